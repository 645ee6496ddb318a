"""`xtok extract` on tiny real-architecture models (random init, seeded) with real tokenizers: the store
must equal a dense full-softmax float64 reference; chat masks; padded vocab; bad input; resume after
kill -9; sharding."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import MISTRAL_SPM, MISTRAL_SPM_V3, asset
from xtok.chat import default_template
from xtok.cli import main as cli
from xtok.extract import ExtractConfig, ExtractError, extract, tail_uniforms, teacher_targets
from xtok.store import QSTEP, TeacherStore, example_key
from xtok.tokens import load_tokenizer

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Once upon a time there was a little boy named Ben. Ben loved to explore the world around him.",
    "Les élèves étudient la physique quantique à l'université.",
    "def add(a, b):\n    return a + b\n",
    "Zebras 🦓 and giraffes live in Africa; 42 of them were counted.",
    "Short.",
]


def _make_model(path: Path, vocab: int, seed: int = 0, pad_boost: bool = False) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                      tie_word_embeddings=False)
    m = LlamaForCausalLM(cfg)
    with torch.no_grad():
        m.lm_head.weight.mul_(60.0)  # peaked distributions: the top-k holds a real share of the mass
        if pad_boost:  # padded rows would win every top-1 if they were not masked
            m.lm_head.weight[32000:] = m.lm_head.weight[:1].abs() * 200
    m.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def spm():
    return load_tokenizer(MISTRAL_SPM)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return _make_model(tmp_path_factory.mktemp("m") / "llama", 32000)


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _dense_reference(model_dir: Path, ids: np.ndarray, vocab: int, temperature: float = 1.0,
                     dtype=torch.float32) -> np.ndarray:
    """float64 log-softmax of the full logits of the model's own forward (its logit scaling / softcap
    included) divided by the temperature, over the tokenizer's vocab."""
    from transformers import AutoModelForCausalLM

    m = _dense_reference.cache.get((str(model_dir), dtype))
    if m is None:
        m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
        _dense_reference.cache[(str(model_dir), dtype)] = m
    with torch.no_grad():
        logits = m(torch.as_tensor(ids)[None]).logits[0].double()[:, :vocab]
    return torch.log_softmax(logits / temperature, -1).numpy()


_dense_reference.cache = {}


def _check_against_reference(ex, ref_lp, word_start, k, m, seed=0):
    P = ex.positions.shape[0]
    ref = ref_lp[ex.positions]                              # [P, V] float64
    order = np.argsort(-ref, axis=1, kind="stable")[:, :k]
    top = np.take_along_axis(ref, order, 1)
    # ids: the reference top-k (order may swap only between near-equal entries)
    same = ex.topk_ids == order
    gap = np.abs(np.take_along_axis(ref, ex.topk_ids.astype(np.int64), 1) - top)
    assert (same | (gap < 1e-9)).all()
    # tail mass: exact
    tail_ref = 1.0 - np.exp(top).sum(1)
    np.testing.assert_allclose(ex.tail_mass, tail_ref, rtol=2e-5, atol=1e-6)
    # log-probs: within the documented quantisation bound
    d = top[:, :1] - top
    bound = 2 * (QSTEP * np.sqrt(d) + QSTEP ** 2) + 2 * QSTEP * np.sqrt(d.max(1, keepdims=True)) + 1e-4
    assert (np.abs(ex.topk_logprobs - top) <= bound).all()
    p = np.concatenate([np.exp(top), tail_ref[:, None]], 1)
    q = np.concatenate([np.exp(ex.topk_logprobs.astype(np.float64)), ex.tail_mass[:, None].astype(np.float64)], 1)
    kl = (p * (np.log(np.maximum(p, 1e-300)) - np.log(np.maximum(q, 1e-300)))).sum(1)
    assert kl.max() < 2e-3
    # realised next token and word-start mass
    nxt = ex.input_ids[ex.positions + 1].astype(np.int64)
    np.testing.assert_allclose(ex.target_logprob, ref[np.arange(P), nxt], rtol=1e-3, atol=1e-3)
    ws_ref = np.exp(ref[:, word_start]).sum(1)
    np.testing.assert_allclose(ex.word_start_mass, ws_ref, atol=1e-3)
    if m:
        # independent inverse-CDF draw in float64 from the same uniforms over the tail
        u = tail_uniforms(ex.key, seed, P, m)
        tp = np.exp(ref)
        np.put_along_axis(tp, order, 0.0, 1)
        cdf = np.cumsum(tp, 1)
        want = np.stack([np.searchsorted(cdf[i], u[i] * cdf[i, -1], side="right") for i in range(P)])
        assert not np.isin(ex.tail_ids, order).any() if P == 1 else True
        for i in range(P):
            assert not np.isin(ex.tail_ids[i], order[i]).any()
        assert (ex.tail_ids == want).mean() > 0.97


def test_store_equals_dense_float64_reference(tmp_path, model_dir, spm):
    ds = _jsonl(tmp_path / "d.jsonl", [{"text": t} for t in TEXTS])
    out = tmp_path / "store"
    res = extract(ExtractConfig(model=str(model_dir), tokenizer=MISTRAL_SPM, dataset=str(ds), output=str(out),
                                top_k=8, sample_tail=5, token_budget=64, shard_size=4, chunk_mb=1, progress=False))
    st = TeacherStore(out)
    assert len(st) == len(TEXTS) == res["manifest"]["n_examples"]
    man = st.manifest
    assert man["tokenizer_hash"] == spm.content_hash and man["top_k"] == 8 and man["sample_tail"] == 5
    assert man["temperature"] == 1.0 and man["model"] == str(model_dir)
    for t in TEXTS:
        ex = st[__import__("hashlib").sha256(t.encode()).hexdigest()]
        want_ids = np.concatenate([[spm.bos_id], spm.encode(t)])
        assert np.array_equal(ex.input_ids, want_ids) and ex.text == t
        assert np.array_equal(ex.positions, np.arange(len(want_ids) - 1))
        _check_against_reference(ex, _dense_reference(model_dir, want_ids, 32000), spm.token_bytes.word_start, 8, 5)


