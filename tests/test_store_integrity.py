"""Damaged stores (issue 14, items 1, 4 and 6): every read of a store (reader, `xtok inspect`, the
collator) names the shard file, the example key and the fix; shard checksums in the manifest catch
silent corruption; the manifest is byte-stable across re-runs and resumes; a dataset path spelled
differently with the same content resumes; the reader's byte-sized row-group cache. Real files are
damaged (truncated, bytes flipped, replaced) and nothing may come back silently wrong."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from test_store import _header, _rows
from xtok.store import DamagedShardError, StoreError, StoreWriter, TeacherStore, encode_example, quantize_logprobs

V, K = 1000, 4


def _store(path, n_shards=3, per=5, header=None, seed=0):
    rng = np.random.default_rng(seed)
    w = StoreWriter(path, header or _header(V, K, 0))
    refs = []
    for j in range(n_shards):
        rows, ref = _rows(rng, per, V, K, 0, start=per * j)
        w.write_shard(j, rows)
        refs += ref
    man = w.finish()
    return man, refs


def _flip(path, offset, mask=0xFF):
    b = bytearray(open(path, "rb").read())
    b[offset] ^= mask
    open(path, "wb").write(bytes(b))


def _row_group_range(path, g=0):
    import pyarrow.parquet as pq

    from xtok.store.integrity import row_group_ranges

    return row_group_ranges(pq.ParquetFile(path).metadata)[g]


def _strip_checksums(store):
    """The manifest as an older xtok wrote it (no checksums)."""
    p = store / "manifest.json"
    man = json.loads(p.read_text())
    man.pop("manifest_sha256", None)
    for s in man["shards"]:
        for f in ("bytes", "sha256", "row_group_xxh3"):
            s.pop(f, None)
    p.write_text(json.dumps(man))


def _fix_hint(msg):
    return "delete it and re-run the same `xtok extract` command" in msg and "xtok inspect --verify" in msg


def test_manifest_records_checksums_of_every_shard(tmp_path):
    import hashlib

    man, _ = _store(tmp_path / "s")
    for s in man["shards"]:
        data = (tmp_path / "s" / s["file"]).read_bytes()
        assert s["bytes"] == len(data) and s["sha256"] == hashlib.sha256(data).hexdigest()
        a, b = _row_group_range(tmp_path / "s" / s["file"])
        import xxhash

        assert s["row_group_xxh3"] == [xxhash.xxh3_64_hexdigest(data[a:b])]
    st = TeacherStore(tmp_path / "s")
    assert st.checksummed
    assert all(st.verify_shard(s) == ["sha256", "row group checksums", "every row decoded"] for s in range(3))


def test_truncated_shard_is_named_and_other_shards_still_read(tmp_path):
    s = tmp_path / "s"
    man, refs = _store(s)
    f1 = s / man["shards"][1]["file"]
    f1.write_bytes(f1.read_bytes()[:-50])  # truncated: the parquet footer is gone
    st = TeacherStore(s)
    for key in ("ex0", "ex4", "ex10", "ex14"):  # other shards are unaffected
        ex = st[key]
        assert np.array_equal(ex.input_ids, refs[int(key[2:])]["ids"])
    for read in (lambda: st["ex6"], lambda: st[7], lambda: st.packed("ex8")):
        with pytest.raises(DamagedShardError) as e:
            read()
        msg = str(e.value)
        assert "shards/r000of001-00001.parquet" in msg and "bytes but manifest.json records" in msg and _fix_hint(msg)
        assert e.value.file == "shards/r000of001-00001.parquet" and e.value.key in ("ex6", "ex7", "ex8")
        assert isinstance(e.value, StoreError)
    # an older store (no checksums in its manifest): pyarrow's own error, but named
    _strip_checksums(s)
    st = TeacherStore(s)
    assert not st.checksummed and st["ex0"].key == "ex0"
    with pytest.raises(DamagedShardError, match=r"r000of001-00001.parquet: cannot read example 'ex5'.*pyarrow cannot "
                                                r"read it \(.*(magic bytes|footer).*delete it and re-run"):
        st["ex5"]


def test_flipped_bytes_are_caught_by_the_row_group_checksum(tmp_path):
    s = tmp_path / "s"
    man, refs = _store(s, n_shards=2, per=6)
    f0 = s / man["shards"][0]["file"]
    a, b = _row_group_range(f0)
    clean = f0.read_bytes()
    seen_silent = 0
    for off in range(a + 40, b - 8, max(1, (b - a) // 23)):  # bytes all over the row group's pages
        f0.write_bytes(clean)
        _flip(f0, off, 0x10)
        st = TeacherStore(s)
        with pytest.raises(DamagedShardError) as e:
            st.packed("ex3")
        assert "do not match the checksum recorded in manifest.json" in str(e.value) and "'ex3'" in str(e.value)
        assert _fix_hint(str(e.value))
        assert st["ex8"].key == "ex8"  # the other shard reads
        # without the check (verify=False), the same flip either errors (named) or would have returned
        # other values silently: the checksum is what stands between them and the training
        raw = TeacherStore(s, verify=False)
        try:
            ex = raw["ex3"]
        except DamagedShardError as e2:
            assert "r000of001-00000.parquet" in str(e2) and _fix_hint(str(e2))
        else:
            r = refs[3]
            same = (np.array_equal(ex.input_ids, r["ids"]) and np.array_equal(ex.topk_ids, r["order"])
                    and np.array_equal(ex.tail_mass, r["tail"]) and ex.text == "text 3")
            seen_silent += not same
    assert seen_silent >= 1  # some flips decode "fine" into wrong values: why checksums are needed


def test_garbage_and_swapped_shards_are_named(tmp_path):
    s = tmp_path / "s"
    man, _ = _store(s)
    f0, f2 = (s / man["shards"][j]["file"] for j in (0, 2))
    size = f0.stat().st_size
    f0.write_bytes(os.urandom(size))  # same size, not parquet
    with pytest.raises(DamagedShardError, match=r"r000of001-00000.parquet: cannot read example 'ex1': pyarrow cannot "
                                                r"read it"):
        TeacherStore(s)["ex1"]
    # a valid shard of the same store in the wrong place (no checksums to compare): the keys tell
    shutil.copy(f2, f0)
    _strip_checksums(s)
    with pytest.raises(DamagedShardError, match=r"r000of001-00000.parquet: cannot read example 'ex0' \(row group 0\): "
                                                r"row 0 holds example 'ex10' where manifest.json says 'ex0'"):
        TeacherStore(s)[0]


def test_damaged_row_without_checksums_does_not_decode_silently(tmp_path):
    """A row whose column sizes disagree with n_tokens/n_positions (an older store, no checksums) is a
    named error, not a short array or a read past a buffer."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    s = tmp_path / "s"
    man, _ = _store(s, n_shards=1)
    f = s / man["shards"][0]["file"]
    pf = pq.ParquetFile(f)
    t = pf.read()
    ids = t.column("topk_ids").to_pylist()
    ids[2] = ids[2][:-3]  # three bytes short
    t = t.set_column(t.schema.get_field_index("topk_ids"), "topk_ids", pa.array(ids, pa.binary()))
    pq.write_table(t.replace_schema_metadata(pf.schema_arrow.metadata), f, compression="zstd")
    _strip_checksums(s)
    st = TeacherStore(s)
    assert st["ex1"].key == "ex1"
    for read in (lambda: st["ex2"], lambda: st.packed("ex2")):
        with pytest.raises(DamagedShardError, match=r"cannot read example 'ex2'.*row does not decode \(column "
                                                    r"'topk_ids' holds \d+ bytes, expected \d+"):
            read()


