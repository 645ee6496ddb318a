"""Live (online) teachers and `DistillationTrainer`.

- online == offline: a teacher through `xtok extract` + store and the same model online give the same
  plan (positions, chunks) and the same targets (ids equal, probabilities within the store's
  quantisation, chunk log-probs within its float16), for text rows and for chat rows rendered with a
  teacher template that differs from the student's;
- padded vocabularies: a teacher / student whose output layer has more rows than its tokenizer has ids
  gives exactly the targets / loss of the unpadded one; fewer rows is a clear error naming both numbers;
- DistillationTrainer: trains (the loss on a fixed batch goes down), logs every component per teacher,
  keeps the teacher in eval mode and out of the optimizer and checkpoints, keeps the collator's columns
  under remove_unused_columns, is exact under gradient accumulation, and resumes from a checkpoint to
  the parameters of an uninterrupted run.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import ASSETS, MISTRAL_SPM, TEKKEN
from xtok import CrossTokenizerCollator, DistillationTrainer, MultiTeacherLossAggregator, TeacherSpec
from xtok.collate import fill_online_targets
from xtok.losses import TeacherLoss
from xtok.tokens import load_tokenizer

TEACHER_TPL = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
               "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
STUDENT_TPL = ("{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
               "{% else %} {{ m['content'] }}</s>{% endif %}{% endfor %}")


def tiny_llama(vocab: int, seed: int, hidden: int = 24, layers: int = 1):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                      initializer_range=0.5, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def _texts(shakespeare_text, n):
    lines = [x for x in shakespeare_text.split("\n\n") if 150 < len(x) < 500]
    return [lines[3 * i] for i in range(n)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, shakespeare_text):
    """A tiny random teacher over the Tekken vocabulary (an HF folder), its `xtok extract` stores of text
    rows and of chat rows (teacher template), and W Tekken -> SentencePiece 32k."""
    from click.testing import CliRunner

    from projection_tools.build import build_projection
    from xtok.cli import main

    d = tmp_path_factory.mktemp("online")
    texts = _texts(shakespeare_text, 12)
    text_rows = [{"id": f"t{i}", "text": t} for i, t in enumerate(texts)]
    chat_rows = [{"id": f"c{i}", "messages": [{"role": "user", "content": texts[i][:80]},
                                              {"role": "assistant", "content": texts[i][80:]}]} for i in range(6)]
    tok = load_tokenizer(TEKKEN)
    model = tiny_llama(tok.vocab_size, seed=3)
    model.save_pretrained(d / "teacher")
    (d / "teacher.jinja").write_text(TEACHER_TPL, encoding="utf-8")
    for name, rows, extra in (("text", text_rows, []), ("chat", chat_rows, ["--chat-template", str(d / "teacher.jinja"),
                                                                          "--targets", "all"])):
        with open(d / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        res = CliRunner().invoke(main, ["extract", "-m", str(d / "teacher"), "--tokenizer", TEKKEN, "-d",
                                        str(d / f"{name}.jsonl"), "-o", str(d / f"{name}_store"), "-k", "16",
                                        "--device", "cpu", "--quiet"] + extra)
        assert res.exit_code == 0, res.output
    build_projection(tok, load_tokenizer(MISTRAL_SPM), progress=False).save(d / "W.safetensors")
    return d, model, text_rows, chat_rows


def _as_dict(ids, probs):
    return {int(i): float(p) for i, p in zip(ids.tolist(), probs.tolist()) if p > 0}


def assert_online_equals_offline(b_off, b_on, name_off, name_on, store=None, keys=None):
    a, b = b_off["teachers"][name_off], b_on["teachers"][name_on]
    for k in ("positions", "mask", "chunk_spans", "chunk_mask", "present"):
        assert torch.equal(a[k], b[k]), k
    assert a["mask"].sum() > 50 and a["chunk_mask"].sum() > 20
    n = 0
    for i, p in zip(*a["mask"].nonzero(as_tuple=True)):
        da, db = _as_dict(a["target_ids"][i, p], a["target_probs"][i, p]), _as_dict(b["target_ids"][i, p],
                                                                                      b["target_probs"][i, p])
        assert set(da) == set(db), (int(i), int(p))
        for s, q in db.items():  # the store's sqrt grid: |d log p| <= h sqrt(d) + h^2 (d <= 20 nats), + renorm
            assert abs(np.log(da[s]) - np.log(q)) <= 0.1, (s, da[s], q)
        n += 1
    assert n == int(a["mask"].sum())
    m = a["mask"]
    # tail = r (the exact mass outside the top-k, the same on both sides) + the top-k mass W maps nowhere
    # (special tokens): that second part is quantised in the store, so it may differ by the grid's error
    r = torch.zeros_like(a["tail_mass"])
    from xtok.store import TeacherStore

    st = TeacherStore(store)
    for i, key in enumerate(keys):
        ex = st[key]
        row_of = {int(p): j for j, p in enumerate(ex.positions)}
        tp = b["teacher_positions"][i]
        for j in range(int(m[i].sum())):
            r[i, j] = float(ex.tail_mass[row_of[int(tp[j])]])
    unmapped = (b["tail_mass"] - r).clamp_min(0)
    assert ((a["tail_mass"] - b["tail_mass"]).abs()[m] <= 2e-4 + 0.1 * unmapped[m]).all()
    cm = a["chunk_mask"]
    # the store keeps each token's log-prob as float16: rounding <= 2^-11 relative per token
    assert torch.allclose(a["chunk_teacher_logprob"][cm], b["chunk_teacher_logprob"][cm], rtol=2e-3, atol=2e-2)
    assert a["temperature"] == b["temperature"] == 1.0


def test_online_equals_offline_text_rows(setup):
    d, model, text_rows, _ = setup
    off = CrossTokenizerCollator(MISTRAL_SPM, [TeacherSpec("t", TEKKEN, str(d / "text_store"), str(d / "W.safetensors"))],
                                 max_length=200)
    on = CrossTokenizerCollator(MISTRAL_SPM, [TeacherSpec("t", TEKKEN, projection=str(d / "W.safetensors"),
                                                          model=model, top_k=16)], max_length=200)
    b_off, b_on = off(text_rows[:6]), on(text_rows[:6])
    assert b_on["teachers"]["t"]["online"] is True and "target_ids" not in b_on["teachers"]["t"]
    fill_online_targets(b_on, on.teachers, on.student)
    assert_online_equals_offline(b_off, b_on, "t", "t", d / "text_store", [r["id"] for r in text_rows[:6]])
    assert b_on["stats"]["t"]["present"] == 6 and b_on["stats"]["t"]["targets"] == int(b_on["teachers"]["t"]["mask"].sum())


def test_online_equals_offline_chat_rows_other_templates(setup):
    """Chat rows: the teacher renders its own template (ChatML-like), the student another ([INST]); the
    online teacher's view equals what `xtok extract --chat-template` stored."""
    d, model, _, chat_rows = setup
    kw = dict(max_length=300, chat_template=STUDENT_TPL)
    off = CrossTokenizerCollator(MISTRAL_SPM, [TeacherSpec("t", TEKKEN, str(d / "chat_store"), str(d / "W.safetensors"))],
                                 **kw)
    on = CrossTokenizerCollator(MISTRAL_SPM, [TeacherSpec("t", TEKKEN, projection=str(d / "W.safetensors"), model=model,
                                                          top_k=16, chat_template=TEACHER_TPL)], **kw)
    b_off, b_on = off(chat_rows), on(chat_rows)
    fill_online_targets(b_on, on.teachers, on.student)
    assert_online_equals_offline(b_off, b_on, "t", "t", d / "chat_store", [r["id"] for r in chat_rows])
    # the teacher really read its own template: its ids decode to the teacher rendering
    t_ids = b_on["teachers"]["t"]["teacher_input_ids"][0][b_on["teachers"]["t"]["teacher_attention_mask"][0].bool()]
    assert "<|assistant|>" in load_tokenizer(TEKKEN).decode(t_ids.tolist())
    assert "[INST]" in load_tokenizer(MISTRAL_SPM).decode(b_on["input_ids"][0].tolist())


