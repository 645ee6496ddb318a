"""On-policy distillation: the student samples, live teachers on other tokenizers score its text.

- the seam: a completion the student produced (its own token ids), re-rendered for the teachers, has
  exactly the student's bytes: the student's template renders the rebuilt row back to the student's
  bytes, and the teacher's rendering holds the completion once, with no lost or doubled space, for a
  SentencePiece and a byte-level BPE student, with a teacher template other than the student's;
- an on-policy batch trains only the generated tokens (labels, KL and chunk targets), generation stops
  at EOS and leaves the student in train mode;
- DistillationTrainer(on_policy=...) runs with each KL variant (forward, reverse, JSD), logs samples,
  and refuses on_policy > 0 without a live teacher.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import ASSETS, MISTRAL_SPM, TEKKEN
from xtok import CrossTokenizerCollator, DistillationTrainer, MultiTeacherLossAggregator, TeacherSpec
from xtok.chat import render_chat
from xtok.collate import fill_online_targets
from xtok.losses import CrossTokenizerKLLoss, TeacherLoss
from xtok.onpolicy import completion_row, generate, on_policy_batch, split_prompt
from xtok.tokens import load_tokenizer

STUDENT_TPL = ("{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
               "{% else %} {{ m['content'] }}</s>{% endif %}{% endfor %}")
TEACHER_TPL = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
               "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def tiny_llama(vocab: int, seed: int, hidden: int = 24, eos=None, bos=None):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                      initializer_range=0.5, tie_word_embeddings=False, eos_token_id=eos, bos_token_id=bos)
    return LlamaForCausalLM(cfg)


GPT2_TPL = ("{% for m in messages %}{% if m['role'] == 'user' %}User: {{ m['content'] }}\n{% else %}Assistant: "
            "{{ m['content'] }}<|endoftext|>{% endif %}{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}")
# SentencePiece (dummy prefix) and byte-level BPE students, each with a template whose end-of-turn is a
# special token of its own vocabulary and that puts a space between the prompt and the content
STUDENTS = [(MISTRAL_SPM, STUDENT_TPL), (TEKKEN, STUDENT_TPL)]
if (ASSETS / "tokenizers" / "gpt2").exists():
    STUDENTS.append((str(ASSETS / "tokenizers" / "gpt2"), GPT2_TPL))


@pytest.fixture(scope="module")
def W(tmp_path_factory):
    """W files teacher (Tekken) -> every student tokenizer of STUDENTS, and SentencePiece -> Tekken."""
    from projection_tools.build import build_projection

    d = tmp_path_factory.mktemp("onpolicy")
    out = {}
    for spec, _ in STUDENTS:
        teacher = MISTRAL_SPM if spec == TEKKEN else TEKKEN
        p = d / f"W_{abs(hash(spec))}.safetensors"
        build_projection(load_tokenizer(teacher), load_tokenizer(spec), progress=False).save(p)
        out[spec] = (teacher, str(p))
    return out


CONTENTS = ["The answer is 42, of course.", " leading space kept?", "Line one.\n  indented line two.", "ünïcödé ✓ 你好"]


@pytest.mark.parametrize("student_spec,student_tpl", STUDENTS)
def test_seam_reproduces_the_students_bytes(student_spec, student_tpl, W):
    """A completion = the student's own ids for an assistant content (what a perfect student writes after
    its generation prompt), and random token ids (what an untrained one writes): the row rebuilt for the
    teachers renders back (student template) to the student's bytes, and the teacher's rendering (another
    template) holds the completion's text exactly once, with no lost or doubled space at the seam."""
    teacher_spec, wpath = W[student_spec]
    teacher = TeacherSpec("t", teacher_spec, projection=wpath, model=tiny_llama(8, 0), chat_template=TEACHER_TPL)
    col = CrossTokenizerCollator(student_spec, [teacher], chat_template=student_tpl, max_length=512, validate=False)
    student = col.student
    rng = np.random.default_rng(0)
    checked = 0
    for content in CONTENTS:
        msgs = [{"role": "user", "content": "Tell me something."}, {"role": "assistant", "content": content}]
        p = split_prompt(col, {"messages": msgs})
        full = np.asarray(render_chat(student, msgs, template=student_tpl).ids)
        assert np.array_equal(full[: len(p.ids)], p.ids)  # the generation prompt is a prefix of the full render
        natural = full[len(p.ids):]
        text_ids = np.flatnonzero(~student.token_bytes.is_special[np.arange(student.vocab_size)])
        random_ids = rng.choice(text_ids, 6)
        for comp in (natural, random_ids):
            row, exact = completion_row(col, p, comp)
            got = row["messages"][-1]["content"].encode("utf-8")
            # (a byte-level completion may end inside a UTF-8 character: the teachers read text, U+FFFD there)
            produced = student.decode_bytes(comp).decode("utf-8", errors="replace").encode("utf-8")
            if comp is natural:  # what the student's template rendered: reproduced exactly, content recovered
                assert exact, (content, comp)
                assert got == content.strip().encode("utf-8") or got == content.encode("utf-8"), (got, content)
            if exact:
                want = student.decode_bytes(np.concatenate([p.ids, comp]))
                again = student.decode_bytes(render_chat(student, row["messages"], template=student_tpl).ids)
                assert again.startswith(want.rstrip()), (want, again)
            # nothing lost, nothing doubled: the content is what the student produced, less at most the one
            # leading space the template puts before it (or less outer whitespace the template strips)
            assert got in (produced, produced[1:] if produced.startswith(b" ") else produced, produced.strip())
            t_text = render_chat(teacher.tok, row["messages"], template=TEACHER_TPL).text.encode("utf-8")
            assert t_text.count(got) >= 1 and b"<|assistant|>\n" + got in t_text, (t_text, got)
            checked += 1
    # text rows: the teacher's text = the original prefix + exactly the completion's bytes
    text = "First line of a story.\nSecond  line, with two spaces and ünïcödé."
    p = split_prompt(col, {"text": text}, prompt_fraction=0.5)
    ids, _ = student.encode_with_offsets(text)
    n = len(p.ids) - (1 if (col.add_special_tokens and student.bos_id is not None) else 0)
    comp = ids[n:]
    row, exact = completion_row(col, p, comp)
    assert exact and row["text"] == text, (row["text"], text)
    assert checked == 2 * len(CONTENTS)