def test_teacher_targets_chunks_temperature_top_p_padding():
    """The fused chunked kernel alone vs float64 dense softmax: padded rows excluded, temperature, top-p."""
    g = torch.Generator().manual_seed(0)
    N, D, V, Vm, k = 37, 16, 3000, 3072, 10
    h = torch.randn(N, D, generator=g)
    w = torch.randn(Vm, D, generator=g) * 2
    w[V:] = 50.0  # padding rows: would dominate if not excluded
    ws = torch.rand(V, generator=g) < 0.3
    tgt = torch.randint(0, V, (N,), generator=g)
    for T, top_p in ((1.0, None), (0.7, 0.5)):
        r = teacher_targets(h, w, tgt, vocab_size=V, top_k=k, word_start=ws, temperature=T, top_p=top_p,
                            chunk_rows=5)
        ref = torch.log_softmax((h.double() @ w[:V].double().T) / T, -1).numpy()
        order = np.argsort(-ref, 1)[:, :k]
        top = np.take_along_axis(ref, order, 1)
        nk = r["n_kept"].numpy()
        if top_p is None:
            assert (nk == k).all()
        else:
            cum = np.cumsum(np.exp(top), 1)
            want = np.minimum((cum < top_p).sum(1) + 1, k)
            assert np.array_equal(nk, want) and (nk < k).any()
        kept = np.arange(k)[None] < nk[:, None]
        assert np.array_equal(np.where(kept, r["topk_ids"].numpy(), -1), np.where(kept, order, -1))
        assert (r["topk_ids"].numpy() < V).all()
        np.testing.assert_allclose(r["topk_logprobs"].numpy()[kept], top[kept], atol=2e-5)
        np.testing.assert_allclose(r["tail_mass"].numpy(), 1 - (np.exp(top) * kept).sum(1), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(r["target_logprob"].numpy(), ref[np.arange(N), tgt.numpy()], atol=2e-5)
        np.testing.assert_allclose(r["word_start_mass"].numpy(), np.exp(ref[:, ws.numpy()]).sum(1), rtol=3e-5, atol=2e-6)


def test_padded_model_vocab(tmp_path, spm):
    mdir = _make_model(tmp_path / "padded", 32064, seed=1, pad_boost=True)
    ds = _jsonl(tmp_path / "d.jsonl", [{"id": "a", "text": TEXTS[0]}, {"id": "b", "text": TEXTS[3]}])
    extract(ExtractConfig(model=str(mdir), tokenizer=MISTRAL_SPM, dataset=str(ds), output=str(tmp_path / "s"),
                          top_k=4, progress=False))
    st = TeacherStore(tmp_path / "s")
    assert st.keys() == ["a", "b"] and st.manifest["model_vocab_size"] == 32064
    for key in "ab":
        ex = st[key]
        assert ex.topk_ids.max() < 32000
        _check_against_reference(ex, _dense_reference(mdir, ex.input_ids, 32000), spm.token_bytes.word_start, 4, 0)


def _chat_rows():
    return [
        {"id": "c1", "messages": [{"role": "user", "content": "What is two plus two?"},
                                  {"role": "assistant", "content": "Two plus two is four."}]},
        {"id": "c2", "messages": [{"role": "system", "content": "Be brief."},
                                  {"role": "user", "content": "Name a colour."},
                                  {"role": "assistant", "content": "Blue."},
                                  {"role": "user", "content": "Another one?"},
                                  {"role": "assistant", "content": "Green, then."}]},
    ]


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}")


@pytest.fixture(scope="module")
def v3_model_dir(tmp_path_factory):
    return _make_model(tmp_path_factory.mktemp("m3") / "llama", 32768, seed=3)


@pytest.mark.parametrize("template", [
    "v3-builtin-inst",
    "v1-chatml-file"])
def test_chat_assistant_only_targets(tmp_path, request, template):
    """Assistant-only targets: the targeted tokens spell exactly the assistant replies (plus the
    end-of-turn token), never the user/system text; two templates, two tokenizers."""
    if template == "v3-builtin-inst":  # [INST]/[/INST] are control tokens of this tokenizer
        tok_spec, mdir, tpl = MISTRAL_SPM_V3, request.getfixturevalue("v3_model_dir"), None
    else:  # ChatML markers are plain text for this tokenizer
        tok_spec, mdir = MISTRAL_SPM, request.getfixturevalue("model_dir")
        tpl = tmp_path / "chatml.jinja"
        tpl.write_text(CHATML)
    tok = load_tokenizer(tok_spec)
    ds = _jsonl(tmp_path / "chat.jsonl", _chat_rows())
    extract(ExtractConfig(model=str(mdir), tokenizer=tok_spec, dataset=str(ds), output=str(tmp_path / "s"),
                          top_k=4, chat_template=str(tpl) if tpl else None, progress=False))
    st = TeacherStore(tmp_path / "s")
    assert st.manifest["targets"] == "assistant"
    # the template actually used is hashed: here the built-in default (the tokenizer has none) or the file
    used = default_template(tok) if tpl is None else CHATML
    assert tok.chat_template is None
    assert st.manifest["chat_template_hash"] == hashlib.sha256(used.encode()).hexdigest()
    assert st.manifest["chat_template_source"] == ("built-in default" if tpl is None else "--chat-template")
    squash = lambda s: "".join(s.split())  # noqa: E731
    for row in _chat_rows():
        ex = st[row["id"]]
        tgt = ex.input_ids[ex.positions + 1]
        got = squash(tok.decode_bytes(tgt).decode("utf-8"))
        turns = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
        others = [m["content"] for m in row["messages"] if m["role"] != "assistant"]
        if tpl is None:
            assert "[INST]" in tok.special_tokens and tok.token_bytes.is_special[tok.special_tokens["[INST]"]]
            assert got == squash("".join(turns))
            assert (tgt == tok.eos_id).sum() == len(turns)          # each turn's closing </s>
            assert tok.special_tokens["[INST]"] not in tgt
        else:  # a token straddling the content/marker boundary (".<") is part of the turn
            pos = 0
            for t in turns:
                pos = got.index(squash(t), pos) + len(squash(t))
            assert len(got) - len(squash("".join(turns))) <= 2 * len(turns)
            assert "<|im_start|>user" in ex.text
        for u in others:
            assert squash(u) not in got
        _check_against_reference(ex, _dense_reference(mdir, ex.input_ids, tok.vocab_size), tok.token_bytes.word_start,
                                 4, 0)


def test_skips_duplicates_and_shard_split(tmp_path, model_dir):
    rows = [{"text": t} for t in TEXTS] + [{"text": TEXTS[0]}, {"text": "x " * 300}]
    ds = _jsonl(tmp_path / "d.jsonl", rows)
    kw = dict(model=str(model_dir), tokenizer=MISTRAL_SPM, dataset=str(ds), top_k=4, max_length=100, progress=False,
              shard_size=2)
    full = extract(ExtractConfig(output=str(tmp_path / "full"), **kw))
    assert full["stats"]["duplicates"] == 1 and full["stats"]["too_long"] == 1
    assert full["manifest"]["skipped"]["too_long"] == 1
    r0 = extract(ExtractConfig(output=str(tmp_path / "sh"), shard=(0, 2), **kw))
    assert r0["manifest"] is None  # rank 1 still missing: no merged manifest yet
    os.environ["RANK"], os.environ["WORLD_SIZE"] = "1", "2"  # torchrun-style rank detection
    try:
        r1 = extract(ExtractConfig(output=str(tmp_path / "sh"), **kw))
    finally:
        del os.environ["RANK"], os.environ["WORLD_SIZE"]
    assert r1["rank"] == 1 and r1["manifest"] is not None
    a, b = TeacherStore(tmp_path / "full"), TeacherStore(tmp_path / "sh")
    assert sorted(a.keys()) == sorted(b.keys()) and len(set(b.keys())) == len(b) == len(TEXTS)
    for key in a.keys():
        x, y = a[key], b[key]
        assert np.array_equal(x.topk_ids, y.topk_ids) and np.array_equal(x.input_ids, y.input_ids)
        np.testing.assert_allclose(x.tail_mass, y.tail_mass, rtol=1e-5)


def _cli_args(model_dir, ds, out, *extra):
    return ["extract", "--model", str(model_dir), "--tokenizer", MISTRAL_SPM, "--dataset", str(ds), "--output",
            str(out), "-k", "4", "-q", *extra]