def test_online_spec_errors_and_pickling(setup):
    import pickle

    d, model, text_rows, _ = setup
    with pytest.raises(ValueError, match="exactly one of store= .* or model="):
        TeacherSpec("t", TEKKEN, projection=str(d / "W.safetensors"))
    with pytest.raises(ValueError, match="exactly one of"):
        TeacherSpec("t", TEKKEN, str(d / "text_store"), str(d / "W.safetensors"), model=model)
    with pytest.raises(ValueError, match="projection= is required"):
        CrossTokenizerCollator(MISTRAL_SPM, [TeacherSpec("t", TEKKEN, model=model)])
    spec = TeacherSpec("t", TEKKEN, projection=str(d / "W.safetensors"), model=model, top_k=16)
    col = CrossTokenizerCollator(MISTRAL_SPM, [spec], max_length=64)
    blob = pickle.dumps(col)  # what DataLoader workers get: no model weights
    assert len(blob) < 200_000, len(blob)
    worker = pickle.loads(blob)
    assert worker.teachers[0].online and not isinstance(worker.teachers[0].model, torch.nn.Module)
    b = worker(text_rows[:2])  # the worker side needs no model
    assert b["teachers"]["t"]["teacher_input_ids"].shape[0] == 2


def _pad_rows(model, extra: int, seed: int):
    """A copy of `model` whose output (and input) embedding has `extra` more rows (random), the others equal."""
    from transformers import LlamaForCausalLM

    cfg = model.config.to_dict()
    cfg["vocab_size"] = model.config.vocab_size + extra
    big = LlamaForCausalLM(type(model.config)(**cfg)).eval()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        if k in sd:
            sd[k] = torch.cat([sd[k], 5.0 * torch.randn(extra, sd[k].shape[1], generator=g)])
    big.load_state_dict(sd, strict=False)
    if model.config.tie_word_embeddings:
        big.tie_weights()
    return big


