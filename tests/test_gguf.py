"""GGUF teachers end to end, without any teacher package: a tiny random Llama is written as a llama.cpp
GGUF file by the `gguf` package (F32 tensors, llama.cpp names, q/k rows permuted as llama.cpp's converter
does, the SentencePiece tokenizer of mistral-common's `tokenizer.model.v1` as `tokenizer.ggml.*`
metadata), then read back by `load_tokenizer` and `xtok extract`, and compared with the same weights
saved as a transformers folder, with the real tokenizer and with a float64 forward of the model."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import MISTRAL_SPM

pytest.importorskip("gguf", reason="the gguf package (xtok[gguf]) is not installed")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.quality.tiny_gguf import permute_qk, tiny_llama, write_llama_gguf  # noqa: E402

from xtok.cli import main as cli  # noqa: E402
from xtok.store import QSTEP, TeacherStore  # noqa: E402
from xtok.tokens import TokenizerLoadError, load_tokenizer, mistral_common_data_dir  # noqa: E402

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n",
    "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\n#### 18",
    "Les élèves étudient la physique quantique à l'université. 🦓",
]


@pytest.fixture(scope="module")
def gguf_env(tmp_path_factory):
    """(gguf file, HF folder of the same weights, the model). The GGUF tokenizer conversion cache goes
    to a fresh folder, so the conversion itself is exercised."""
    root = tmp_path_factory.mktemp("gguf")
    mp = pytest.MonkeyPatch()
    mp.setenv("XTOK_CACHE_DIR", str(root / "xtok-cache"))
    torch.manual_seed(0)
    model = tiny_llama(32000, seed=0, dim=32, layers=2, heads=4, kv_heads=2, ffn=64, logit_scale=3.0)
    gdir = root / "gguf"
    gdir.mkdir()
    g = write_llama_gguf(model, gdir / "tiny.gguf", str(mistral_common_data_dir() / "tokenizer.model.v1"))
    hf = root / "hf"
    model.save_pretrained(hf)
    yield g, hf, model
    mp.undo()


def test_permute_qk_is_undone_by_transformers_loader():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = np.arange(8 * 16 * 3, dtype=np.float32).reshape(8 * 16, 3)
    for n_head, n_kv in ((8, 8), (8, 2)):
        proc = LlamaTensorProcessor(config={"num_attention_heads": n_head, "num_key_value_heads": n_kv})
        for kind, heads in (("attn_q", n_head), ("attn_k", n_kv)):
            rows = heads * 16 if kind == "attn_k" else n_head * 16
            x = w[:rows]
            got = proc.process(permute_qk(x, heads), f"blk.0.{kind}.weight").weights
            assert np.array_equal(got, x)
            assert not np.array_equal(permute_qk(x, heads), x)   # the permutation does something


def test_gguf_tokenizer_equals_source_tokenizer(gguf_env, shakespeare_text):
    g, _, _ = gguf_env
    tok = load_tokenizer(str(g))
    ref = load_tokenizer(MISTRAL_SPM)
    assert tok.vocab_size == ref.vocab_size == 32000
    assert (tok.bos_id, tok.eos_id) == (ref.bos_id, ref.eos_id)
    text = shakespeare_text[:30000] + "\n" + "\n".join(TEXTS)
    ids = tok.encode(text)
    assert tok.decode(ids) == text                                 # round trip
    assert np.array_equal(ids, ref.encode(text))                   # the source tokenizer's ids
    assert np.array_equal(tok.encode("Hello", add_special_tokens=True), ref.encode("Hello", add_special_tokens=True))
    assert tok.content_hash == ref.content_hash                    # same token bytes, specials and probe ids
    # a second load comes from the conversion cache and is the same tokenizer
    assert load_tokenizer(str(g)).content_hash == tok.content_hash


def test_gguf_folder_one_file_and_two_files(gguf_env, tmp_path):
    g, _, _ = gguf_env
    assert load_tokenizer(str(g.parent)).content_hash == load_tokenizer(str(g)).content_hash
    two = tmp_path / "two"
    two.mkdir()
    shutil.copy(g, two / "a.gguf")
    shutil.copy(g, two / "b.gguf")
    with pytest.raises(TokenizerLoadError, match=r"several \.gguf files.*a\.gguf, b\.gguf"):
        load_tokenizer(str(two))
    r = CliRunner().invoke(cli, ["extract", "--model", str(two), "--dataset", str(tmp_path / "d.jsonl"),
                                 "-o", str(tmp_path / "s"), "-q"])
    assert r.exit_code != 0 and "several .gguf files" in r.output, r.output


def _dense_reference(model, tok, text: str, k: int):
    """float64 log-softmax top-k of the HF model on BOS + text: (ids [P,k], logprobs [P,k], target lp [P])."""
    ids = np.concatenate([[tok.bos_id], tok.encode(text)])
    with torch.no_grad():
        z = model(input_ids=torch.as_tensor(ids)[None]).logits[0, :-1].double()
    lp = z.log_softmax(-1)
    v, ix = lp.topk(k + 1, dim=-1)
    tgt = lp.gather(-1, torch.as_tensor(ids[1:])[:, None])[:, 0]
    gap = (v[:, k - 1] - v[:, k]).numpy()          # margin between the k-th and the (k+1)-th id
    return ids, ix[:, :k].numpy(), v[:, :k].numpy(), tgt.numpy(), gap


def test_extract_gguf_equals_hf_folder_and_dense_reference(gguf_env, tmp_path):
    g, hf, model = gguf_env
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"id": f"ex{i}", "text": t}) + "\n" for i, t in enumerate(TEXTS)))
    k = 8
    runner = CliRunner()
    outs = {}
    for name, args in (("gguf", ["--model", str(g)]),
                       ("hf", ["--model", str(hf), "--tokenizer", MISTRAL_SPM])):
        out = tmp_path / f"store-{name}"
        r = runner.invoke(cli, ["extract", *args, "--dataset", str(data), "-o", str(out), "--top-k", str(k),
                                "--dtype", "float32", "--device", "cpu", "-q"])
        assert r.exit_code == 0, r.output
        outs[name] = TeacherStore(str(out))
    sg, sh = outs["gguf"], outs["hf"]
    assert sg.manifest["tokenizer_hash"] == sh.manifest["tokenizer_hash"]
    assert sg.manifest["model"].endswith("tiny.gguf")
    tok = load_tokenizer(MISTRAL_SPM)
    for i, text in enumerate(TEXTS):
        a, b = sg[f"ex{i}"], sh[f"ex{i}"]
        ids, rid, rlp, rtgt, gap = _dense_reference(model, tok, text, k)
        assert np.array_equal(a.input_ids, ids) and np.array_equal(b.input_ids, ids)
        for ex in (a, b):
            # every top-k id the reference ranks clearly apart (no near-tie at the k boundary) is stored
            lp = np.asarray(ex.topk_logprobs, dtype=np.float64)
            assert ex.topk_ids.shape == rid.shape
            same = (np.sort(ex.topk_ids, axis=1) == np.sort(rid, axis=1)).all(axis=1)
            assert (same | (gap < 1e-5)).all() and same.mean() > 0.9
            # log-probs within the store's quantisation bound (grid error h*sqrt(d) + h^2/4, + renormalisation)
            d = rlp[:, :1] - rlp
            bound = 2 * (QSTEP * np.sqrt(d).max(axis=1, keepdims=True) + QSTEP ** 2 / 4) + 1e-4
            assert (np.abs(lp - rlp) <= bound).all()
            tail = 1 - np.exp(rlp).sum(axis=1)
            assert np.allclose(ex.tail_mass, tail, atol=1e-5, rtol=1e-4)
            assert np.allclose(ex.target_logprob, rtgt, atol=2e-3 * np.abs(rtgt).max() + 1e-3)
        # and the two paths agree with each other, entry by entry (same weights, same float32 maths)
        assert np.array_equal(a.topk_ids, b.topk_ids)
        assert np.allclose(a.topk_logprobs, b.topk_logprobs, atol=1e-5)
        assert np.allclose(a.tail_mass, b.tail_mass, atol=1e-6)
    # the tiny model is far from uniform (top-1 mass >> 1/V), so equal top-k ids are a real check
    assert np.exp(rlp[:, 0]).mean() > 100 / 32000


def test_missing_gguf_package_names_the_extra(gguf_env, monkeypatch, tmp_path):
    import importlib.util

    from xtok.extract import ExtractError, check_model_spec

    g, _, _ = gguf_env
    real = importlib.util.find_spec

    def fake(name, *a, **kw):
        return None if name in ("gguf", "accelerate") else real(name, *a, **kw)

    monkeypatch.setattr(importlib.util, "find_spec", fake)
    monkeypatch.setenv("XTOK_CACHE_DIR", str(tmp_path / "empty-cache"))   # no cached conversion to fall back on
    with pytest.raises(TokenizerLoadError, match=r"needs the gguf package\(s\).*xtok\[gguf\]"):
        load_tokenizer(str(g), cache=False)    # (not the in-process cache of the earlier tests' load)
    with pytest.raises(ExtractError, match=r"gguf, accelerate package\(s\).*xtok\[gguf\]"):
        check_model_spec(str(g))
    r = CliRunner().invoke(cli, ["extract", "--model", str(g), "--dataset", str(tmp_path / "d.jsonl"),
                                 "-o", str(tmp_path / "s"), "-q"])
    assert r.exit_code != 0 and "xtok[gguf]" in r.output, r.output
