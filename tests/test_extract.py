"""`xtok extract` on tiny real-architecture models (random init, seeded) with real tokenizers: the store
must equal a dense full-softmax float64 reference; chat masks; padded vocab; bad input; resume after
kill -9; sharding."""
from __future__ import annotations

import json
import os
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
from xtok.cli import main as cli
from xtok.extract import ExtractConfig, ExtractError, _uniforms, extract, teacher_targets
from xtok.store import QSTEP, TeacherStore
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


def _dense_reference(model_dir: Path, ids: np.ndarray, vocab: int) -> np.ndarray:
    """float64 log-softmax of the full logits (model's own forward), over the tokenizer's vocab."""
    from transformers import AutoModelForCausalLM

    m = _dense_reference.cache.get(str(model_dir))
    if m is None:
        m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        _dense_reference.cache[str(model_dir)] = m
    with torch.no_grad():
        logits = m(torch.as_tensor(ids)[None]).logits[0].double()[:, :vocab]
    return torch.log_softmax(logits, -1).numpy()


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
        u = _uniforms(ex.key, seed, P, m)
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
    cases.append((_cli_args(model_dir, bad, out), ["broken.jsonl", "cannot read"]))
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
                "--max-length", "--chat-template", "--targets", "--temperature", "--skip-empty"):
        assert opt in r.output


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
    pq.write_table(pa.table({"user": ["Say hi.", "Count to three."], "assistant": ["Hi there!", "One, two, three."]}),
                   d / "part-0.parquet")
    extract(ExtractConfig(model=str(model_dir), tokenizer=MISTRAL_SPM, dataset=str(d), output=str(tmp_path / "s"),
                          top_k=6, top_p=0.5, limit=2, progress=False))
    st = TeacherStore(tmp_path / "s")
    assert len(st) == 2 and st.manifest["top_p"] == 0.5 and st.manifest["targets"] == "assistant"
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