def test_padded_teacher_vocabulary(setup):
    """A teacher whose output layer has more rows than its tokenizer (embedding padding, e.g. 152,064 rows
    for 151,936 ids) gives exactly the targets of the unpadded one (padded rows get no mass, even with
    large logits there); fewer rows than ids is a clear error naming both numbers."""
    d, model, text_rows, _ = setup
    big = _pad_rows(model, 64, seed=1)
    outs = []
    for m in (model, big):
        col = CrossTokenizerCollator(MISTRAL_SPM, [TeacherSpec("t", TEKKEN, projection=str(d / "W.safetensors"),
                                                               model=m, top_k=16)], max_length=120)
        outs.append(fill_online_targets(col(text_rows[:3]), col.teachers, col.student)["teachers"]["t"])
    for k in ("target_ids", "target_probs", "tail_mass", "chunk_teacher_logprob"):
        assert torch.allclose(outs[0][k].float(), outs[1][k].float(), atol=1e-6), k
    small = tiny_llama(1000, seed=0)
    col = CrossTokenizerCollator(MISTRAL_SPM, [TeacherSpec("t", TEKKEN, projection=str(d / "W.safetensors"),
                                                           model=small)], max_length=64)
    with pytest.raises(ValueError, match=r"has 1000 rows but its tokenizer has 131072 ids"):
        fill_online_targets(col(text_rows[:1]), col.teachers, col.student)


def test_padded_student_vocabulary(setup):
    """A student whose output layer has more rows than its tokenizer: the padded rows take no mass in
    any loss term (the loss equals the unpadded student's, whatever their logits); fewer rows is an error."""
    d, _, text_rows, _ = setup
    col = CrossTokenizerCollator(MISTRAL_SPM, [TeacherSpec("t", TEKKEN, str(d / "text_store"), str(d / "W.safetensors"))],
                                 max_length=120)
    batch = col(text_rows[:3])
    agg = MultiTeacherLossAggregator({"t": TeacherLoss(weight=1.0, chunk_weight=0.5)}, sft_weight=0.5)
    V = load_tokenizer(MISTRAL_SPM).vocab_size
    torch.manual_seed(0)
    logits = torch.randn(*batch["input_ids"].shape, V, dtype=torch.float64)
    padded = torch.cat([logits, 8.0 + torch.randn(*logits.shape[:2], 64, dtype=torch.float64)], -1)
    base, _ = agg(logits, batch)
    got, _ = agg(padded, batch)
    assert torch.allclose(base, got, rtol=1e-10), (float(base), float(got))
    with pytest.raises(ValueError, match=rf"31000 .* {V}"):
        agg(logits[..., :31000], batch)


# ------------------------------------------------------------------------------------------
# DistillationTrainer
# ------------------------------------------------------------------------------------------