def test_inspect_reports_damaged_shards_and_goes_on(tmp_path):
    from xtok.cli import main as cli

    s = tmp_path / "s"
    man, _ = _store(s, n_shards=4)
    r = CliRunner().invoke(cli, ["inspect", str(s), "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["damaged_shards"] == []
    f1 = s / man["shards"][1]["file"]
    f1.write_bytes(f1.read_bytes()[:-50])
    _flip(s / man["shards"][3]["file"], _row_group_range(s / man["shards"][3]["file"])[0] + 100)
    r = CliRunner().invoke(cli, ["inspect", str(s), "-n", "2"])
    assert r.exit_code == 1
    assert "examples: 20" in r.output and "top-k mass covered" in r.output and "example key=ex0" in r.output
    assert "2 of 4 shards are damaged" in r.output
    assert "r000of001-00001.parquet" in r.output and "r000of001-00003.parquet" in r.output
    assert "r000of001-00000.parquet" not in r.output and "Traceback" not in r.output
    # the example asked for is in a damaged shard: said, not a traceback
    r = CliRunner().invoke(cli, ["inspect", str(s), "-e", "ex6"])
    assert r.exit_code == 1 and "example ex6: in a damaged shard (shards/r000of001-00001.parquet)" in r.output
    # the histogram counts the healthy shards' positions only
    js = json.loads(CliRunner().invoke(cli, ["inspect", str(s), "--json"]).output.split("\n2 of")[0])
    healthy = sum(len(TeacherStore(s)[i].positions) for i in (*range(0, 5), *range(10, 15)))
    assert sum(js["topk_mass_histogram"].values()) == healthy
    assert [d["file"] for d in js["damaged_shards"]] == ["shards/r000of001-00001.parquet",
                                                         "shards/r000of001-00003.parquet"]


def test_inspect_verify_reads_every_row_and_the_whole_file(tmp_path):
    from xtok.cli import main as cli

    s = tmp_path / "s"
    man, _ = _store(s, n_shards=3)
    r = CliRunner().invoke(cli, ["inspect", str(s), "--verify", "--json"])
    assert r.exit_code == 0, r.output
    js = json.loads(r.output)
    assert js["verified"] == {"shards": 3, "damaged": 0, "checked": ["every row decoded", "row group checksums",
                                                                     "sha256"]}
    # a flip in the footer's key/value metadata: the reader does not use it (reads still pass), the
    # whole-file sha256 of --verify catches it
    f2 = s / man["shards"][2]["file"]
    data = f2.read_bytes()
    at = data.rindex(b"tokenizer_hash")
    _flip(f2, at + 2, 0x01)
    st = TeacherStore(s)
    assert [st[i].key for i in range(15)] == [f"ex{i}" for i in range(15)]
    r = CliRunner().invoke(cli, ["inspect", str(s), "--verify"])
    assert r.exit_code == 1 and "1 of 3 shards are damaged" in r.output
    assert "r000of001-00002.parquet: its sha256" in r.output and "recorded in manifest.json" in r.output
    # an older store: rows decoded, bytes not verified, and it says so
    _strip_checksums(s)
    r = CliRunner().invoke(cli, ["inspect", str(s), "--verify", "--json"])
    js = json.loads(r.output)
    assert r.exit_code == 0 and js["verified"]["checked"] == ["every row decoded"]
    assert js["checksums"].startswith("none recorded")


def test_collator_names_the_damaged_shard(tmp_path, spm_tok):
    """The collator reads through TeacherStore.packed: a damaged shard is a named error, never a
    silently empty or wrong teacher."""
    from xtok.collate import CrossTokenizerCollator, TeacherSpec
    from xtok.projection import ProjectionMatrix

    tok = spm_tok
    texts = ["The quick brown fox jumps over the lazy dog.", "Pack my box with five dozen liquor jugs.",
             "How vexingly quick daft zebras jump!", "Sphinx of black quartz, judge my vow."]
    rng = np.random.default_rng(0)
    w = StoreWriter(tmp_path / "s", {"model": "m", "tokenizer_hash": tok.content_hash, "vocab_size": tok.vocab_size,
                                     "top_k": 3, "sample_tail": 0, "temperature": 1.0})
    for j in range(2):
        rows = []
        for i in (2 * j, 2 * j + 1):
            ids = tok.encode(texts[i], add_special_tokens=True)
            P = len(ids) - 1
            top = np.sort(rng.standard_normal((P, 3)), axis=1)[:, ::-1] - 2
            rows.append(encode_example(f"r{i}", texts[i], ids, np.arange(P), rng.integers(0, tok.vocab_size, (P, 3)),
                                       quantize_logprobs(top), np.full(P, 0.3, np.float32), np.full(P, -1.0),
                                       np.zeros(P), tok.vocab_size))
        w.write_shard(j, rows)
    man = w.finish()
    Vt = tok.vocab_size
    W = ProjectionMatrix.from_coo(np.arange(Vt), np.arange(Vt), np.ones(Vt, np.float32), (Vt, Vt))
    col = CrossTokenizerCollator(tok, [TeacherSpec("t", tok, str(tmp_path / "s"), W)])
    batch = [{"id": f"r{i}", "text": t} for i, t in enumerate(texts)]
    assert col(batch)["stats"]["t"]["present"] == 4
    f1 = tmp_path / "s" / man["shards"][1]["file"]
    _flip(f1, _row_group_range(f1)[0] + 60)
    col = CrossTokenizerCollator(tok, [TeacherSpec("t", tok, str(tmp_path / "s"), W)])
    assert col(batch[:2])["stats"]["t"]["present"] == 2  # shard 0 is fine
    with pytest.raises(DamagedShardError, match=r"r000of001-00001.parquet: cannot read example 'r2' \(row group 0\): "
                                                r"its bytes do not match the checksum"):
        col(batch)


def test_row_group_cache_by_bytes(tmp_path):
    s = tmp_path / "s"
    rng = np.random.default_rng(1)
    w = StoreWriter(s, _header(V, K, 0))
    rows, refs = _rows(rng, 40, V, K, 0)
    # 40 row groups in one shard: one example each (write_shard sizes groups by bytes; force it here)
    import pyarrow.parquet as pq

    orig = pq.write_table
    try:
        pq.write_table = lambda *a, **k: orig(*a, **dict(k, row_group_size=1))
        w.write_shard(0, rows)
    finally:
        pq.write_table = orig
    w.finish()
    big = TeacherStore(s)
    for i in range(40):
        big.packed(i)
    assert len(big._cache) == 40 and big._cache_used == sum(e[1] for e in big._cache.values())
    budget = int(big._cache_used / 8)
    small = TeacherStore(s, cache_bytes=budget)
    sizes = []
    for i in rng.permutation(40):
        ex = small[int(i)] if i % 2 else small.packed(int(i))
        assert np.array_equal(ex.input_ids, refs[i]["ids"])
        assert small._cache_used == sum(e[1] for e in small._cache.values()) <= budget
        sizes.append(len(small._cache))
    assert 2 <= min(sizes[10:]) and max(sizes) < 15  # evicts by bytes: ~1/8 of the row groups stay
    capped = TeacherStore(s, cache_row_groups=3)
    for i in range(10):
        capped.packed(i)
    assert len(capped._cache) == 3
    # a packed read then a full read of the same row group: the missing columns are added
    st = TeacherStore(s)
    st.packed(5)
    assert "text" not in st._cache[(0, 5)][0]
    assert st[5].text == refs[5]["key"].replace("ex", "text ")
    assert "text" in st._cache[(0, 5)][0] and len(st._cache) == 1


def test_writer_refuses_a_shard_damaged_since_the_manifest(tmp_path):
    s = tmp_path / "s"
    man, _ = _store(s)
    f = s / man["shards"][2]["file"]
    data = f.read_bytes()
    f.write_bytes(data[:100] + b"inserted" + data[100:])  # the footer still reads: only the size tells
    with pytest.raises(DamagedShardError, match=r"r000of001-00002.parquet: \d+ bytes but the store records \d+ .*"
                                                r"delete it and re-run the same `xtok extract`"):
        StoreWriter(s, _header(V, K, 0))
    # deleting it (as the message says) lets the re-run redo it; the others keep their checksums
    f.unlink()
    w = StoreWriter(s, _header(V, K, 0))
    assert w.committed() == {0, 1}
    rows, _ = _rows(np.random.default_rng(0), 15, V, K, 0)
    w.write_shard(2, rows[10:])
    man2 = w.finish()
    assert man2["shards"][:2] == man["shards"][:2]
    assert all(TeacherStore(s).verify_shard(j) for j in range(3))


def test_manifest_bytes_stable_across_reruns_and_resumes(tmp_path):
    """Re-running on a finished store and resuming after a kill give the manifest of an uninterrupted
    run byte for byte, whatever order the skip counts came in."""
    rng = np.random.default_rng(7)
    shards = [_rows(rng, 3, V, K, 0, start=3 * j)[0] for j in range(3)]
    skips = [{"too_long": 1, "no_targets": 2}, {}, {"no_targets": 1, "too_long": 0}]

    def run(path, stop=None):
        w = StoreWriter(path, _header(V, K, 0))
        for j in range(3):
            if j in w.committed():
                continue
            if stop is not None and j == stop:
                return None  # killed here
            w.write_shard(j, shards[j], skips[j])
        return w.finish({"empty": 0, "duplicates": 3})

    run(tmp_path / "a")
    ref = (tmp_path / "a" / "manifest.json").read_bytes()
    run(tmp_path / "a")
    assert (tmp_path / "a" / "manifest.json").read_bytes() == ref
    assert run(tmp_path / "b", stop=2) is None
    run(tmp_path / "b")
    assert (tmp_path / "b" / "manifest.json").read_bytes() == ref
    man = json.loads(ref)
    assert man["skipped"] == {"no_targets": 3, "too_long": 1}
    assert list(man) == sorted(man) and list(man["shards"][0]) == sorted(man["shards"][0])


def test_resume_accepts_the_same_dataset_under_another_spelling(tmp_path):
    h = dict(_header(V, K, 0), dataset="./big.jsonl", dataset_fingerprint="f" * 64, model="./m", model_hash="a" * 64)
    s = tmp_path / "s"
    rng = np.random.default_rng(3)
    w = StoreWriter(s, h)
    w.write_shard(0, _rows(rng, 2, V, K, 0)[0])
    # killed; resumed with the path spelled differently: same fingerprint -> same store, spelling kept
    other = dict(h, dataset=str(tmp_path / "big.jsonl"), model=str(tmp_path / "m"))
    w2 = StoreWriter(s, other)
    assert w2.committed() == {0} and w2.header["dataset"] == "./big.jsonl" and w2.header["model"] == "./m"
    w2.write_shard(1, _rows(rng, 2, V, K, 0, start=2)[0])
    man = w2.finish()
    assert man["dataset"] == "./big.jsonl"
    before = (s / "manifest.json").read_bytes()
    StoreWriter(s, dict(other, dataset="big.jsonl")).finish()
    assert (s / "manifest.json").read_bytes() == before
    # other content is still another dataset, whatever the spelling
    with pytest.raises(StoreError, match=r"differs in: dataset, dataset_fingerprint"):
        StoreWriter(s, dict(other, dataset_fingerprint="0" * 64))
    with pytest.raises(StoreError, match=r"differs in: dataset_fingerprint$|differs in: dataset_fingerprint\)"):
        StoreWriter(s, dict(h, dataset_fingerprint="0" * 64))


def test_edited_manifest_is_refused_and_rewritten(tmp_path):
    """manifest.json carries its own checksum: a manifest edited or damaged after it was written (here one
    shard file name) is a StoreError naming manifest.json, not a misleading 'shard missing'; the writer
    treats it as absent (it is derived from the parts) and finish() merges it again."""
    from xtok.store import StoreError, StoreWriter, TeacherStore
    from xtok.store.writer import merge_manifests

    s = tmp_path / "s"
    man, _ = _store(s, n_shards=2)
    p = s / "manifest.json"
    good = p.read_bytes()
    p.write_bytes(good.replace(b"r000of001-00001", b"r010of001-00001"))
    with pytest.raises(StoreError, match=r"manifest\.json: its content does not match its manifest_sha256"):
        TeacherStore(s)
    merge_manifests(s)
    assert p.read_bytes() == good and len(TeacherStore(s)) == sum(x["n"] for x in man["shards"])

