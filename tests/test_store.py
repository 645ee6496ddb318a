"""Teacher store format: id packing, log-prob quantisation against float64 references, atomic
writer, crash repair, O(1) random access, keys."""
from __future__ import annotations

import hashlib
import json
import os
import pickle

import numpy as np
import pytest

from xtok.store import (QSTEP, StoreError, StoreWriter, TeacherStore, dequantize_logprobs, encode_example,
                        example_key, merge_manifests, pack_ids, quantize_logprobs, unpack_ids)


@pytest.mark.parametrize("V", [512, 65536, 65537, 131072, 262144, 300000])
def test_pack_ids_roundtrip_and_size(V):
    rng = np.random.default_rng(V)
    for n in (0, 1, 3, 4, 5, 1001):
        ids = rng.integers(0, V, size=n)
        if n:
            ids[0] = V - 1
        buf = pack_ids(ids, V)
        assert np.array_equal(unpack_ids(buf, n, V), ids)
        per = len(buf) / max(n, 1)
        if V <= 65536:
            assert len(buf) == 2 * n
        elif V <= 262144:
            assert len(buf) == 2 * n + (n + 3) // 4 and (n < 8 or per <= 2.25 + 3 / n)
        else:
            assert len(buf) == 4 * n


def _random_logprobs(rng, P, V, k, scale):
    logits = rng.standard_normal((P, V)) * scale
    lp = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) - logits.max(1, keepdims=True)
    order = np.argsort(-lp, axis=1)[:, :k]
    top = np.take_along_axis(lp, order, 1)
    return lp, order, top


@pytest.mark.parametrize("scale", [0.5, 3.0, 8.0])
def test_quantisation_error_bound_and_exact_tail(scale):
    rng = np.random.default_rng(1)
    lp, _, top = _random_logprobs(rng, 300, 2000, 32, scale)
    tail = 1.0 - np.exp(top).sum(1)          # exact float64 tail mass
    codes = quantize_logprobs(top)
    assert codes.dtype == np.uint8 and (codes[:, 0] == 0).all() and (np.diff(codes.astype(int), axis=1) >= 0).all()
    rec = dequantize_logprobs(codes, tail.astype(np.float32)).astype(np.float64)
    # the reconstruction's probabilities sum to exactly 1 - tail (the contract)
    np.testing.assert_allclose(1.0 - np.exp(rec).sum(1), tail.astype(np.float32), rtol=0, atol=2e-6)
    # per-entry error: grid error in d plus the renormalisation shift (both <= h*sqrt(d) + h^2)
    d = top[:, :1] - top
    inside = d < 20.0
    bound = 2 * (QSTEP * np.sqrt(d) + QSTEP ** 2) + 1e-5
    err = np.abs(rec - top)
    assert (err[inside] <= (bound + bound.max(1, keepdims=True))[inside]).all()
    # fidelity: KL(exact top-k + tail bucket || stored top-k + tail bucket) per position
    p = np.concatenate([np.exp(top), tail[:, None]], 1)
    q = np.concatenate([np.exp(rec), tail[:, None]], 1)
    kl = (p * (np.log(np.maximum(p, 1e-300)) - np.log(np.maximum(q, 1e-300)))).sum(1)
    assert kl.mean() < 2e-4 and kl.max() < 2e-3


def test_quantisation_top_p_padding():
    rng = np.random.default_rng(2)
    _, _, top = _random_logprobs(rng, 50, 500, 8, 4.0)
    n_kept = rng.integers(1, 9, size=50)
    j = np.arange(8)[None, :]
    top_p = np.where(j < n_kept[:, None], top, -np.inf)
    tail = 1.0 - np.exp(top_p).sum(1)
    rec = dequantize_logprobs(quantize_logprobs(top_p), tail, n_kept)
    assert np.isneginf(rec[j >= n_kept[:, None]]).all()
    np.testing.assert_allclose(np.exp(rec.astype(np.float64)).sum(1), 1 - tail, rtol=1e-6)