def test_bad_input_clear_errors(tmp_path, model_dir):
    run = CliRunner().invoke
    out = tmp_path / "out"
    cases = []
    ds = _jsonl(tmp_path / "nocol.jsonl", [{"body": "x"}])
    cases.append((_cli_args(model_dir, ds, out), ["nocol.jsonl", "'text'", "--text-column"]))
    cases.append((_cli_args(model_dir, ds, out, "--text-column", "content"), ["column 'content' not found"]))
    ds = _jsonl(tmp_path / "empty.jsonl", [{"text": "a"}, {"text": ""}])
    cases.append((_cli_args(model_dir, ds, out), ["row 1", "'text' is empty", "--skip-empty"]))
    bad = tmp_path / "broken.jsonl"
    bad.write_bytes(b'{"text": "ok"}\n{"text": \x00\xff not json\n')
    cases.append((_cli_args(model_dir, bad, out), [f"{bad} line 2 is not valid UTF-8 (byte 0xff", "--skip-bad-rows"]))
    cases.append((_cli_args(model_dir, tmp_path / "missing.jsonl", out), ["missing.jsonl", "no such file"]))
    small = _make_model(tmp_path / "small", 1000)
    ds = _jsonl(tmp_path / "ok.jsonl", [{"text": "hello"}])
    cases.append((_cli_args(small, ds, out), ["1000 output rows", "32000 tokens", "--tokenizer"]))
    for args, needles in cases:
        r = run(cli, args)
        assert r.exit_code != 0, (args, r.output)
        for n in needles:
            assert n in r.output, (n, r.output)
        assert not out.exists(), "no partial output on bad input"
    r = run(cli, _cli_args(model_dir, tmp_path / "empty.jsonl", out, "--skip-empty"))
    assert r.exit_code == 0, r.output
    assert json.loads(r.output[r.output.rindex('{"rank"'):])["empty"] == 1