@pytest.fixture(scope="module")
def live(W):
    teacher_spec, wpath = W[MISTRAL_SPM]
    model = tiny_llama(load_tokenizer(teacher_spec).vocab_size, seed=3).eval()
    return teacher_spec, wpath, model


def _rows(n=8):
    text = ("The quick brown fox jumps over the lazy dog. A stitch in time saves nine. Every cloud has a silver "
            "lining, and every lining a cloud.")
    rows = [{"messages": [{"role": "user", "content": f"Say something about {w}."},
                          {"role": "assistant", "content": text[i * 7: i * 7 + 60]}]}
            for i, w in enumerate(["foxes", "dogs", "time", "clouds"])]
    rows += [{"text": text[i * 5:]} for i in range(n - len(rows))]
    return rows


def test_on_policy_batch_trains_only_generated_tokens(live):
    teacher_spec, wpath, model = live
    col = CrossTokenizerCollator(MISTRAL_SPM, [TeacherSpec("t", teacher_spec, projection=wpath, model=model, top_k=8,
                                                           chat_template=TEACHER_TPL)],
                                 chat_template=STUDENT_TPL, max_length=256)
    student_model = tiny_llama(32000, seed=5, hidden=32, eos=2, bos=1).train()
    rows = _rows()
    prompts = [split_prompt(col, r) for r in rows]
    assert all(p is not None for p in prompts)
    comps = generate(student_model, prompts, pad_id=0, eos_id=2, max_new_tokens=10, temperature=1.0, top_p=0.9,
                     generator_seed=0)
    assert student_model.training  # back in train mode
    assert all(1 <= len(c) <= 10 for c in comps)
    assert all(2 not in c[:-1].tolist() for c in comps)  # stopped at the first EOS
    # greedy with EOS made certain: every completion is exactly [EOS]
    with torch.no_grad():
        student_model.lm_head.weight[2] += 1e4
    eos_only = generate(student_model, prompts[:2], pad_id=0, eos_id=2, max_new_tokens=5, temperature=0.0)
    assert [c.tolist() for c in eos_only] == [[2], [2]]
    batch = on_policy_batch(col, prompts, comps)
    st = batch["stats"]["onpolicy"]
    assert st["examples"] == len(rows) and st["generated_tokens"] == sum(len(c) for c in comps)
    # an untrained student's text may not re-render exactly after its chat template's seam (e.g. no space
    # where the template puts one): counted, and only chat rows can have it
    assert 0 <= st["seam_mismatch"] <= sum("messages" in r for r in rows)
    fill_online_targets(batch, col.teachers, col.student)
    labels, tb = batch["labels"], batch["teachers"]["t"]
    for i, (p, c) in enumerate(zip(prompts, comps)):
        n_p, n = len(p.ids), len(p.ids) + len(c)
        trained = (labels[i] != -100).nonzero().flatten().tolist()
        assert trained == list(range(n_p, n))  # labels on the completion only
        assert torch.equal(batch["input_ids"][i, :n], torch.as_tensor(np.concatenate([p.ids, c])))
        pos = tb["positions"][i][tb["mask"][i]] + 1  # the token each KL target predicts
        assert ((pos >= n_p) & (pos < n)).all()
        spans = tb["chunk_spans"][i][tb["chunk_mask"][i]]
        assert ((spans[:, 0] >= n_p) & (spans[:, 1] <= n)).all()
    assert int(tb["mask"].sum()) > 0
    agg = MultiTeacherLossAggregator({"t": TeacherLoss(weight=1.0, chunk_weight=0.5)}, sft_weight=1.0)
    logits = student_model(input_ids=batch["input_ids"]).logits
    loss, logs = agg(logits, batch, sft=False)
    assert torch.isfinite(loss) and "sft" not in logs
    loss.backward()