def _trainer(setup, out, *, steps=4, batch=2, accum=1, online=True, seed=0, student=None, **kw):
    from transformers import TrainingArguments

    d, model, text_rows, _ = setup
    teachers = [TeacherSpec("store", TEKKEN, str(d / "text_store"), str(d / "W.safetensors"))]
    if online:
        teachers.append(TeacherSpec("live", TEKKEN, projection=str(d / "W.safetensors"), model=model, top_k=16))
    col = CrossTokenizerCollator(MISTRAL_SPM, teachers, max_length=96)
    weights = {"store": TeacherLoss(weight=1.0, chunk_weight=0.2)}
    if online:
        weights["live"] = TeacherLoss(weight=1.0, chunk_weight=0.2)
    agg = MultiTeacherLossAggregator(weights, sft_weight=0.3)
    if student is None:
        student = tiny_llama(32000, seed=seed + 11, hidden=32)
        student.train()
    kw.setdefault("save_strategy", "no")
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=batch, gradient_accumulation_steps=accum,
                             max_steps=steps, report_to=[], use_cpu=True, seed=seed, data_seed=seed,
                             dataloader_num_workers=0, disable_tqdm=True, **kw)
    return DistillationTrainer(model=student, args=args, train_dataset=text_rows, data_collator=col, aggregator=agg)


def test_trainer_trains_logs_and_keeps_the_teacher_out(setup, tmp_path):
    d, model, text_rows, _ = setup
    tr = _trainer(setup, tmp_path / "run", steps=8, learning_rate=3e-3, logging_steps=4)
    fixed = tr.data_collator(text_rows[:4])
    fixed = fill_online_targets(fixed, tr.online_teachers, tr.collator.student)

    def fixed_loss():
        with torch.no_grad():
            logits = tr.model(input_ids=fixed["input_ids"], attention_mask=fixed["attention_mask"]).logits
            return float(tr.aggregator(logits, fixed)[0])

    before = fixed_loss()
    teacher_before = {k: v.clone() for k, v in model.state_dict().items()}
    tr.train()
    after = fixed_loss()
    assert np.isfinite(before) and np.isfinite(after) and after < before - 1e-3, (before, after)
    logs = [h for h in tr.state.log_history if "loss" in h and "sft" in h]
    assert len(logs) == 2
    for h in logs:
        for k in ("sft", "kl/store", "kl/live", "chunk/store", "chunk/live", "kl_per_position/live", "present/store",
                  "present/live", "coverage/store", "coverage/live"):
            assert k in h and np.isfinite(h[k]), (k, h)
        assert h["present/live"] == 1.0 and 0 < h["coverage/live"] <= 1.0
    # the teacher: eval mode, no gradients, unchanged, not among the optimised parameters
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in teacher_before.items())
    opt_ids = {id(p) for g in tr.optimizer.param_groups for p in g["params"]}
    assert not opt_ids & {id(p) for p in model.parameters()}
    assert opt_ids == {id(p) for p in tr.model.parameters() if p.requires_grad}


def test_trainer_keeps_collator_columns_with_remove_unused_columns(setup, tmp_path):
    """remove_unused_columns=True (the default) drops dataset columns the model's forward does not take;
    the collator's text/id columns survive (a datasets.Dataset with an extra column, which is dropped)."""
    import datasets

    d, _, text_rows, _ = setup
    ds = datasets.Dataset.from_list([dict(r, junk=i) for i, r in enumerate(text_rows)])
    tr = _trainer(setup, tmp_path / "cols", steps=1, online=False)
    tr.train_dataset = ds
    assert tr.args.remove_unused_columns
    batch = next(iter(tr.get_train_dataloader()))
    assert batch["teachers"]["store"]["present"].all()  # keys from the 'id' column found the store's examples
    tr.train()


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_gradient_accumulation_equals_one_big_batch(setup, tmp_path):
    """One SGD step over 2 micro-batches of 2 equals one step over the batch of 4 (the loss is normalised
    by the trained tokens of all accumulated micro-batches: num_items_in_batch)."""
    kw = dict(steps=1, learning_rate=0.5, optim="sgd", lr_scheduler_type="constant", weight_decay=0.0,
              max_grad_norm=1e9)
    a = _trainer(setup, tmp_path / "a", batch=4, accum=1, **kw)
    b = _trainer(setup, tmp_path / "b", batch=2, accum=2, **kw)
    p0 = _params(a.model)
    assert all(torch.equal(v, b.model.state_dict()[k]) for k, v in p0.items())
    a.train()
    b.train()
    pa, pb = _params(a.model), _params(b.model)
    moved = max(float((pa[k] - p0[k]).abs().max()) for k in pa)
    assert moved > 1e-4
    for k in pa:
        assert torch.allclose(pa[k], pb[k], rtol=1e-4, atol=1e-6), (k, float((pa[k] - pb[k]).abs().max()))


