"""CrossTokenizerCollator: targets cross-checked against slow references built from a dense teacher
distribution (a tiny random-init Llama whose full softmax we compute), independent byte-offset
alignment, missing / mismatched teachers, chat labels, pickling + DataLoader workers, end-to-end."""
from __future__ import annotations

import pickle
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import ASSETS, MISTRAL_SPM, MISTRAL_SPM_V3, TEKKEN
from xtok.collate import CrossTokenizerCollator, TeacherSpec
from xtok.tokens import load_tokenizer

# ------------------------------------------------------------------------------------------
# helpers: dense teacher, in-memory store, a reference W, slow references
# ------------------------------------------------------------------------------------------


def tiny_llama(vocab: int, seed: int = 0, hidden: int = 32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
                      initializer_range=0.5, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


@torch.no_grad()
def dense_logprobs(model, ids) -> np.ndarray:
    x = torch.as_tensor(np.asarray(ids, dtype=np.int64))[None]
    return torch.log_softmax(model(x).logits[0].float(), -1).numpy()


def make_example(ids, logp, k, positions=None, tail_m=0, seed=0):
    """A store example built from the dense teacher distribution (what extract stores)."""
    T = len(ids)
    pos = np.arange(T - 1) if positions is None else np.asarray(positions)
    lp = logp[pos]
    top = np.argsort(-lp, axis=1, kind="stable")[:, :k]
    topv = np.take_along_axis(lp, top, 1)
    tail = 1.0 - np.exp(topv).sum(1)
    ex = SimpleNamespace(input_ids=np.asarray(ids, np.int32), positions=pos.astype(np.int32),
                         topk_ids=top.astype(np.int32), topk_logprobs=topv.astype(np.float32),
                         tail_mass=tail.astype(np.float32), target_logprob=lp[np.arange(len(pos)), np.asarray(ids)[pos + 1]],
                         word_start_mass=np.zeros(len(pos), np.float32), tail_ids=None)
    if tail_m:
        rng = np.random.default_rng(seed)
        ex.tail_ids = rng.integers(0, logp.shape[1], (len(pos), tail_m)).astype(np.int32)
    return ex


def random_w(vt, vs, seed=0, max_nnz=3):
    """A row-stochastic sparse W [V_t, V_s] (1..max_nnz entries per row) as a real ProjectionMatrix."""
    from xtok.projection import ProjectionMatrix

    rng = np.random.default_rng(seed)
    nnz = rng.integers(1, max_nnz + 1, vt)
    indptr = np.concatenate([[0], np.cumsum(nnz)]).astype(np.int64)
    cols = rng.integers(0, vs, indptr[-1])
    v = rng.random(indptr[-1]) + 0.05
    vals = (v / np.repeat(np.add.reduceat(v, indptr[:-1]), nnz)).astype(np.float32)
    rows = np.repeat(np.arange(vt), nnz)
    return ProjectionMatrix.from_coo(rows, cols, vals, (vt, vs))


class ProjectOnly:
    """Hides W's CSR arrays: the collator must fall back to `W.project` (torch, xtok.projection)."""

    def __init__(self, W):
        self.W = W

    def project(self, ids, probs):
        return self.W.project(ids, probs)


def w_rows_of(proj):
    """teacher id -> [(student id, weight)], read straight from W's CSR arrays (slow reference)."""
    W = proj.W if isinstance(proj, ProjectOnly) else proj
    return lambda t: list(zip(W.indices[W.indptr[t]:W.indptr[t + 1]].tolist(),
                              W.data[W.indptr[t]:W.indptr[t + 1]].tolist()))


def ref_pairs(t_tok, s_tok, text, t_ids, s_ids):
    """Independent alignment: (teacher token t, student token s) starting at the same text byte,
    both non-special, from each tokenizer's own byte offsets (BOS prepended when present)."""
    def starts(tok, ids):
        ids_ref, off = tok.encode_with_offsets(text)
        ids = np.asarray(ids)
        extra = len(ids) - len(ids_ref)
        assert extra >= 0 and np.array_equal(ids[extra:], ids_ref[:len(ids) - extra]) or np.array_equal(
            ids[extra:], ids_ref), "collator/store ids differ from the tokenizer's own encoding"
        st = {}
        for i in range(extra, len(ids)):
            if not tok.token_bytes.is_special[ids[i]]:
                st.setdefault(int(off[i - extra, 0]), i)
        return st
    ts, ss = starts(t_tok, t_ids), starts(s_tok, s_ids)
    return {(ts[b], ss[b]) for b in ts.keys() & ss.keys()}


def check_targets(batch, name, i, logp, t_ids, k, wrow, pairs=None, tol=1e-4, n_check=None):
    """Every target of example i against the dense teacher distribution; returns #checked."""
    tt = batch["teachers"][name]
    m = tt["mask"][i].numpy()
    pos = tt["positions"][i].numpy()[m]
    labels = batch["labels"][i].numpy()
    assert (labels[pos + 1] != -100).all(), "target on a position whose next token is not trained"
    checked = 0
    sel = np.nonzero(m)[0]
    if n_check is not None:
        sel = sel[np.linspace(0, len(sel) - 1, min(n_check, len(sel))).astype(int)]
    for j in sel:
        s = int(tt["positions"][i, j])
        # which teacher position: the reference pair with student token s+1
        cands = [t for (t, ss) in pairs if ss == s + 1] if pairs is not None else None
        assert cands, f"student output position {s} has a target but no reference alignment pair"
        t = cands[0]
        row = logp[t - 1]
        top = np.argsort(-row, kind="stable")[:k]
        ref = {}
        for v in top.tolist():
            for c, w in wrow(v):
                ref[c] = ref.get(c, 0.0) + float(np.exp(row[v])) * w
        got = {}
        for c, p in zip(tt["target_ids"][i, j].tolist(), tt["target_probs"][i, j].tolist()):
            if p > 0:
                got[c] = got.get(c, 0.0) + p
        big = {c for c, p in ref.items() if p > 10 * tol}
        assert big <= set(got), (s, t)
        for c in big:
            assert abs(got[c] - ref[c]) <= tol + 2e-2 * ref[c], (s, t, c, got[c], ref[c])
        ref_tail = 1.0 - float(np.exp(row[top]).sum())
        assert abs(float(tt["tail_mass"][i, j]) - ref_tail) < 5 * tol + 1e-2 * ref_tail
        checked += 1
    return checked


def check_chunks(batch, name, i, logp, t_ids, pairs, tol=1e-3):
    tt = batch["teachers"][name]
    cm = tt["chunk_mask"][i].numpy()
    spans = tt["chunk_spans"][i].numpy()[cm]
    lps = tt["chunk_teacher_logprob"][i].numpy()[cm]
    s2t = {s: t for (t, s) in pairs}
    labels = batch["labels"][i].numpy()
    for (s0, s1), lp in zip(spans, lps):
        assert (labels[s0:s1] != -100).all()
        t0, t1 = s2t[int(s0)], s2t.get(int(s1))
        if t1 is None:  # chunk ends at the end of the aligned text
            t1 = len(t_ids)
        ref = sum(float(logp[t - 1, t_ids[t]]) for t in range(t0, t1))
        assert abs(ref - lp) < tol * max(1.0, abs(ref)), (s0, s1, t0, t1, ref, lp)
    return len(spans)


class DictStore(dict):
    manifest: dict = {}


# ------------------------------------------------------------------------------------------
# unit-level: targets against the dense reference (in-memory store, both projection paths)
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def spm():
    return load_tokenizer(MISTRAL_SPM)


@pytest.fixture(scope="module")
def tek():
    return load_tokenizer(TEKKEN)


@pytest.fixture(scope="module")
def text_rows(shakespeare_text):
    t = shakespeare_text
    return [{"id": f"ex{i}", "text": t[i * 700: i * 700 + 500 + 60 * i]} for i in range(4)]


@pytest.fixture(scope="module")
def spm_teacher(spm, text_rows):
    """SPM 32k teacher: dense log-probs per row, and an in-memory store with k=16."""
    model = tiny_llama(spm.vocab_size, seed=1)
    data = {}
    for r in text_rows:
        ids = spm.encode(r["text"], add_special_tokens=True)
        data[r["id"]] = (ids, dense_logprobs(model, ids))
    return data


@pytest.mark.parametrize("path", ["kernel", "onehot", "project"])
def test_targets_match_dense_reference(spm, tek, text_rows, spm_teacher, path):
    """kernel: general CSR kernel; onehot: the one-entry-per-row kernel (first-token W, several
    teacher ids sharing student ids); project: fallback through W.project()."""
    k = 16
    W = random_w(spm.vocab_size, 3000 if path == "onehot" else tek.vocab_size, seed=3,
                 max_nnz=1 if path == "onehot" else 3)
    W = ProjectOnly(W) if path == "project" else W
    store = DictStore({key: make_example(ids, lp, k) for key, (ids, lp) in spm_teacher.items()})
    col = CrossTokenizerCollator(tek, [TeacherSpec("spm", spm, store, W)], max_length=4096)
    pj = col.teachers[0].projector(col.student)
    assert (pj.csr is None) == (path == "project") and (pj.onehot is not None) == (path == "onehot")
    batch = col(text_rows)
    st = batch["stats"]["spm"]
    assert st["present"] == len(text_rows) and st["missing"] == 0 and st["mismatch"] == 0
    n_checked = n_chunks = 0
    for i, r in enumerate(text_rows):
        t_ids, logp = spm_teacher[r["id"]]
        s_ids = batch["input_ids"][i][batch["attention_mask"][i].bool()].numpy()
        pairs = ref_pairs(spm, tek, r["text"], t_ids, s_ids)
        tt = batch["teachers"]["spm"]
        got = {int(p) + 1 for p in tt["positions"][i][tt["mask"][i]]}
        ref = {s for (t, s) in pairs if t >= 1 and s >= 1}
        assert got <= ref, "targets at positions the independent alignment does not support"
        assert len(got) >= 0.9 * len(ref), (len(got), len(ref))
        n_checked += check_targets(batch, "spm", i, logp, t_ids, k, w_rows_of(W), pairs,
                                   n_check=80 if i == 0 else 25)
        n_chunks += check_chunks(batch, "spm", i, logp, t_ids, pairs)
    assert n_checked > 100 and n_chunks > 300
    ids = batch["teachers"]["spm"]["target_ids"]
    assert ids.min() >= 0 and ids.max() < tek.vocab_size


def test_sampled_tail_ids(spm, tek, text_rows, spm_teacher):
    """Stored tail samples enter the target with weight tail_mass/m each; the tail bucket ~0."""
    k, m = 8, 4
    W = random_w(spm.vocab_size, tek.vocab_size, seed=5)
    key = text_rows[0]["id"]
    ids, logp = spm_teacher[key]
    ex = make_example(ids, logp, k, tail_m=m, seed=1)
    col = CrossTokenizerCollator(tek, [TeacherSpec("spm", spm, DictStore({key: ex}), W)])
    b = col(text_rows[:1])
    tt = b["teachers"]["spm"]
    msk = tt["mask"][0]
    assert msk.sum() > 50
    assert float(tt["tail_mass"][0][msk].max()) < 1e-4
    total = tt["target_probs"][0][msk].sum(-1)
    assert torch.allclose(total, torch.ones_like(total), atol=1e-4)
    # one position by hand: top-k + tail samples, projected with the slow W
    j = 7
    s = int(tt["positions"][0, j])
    pairs = ref_pairs(spm, tek, text_rows[0]["text"], ids, b["input_ids"][0].numpy())
    t = [tp for (tp, sp) in pairs if sp == s + 1][0]
    r = int(np.nonzero(ex.positions == t - 1)[0][0])
    src = list(zip(ex.topk_ids[r].tolist(), np.exp(ex.topk_logprobs[r]).tolist()))
    src += [(int(v), float(ex.tail_mass[r]) / m) for v in ex.tail_ids[r]]
    ref = {}
    for v, p in src:
        for c, w in w_rows_of(W)(v):
            ref[c] = ref.get(c, 0.0) + p * w
    got = {c: p for c, p in zip(tt["target_ids"][0, j].tolist(), tt["target_probs"][0, j].tolist()) if p > 0}
    assert set(got) == {c for c, p in ref.items() if p > 0}
    assert all(abs(got[c] - ref[c]) < 1e-5 for c in got)


def test_missing_example_mismatch_and_partial_store(spm, tek, text_rows, spm_teacher):
    k = 8
    W = random_w(spm.vocab_size, tek.vocab_size, seed=7)
    keys = [r["id"] for r in text_rows]
    data = {}
    # ex0: fine; ex1: absent; ex2: a different text under its key; ex3: teacher positions half missing
    data[keys[0]] = make_example(*spm_teacher[keys[0]], k)
    data[keys[2]] = make_example(*spm_teacher[keys[3]], k)
    ids3, lp3 = spm_teacher[keys[3]]
    keep = np.arange(0, len(ids3) - 1, 2)  # only even teacher output positions stored
    data[keys[3]] = make_example(ids3, lp3, k, positions=keep)
    col = CrossTokenizerCollator(tek, [TeacherSpec("spm", spm, DictStore(data), W)])
    b = col(text_rows)
    tt, st = b["teachers"]["spm"], b["stats"]["spm"]
    assert tt["present"].tolist() == [True, False, False, True]
    assert st["missing"] == 1 and st["mismatch"] == 1 and st["present"] == 2
    assert not tt["mask"][1].any() and not tt["mask"][2].any()
    assert not tt["chunk_mask"][1].any() and not tt["chunk_mask"][2].any()
    assert st["missing_positions"] > 0
    # ex3: every target comes from an even (stored) teacher position; chunks need all positions
    pairs = ref_pairs(spm, tek, text_rows[3]["text"], ids3, b["input_ids"][3][b["attention_mask"][3].bool()].numpy())
    s2t = {s: t for t, s in pairs}
    ps = tt["positions"][3][tt["mask"][3]].tolist()
    assert len(ps) > 20 and all((s2t[p + 1] - 1) % 2 == 0 for p in ps)
    n = check_chunks(b, "spm", 3, lp3, ids3, pairs)
    assert n > 0
    assert all(s2t[int(s1)] - s2t[int(s0)] == 1 if int(s1) in s2t else True
               for s0, s1 in tt["chunk_spans"][3][tt["chunk_mask"][3]].tolist())
    # the good example still matches the dense reference
    ids0, lp0 = spm_teacher[keys[0]]
    pairs0 = ref_pairs(spm, tek, text_rows[0]["text"], ids0, b["input_ids"][0][b["attention_mask"][0].bool()].numpy())
    assert check_targets(b, "spm", 0, lp0, ids0, k, w_rows_of(W), pairs0, n_check=20) == 20


def test_truncation_student_and_teacher(spm, tek, text_rows, spm_teacher):
    """Student truncated to max_length and a teacher store holding a shorter (truncated) text:
    targets only where both sides have the text, present stays True."""
    k = 8
    W = random_w(spm.vocab_size, tek.vocab_size, seed=9)
    key = text_rows[1]["id"]
    ids, lp = spm_teacher[key]
    cut = len(ids) // 2
    col = CrossTokenizerCollator(tek, [TeacherSpec("spm", spm, DictStore({key: make_example(ids[:cut], lp[:cut], k)}), W)],
                                 max_length=60)
    b = col([text_rows[1]])
    tt = b["teachers"]["spm"]
    assert b["input_ids"].shape[1] == 60 and b["stats"]["truncated"] == 1
    assert bool(tt["present"][0]) and tt["mask"][0].sum() > 20
    pos = tt["positions"][0][tt["mask"][0]]
    assert int(pos.max()) <= 58
    col2 = CrossTokenizerCollator(tek, [TeacherSpec("spm", spm, DictStore({key: make_example(ids[:cut], lp[:cut], k)}), W)])
    b2 = col2([text_rows[1]])
    t2 = b2["teachers"]["spm"]
    s_ids = b2["input_ids"][0].numpy()
    pairs = ref_pairs(spm, tek, text_rows[1]["text"], ids, s_ids)
    s2t = {s: t for t, s in pairs}
    ps = t2["positions"][0][t2["mask"][0]].tolist()
    assert bool(t2["present"][0]) and max(s2t[p + 1] for p in ps) <= cut - 1
    spans = t2["chunk_spans"][0][t2["chunk_mask"][0]].tolist()
    assert all(s2t.get(s1, cut) <= cut for _, s1 in spans)
    assert check_targets(b2, "spm", 0, lp, ids, k, w_rows_of(W), pairs, n_check=15) == 15


def test_chat_rows_assistant_labels(spm, tek):
    """Chat rows: labels only on assistant tokens; teacher store rendered with another template."""
    from xtok.chat import DEFAULT_TEMPLATES, render_chat

    msgs = [{"role": "user", "content": "Name three colours of the rainbow, please."},
            {"role": "assistant", "content": "Red, orange and yellow are three of them."},
            {"role": "user", "content": "And two more?"},
            {"role": "assistant", "content": "Green and blue; indigo and violet complete it."}]
    model = tiny_llama(spm.vocab_size, seed=2)
    rt = render_chat(spm, msgs, template=DEFAULT_TEMPLATES["inst"])
    logp = dense_logprobs(model, rt.ids)
    W = random_w(spm.vocab_size, tek.vocab_size, seed=11)
    store = DictStore({"c1": make_example(rt.ids, logp, 8)})
    col = CrossTokenizerCollator(tek, [TeacherSpec("spm", spm, store, W)], chat_template=DEFAULT_TEMPLATES["chatml"])
    b = col([{"id": "c1", "messages": msgs}])
    rs = render_chat(tek, msgs, template=DEFAULT_TEMPLATES["chatml"])
    assert b["input_ids"][0].tolist() == rs.ids.tolist()
    lab = b["labels"][0].numpy()
    assert np.array_equal(lab != -100, rs.assistant_mask)
    tt = b["teachers"]["spm"]
    pos = tt["positions"][0][tt["mask"][0]].numpy()
    assert bool(tt["present"][0]) and len(pos) >= 10
    assert (lab[pos + 1] != -100).all()
    # independent alignment through each render's byte offsets in its own text: map assistant
    # content bytes of both renders onto each other
    sb, tb = rs.text.encode(), rt.text.encode()
    t_start = {int(o[0]): i for i, o in enumerate(rt.offsets) if not spm.token_bytes.is_special[rt.ids[i]]}
    for p in pos:
        s = int(p) + 1
        o = int(rs.offsets[s, 0])
        # locate the same content byte in the teacher text: same assistant message, same offset in it
        for mm in msgs:
            c = mm["content"].encode()
            a = sb.find(c)
            if mm["role"] == "assistant" and a <= o < a + len(c):
                tpos = tb.find(c) + (o - a)
                break
        else:
            pytest.fail(f"target at {s} outside assistant content")
        t = t_start[tpos] if tpos in t_start else t_start.get(tpos - 1)  # SPM tokens may carry the space
        assert t is not None
        row = logp[t - 1]
        top = np.argsort(-row, kind="stable")[:8]
        ref = {}
        for v in top.tolist():
            for c, w in w_rows_of(W)(v):
                ref[c] = ref.get(c, 0.0) + float(np.exp(row[v])) * w
        j = int(np.nonzero(tt["positions"][0].numpy() == p)[0][0])
        got = {c: q for c, q in zip(tt["target_ids"][0, j].tolist(), tt["target_probs"][0, j].tolist()) if q > 0}
        assert set(got) == set(ref) and all(abs(got[c] - ref[c]) < 1e-5 for c in got)


def test_pickle_roundtrip(spm, tek, text_rows, spm_teacher):
    """The collator pickles without its loaded handles (paths travel) and gives identical batches."""
    W = random_w(spm.vocab_size, tek.vocab_size, seed=13)
    store = DictStore({key: make_example(ids, lp, 8) for key, (ids, lp) in spm_teacher.items()})
    col = CrossTokenizerCollator(TEKKEN, [TeacherSpec("spm", MISTRAL_SPM, store, W)])
    col2 = pickle.loads(pickle.dumps(col))
    assert col2._student is None and col2.teachers[0]._tok is None  # re-loaded lazily in the worker
    a, b = col(text_rows), col2(text_rows)
    for key in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(a[key], b[key])
    for key, v in a["teachers"]["spm"].items():
        assert torch.equal(b["teachers"]["spm"][key], v), key
    assert a["stats"] == b["stats"]


# ------------------------------------------------------------------------------------------
# end to end: xtok extract stores of two tiny teachers, DataLoader workers, losses, training
# ------------------------------------------------------------------------------------------


def _student_spec():
    p = ASSETS / "tokenizers" / "gpt2"
    return str(p) if p.exists() else MISTRAL_SPM_V3


@pytest.fixture(scope="module")
def e2e(tmp_path_factory, shakespeare_text):
    """Two teachers (Tekken 131k, SentencePiece 32k), each a tiny random Llama saved with
    save_pretrained and a store written by `xtok extract`; W files by build_projection."""
    import json as _json

    from click.testing import CliRunner

    from projection_tools.build import build_projection
    from xtok.cli import main

    d = tmp_path_factory.mktemp("e2e")
    student = load_tokenizer(_student_spec())
    lines = [l for l in shakespeare_text.split("\n\n") if 200 < len(l) < 700]
    rows = [{"id": f"s{i}", "text": lines[3 * i]} for i in range(8)]
    with open(d / "data.jsonl", "w", encoding="utf-8") as f:
        for r in rows:
            f.write(_json.dumps(r) + "\n")
    teachers = {}
    for name, spec, extra in (("tekken", TEKKEN, []), ("spm", MISTRAL_SPM, ["--sample-tail", "4"])):
        tok = load_tokenizer(spec)
        model = tiny_llama(tok.vocab_size, seed=len(name), hidden=24)
        model.save_pretrained(d / f"{name}_model")
        res = CliRunner().invoke(main, ["extract", "-m", str(d / f"{name}_model"), "--tokenizer", spec, "-d",
                                        str(d / "data.jsonl"), "-o", str(d / f"{name}_store"), "-k", "16",
                                        "--device", "cpu", "--quiet"] + extra)
        assert res.exit_code == 0, res.output
        W = build_projection(tok, student, progress=False)
        W.save(d / f"{name}_W.safetensors")
        teachers[name] = (spec, tok, model, W)
    return d, rows, student, teachers


def test_end_to_end_extract_workers_training(e2e):
    from xtok.losses import MultiTeacherLossAggregator, TeacherLoss
    from xtok.store import TeacherStore

    d, rows, student, teachers = e2e
    specs = [TeacherSpec(n, spec, str(d / f"{n}_store"), str(d / f"{n}_W.safetensors"))
             for n, (spec, *_r) in teachers.items()]
    col = CrossTokenizerCollator(_student_spec(), specs, max_length=256)
    # rows the stores lack, and one whose stored text differs (same key, other text)
    extra = [{"id": "not-in-store", "text": rows[0]["text"]}, {"id": rows[1]["id"], "text": rows[5]["text"]}]
    data = rows + extra
    loader = torch.utils.data.DataLoader(data, batch_size=5, num_workers=2, collate_fn=col,
                                         multiprocessing_context="spawn")
    batches = list(loader)
    assert len(batches) == 2
    # workers (pickled collator, lazily opened stores / W / tokenizers) == in-process, deterministic
    for bi, b in enumerate(batches):
        ref = col(data[5 * bi: 5 * bi + 5])
        for key in ("input_ids", "attention_mask", "labels"):
            assert torch.equal(b[key], ref[key])
        for n in teachers:
            for key, v in ref["teachers"][n].items():
                assert torch.equal(b["teachers"][n][key], v), (n, key)
    last = batches[1]
    for n in teachers:
        assert last["teachers"][n]["present"].tolist() == [True, True, True, False, False]
        st = last["stats"][n]
        assert st["missing"] == 1 and st["mismatch"] == 1
        for b in batches:
            ids = b["teachers"][n]["target_ids"]
            assert ids.min() >= 0 and ids.max() < student.vocab_size
            assert b["teachers"][n]["mask"].sum() > 0

    # cross-check against the teachers' dense distributions (extract's quantisation: 8-bit sqrt grid)
    for n, (spec, tok, model, W) in teachers.items():
        store = TeacherStore(d / f"{n}_store")
        b = batches[0]
        wrow = w_rows_of(W)
        checked = 0
        for i in (0, 3):
            r = rows[i]
            ex = store[r["id"]]
            t_ids = np.asarray(ex.input_ids, np.int64)
            logp = dense_logprobs(model, t_ids)
            s_ids = b["input_ids"][i][b["attention_mask"][i].bool()].numpy()
            pairs = ref_pairs(tok, student, r["text"], t_ids, s_ids)
            tt = b["teachers"][n]
            got = {int(p) + 1 for p in tt["positions"][i][tt["mask"][i]]}
            ref = {s for (t, s) in pairs if t >= 1 and s >= 1}
            assert got <= ref and len(got) >= 0.9 * len(ref)
            if n == "tekken":
                checked += check_targets(b, n, i, logp, t_ids, 16, wrow, pairs, tol=1e-2, n_check=12)
            else:  # sampled tail: the tail bucket is ~0, the target holds all the mass
                m = tt["mask"][i]
                assert float(tt["tail_mass"][i][m].max()) < 1e-3
                assert torch.allclose(tt["target_probs"][i][m].sum(-1), torch.ones(int(m.sum())), atol=1e-3)
                checked += _check_topk_part(b, n, i, logp, wrow, pairs, ex)
            check_chunks(b, n, i, logp, t_ids, pairs, tol=1e-2)
        assert checked >= 12

    # a few optimiser steps of a tiny student with both teachers: the loss decreases
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # torch's threaded CPU index_select is pathologically slow on a shared 2-core box
    try:
        _train_student(batches, student)
    finally:
        torch.set_num_threads(threads)


def _train_student(batches, student):
    from transformers import LlamaConfig, LlamaForCausalLM

    from xtok.losses import MultiTeacherLossAggregator, TeacherLoss

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=student.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512)
    stu = LlamaForCausalLM(cfg)
    agg = MultiTeacherLossAggregator({"tekken": 1.0, "spm": TeacherLoss(weight=1.0, chunk_weight=0.5)}, sft_weight=0.2)
    opt = torch.optim.Adam(stu.parameters(), lr=1e-2)
    losses = []
    for step in range(5):  # both batches: the second has absent teachers (missing / mismatched rows)
        tot = 0.0
        for b in batches:
            hidden = stu.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
            loss, logs = agg((hidden, stu.lm_head.weight), b)  # fused path: no [B,T,V] logits
            assert torch.isfinite(loss) and float(logs["kl/tekken"]) > 0 and float(logs["chunk/spm"]) != 0
            opt.zero_grad()
            loss.backward()
            opt.step()
            tot += loss.item()
        losses.append(tot)
    assert losses[-1] < 0.9 * losses[0], losses