def test_example_key_rule():
    assert example_key({"id": 17, "text": "x"}) == "17"
    assert example_key({"key": "a", "text": "x"}) == "a"
    assert example_key({"uid": "z", "text": "x"}, "uid") == "z"
    assert example_key({"id": None, "text": "héllo"}) == hashlib.sha256("héllo".encode()).hexdigest()
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    want = hashlib.sha256('[{"content": "hi", "role": "user"}, {"content": "yo", "role": "assistant"}]'.encode()).hexdigest()
    assert example_key({"messages": msgs}) == want
    with pytest.raises(KeyError):
        example_key({"text": "x"}, "uid")


def _rows(rng, n, V, k, m, start=0):
    rows, ref = [], []
    for i in range(n):
        T = int(rng.integers(3, 40))
        ids = rng.integers(0, V, size=T)
        pos = np.sort(rng.choice(T - 1, size=int(rng.integers(1, T)), replace=False))
        _, order, top = _random_logprobs(rng, len(pos), V, k, 3.0)
        tail = (1 - np.exp(top).sum(1)).astype(np.float32)
        tgt = rng.standard_normal(len(pos)).astype(np.float32) - 3
        ws = rng.random(len(pos)).astype(np.float32)
        tids = rng.integers(-1, V, size=(len(pos), m)) if m else None
        key = f"ex{start + i}"
        rows.append(encode_example(key, f"text {i}", ids, pos, order, quantize_logprobs(top), tail, tgt, ws, V,
                                   tail_ids=tids))
        ref.append(dict(key=key, ids=ids, pos=pos, order=order, top=top, tail=tail, tgt=tgt, ws=ws, tids=tids))
    return rows, ref


def _header(V, k, m):
    return {"model": "m", "tokenizer_hash": "h", "vocab_size": V, "top_k": k, "sample_tail": m, "temperature": 1.0}


@pytest.mark.parametrize("V,m", [(1000, 0), (150000, 3)])
def test_write_read_random_access(tmp_path, V, m):
    rng = np.random.default_rng(V)
    k = 6
    w = StoreWriter(tmp_path / "s", _header(V, k, m))
    refs = []
    for j in range(3):
        rows, ref = _rows(rng, 7, V, k, m, start=7 * j)
        w.write_shard(j, rows)
        refs += ref
    man = w.finish()
    assert man["n_examples"] == 21
    st = TeacherStore(tmp_path / "s")
    assert len(st) == 21 and st.manifest["tokenizer_hash"] == "h"
    for i in rng.permutation(21):  # random order: crosses shards and row groups
        r = refs[i]
        ex = st[r["key"]] if i % 2 else st[int(i)]
        assert ex.key == r["key"] and ex.text.startswith("text")
        assert np.array_equal(ex.input_ids, r["ids"]) and np.array_equal(ex.positions, r["pos"])
        assert np.array_equal(ex.topk_ids, r["order"])
        np.testing.assert_array_equal(ex.tail_mass, r["tail"])
        np.testing.assert_allclose(ex.topk_logprobs, r["top"], atol=0.12)
        np.testing.assert_allclose(ex.target_logprob, r["tgt"], rtol=1e-3)
        np.testing.assert_allclose(ex.word_start_mass, r["ws"], atol=5e-4)
        if m:
            assert np.array_equal(ex.tail_ids, r["tids"])
        else:
            assert ex.tail_ids is None
    assert [e.key for e in st] == [r["key"] for r in refs]
    st2 = pickle.loads(pickle.dumps(st))
    assert np.array_equal(st2["ex5"].input_ids, refs[5]["ids"])
    with pytest.raises(KeyError, match="not in the store"):
        st["nope"]
    with pytest.raises(IndexError):
        st[21]
    t = st[0].to_tensors()
    assert t["topk_ids"].shape == (len(refs[0]["pos"]), k)
    # packed: one example with its top-k rows still encoded, by key or global index
    assert st.packed("nope") is None and st.packed(21) is None and st.packed(-1) is None
    for i in (0, 9, 20):
        got = st.packed(refs[i]["key"])
        assert got.key == refs[i]["key"]
        assert st.packed(i).key == refs[i]["key"]
        assert np.array_equal(got.input_ids, refs[i]["ids"])