@pytest.mark.parametrize("variant", ["forward", "reverse", "jsd"])
def test_trainer_on_policy_runs_each_variant(live, tmp_path, variant):
    from transformers import TrainingArguments

    teacher_spec, wpath, model = live
    col = CrossTokenizerCollator(MISTRAL_SPM, [TeacherSpec("t", teacher_spec, projection=wpath, model=model, top_k=8,
                                                           chat_template=TEACHER_TPL)],
                                 chat_template=STUDENT_TPL, max_length=128)
    agg = MultiTeacherLossAggregator({"t": TeacherLoss(weight=1.0, chunk_weight=0.2,
                                                       kl=CrossTokenizerKLLoss(variant=variant))}, sft_weight=0.5)
    student = tiny_llama(32000, seed=7, hidden=32, eos=2, bos=1).train()
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, learning_rate=1e-3,
                             report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, logging_steps=1)
    tr = DistillationTrainer(model=student, args=args, train_dataset=_rows(), data_collator=col, aggregator=agg,
                             on_policy=1.0, max_new_tokens=8, log_samples_every=1, log_samples=2)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    tr.train()
    logs = [h for h in tr.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(np.isfinite(h["loss"]) for h in logs)
    assert all("sft" not in h and "kl/t" in h for h in logs)  # every step on-policy: no SFT term
    assert len(tr.samples) == 4 and all(s["completion"] is not None for s in tr.samples)
    assert any(not torch.equal(before[k], v) for k, v in student.state_dict().items())
    assert student.training


def test_on_policy_needs_a_live_teacher(tmp_path, W):
    from transformers import TrainingArguments

    from xtok.losses import MultiTeacherLossAggregator as Agg

    teacher_spec, wpath = W[MISTRAL_SPM]
    col = CrossTokenizerCollator(MISTRAL_SPM, [TeacherSpec("s", teacher_spec, {}, wpath)], validate=False)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True)
    with pytest.raises(ValueError, match="needs a live teacher .* stored teachers cannot score"):
        DistillationTrainer(model=tiny_llama(32000, 0), args=args, train_dataset=_rows(), data_collator=col,
                            aggregator=Agg({"s": 1.0}), on_policy=0.5)
    with pytest.raises(ValueError, match="on_policy must be in"):
        DistillationTrainer(model=tiny_llama(32000, 0), args=args, train_dataset=_rows(), data_collator=col,
                            aggregator=Agg({"s": 1.0}), on_policy=1.5)