def _check_topk_part(b, n, i, logp, wrow, pairs, ex):
    """With sampled tails: target = projection of (top-k from the dense distribution + the stored
    tail samples at tail_mass / m each)."""
    tt = b["teachers"][n]
    s2t = {s: t for t, s in pairs}
    row_of = {int(p): j for j, p in enumerate(ex.positions)}
    sel = np.nonzero(tt["mask"][i].numpy())[0]
    checked = 0
    for j in sel[np.linspace(0, len(sel) - 1, min(8, len(sel))).astype(int)]:
        s = int(tt["positions"][i, j])
        t = s2t[s + 1]
        row = logp[t - 1]
        top = np.argsort(-row, kind="stable")[:16]
        r = row_of[t - 1]
        tail = 1.0 - float(np.exp(row[top]).sum())
        assert abs(float(ex.tail_mass[r]) - tail) < 1e-3
        ref = {}
        src = [(int(v), float(np.exp(row[v]))) for v in top] + [(int(v), tail / 4) for v in ex.tail_ids[r] if v >= 0]
        for v, p in src:
            for c, w in wrow(v):
                ref[c] = ref.get(c, 0.0) + p * w
        got = {c: p for c, p in zip(tt["target_ids"][i, j].tolist(), tt["target_probs"][i, j].tolist()) if p > 0}
        for c, p in ref.items():
            if p > 1e-2:
                assert c in got and abs(got[c] - p) < 1e-2 + 0.1 * p, (c, got.get(c), p)
        checked += 1
    return checked