def test_crash_repair_orphan_shard_and_temp_files(tmp_path):
    rng = np.random.default_rng(0)
    V, k = 1000, 4
    w = StoreWriter(tmp_path / "s", _header(V, k, 0))
    rows0, _ = _rows(rng, 3, V, k, 0)
    rows1, _ = _rows(rng, 3, V, k, 0, start=3)
    w.write_shard(0, rows0)
    w.write_shard(1, rows1)
    # a kill -9 here: no finish; plus half-written temporary files of a shard and of the part, and the
    # part file itself gone (a kill before it was first written)
    (tmp_path / "s" / "shards" / "r000of001-00002.parquet.tmp-dead").write_bytes(b"partial")
    (tmp_path / "s" / "parts" / "r000of001.json.tmp-dead").write_bytes(b"{")
    (tmp_path / "s" / "parts" / "r000of001.json").unlink()
    w2 = StoreWriter(tmp_path / "s", _header(V, k, 0))
    assert w2.committed() == {0, 1}
    assert not any(".tmp-" in n for d in ("shards", "parts") for n in os.listdir(tmp_path / "s" / d))
    man = w2.finish()
    assert [k_ for s in man["shards"] for k_ in s["keys"]] == [f"ex{i}" for i in range(6)]
    assert [s["n"] for s in man["shards"]] == [3, 3]