def test_resume_after_kill_equals_uninterrupted_run(tmp_path, model_dir):
    rows = [{"id": f"r{i}", "text": f"{TEXTS[i % len(TEXTS)][:24]} number {i}."} for i in range(30)]
    ds = _jsonl(tmp_path / "d.jsonl", rows)
    ref_out, out = tmp_path / "ref", tmp_path / "killed"
    extra = ["--shard-size", "3", "--token-budget", "96", "--sample-tail", "3"]
    r = CliRunner().invoke(cli, _cli_args(model_dir, ds, ref_out, *extra))
    assert r.exit_code == 0, r.output
    cmd = [sys.executable, "-c", "from xtok.cli import main; main()", *_cli_args(model_dir, ds, out, *extra)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shards = out / "shards"
    deadline = time.time() + 120
    while time.time() < deadline:
        n = len([f for f in shards.iterdir() if f.suffix == ".parquet"]) if shards.exists() else 0
        if n >= 2 or p.poll() is not None:
            break
        time.sleep(0.05)
    assert p.poll() is None, "the run finished before it could be killed; make the dataset larger"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert not (out / "manifest.json").exists()
    with pytest.raises(Exception, match="has not finished"):
        TeacherStore(out)
    r2 = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r2.returncode == 0, r2.stderr[-2000:]
    a, b = TeacherStore(ref_out), TeacherStore(out)
    assert a.keys() == b.keys() == [f"r{i}" for i in range(30)]
    for key in a.keys():
        x, y = a[key], b[key]
        for f in ("input_ids", "positions", "topk_ids", "tail_ids"):
            assert np.array_equal(getattr(x, f), getattr(y, f)), (key, f)
        assert (np.abs(x.topk_codes.astype(int) - y.topk_codes.astype(int)) <= 1).all()
        np.testing.assert_allclose(x.tail_mass, y.tail_mass, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(x.target_logprob, y.target_logprob, rtol=1e-3)
    # the same command on a finished store is a no-op that succeeds; other settings are refused
    before = (ref_out / "manifest.json").read_bytes()
    r3 = CliRunner().invoke(cli, _cli_args(model_dir, ds, ref_out, *extra))
    assert r3.exit_code == 0, r3.output
    res = json.loads(r3.output[r3.output.rindex('{"rank"'):])
    assert res["new_examples"] == 0 and res["store_examples"] == 30 and res["complete"]
    assert json.loads((ref_out / "manifest.json").read_bytes())["shards"] == json.loads(before)["shards"]
    r4 = CliRunner().invoke(cli, _cli_args(model_dir, ds, ref_out, *extra[:-1], "2"))
    assert r4.exit_code != 0 and "differs in: sample_tail" in r4.output


def test_inspect_cli(tmp_path, model_dir):
    ds = _jsonl(tmp_path / "d.jsonl", [{"id": "k1", "text": TEXTS[1]}])
    extract(ExtractConfig(model=str(model_dir), tokenizer=MISTRAL_SPM, dataset=str(ds), output=str(tmp_path / "s"),
                          top_k=4, progress=False))
    r = CliRunner().invoke(cli, ["inspect", str(tmp_path / "s"), "-e", "k1", "-n", "3"])
    assert r.exit_code == 0, r.output
    assert "example key=k1" in r.output and "top-k mass covered" in r.output and "bytes_per_position" in r.output
    r = CliRunner().invoke(cli, ["inspect", str(tmp_path / "nothing")])
    assert r.exit_code != 0 and "no manifest.json" in r.output


def test_help_lists_every_option():
    r = CliRunner().invoke(cli, ["extract", "--help"])
    assert r.exit_code == 0
    for opt in ("--model", "--dataset", "--output", "--top-k", "--top-p", "--sample-tail", "--shard", "--token-budget",
                "--max-length", "--chat-template", "--targets", "--temperature", "--skip-empty", "--force-tokenizer",
                "--split"):
        assert opt in r.output
    flat = " ".join(r.output.split())
    assert "A single file is the whole dataset and ignores --split." in flat


def test_stories260k_real_model(tmp_path):
    """The real pretrained tiny Llama with its own 512-token tokenizer (skipped without ../shared)."""
    mdir = asset("models/stories260K")
    text = asset("corpora/tinystories_sample.txt").read_text(encoding="utf-8")
    ds = _jsonl(tmp_path / "d.jsonl", [{"text": p} for p in text.split("\n") if p.strip()][:4])
    extract(ExtractConfig(model=str(mdir), dataset=str(ds), output=str(tmp_path / "s"), top_k=16, progress=False))
    st = TeacherStore(tmp_path / "s")
    tok = load_tokenizer(str(mdir))
    for ex in st:
        ref = _dense_reference(mdir, ex.input_ids, tok.vocab_size)
        _check_against_reference(ex, ref, tok.token_bytes.word_start, 16, 0)
        assert (1 - ex.tail_mass).mean() > 0.5  # a trained model: the top-16 holds most of the mass


def test_parquet_folder_user_assistant_columns_top_p(tmp_path, model_dir, spm):
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path / "pq"
    d.mkdir()
    users, replies = ["Say hi.", "Count to three.", "Name a fruit."], ["Hi there!", "One, two, three.", "A pear."]
    pq.write_table(pa.table({"user": users, "assistant": replies}), d / "part-0.parquet")
    extract(ExtractConfig(model=str(model_dir), tokenizer=MISTRAL_SPM, dataset=str(d), output=str(tmp_path / "s"),
                          top_k=6, top_p=0.5, limit=2, progress=False))
    st = TeacherStore(tmp_path / "s")
    assert len(st) == 2 and st.manifest["top_p"] == 0.5 and st.manifest["targets"] == "assistant"
    assert st.manifest["limit"] == 2 and st.manifest["n_dataset_examples"] == 2
    # --limit keeps the first N rows: the third conversation is nowhere in the store
    assert sorted(st.keys()) == sorted(example_key({"user": u, "assistant": a}) for u, a in zip(users[:2], replies[:2]))
    assert not any("fruit" in ex.text or "pear" in ex.text for ex in st)
    for ex in st:
        ref = _dense_reference(model_dir, ex.input_ids, 32000)[ex.positions]
        order = np.argsort(-ref, 1)[:, :6]
        top = np.take_along_axis(ref, order, 1)
        n_kept = np.minimum((np.cumsum(np.exp(top), 1) < 0.5).sum(1) + 1, 6)
        kept = np.arange(6)[None] < n_kept[:, None]
        assert np.array_equal(ex.topk_ids, np.where(kept, order, -1))
        assert np.isneginf(ex.topk_logprobs[~kept]).all()
        np.testing.assert_allclose(ex.tail_mass, 1 - (np.exp(top) * kept).sum(1), rtol=2e-5, atol=1e-6)
        got = spm.decode_bytes(ex.input_ids[ex.positions + 1]).decode()
        assert "Say hi" not in got and "Count to three" not in got and ("Hi there" in got or "One, two" in got)


# ------------------------------------------------------------------------------------------
# Output layers other than a plain lm_head: the model's own forward is the reference
# ------------------------------------------------------------------------------------------

_TINY = dict(vocab_size=32000, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _tiny_arch(path: Path, arch: str, seed: int = 0) -> Path:
    """Tiny random models of architectures whose forward transforms the lm_head logits."""
    import transformers as tf

    torch.manual_seed(seed)
    if arch == "granite":    # logits / logits_scaling
        m = tf.GraniteForCausalLM(tf.GraniteConfig(**_TINY, logits_scaling=8.0, tie_word_embeddings=False))
    elif arch == "cohere":   # logits * logit_scale (tied embeddings)
        m = tf.CohereForCausalLM(tf.CohereConfig(**_TINY, logit_scale=0.25))
    elif arch == "gemma2":   # softcap * tanh(logits / softcap)
        m = tf.Gemma2ForCausalLM(tf.Gemma2Config(**_TINY, head_dim=16, final_logit_softcapping=5.0,
                                                 tie_word_embeddings=False))
    else:
        raise ValueError(arch)
    with torch.no_grad():
        m.get_output_embeddings().weight.mul_(60.0)  # large logits: the transforms matter
    m.save_pretrained(path)
    return path


@pytest.mark.parametrize("arch", ["granite", "cohere", "gemma2"])
def test_logit_transforms_match_the_models_own_forward(tmp_path, spm, arch):
    mdir = _tiny_arch(tmp_path / arch, arch)
    ds = _jsonl(tmp_path / "d.jsonl", [{"id": "a", "text": TEXTS[0]}, {"id": "b", "text": TEXTS[4]}])
    extract(ExtractConfig(model=str(mdir), tokenizer=MISTRAL_SPM, dataset=str(ds), output=str(tmp_path / "s"),
                          top_k=8, sample_tail=3, progress=False))
    st = TeacherStore(tmp_path / "s")
    want = {"granite": (1 / 8.0, None), "cohere": (0.25, None), "gemma2": (1.0, 5.0)}[arch]
    assert (st.manifest["output_layer"]["scale"], st.manifest["output_layer"]["softcap"]) == want
    for ex in st:
        _check_against_reference(ex, _dense_reference(mdir, ex.input_ids, 32000), spm.token_bytes.word_start, 8, 3)


from transformers import LlamaConfig as _LlamaConfig, LlamaForCausalLM as _LlamaForCausalLM  # noqa: E402


class _OddConfig(_LlamaConfig):
    model_type = "xtok_test_odd_llama"


class _OddForCausalLM(_LlamaForCausalLM):
    """A causal LM whose forward does something to the logits that xtok cannot know about."""
    config_class = _OddConfig

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 3.0 + torch.linspace(0, 2, out.logits.shape[-1], dtype=out.logits.dtype)
        return out


def _register_odd():
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        AutoConfig.register(_OddConfig.model_type, _OddConfig)
        AutoModelForCausalLM.register(_OddConfig, _OddForCausalLM)
    except ValueError:  # already registered in this process
        pass


def test_unknown_logit_transform_is_refused(tmp_path):
    _register_odd()
    torch.manual_seed(0)
    cfg = _OddConfig(**_TINY, tie_word_embeddings=False)
    _OddForCausalLM(cfg).save_pretrained(tmp_path / "odd")
    ds = _jsonl(tmp_path / "d.jsonl", [{"text": TEXTS[0]}])
    out = tmp_path / "out"
    r = CliRunner().invoke(cli, _cli_args(tmp_path / "odd", ds, out))
    assert r.exit_code != 0 and isinstance(r.exception, SystemExit), r.output
    assert "output layer could not be reproduced" in r.output and str(tmp_path / "odd") in r.output, r.output
    assert "Traceback" not in r.output and not out.exists()


# ------------------------------------------------------------------------------------------
# Context length, dtype, temperature
# ------------------------------------------------------------------------------------------


def test_max_length_capped_at_model_positions(tmp_path, spm):
    """GPT-2 with n_positions=16: examples longer than 16 tokens are skipped and counted (never an
    IndexError); the others equal the dense reference."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=32000, n_positions=16, n_embd=32, n_layer=2, n_head=2)) \
        .save_pretrained(tmp_path / "gpt2")
    lens = {t: 1 + len(spm.encode(t)) for t in TEXTS}
    n_long = sum(n > 16 for n in lens.values())
    assert 0 < n_long < len(TEXTS)
    ds = _jsonl(tmp_path / "d.jsonl", [{"text": t} for t in TEXTS])
    out = tmp_path / "s"
    r = CliRunner().invoke(cli, _cli_args(tmp_path / "gpt2", ds, out))  # --max-length: default 4096
    assert r.exit_code == 0, r.output
    res = json.loads(r.output[r.output.rindex('{"rank"'):])
    assert res["skipped_too_long"] == n_long and res["new_examples"] == len(TEXTS) - n_long
    assert res["max_length"] == 16 and "capped" in res["max_length_note"]
    st = TeacherStore(out)
    assert st.manifest["max_length"] == 16 and st.manifest["skipped"]["too_long"] == n_long
    assert sorted(ex.text for ex in st) == sorted(t for t, n in lens.items() if n <= 16)
    for ex in st:
        _check_against_reference(ex, _dense_reference(tmp_path / "gpt2", ex.input_ids, 32000),
                                 spm.token_bytes.word_start, 4, 0)


def test_temperature_end_to_end(tmp_path, model_dir, spm):
    ds = _jsonl(tmp_path / "d.jsonl", [{"id": "a", "text": TEXTS[1]}, {"id": "b", "text": TEXTS[2]}])
    extract(ExtractConfig(model=str(model_dir), tokenizer=MISTRAL_SPM, dataset=str(ds), output=str(tmp_path / "s"),
                          top_k=8, sample_tail=4, temperature=2.5, progress=False))
    st = TeacherStore(tmp_path / "s")
    assert st.manifest["temperature"] == 2.5
    for ex in st:
        ref = _dense_reference(model_dir, ex.input_ids, 32000, temperature=2.5)
        _check_against_reference(ex, ref, spm.token_bytes.word_start, 8, 4)
        # and it is not the T=1 distribution
        t1 = _dense_reference(model_dir, ex.input_ids, 32000)[ex.positions]
        assert np.abs(np.sort(t1, 1)[:, -1] - ex.topk_logprobs[:, 0]).max() > 0.1


def test_bfloat16_on_cpu(tmp_path, model_dir, spm):
    """--dtype bfloat16 on CPU: equal to the bf16 model's own forward (the output layer is reproduced
    exactly, up to float32 rounding of the bf16 logits); versus the float32 model's float64 reference
    the bf16 weights and activations cost (tolerance / measured on this peaked random model, logits up
    to ~35): KL(exact || store) per position < 0.01 / 0.004 nats, top-1 agreement >= 90 % / 100 %,
    |d tail mass| < 0.03."""
    ds = _jsonl(tmp_path / "d.jsonl", [{"id": "a", "text": TEXTS[0]}, {"id": "b", "text": TEXTS[3]}])
    extract(ExtractConfig(model=str(model_dir), tokenizer=MISTRAL_SPM, dataset=str(ds), output=str(tmp_path / "s"),
                          top_k=8, dtype="bfloat16", device="cpu", progress=False))
    st = TeacherStore(tmp_path / "s")
    assert st.manifest["dtype"] == "bfloat16"
    for ex in st:
        own = _dense_reference(model_dir, ex.input_ids, 32000, dtype=torch.bfloat16)
        _check_against_reference(ex, own, spm.token_bytes.word_start, 8, 0)
        ref = _dense_reference(model_dir, ex.input_ids, 32000)[ex.positions]
        # KL(exact float32 teacher || what the bf16 store reconstructs), on the store's top-k + tail buckets
        p_top = np.exp(np.take_along_axis(ref, ex.topk_ids.astype(np.int64), 1))
        p = np.concatenate([p_top, 1 - p_top.sum(1, keepdims=True)], 1)
        q = np.concatenate([np.exp(ex.topk_logprobs.astype(np.float64)), ex.tail_mass[:, None]], 1)
        kl = (p * (np.log(np.maximum(p, 1e-300)) - np.log(np.maximum(q, 1e-300)))).sum(1)
        assert kl.max() < 0.01, kl.max()
        assert (ex.topk_ids[:, 0] == ref.argmax(1)).mean() >= 0.9
        assert np.abs(ex.tail_mass - (1 - np.sort(np.exp(ref), 1)[:, -8:].sum(1))).max() < 0.03


# ------------------------------------------------------------------------------------------
# Tokenizer / model agreement
# ------------------------------------------------------------------------------------------


def test_tokenizer_other_than_the_model_folders_is_refused(tmp_path, v3_model_dir):
    from xtok.tokens import builtin_tokenizer_path

    mdir = tmp_path / "m3"
    shutil.copytree(v3_model_dir, mdir)
    v3_file = builtin_tokenizer_path(MISTRAL_SPM_V3)
    shutil.copy(v3_file, mdir / v3_file.name)                 # the model folder now has its own tokenizer
    ds = _jsonl(tmp_path / "d.jsonl", [{"text": TEXTS[0]}])
    run = CliRunner().invoke
    out = tmp_path / "out"
    # Mistral v1 (32000 tokens) on the 32768-row v3 model: 768 "padding" rows, but the wrong tokenizer
    r = run(cli, _cli_args(mdir, ds, out))
    assert r.exit_code != 0 and isinstance(r.exception, SystemExit), r.output
    for n in ("--tokenizer", "not the tokenizer in the model folder", str(mdir), "--force-tokenizer"):
        assert n in r.output, (n, r.output)
    assert not out.exists()
    r = run(cli, _cli_args(mdir, ds, out, "--force-tokenizer"))
    assert r.exit_code == 0, r.output
    assert TeacherStore(out).manifest["tokenizer_hash"] == load_tokenizer(MISTRAL_SPM).content_hash
    # the model's own tokenizer, by default or named explicitly: accepted
    for extra in ([], ["--tokenizer", str(mdir / v3_file.name)]):
        args = ["extract", "--model", str(mdir), "--dataset", str(ds), "-k", "4", "-q", *extra,
                "-o", str(tmp_path / f"own{len(extra)}")]
        r = run(cli, args)
        assert r.exit_code == 0, r.output
        assert TeacherStore(tmp_path / f"own{len(extra)}").manifest["vocab_size"] == 32768


def test_more_model_rows_than_max_vocab_padding(tmp_path, v3_model_dir):
    ds = _jsonl(tmp_path / "d.jsonl", [{"text": TEXTS[0]}])
    out = tmp_path / "out"
    r = CliRunner().invoke(cli, _cli_args(v3_model_dir, ds, out, "--max-vocab-padding", "767"))
    assert r.exit_code != 0, r.output
    for n in ("32768 output rows", "32000", "768 extra rows", "--max-vocab-padding"):
        assert n in r.output, (n, r.output)
    assert not out.exists()
    r = CliRunner().invoke(cli, _cli_args(v3_model_dir, ds, out, "--max-vocab-padding", "768"))
    assert r.exit_code == 0, r.output
    assert TeacherStore(out).manifest["model_vocab_size"] == 32768


# ------------------------------------------------------------------------------------------
# Resume must not mix data: model weights and dataset content are part of the settings
# ------------------------------------------------------------------------------------------


def test_model_hash_covers_every_parameter_tensor(tmp_path):
    from transformers import AutoModelForCausalLM

    from xtok.extract import model_hash

    mdir = _make_model(tmp_path / "m", 32000, seed=5)
    m = AutoModelForCausalLM.from_pretrained(mdir, dtype=torch.float32)
    base = model_hash(m)
    assert model_hash(AutoModelForCausalLM.from_pretrained(mdir, dtype=torch.float32)) == base
    g = torch.Generator().manual_seed(0)
    names = [n for n, _ in m.named_parameters()]
    assert len(names) > 10
    with torch.no_grad():
        for name, p in m.named_parameters():
            old = p.detach().clone()
            if p.dim() == 2:  # a rank-1 (LoRA-like) dense update
                p.add_(1e-3 * torch.outer(torch.randn(p.shape[0], generator=g), torch.randn(p.shape[1], generator=g)))
            else:
                p.add_(1e-3 * torch.randn(p.shape, generator=g))
            assert model_hash(m) != base, name
            p.copy_(old)
    assert model_hash(m) == base


def test_resume_refuses_changed_weights_or_texts(tmp_path):
    """A store made from other weights (a LoRA-merged checkpoint, same config and lm_head) or other
    texts under the same ids is not resumed into; the unchanged command still resumes."""
    from transformers import AutoModelForCausalLM

    mdir = _make_model(tmp_path / "m", 32000, seed=6)
    rows = [{"id": f"e{i}", "text": t} for i, t in enumerate(TEXTS[:4])]
    ds = _jsonl(tmp_path / "d.jsonl", rows)
    out = tmp_path / "s"
    run = lambda: CliRunner().invoke(cli, _cli_args(mdir, ds, out, "--shard-size", "2"))  # noqa: E731
    r = run()
    assert r.exit_code == 0, r.output
    # (1) merge a rank-2 update into one attention projection of layer 0 (lm_head and config untouched)
    orig = AutoModelForCausalLM.from_pretrained(mdir, dtype=torch.float32)
    merged = AutoModelForCausalLM.from_pretrained(mdir, dtype=torch.float32)
    with torch.no_grad():
        w = merged.model.layers[0].self_attn.q_proj.weight
        g = torch.Generator().manual_seed(1)
        w.add_(0.05 * torch.randn(w.shape[0], 2, generator=g) @ torch.randn(2, w.shape[1], generator=g))
    merged.save_pretrained(mdir)
    r = run()
    assert r.exit_code != 0 and "different settings" in r.output and "model_hash" in r.output, r.output
    orig.save_pretrained(mdir)
    r = run()
    assert r.exit_code == 0, r.output
    assert json.loads(r.output[r.output.rindex('{"rank"'):])["new_examples"] == 0
    # (2) the same ids with an edited text
    _jsonl(ds, [dict(rows[0], text=rows[0]["text"].replace("fox", "cat"))] + rows[1:])
    r = run()
    assert r.exit_code != 0 and "different settings" in r.output and "dataset_fingerprint" in r.output, r.output
    _jsonl(ds, rows)
    r = run()
    assert r.exit_code == 0 and json.loads(r.output[r.output.rindex('{"rank"'):])["store_examples"] == 4, r.output


# ------------------------------------------------------------------------------------------
# --split for local folders
# ------------------------------------------------------------------------------------------


def test_split_picks_files_by_name(tmp_path, model_dir):
    from xtok.extract import read_dataset

    d = tmp_path / "ds"
    d.mkdir()
    _jsonl(d / "train.jsonl", [{"text": "tr0"}])
    _jsonl(d / "test.jsonl", [{"text": "te0"}, {"text": "te1"}])
    texts = lambda split: sorted(read_dataset(str(d), split)["text"])  # noqa: E731
    assert texts("train") == ["tr0"]
    assert texts("test") == ["te0", "te1"]
    with pytest.raises(ExtractError, match=r"no files for --split validation \(splits there: test, train\)"):
        read_dataset(str(d), "validation")
    _jsonl(d / "my-dev_set.jsonl", [{"text": "va0"}])          # 'dev' between separators: validation
    assert texts("validation") == texts("dev") == ["va0"]
    # a single file is the whole dataset, whatever --split says
    assert sorted(read_dataset(str(d / "test.jsonl"), "train")["text"]) == ["te0", "te1"]
    # split-named sub-folders; a folder without split names is all 'train'
    e = tmp_path / "nested"
    (e / "v1" / "training").mkdir(parents=True)
    (e / "v1" / "eval").mkdir()
    _jsonl(e / "v1" / "training" / "part-0.jsonl", [{"text": "a"}, {"text": "b"}])
    _jsonl(e / "v1" / "eval" / "part-0.jsonl", [{"text": "c"}])
    assert sorted(read_dataset(str(e), "train")["text"]) == ["a", "b"]
    assert sorted(read_dataset(str(e), "test")["text"]) == ["c"]
    # a save_to_disk DatasetDict folder
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["p", "q"]}),
                          "test": datasets.Dataset.from_dict({"text": ["r"]})}).save_to_disk(str(tmp_path / "dd"))
    assert read_dataset(str(tmp_path / "dd"), "test")["text"] == ["r"]
    assert sorted(read_dataset(str(tmp_path / "dd"), "train")["text"]) == ["p", "q"]
    f = tmp_path / "plain"
    f.mkdir()
    _jsonl(f / "part-0.jsonl", [{"text": "x"}])
    _jsonl(f / "part-1.jsonl", [{"text": "y"}])
    assert sorted(read_dataset(str(f), "train")["text"]) == ["x", "y"]
    with pytest.raises(ExtractError, match="no file or folder name there names a split"):
        read_dataset(str(f), "test")
    # end to end: the store holds the requested split only
    out = tmp_path / "s"
    r = CliRunner().invoke(cli, _cli_args(model_dir, d, out, "--split", "test"))
    assert r.exit_code == 0, r.output
    assert sorted(ex.text for ex in TeacherStore(out)) == ["te0", "te1"]
    r = CliRunner().invoke(cli, _cli_args(model_dir, d, tmp_path / "s2", "--split", "nope"))
    assert r.exit_code != 0 and "--split nope" in r.output and not (tmp_path / "s2").exists()


# ------------------------------------------------------------------------------------------
# Bad input: a clear message naming the option/file, no traceback, nothing left behind
# ------------------------------------------------------------------------------------------


def _assert_clean_failure(r, needles, out=None, code=None):
    assert r.exit_code != 0, r.output
    if code is not None:
        assert r.exit_code == code, (r.exit_code, r.output)
    assert isinstance(r.exception, SystemExit), (type(r.exception), r.output)  # a click error, not a crash
    assert "Traceback" not in r.output
    for n in needles:
        assert n in r.output, (n, r.output)
    if out is not None:
        assert not Path(out).exists(), "half-made output left behind"


def test_bad_options_and_paths_clear_errors(tmp_path, model_dir):
    run = CliRunner().invoke
    ds = _jsonl(tmp_path / "ok.jsonl", [{"text": "hello there"}])
    out = tmp_path / "out"
    for opt, val in (("--shard-size", "0"), ("--top-k", "0"), ("--top-k", "70000"), ("--token-budget", "0"),
                     ("--chunk-mb", "0"), ("--max-length", "1"), ("--sample-tail", "-1"), ("--limit", "0"),
                     ("--top-p", "0"), ("--top-p", "1.5"), ("--temperature", "0"), ("--max-vocab-padding", "-1")):
        _assert_clean_failure(run(cli, _cli_args(model_dir, ds, out, opt, val)), [opt], out, code=2)
    # the Python API checks the same bounds
    with pytest.raises(ExtractError, match="--shard-size 0"):
        extract(ExtractConfig(model=str(model_dir), tokenizer=MISTRAL_SPM, dataset=str(ds), output=str(out),
                              shard_size=0, progress=False))
    _assert_clean_failure(run(cli, _cli_args(model_dir, ds, out, "--device", "foo")), ["--device foo"], out)
    if not torch.cuda.is_available():
        _assert_clean_failure(run(cli, _cli_args(model_dir, ds, out, "--device", "cuda")),
                              ["--device cuda", "CUDA is not available"], out)
    afile = tmp_path / "afile"
    afile.write_text("x")
    _assert_clean_failure(run(cli, _cli_args(model_dir, ds, afile)), ["--output", "existing file"])
    assert afile.read_text() == "x"
    _assert_clean_failure(run(cli, _cli_args(model_dir, ds, afile / "sub")), ["--output", "is a file"])
    _assert_clean_failure(run(cli, _cli_args(model_dir, ds, "/proc/xtok-test-store")),
                          ["--output /proc/xtok-test-store"], "/proc/xtok-test-store")
    _assert_clean_failure(run(cli, _cli_args(model_dir, ds, "foo://bar")), ["--output foo://bar", "protocol"])
    # a missing model folder is a --model error, even with the default tokenizer (the model folder)
    args = ["extract", "--model", str(tmp_path / "nonexist"), "--dataset", str(ds), "-o", str(out), "-q"]
    r = run(cli, args)
    _assert_clean_failure(r, ["--model", "nonexist", "no such folder"], out)
    assert "--tokenizer" not in r.output
    nocfg = tmp_path / "nocfg"
    nocfg.mkdir()
    _assert_clean_failure(run(cli, _cli_args(nocfg, ds, out)), ["--model", "config.json"], out)


def test_missing_hub_model_fails_fast(tmp_path, monkeypatch):
    ds = _jsonl(tmp_path / "ok.jsonl", [{"text": "hello"}])
    out = tmp_path / "out"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hfcache"))
    args = ["extract", "--model", "xtok-test-org/no-such-model-xyz", "--dataset", str(ds), "-o", str(out), "-q"]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    r = CliRunner().invoke(cli, args)
    _assert_clean_failure(r, ["--model xtok-test-org/no-such-model-xyz", "cache", "HF_HUB_OFFLINE"], out)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    r = CliRunner().invoke(cli, args)  # no network here (or a hub without that repo): one quick request
    _assert_clean_failure(r, ["--model xtok-test-org/no-such-model-xyz"], out)
    assert time.perf_counter() - t0 < 20


def test_bad_rows_and_templates_clear_errors(tmp_path, model_dir):
    run = CliRunner().invoke
    out = tmp_path / "out"
    ds = _jsonl(tmp_path / "int.jsonl", [{"text": "fine"}, {"text": 5}])
    _assert_clean_failure(run(cli, _cli_args(model_dir, ds, out)), ["int.jsonl", "row 1", "'text'", "int"], out)
    ds = _jsonl(tmp_path / "msg.jsonl", [{"messages": [{"role": "user", "content": 3}]}])
    _assert_clean_failure(run(cli, _cli_args(model_dir, ds, out)), ["msg.jsonl", "row 0", "'content'"], out)
    # --chat-template on a plain-text dataset: a missing file, or one that exists, is refused
    ds = _jsonl(tmp_path / "text.jsonl", [{"text": "hello"}])
    _assert_clean_failure(run(cli, _cli_args(model_dir, ds, out, "--chat-template", str(tmp_path / "nope.jinja"))),
                          ["--chat-template", "nope.jinja"], out)
    tpl = tmp_path / "chatml.jinja"
    tpl.write_text(CHATML)
    _assert_clean_failure(run(cli, _cli_args(model_dir, ds, out, "--chat-template", str(tpl))),
                          ["--chat-template", "plain text", "--messages-column"], out)
    # a template that refuses a row at render time (after the store folder was made): named row, no folder left
    strict = tmp_path / "strict.jinja"
    strict.write_text("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system turns') }}"
                      "{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}")
    ds = _jsonl(tmp_path / "chat.jsonl", _chat_rows())
    _assert_clean_failure(run(cli, _cli_args(model_dir, ds, out, "--chat-template", str(strict))),
                          ["chat.jsonl", "row 1", "'c2'", "no system turns"], out)


def test_null_message_content_fails_before_any_shard(tmp_path, model_dir):
    """xtok.chat refuses a message whose content is None (render would, mid-run); the row is named
    before the model loads, so no shard of the rows before it is committed and no folder is left."""
    rows = [{"messages": [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": "Yes."}]}
            for i in range(3)]
    rows.append({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": None}]})
    ds = _jsonl(tmp_path / "null.jsonl", rows)
    out = tmp_path / "out"
    run = CliRunner().invoke
    _assert_clean_failure(run(cli, _cli_args(model_dir, ds, out, "--shard-size", "1", "--chat-template", CHATML)),
                          ["null.jsonl", "row 3", "'content'"], out)
    with pytest.raises(ExtractError, match="row 3"):
        extract(ExtractConfig(model=str(model_dir), tokenizer=MISTRAL_SPM, dataset=str(ds), output=str(out),
                              chat_template=CHATML, shard_size=1, progress=False))
    assert not out.exists()
    # an empty messages list is refused by the chat validator too, but --skip-empty still skips it
    ds = _jsonl(tmp_path / "empty.jsonl", rows[:1] + [{"messages": []}])
    _assert_clean_failure(run(cli, _cli_args(model_dir, ds, out, "--chat-template", CHATML)),
                          ["row 1", "'messages' is empty", "--skip-empty"], out)
    r = run(cli, _cli_args(model_dir, ds, out, "--chat-template", CHATML, "--skip-empty"))
    assert r.exit_code == 0, r.output
    assert json.loads(r.output[r.output.rindex('{"rank"'):])["empty"] == 1


def _old_content_key(content) -> str:  # example_key's content hash as first written
    blob = content if isinstance(content, str) else json.dumps(content, ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _old_fingerprint(pairs) -> str:  # the dataset fingerprint as first written: (key, content) per kept example
    h = hashlib.sha256()
    for key, content in pairs:
        body = content if isinstance(content, str) else json.dumps(content, sort_keys=True, ensure_ascii=False,
                                                                   default=str)
        h.update(json.dumps(key, ensure_ascii=False).encode())
        h.update(b"\x00")
        h.update(body.encode("utf-8", "surrogatepass"))
        h.update(b"\x01")
    return h.hexdigest()


@pytest.mark.parametrize("kind", ["text", "messages", "user-assistant"])
def test_keys_and_fingerprint_equal_the_original_formulas(tmp_path, model_dir, kind):
    """Content-hash keys and the dataset fingerprint (content serialised once per row) are byte-identical
    to the formulas they were first written with, for id-keyed, content-keyed and duplicate rows."""
    from xtok.extract import read_dataset

    if kind == "text":
        rows = [{"text": t} for t in TEXTS[:4]] + [{"text": TEXTS[0]}, {"id": 7, "text": TEXTS[4]}]
        content = lambda r: r["text"]  # noqa: E731
    elif kind == "messages":
        rows = [{"messages": [{"role": "user", "content": t}, {"role": "assistant", "content": "Ça va 🦓."}]}
                for t in TEXTS[:3]]
        rows += [rows[1], dict(rows[2], id="c9"), dict(_chat_rows()[1], id=None)]
        content = lambda r: r["messages"]  # noqa: E731
    else:
        rows = [{"user": t, "assistant": "Oui, élève."} for t in TEXTS[:3]] + [{"user": TEXTS[0],
                                                                                 "assistant": "Oui, élève."}]
        content = lambda r: {"user": r["user"], "assistant": r["assistant"]}  # noqa: E731
    ds = _jsonl(tmp_path / "d.jsonl", rows)
    out = tmp_path / "s"
    tpl = CHATML if kind != "text" else None
    res = extract(ExtractConfig(model=str(model_dir), tokenizer=MISTRAL_SPM, dataset=str(ds), output=str(out),
                                top_k=4, chat_template=tpl, progress=False))
    kept, seen = [], set()
    for row in read_dataset(str(ds)):  # the rows as extract reads them (nulls where a column is missing)
        key = str(row["id"]) if row.get("id") is not None else _old_content_key(content(row))
        assert key == example_key(row)
        if key not in seen:
            seen.add(key)
            kept.append((key, content(row)))
    assert res["stats"]["duplicates"] == len(rows) - len(kept) >= 1
    st = TeacherStore(out)
    assert st.manifest["dataset_fingerprint"] == _old_fingerprint(kept)
    assert st.keys() == [k for k, _ in kept]


def test_writer_abort_leaves_only_what_it_should(tmp_path, monkeypatch):
    """StoreWriter.abort() (and a failing constructor) removes the store folder only when the writer
    made it, is the only rank and has committed nothing."""
    from xtok.store import StoreWriter

    h = {"model": "m"}
    StoreWriter(tmp_path / "new", h).abort()
    assert not (tmp_path / "new").exists()
    (tmp_path / "old").mkdir()
    StoreWriter(tmp_path / "old", h).abort()
    assert (tmp_path / "old").is_dir()
    StoreWriter(tmp_path / "ranks", h, rank=0, world=2).abort()
    assert (tmp_path / "ranks").is_dir()
    w = StoreWriter(tmp_path / "done", h)
    w.write_shard(0, [])
    w.abort()
    assert (tmp_path / "done" / w.shard_rel(0)).exists()

    def fail(self, *a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(StoreWriter, "_write_part", fail)
    with pytest.raises(OSError):
        StoreWriter(tmp_path / "new2", h)
    assert not (tmp_path / "new2").exists()
    with pytest.raises(OSError):
        StoreWriter(tmp_path / "old", h)
    assert (tmp_path / "old").is_dir()


# ------------------------------------------------------------------------------------------
# Length-sorted batching
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batches_budget_sorted_and_complete(seed):
    from xtok.extract import length_batches

    rng = np.random.default_rng(seed)
    lengths = np.concatenate([rng.integers(1, 300, 200), [500, 500, 1, 1]])  # two longer than the budget
    budget = 400
    batches = length_batches(lengths, budget)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(len(lengths)))          # every index exactly once
    prev_min = None
    for b in batches:
        L = lengths[b]
        assert (np.diff(L) <= 0).all()                                  # sorted within a batch (longest first)
        if prev_min is not None:
            assert L.max() <= prev_min                                  # ... and across batches
        prev_min = L.min()
        if len(b) > 1:
            assert len(b) * L.max() <= budget                           # padded tokens within the budget
        else:
            assert L[0] > budget or len(b) * L.max() <= budget
    # greedy: no batch could have taken the next example without exceeding the budget
    for b, nxt in zip(batches[:-1], batches[1:]):
        assert (len(b) + 1) * lengths[b].max() > budget
    assert (lengths[flat] == np.sort(lengths)[::-1]).all()


def test_undecodable_and_empty_datasets(tmp_path, model_dir):
    """Issue 14, item 2: a row that cannot be decoded is an error naming the file and the line (or, with
    --skip-bad-rows, skipped and counted in the manifest); an empty dataset says it is empty."""
    run = CliRunner().invoke
    out = tmp_path / "out"
    good = [json.dumps({"id": f"g{i}", "text": t}, ensure_ascii=False).encode() for i, t in enumerate(TEXTS[:4])]
    # invalid UTF-8 inside a string (datasets loads it as is; reading the row would fail later)
    d = tmp_path / "bad_utf8.jsonl"
    d.write_bytes(b"\n".join([good[0], b"", good[1], b'{"id": "b", "text": "caf\xe9 au lait"}', good[2], good[3]])
                  + b"\n")
    r = run(cli, _cli_args(model_dir, d, out))
    _assert_clean_failure(r, [f"{d} line 4 (dataset row 2) holds text that is not valid UTF-8", "--skip-bad-rows"], out)
    r = run(cli, _cli_args(model_dir, d, out, "--skip-bad-rows"))
    assert r.exit_code == 0, r.output
    man = json.loads((out / "manifest.json").read_text())
    assert man["stats"]["undecodable"] == 1 and TeacherStore(out).keys() == ["g0", "g1", "g2", "g3"]
    # the kept rows are the clean file's: the same fingerprint and examples
    clean = tmp_path / "clean.jsonl"
    clean.write_bytes(b"\n".join(good) + b"\n")
    assert run(cli, _cli_args(model_dir, clean, tmp_path / "ref")).exit_code == 0
    ref = json.loads((tmp_path / "ref" / "manifest.json").read_text())
    assert man["dataset_fingerprint"] == ref["dataset_fingerprint"] and ref["stats"]["undecodable"] == 0
    a, b = TeacherStore(out), TeacherStore(tmp_path / "ref")
    assert all(np.array_equal(a[k].topk_ids, b[k].topk_ids) for k in a.keys())
    # lines that are not JSON objects / not JSON / not UTF-8 outside a string: the whole load fails
    for name, line, why in (("notobj", b"[1, 2]", "line 3 is a JSON list, not an object"),
                            ("syntax", b'{"id": "s", "text": "unterminated', "line 3 is not valid JSON"),
                            ("raw", b'{"id": "r", \xff "text": "x"}', "line 3 is not valid UTF-8 (byte 0xff")):
        d = tmp_path / f"{name}.jsonl"
        d.write_bytes(b"\n".join([good[0], good[1], line, good[2]]) + b"\n")
        o = tmp_path / f"o_{name}"
        _assert_clean_failure(run(cli, _cli_args(model_dir, d, o)), [f"{d} {why}", "--skip-bad-rows"], o)
        r = run(cli, _cli_args(model_dir, d, o, "--skip-bad-rows"))
        assert r.exit_code == 0, r.output
        assert json.loads((o / "manifest.json").read_text())["stats"]["undecodable"] == 1
        assert TeacherStore(o).keys() == ["g0", "g1", "g2"]
    # a chat row with a bad byte inside a message
    d = tmp_path / "chat.jsonl"
    d.write_bytes(b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]}\n'
                  b'{"messages": [{"role": "user", "content": "h\xffi"}, {"role": "assistant", "content": "no"}]}\n')
    _assert_clean_failure(run(cli, _cli_args(model_dir, d, out / "x")),
                          [f"{d} line 2 (dataset row 1) holds text that is not valid UTF-8"], out / "x")
    # empty: a file with no bytes, one of only blank lines, a folder of empty files
    for name, data in (("empty.jsonl", b""), ("blank.jsonl", b"\n  \n\n")):
        (tmp_path / name).write_bytes(data)
        _assert_clean_failure(run(cli, _cli_args(model_dir, tmp_path / name, out / "e")),
                              [f"--dataset {tmp_path / name}: the file is empty (no rows)"], out / "e")
    (tmp_path / "ef").mkdir()
    for n in ("a.jsonl", "b.jsonl"):
        (tmp_path / "ef" / n).write_bytes(b"")
    _assert_clean_failure(run(cli, _cli_args(model_dir, tmp_path / "ef", out / "e")),
                          ["all its 2 files are empty (no rows)"], out / "e")
    # an empty file next to others is just no rows
    (tmp_path / "ef" / "c.jsonl").write_bytes(good[0] + b"\n")
    assert run(cli, _cli_args(model_dir, tmp_path / "ef", out / "e")).exit_code == 0


def test_resume_with_the_dataset_path_spelled_differently(tmp_path, model_dir, monkeypatch):
    """Issue 14, item 4: the fingerprint decides; a relative or absolute spelling of the same file
    resumes (and re-runs) the store, whose manifest keeps its bytes."""
    rows = [{"id": f"r{i}", "text": TEXTS[i % len(TEXTS)]} for i in range(6)]
    _jsonl(tmp_path / "big.jsonl", rows)
    monkeypatch.chdir(tmp_path)
    args = ["--shard-size", "2", "--token-budget", "64"]
    r = CliRunner().invoke(cli, _cli_args(model_dir, "./big.jsonl", tmp_path / "s", *args))
    assert r.exit_code == 0, r.output
    before = (tmp_path / "s" / "manifest.json").read_bytes()
    for spelling in (str(tmp_path / "big.jsonl"), "big.jsonl", "../" + tmp_path.name + "/big.jsonl"):
        r = CliRunner().invoke(cli, _cli_args(model_dir, spelling, tmp_path / "s", *args))
        assert r.exit_code == 0, (spelling, r.output)
        assert (tmp_path / "s" / "manifest.json").read_bytes() == before
    # a resume after losing a shard, with another spelling: the shard is redone, the manifest is the same
    (tmp_path / "s" / "shards" / "r000of001-00001.parquet").unlink()
    (tmp_path / "s" / "manifest.json").unlink()
    r = CliRunner().invoke(cli, _cli_args(model_dir, str(tmp_path / "big.jsonl"), tmp_path / "s", *args))
    assert r.exit_code == 0, r.output
    man, ref = json.loads((tmp_path / "s" / "manifest.json").read_bytes()), json.loads(before)
    assert man["dataset"] == "./big.jsonl" and man["dataset_fingerprint"] == ref["dataset_fingerprint"]
    assert [s["keys"] for s in man["shards"]] == [s["keys"] for s in ref["shards"]]
    # other content under the same name is refused
    _jsonl(tmp_path / "big.jsonl", rows[:5])
    r = CliRunner().invoke(cli, _cli_args(model_dir, "./big.jsonl", tmp_path / "s", *args))
    assert r.exit_code != 0 and "dataset_fingerprint" in r.output