def test_keys_match_store_rule(spm):
    """Rows link to store examples by xtok.store.example_key, as `xtok extract` computed it
    (content hash of text / messages / user+assistant when there is no id)."""
    from xtok.store import example_key

    col = CrossTokenizerCollator(spm, [], text_column="body")
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."}]
    assert col.tokenize({"body": "some text"}).key == example_key({"text": "some text"})
    assert col.tokenize({"id": 7, "body": "x"}).key == "7"
    assert col.tokenize({"messages": msgs}).key == example_key({"messages": msgs})
    ua = col.tokenize({"user": "Hi", "assistant": "Hello there."})
    assert ua.key == example_key({"user": "Hi", "assistant": "Hello there."})
    assert ua.input_ids.tolist() == col.tokenize({"messages": msgs}).input_ids.tolist()
    lab = ua.labels[ua.labels != -100]
    assert spm.decode_bytes(lab).strip() == b"Hello there."
    with pytest.raises(ValueError, match="unique"):
        CrossTokenizerCollator(spm, [TeacherSpec("a", spm, {}, None), TeacherSpec("a", spm, {}, None)], validate=False)


def test_hash_checks(e2e):
    """A store or W made for another tokenizer is refused when the collator is built."""
    from xtok.projection import ProjectionError

    d, rows, student, teachers = e2e
    with pytest.raises(ValueError, match="tokenizer hash"):  # tekken store, SentencePiece tokenizer
        CrossTokenizerCollator(_student_spec(), [TeacherSpec("x", MISTRAL_SPM, str(d / "tekken_store"),
                                                             str(d / "spm_W.safetensors"))])
    with pytest.raises(ProjectionError, match="built for teacher"):  # spm store, tekken W
        CrossTokenizerCollator(_student_spec(), [TeacherSpec("x", MISTRAL_SPM, str(d / "spm_store"),
                                                             str(d / "tekken_W.safetensors"))])
    with pytest.raises(ProjectionError, match="built for student"):  # right W, other student
        CrossTokenizerCollator(TEKKEN, [TeacherSpec("x", MISTRAL_SPM, str(d / "spm_store"),
                                                    str(d / "spm_W.safetensors"))])