def test_orphan_shard_of_other_settings_is_refused(tmp_path):
    """A shard renamed into place before any part or manifest existed (kill right after the first
    shard) records its own settings; a writer with other settings refuses it (or wipes it with
    overwrite) instead of adopting data it cannot decode."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(3)
    V = 1000
    s = tmp_path / "s"
    w8 = StoreWriter(s, _header(V, 8, 0))
    w8.write_shard(0, _rows(rng, 3, V, 8, 0)[0])
    for f in (s / "parts").iterdir():
        f.unlink()
    (s / "shards" / "r000of001-00001.parquet.tmp-dead").write_bytes(b"partial")
    with pytest.raises(StoreError, match=r"different settings.*shards/r000of001-00000.parquet differs in: top_k"):
        StoreWriter(s, _header(V, 16, 0))
    assert sorted(os.listdir(s / "shards")) == ["r000of001-00000.parquet", "r000of001-00001.parquet.tmp-dead"]
    # the same settings adopt it (and clean the temporary file)
    w8b = StoreWriter(s, _header(V, 8, 0))
    assert w8b.committed() == {0} and os.listdir(s / "shards") == ["r000of001-00000.parquet"]
    # other settings with overwrite: everything is replaced and the store reads back with the new k
    w16 = StoreWriter(s, _header(V, 16, 0), overwrite=True)
    assert w16.committed() == set() and os.listdir(s / "shards") == []
    rows, ref = _rows(rng, 2, V, 16, 0)
    w16.write_shard(0, rows)
    w16.finish()
    ex = TeacherStore(s)[0]
    assert ex.topk_ids.shape == (len(ref[0]["pos"]), 16) and np.array_equal(ex.topk_ids, ref[0]["order"])
    # a shard that records no settings (older xtok) is refused too
    t = pa.Table.from_pylist(_rows(rng, 1, V, 16, 0)[0])
    pq.write_table(t, s / "shards" / "r000of001-00001.parquet")
    with pytest.raises(StoreError, match="older xtok"):
        StoreWriter(s, _header(V, 16, 0))
    # an unreadable shard is named, not a traceback
    (s / "shards" / "r000of001-00001.parquet").write_bytes(b"not parquet")
    with pytest.raises(StoreError, match="r000of001-00001.parquet: cannot read this shard"):
        StoreWriter(s, _header(V, 16, 0))
    # ... and so is an unreadable part file; overwrite replaces both
    (s / "parts" / "r000of001.json").write_text("{")
    with pytest.raises(StoreError, match="r000of001.json: unreadable"):
        StoreWriter(s, _header(V, 16, 0))
    assert StoreWriter(s, _header(V, 16, 0), overwrite=True).committed() == set()
    assert os.listdir(s / "shards") == [] and not (s / "manifest.json").exists()


def test_shard_commit_writes_only_the_shard(tmp_path, monkeypatch):
    """Committing a shard is O(shard): one atomic write of the shard itself, of the same size for the
    first and the last shard (no per-rank file that grows with every key so far)."""
    from xtok.store.fs import StoreFS

    writes = []
    orig = StoreFS.write_atomic
    monkeypatch.setattr(StoreFS, "write_atomic", lambda self, rel, data: (writes.append((rel, len(data))),
                                                                          orig(self, rel, data))[1])
    rng = np.random.default_rng(4)
    V, k, n_shards = 1000, 4, 40
    rows, _ = _rows(rng, 4, V, k, 0)
    w = StoreWriter(tmp_path / "s", _header(V, k, 0))
    before = len(writes)
    for j in range(n_shards):
        w.write_shard(j, [dict(r, key=f"ex{4 * j + i:06d}") for i, r in enumerate(rows)])
    during = writes[before:]
    assert [rel for rel, _ in during] == [f"shards/r000of001-{j:05d}.parquet" for j in range(n_shards)]
    sizes = np.array([n for _, n in during])
    assert sizes.max() - sizes.min() <= 16
    man = w.finish()
    assert [rel for rel, _ in writes[before + n_shards:]] == ["parts/r000of001.json", "manifest.json"]
    assert [key for s in man["shards"] for key in s["keys"]] == [f"ex{i:06d}" for i in range(4 * n_shards)]
    part = json.loads((tmp_path / "s" / "parts" / "r000of001.json").read_text())
    assert "keys" not in part["shards"]["00000"] and part["shards"]["00039"]["n"] == 4


def test_rerun_on_finished_store_is_noop(tmp_path):
    rng = np.random.default_rng(6)
    V, k = 1000, 4
    s = tmp_path / "s"
    w = StoreWriter(s, _header(V, k, 0))
    w.write_shard(0, _rows(rng, 3, V, k, 0)[0], {"too_long": 1})
    w.write_shard(1, _rows(rng, 2, V, k, 0, start=3)[0])
    w.finish({"duplicates": 2})
    before = (s / "manifest.json").read_bytes()
    w2 = StoreWriter(s, _header(V, k, 0))
    assert w2.committed() == {0, 1}
    man = w2.finish({"duplicates": 2})
    assert (s / "manifest.json").read_bytes() == before
    assert man["skipped"] == {"too_long": 1} and man["n_examples"] == 5 and man["stats"] == {"duplicates": 2}
    with pytest.raises(StoreError, match="manifest.json differs in: temperature"):
        StoreWriter(s, dict(_header(V, k, 0), temperature=2.0))
    # a shard lost after the run: the merge names it instead of writing a manifest that points nowhere
    (s / "shards" / "r000of001-00001.parquet").unlink()
    with pytest.raises(StoreError, match="r000of001-00001.parquet: cannot read the shard's keys"):
        merge_manifests(s)


def test_errors(tmp_path):
    with pytest.raises(StoreError, match="no manifest.json"):
        TeacherStore(tmp_path)
    w = StoreWriter(tmp_path / "s", _header(1000, 4, 0))
    w.write_shard(0, _rows(np.random.default_rng(0), 2, 1000, 4, 0)[0])
    with pytest.raises(StoreError, match="has not finished"):
        TeacherStore(tmp_path / "s")
    with pytest.raises(StoreError, match="different settings.*top_k"):
        StoreWriter(tmp_path / "s", _header(1000, 8, 0))
    w3 = StoreWriter(tmp_path / "s", _header(1000, 8, 0), overwrite=True)
    assert w3.committed() == set()


def test_fsspec_url_store():
    """Any fsspec URL works as output (here the in-memory filesystem)."""
    import fsspec

    url = "memory://xtok-test-store"
    fs = fsspec.filesystem("memory")
    if fs.exists("/xtok-test-store"):
        fs.rm("/xtok-test-store", recursive=True)
    rng = np.random.default_rng(5)
    rows, ref = _rows(rng, 4, 70000, 3, 2)
    w = StoreWriter(url, _header(70000, 3, 2))
    w.write_shard(0, rows)
    w.finish()
    st = TeacherStore(url)
    assert st.keys() == [r["key"] for r in ref]
    assert np.array_equal(st["ex2"].topk_ids, ref[2]["order"]) and np.array_equal(st["ex3"].tail_ids, ref[3]["tids"])
    fs.rm("/xtok-test-store", recursive=True)