def test_resume_from_checkpoint_equals_uninterrupted(setup, tmp_path):
    """Train 4 steps saving at step 2; a new trainer resumed from that checkpoint ends with the parameters
    of the uninterrupted run. The checkpoint holds the student only."""
    from safetensors.torch import load_file

    kw = dict(steps=4, learning_rate=3e-3, save_strategy="steps", save_steps=2)
    full = _trainer(setup, tmp_path / "full", **kw)
    full.train()
    ref = _params(full.model)
    from transformers import TrainerCallback

    class StopAt2(TrainerCallback):  # the run is cut off after its step-2 checkpoint
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 2:
                control.should_training_stop = True

    part = _trainer(setup, tmp_path / "part", **kw)
    part.add_callback(StopAt2())
    part.train()
    ck = tmp_path / "part" / "checkpoint-2"
    assert ck.is_dir()
    saved = load_file(str(ck / "model.safetensors"))
    assert set(saved) <= set(part.model.state_dict()) and len(saved) >= len(part.model.state_dict()) - 1
    resumed = _trainer(setup, tmp_path / "part", **kw)
    resumed.train(resume_from_checkpoint=str(ck))
    got = _params(resumed.model)
    for k in ref:
        assert torch.allclose(ref[k], got[k], rtol=1e-5, atol=1e-7), k


@pytest.mark.skipif(not (ASSETS / "models" / "stories260K").is_dir(), reason="../shared/assets/models/stories260K absent")
def test_trainer_with_a_real_pretrained_online_teacher(tmp_path):
    """stories260K (a real pretrained tiny Llama, its own 512-token SentencePiece) teaches a SentencePiece-32k
    student online through DistillationTrainer: W built for the pair, loss finite and lower at the end."""
    from transformers import AutoModelForCausalLM, TrainingArguments

    from projection_tools.build import build_projection

    mdir = ASSETS / "models" / "stories260K"
    teacher = AutoModelForCausalLM.from_pretrained(mdir).eval()
    t_tok, s_tok = load_tokenizer(str(mdir)), load_tokenizer(MISTRAL_SPM)
    build_projection(t_tok, s_tok, progress=False).save(tmp_path / "W.safetensors")
    text = (ASSETS / "corpora" / "tinystories_sample.txt").read_text(encoding="utf-8")
    stories = [s.strip() for s in text.split("<|endoftext|>") if s.strip()]
    rows = [{"text": s} for s in stories for _ in range(4)]
    col = CrossTokenizerCollator(MISTRAL_SPM, [TeacherSpec("stories", str(mdir), projection=str(tmp_path / "W.safetensors"),
                                                           model=teacher, top_k=16)], max_length=128)
    agg = MultiTeacherLossAggregator({"stories": 1.0}, sft_weight=0.2)
    student = tiny_llama(32000, seed=5, hidden=32).train()
    args = TrainingArguments(output_dir=str(tmp_path / "o"), per_device_train_batch_size=2, max_steps=10,
                             learning_rate=5e-3, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
                             logging_steps=5)
    tr = DistillationTrainer(model=student, args=args, train_dataset=rows, data_collator=col, aggregator=agg)
    fixed = fill_online_targets(col(rows[:4]), tr.online_teachers, col.student)
    with torch.no_grad():
        before = float(agg(student(input_ids=fixed["input_ids"]).logits, fixed)[0])
    tr.train()
    with torch.no_grad():
        after = float(agg(student(input_ids=fixed["input_ids"]).logits, fixed)[0])
    assert np.isfinite(after) and after < before, (before, after)
    assert fixed["stats"]["stories"]["present"] == 4 and fixed["stats"]["stories"]["targets"] > 100


def test_hf_trainer_example_runs(tmp_path):
    """examples/hf_trainer_online.py end to end (build-projection and extract through the CLI, a stored and a
    live teacher, DistillationTrainer with a DataLoader worker), a few steps; runs without ../shared/assets
    (a stand-in live teacher) and with them (stories260K)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1")
    r = subprocess.run([sys.executable, str(repo / "examples" / "hf_trainer_online.py"), "--steps", "2", "--rows", "8",
                        "--workdir", str(tmp_path)], capture_output=True, text=True, env=env, timeout=600, cwd=repo)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    import ast

    logs = [ast.literal_eval(line) for line in r.stdout.splitlines() if line.startswith("{'loss'") and "'step'" in line]
    assert len(logs) == 2 and all(np.isfinite(h["loss"]) and "kl/online" in h and "kl/stored" in h for h in logs)