def test_chat_store_from_extract(e2e, tmp_path):
    """A chat store from `xtok extract` (teacher's own template, assistant-only positions) against a
    student rendering the same messages with another template (ChatML)."""
    import json as _json

    from click.testing import CliRunner

    from xtok.chat import DEFAULT_TEMPLATES, render_chat
    from xtok.cli import main
    from xtok.store import TeacherStore

    d, rows, student, teachers = e2e
    spec, tok, model, W = teachers["spm"]
    chats = [{"id": f"c{i}", "messages": [
        {"role": "user", "content": rows[i]["text"][:120]},
        {"role": "assistant", "content": rows[i + 1]["text"][:300]}]} for i in range(3)]
    with open(tmp_path / "chat.jsonl", "w", encoding="utf-8") as f:
        for r in chats:
            f.write(_json.dumps(r) + "\n")
    res = CliRunner().invoke(main, ["extract", "-m", str(d / "spm_model"), "--tokenizer", spec, "-d",
                                    str(tmp_path / "chat.jsonl"), "-o", str(tmp_path / "store"), "-k", "16",
                                    "--device", "cpu", "--quiet"])
    assert res.exit_code == 0, res.output
    col = CrossTokenizerCollator(_student_spec(), [TeacherSpec("spm", spec, str(tmp_path / "store"),
                                                               str(d / "spm_W.safetensors"))],
                                 chat_template=DEFAULT_TEMPLATES["chatml"])
    b = col(chats)
    tt, st = b["teachers"]["spm"], b["stats"]["spm"]
    assert tt["present"].all() and st["mismatch"] == 0
    store = TeacherStore(tmp_path / "store")
    for i, r in enumerate(chats):
        ex = store[r["id"]]
        rs = render_chat(student, r["messages"], template=DEFAULT_TEMPLATES["chatml"])
        lab = b["labels"][i].numpy()
        assert np.array_equal(lab[: len(rs.ids)] != -100, rs.assistant_mask)
        pos = tt["positions"][i][tt["mask"][i]].numpy()
        assert len(pos) > 0.8 * int(rs.assistant_mask.sum()) - 5 and (lab[pos + 1] != -100).all()
        # cross-check a few targets: the teacher position holding the same assistant byte
        logp = dense_logprobs(model, np.asarray(ex.input_ids, np.int64))
        c = r["messages"][1]["content"].encode()
        sb, tb = rs.text.encode(), ex.text.encode()
        a_s, a_t = sb.find(c), tb.find(c)
        t_off = tok.encode_with_offsets(ex.text)[1]
        extra = len(ex.input_ids) - len(t_off)
        t_start = {int(o[0]): j + extra for j, o in enumerate(t_off)}
        for j in np.linspace(0, len(pos) - 1, 5).astype(int):
            s = int(pos[j]) + 1
            o = int(rs.offsets[s, 0]) - a_s
            t = t_start.get(a_t + o, t_start.get(a_t + o - 1))  # SentencePiece tokens carry the space
            assert t is not None and (t - 1) in set(ex.positions.tolist())
            row = logp[t - 1]
            top = np.argsort(-row, kind="stable")[:16]
            ref = {}
            for v in top.tolist():
                for cc, w in w_rows_of(W)(v):
                    ref[cc] = ref.get(cc, 0.0) + float(np.exp(row[v])) * w
            got = {cc: p for cc, p in zip(tt["target_ids"][i, j].tolist(), tt["target_probs"][i, j].tolist()) if p > 0}
            for cc, p in ref.items():
                if p > 1e-2:
                    assert cc in got and abs(got[cc] - p) < 1e-2 + 0.1 * p
