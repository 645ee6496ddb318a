"""CrossTokenizerCollator: targets cross-checked against slow references built from a dense teacher
distribution (a tiny random-init Llama whose full softmax we compute), independent byte-offset
alignment, missing / mismatched teachers, chat labels, pickling + DataLoader workers, end-to-end."""
from __future__ import annotations

import pickle
from pathlib import Path
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


H_GRID = float(np.sqrt(20.0) / 254.0)  # docs/formats.md: step h of the stored log-probs' square-root grid


def quantisation_rel_bound(top_lp) -> float:
    """Relative error bound of a decoded stored probability (docs/formats.md, "Error bound"): the grid
    error in d = lp_0 - lp_i is at most h*sqrt(d) + h^2/4 (d <= 20 nats; beyond, the entry is < e^-20 of
    the top-1), and the renormalisation to 1 - tail_mass shifts every log-prob of the row by at most the
    row's largest grid error, so p_decoded / p_exact lies within exp(+-2 eps), eps = that largest error."""
    top_lp = np.asarray(top_lp, np.float64)
    d = top_lp[0] - top_lp
    d = d[d <= 20.0]
    eps = float((H_GRID * np.sqrt(d) + H_GRID ** 2 / 4).max())
    return float(np.expm1(2 * eps))


def check_targets(batch, name, i, logp, t_ids, k, wrow, pairs=None, n_check=None, quantised=False, ex=None):
    """Every entry of every target of example i (or n_check of them) against the dense teacher
    distribution `logp` [T, V]: reference = sum over the dense top-k v of p_v * W[v, :] (+ the store's
    sampled tail ids at (dense tail mass) / m each when `ex` has them); ids must be exactly the
    reference's support, each probability within float32 rounding (in-memory stores) or within the
    store's documented quantisation bound (`quantised`: `xtok extract` stores), and the tail mass
    = 1 - the reference's total (what W drops included). Returns #checked."""
    tt = batch["teachers"][name]
    m = tt["mask"][i].numpy()
    pos = tt["positions"][i].numpy()[m]
    labels = batch["labels"][i].numpy()
    assert (labels[pos + 1] != -100).all(), "target on a position whose next token is not trained"
    s2t = {s: t for (t, s) in pairs}
    tail_ids = None if ex is None else getattr(ex, "tail_ids", None)
    row_of = None if ex is None else {int(p): r for r, p in enumerate(np.asarray(ex.positions))}
    checked = 0
    sel = np.nonzero(m)[0]
    if n_check is not None:
        sel = sel[np.linspace(0, len(sel) - 1, min(n_check, len(sel))).astype(int)]
    for j in sel:
        s = int(tt["positions"][i, j])
        t = s2t.get(s + 1)  # the teacher token starting at the byte where student token s+1 starts
        assert t is not None, f"student output position {s} has a target but no reference alignment pair"
        row = logp[t - 1].astype(np.float64)
        top = np.argpartition(-row, k)[:k]
        top = top[np.argsort(-row[top], kind="stable")]
        p = np.exp(row[top])
        if ex is not None:
            stored = np.asarray(ex.topk_ids)[row_of[t - 1]]
            stored = stored[stored >= 0]
            if set(stored.tolist()) != set(top.tolist()):
                # a near-tie at the k-th place (float32 extraction vs this float64 reference) may swap
                # ids; anything else is a wrong top-k. Then compare against the stored ids.
                kth = row[top[-1]]
                swapped = set(stored.tolist()) ^ set(top.tolist())
                assert all(abs(row[v] - kth) < 1e-4 for v in swapped), \
                    f"stored top-k at teacher position {t - 1} differ from the dense top-k"
                top = stored[np.argsort(-row[stored], kind="stable")]
                p = np.exp(row[top])
        rel = quantisation_rel_bound(row[top]) if quantised else 1e-5
        A, B, dropped = {}, {}, 0.0
        for v, pv in zip(top.tolist(), p.tolist()):
            ws = wrow(v)
            dropped += pv * (1.0 - sum(w for _, w in ws))
            for c, w in ws:
                A[c] = A.get(c, 0.0) + pv * w
        if tail_ids is not None:
            samples = np.asarray(tail_ids)[row_of[t - 1]]
            r = 1.0 - float(p.sum())
            for v in samples.tolist():
                if v >= 0:
                    ws = wrow(v)
                    dropped += r / len(samples) * (1.0 - sum(w for _, w in ws))
                    for c, w in ws:
                        B[c] = B.get(c, 0.0) + r / len(samples) * w
        ref = {c: A.get(c, 0.0) + B.get(c, 0.0) for c in A.keys() | B.keys()}
        got = {}
        for c, q in zip(tt["target_ids"][i, j].tolist(), tt["target_probs"][i, j].tolist()):
            if q > 0:
                assert c not in got, f"student id {c} twice in one target row"
                got[c] = q
        assert set(got) == {c for c, q in ref.items() if q > 0}, (s, t)
        # sampled-tail weights are stored_tail_mass / m: the stored tail (float32 forward) may differ from
        # this float64 reference's 1 - sum(p) by the 1e-5 the tail check below allows
        r_ref = 1.0 - float(p.sum()) if tail_ids is not None else 1.0
        for c, q in ref.items():
            tol = rel * A.get(c, 0.0) + 2e-6 * q + 1e-7 + 1e-5 * B.get(c, 0.0) / max(r_ref, 1e-12)
            assert abs(got[c] - q) <= tol, (s, t, c, got[c], q, rel)
        ref_tail = max(0.0, 1.0 - sum(ref.values()))
        assert abs(float(tt["tail_mass"][i, j]) - ref_tail) <= 1e-5 + rel * dropped, (s, t, ref_tail)
        checked += 1
    return checked


def check_chunks(batch, name, i, logp, t_ids, pairs, quantised=False):
    """Every chunk log-prob of example i = the dense teacher's log-prob of the chunk's teacher tokens;
    tolerance: float32 sums (in-memory stores) or float16 `target_logprob` (`xtok extract` stores:
    relative error <= 2^-11 per token, docs/formats.md)."""
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
        terms = [float(logp[t - 1, t_ids[t]]) for t in range(t0, t1)]
        ref = sum(terms)
        tol = (2.0 ** -11 * sum(abs(x) for x in terms) + 1e-4) if quantised else 1e-5 * max(1.0, abs(ref))
        assert abs(ref - lp) <= tol, (s0, s1, t0, t1, ref, lp)
    return len(spans)


def assert_same_batch(a, b):
    """Two collator outputs are identical (tensors bit for bit, python values equal)."""
    assert set(a) == set(b)
    for key in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(a[key], b[key]), key
    assert set(a["teachers"]) == set(b["teachers"])
    for n, ta in a["teachers"].items():
        tb = b["teachers"][n]
        assert set(ta) == set(tb)
        for key, v in ta.items():
            assert (torch.equal(tb[key], v) if isinstance(v, torch.Tensor) else tb[key] == v), (n, key)
    assert a["stats"] == b["stats"]


class DictStore(dict):
    """An in-memory store (key -> example) whose manifest records the teacher tokenizer's hash (and any
    other manifest fields given), as an `xtok extract` store's does."""

    def __init__(self, data, tok, **manifest):
        super().__init__(data)
        self.manifest = ({"tokenizer_hash": tok.content_hash} if tok is not None else {}) | manifest


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
    store = DictStore({key: make_example(ids, lp, k) for key, (ids, lp) in spm_teacher.items()}, spm)
    col = CrossTokenizerCollator(tek, [TeacherSpec("spm", spm, store, W)], max_length=4096)
    pj = col.teachers[0].projector(col.student)
    assert (pj.w is None) == (path == "project") and (pj.w is not None and pj.w.onehot) == (path == "onehot")
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
    col = CrossTokenizerCollator(tek, [TeacherSpec("spm", spm, DictStore({key: ex}, spm), W)])
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
    col = CrossTokenizerCollator(tek, [TeacherSpec("spm", spm, DictStore(data, spm), W)])
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
    col = CrossTokenizerCollator(tek, [TeacherSpec("spm", spm, DictStore({key: make_example(ids[:cut], lp[:cut], k)}, spm), W)],
                                 max_length=60)
    b = col([text_rows[1]])
    tt = b["teachers"]["spm"]
    assert b["input_ids"].shape[1] == 60 and b["stats"]["truncated"] == 1
    assert bool(tt["present"][0]) and tt["mask"][0].sum() > 20
    pos = tt["positions"][0][tt["mask"][0]]
    assert int(pos.max()) <= 58
    col2 = CrossTokenizerCollator(tek, [TeacherSpec("spm", spm, DictStore({key: make_example(ids[:cut], lp[:cut], k)}, spm), W)])
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
    store = DictStore({"c1": make_example(rt.ids, logp, 8)}, spm)
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
    store = DictStore({key: make_example(ids, lp, 8) for key, (ids, lp) in spm_teacher.items()}, spm)
    col = CrossTokenizerCollator(TEKKEN, [TeacherSpec("spm", MISTRAL_SPM, store, W)])
    col2 = pickle.loads(pickle.dumps(col))
    assert col2._student is None and col2.teachers[0]._tok is None  # re-loaded lazily in the worker
    assert_same_batch(col(text_rows), col2(text_rows))


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
    from xtok.store import TeacherStore

    d, rows, student, teachers = e2e
    specs = [TeacherSpec(n, spec, str(d / f"{n}_store"), str(d / f"{n}_W.safetensors"))
             for n, (spec, *_r) in teachers.items()]
    col = CrossTokenizerCollator(_student_spec(), specs, max_length=256)
    # rows the stores lack, and one whose stored text differs (same key, other text)
    extra = [{"id": "not-in-store", "text": rows[0]["text"]}, {"id": rows[1]["id"], "text": rows[5]["text"]}]
    data = rows + extra
    # workers (pickled collator, lazily opened stores / W / tokenizers; spawn and fork) == in-process
    refs = [col(data[5 * bi: 5 * bi + 5]) for bi in range(2)]
    for ctx in ("spawn", "fork"):
        loader = torch.utils.data.DataLoader(data, batch_size=5, num_workers=2, collate_fn=col,
                                             multiprocessing_context=ctx)
        batches = list(loader)
        assert len(batches) == 2
        for b, ref in zip(batches, refs):
            assert_same_batch(b, ref)
    last = batches[1]
    for n in teachers:
        assert last["teachers"][n]["present"].tolist() == [True, True, True, False, False]
        st = last["stats"][n]
        assert st["missing"] == 1 and st["mismatch"] == 1
        for b in batches:
            ids = b["teachers"][n]["target_ids"]
            assert ids.min() >= 0 and ids.max() < student.vocab_size
            assert b["teachers"][n]["mask"].sum() > 0
            assert b["teachers"][n]["temperature"] == 1.0 and type(b["teachers"][n]["temperature"]) is float

    # cross-check every target entry, tail mass and chunk log-prob of the first batch against the
    # teachers' dense distributions, within the store's documented quantisation bound
    for n, (spec, tok, model, W) in teachers.items():
        store = TeacherStore(d / f"{n}_store")
        b = batches[0]
        wrow = w_rows_of(W)
        checked = chunks = 0
        for i in range(5):
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
            checked += check_targets(b, n, i, logp, t_ids, 16, wrow, pairs, quantised=True, ex=ex)
            chunks += check_chunks(b, n, i, logp, t_ids, pairs, quantised=True)
            if n == "spm":  # sampled tail: the tail bucket is ~0, the target holds all the mass
                m = tt["mask"][i]
                assert float(tt["tail_mass"][i][m].max()) < 1e-3
        assert checked == int(b["teachers"][n]["mask"].sum()) and checked > 300 and chunks > 300

    # a few optimiser steps of a tiny student with both teachers: every distillation term decreases
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
    terms = ("kl/tekken", "kl/spm", "chunk/spm")
    hist = {t: [] for t in terms + ("loss",)}
    for step in range(5):  # both batches: the second has absent teachers (missing / mismatched rows)
        tot = dict.fromkeys(hist, 0.0)
        for b in batches:
            hidden = stu.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
            loss, logs = agg((hidden, stu.lm_head.weight), b)  # fused path: no [B,T,V] logits
            assert torch.isfinite(loss) and float(logs["kl/tekken"]) > 0 and float(logs["chunk/spm"]) > 0
            opt.zero_grad()
            loss.backward()
            opt.step()
            for t in terms:
                tot[t] += float(logs[t])
            tot["loss"] += loss.item()
        for t in hist:
            hist[t].append(tot[t])
    for t in ("kl/tekken", "kl/spm", "loss"):
        assert hist[t][-1] < 0.9 * hist[t][0], (t, hist[t])
    # the chunk term is tiny next to KL + SFT here (random teachers: chunk probabilities ~ e^-10), so
    # it gets its own run: the chunk likelihood alone, from a fresh student
    torch.manual_seed(1)
    stu = LlamaForCausalLM(cfg)
    agg = MultiTeacherLossAggregator({"spm": TeacherLoss(weight=0.0, chunk_weight=1.0)})
    opt = torch.optim.Adam(stu.parameters(), lr=1e-2)
    ch, b = [], batches[0]
    for step in range(4):
        hidden = stu.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
        loss, logs = agg((hidden, stu.lm_head.weight), b)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ch.append(float(logs["chunk/spm"]))
    assert ch[-1] < 0.9 * ch[0], ch


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


# ------------------------------------------------------------------------------------------
# text that partly differs: no target conditioned on another prefix (run filter)
# ------------------------------------------------------------------------------------------


def synth_example(ids, vocab, k=4, seed=0):
    """A store example with arbitrary top-k (these tests check where targets sit, not their values)."""
    rng = np.random.default_rng(seed)
    P = len(ids) - 1
    return SimpleNamespace(input_ids=np.asarray(ids, np.int32), positions=np.arange(P, dtype=np.int32),
                           topk_ids=rng.integers(0, vocab, (P, k)).astype(np.int32),
                           topk_logprobs=np.full((P, k), np.log(0.5 / k), np.float32),
                           tail_mass=np.full(P, 0.5, np.float32), target_logprob=np.full(P, -1.0, np.float32),
                           word_start_mass=np.zeros(P, np.float32), tail_ids=None)


def token_starts(tok, text, ids):
    """Byte offset in text.encode() where each token of `ids` starts (-1: a leading special token),
    from the tokenizer's own offsets (not the aligner); one extra entry for the end."""
    ids_ref, off = tok.encode_with_offsets(text)
    extra = len(ids) - len(ids_ref)
    assert extra >= 0 and np.array_equal(np.asarray(ids)[extra:], ids_ref)
    st = np.full(len(ids) + 1, -1, np.int64)
    st[extra:len(ids)] = off[:, 0]
    st[len(ids)] = len(text.encode())
    return st


def _common_prefix(a: bytes, b: bytes) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def equal_context(t_text: bytes, bt: int, s_text: bytes, bs: int) -> tuple[int, int]:
    """(bytes equal before, bytes equal from) teacher byte bt / student byte bs: the equal window
    around a target (pure Python)."""
    return _common_prefix(t_text[:bt][::-1], s_text[:bs][::-1]), _common_prefix(t_text[bt:], s_text[bs:])


def run_check(tg, t_tok, t_text, t_ids, s_tok, s_text, s_ids, min_run_bytes=16):
    """Targets of one example (TeacherTargets) that violate the run rule, by an independent check: the
    teacher token after the target's teacher position and the student token after its student position
    must start inside an equal text window of >= min_run_bytes bytes around them, or one that reaches
    back to the start of both texts (the whole preceding text equal)."""
    ts, ss = token_starts(t_tok, t_text, t_ids), token_starts(s_tok, s_text, s_ids)
    T, S = t_text.encode(), s_text.encode()
    bad = []
    for tp, sp in zip(tg.teacher_positions.tolist(), tg.positions.tolist()):
        bt, bs = int(ts[tp + 1]), int(ss[sp + 1])
        back, fwd = equal_context(T, bt, S, bs)
        if not (back + fwd >= min_run_bytes or back == bt == bs):
            bad.append((bt, bs, T[bt:bt + 10]))
    return bad, ts, ss


@pytest.fixture(scope="module")
def gpt2_or_spm():
    p = ASSETS / "tokenizers" / "gpt2"
    return load_tokenizer(str(p) if p.exists() else MISTRAL_SPM_V3)


@pytest.mark.parametrize("pair", ["spm->tekken", "tekken->third"])
def test_partial_overlap_no_misaligned_targets(spm, tek, gpt2_or_spm, shakespeare_text, pair):
    """The student's text = the first part of the stored text + other text (50-90 % overlap): every
    target sits where both texts are equal around it for >= min_run_bytes (independent check), the
    common part keeps its targets, and without the run filter the same rows do get misaligned ones."""
    teacher, student = (spm, tek) if pair == "spm->tekken" else (tek, gpt2_or_spm)
    stored, other = shakespeare_text[5000:6400], shakespeare_text[20000:21000]
    W = random_w(teacher.vocab_size, student.vocab_size, seed=1, max_nnz=1)
    t_ids = teacher.encode(stored, add_special_tokens=True)
    store = DictStore({"a": synth_example(t_ids, teacher.vocab_size)}, teacher)
    col = CrossTokenizerCollator(student, [TeacherSpec("t", teacher, store, W)])
    raw = CrossTokenizerCollator(student, [TeacherSpec("t", teacher, store, W, min_run_bytes=0)])
    unfiltered_bad = 0
    for frac in (0.5, 0.6, 0.7, 0.9):
        s_text = stored[: int(len(stored) * frac)] + other
        sx = col.tokenize({"id": "a", "text": s_text})
        tg = col.targets(col.teachers[0], sx)
        assert tg.present and tg.positions.size
        bad, ts, ss = run_check(tg, teacher, stored, t_ids, student, s_text, sx.input_ids)
        assert not bad, (frac, bad[:5])
        # the common part keeps its targets: token starts at the same byte on both sides, in the
        # equal prefix (a margin of min_run_bytes at its end, where the last run may be cut short)
        L = _common_prefix(stored.encode(), s_text.encode())
        t_at = {int(b) for b in ts[1:-1] if b >= 0}
        expected = {int(b) for j, b in enumerate(ss[:-1]) if j >= 1 and 0 <= b <= L - 16 and int(b) in t_at}
        got = {int(ss[p + 1]) for p in tg.positions}
        assert len(expected & got) >= 0.97 * len(expected), (frac, len(expected & got), len(expected))
        assert tg.counts["short_run_chunks"] > 0
        tg0 = raw.targets(raw.teachers[0], sx)
        unfiltered_bad += len(run_check(tg0, teacher, stored, t_ids, student, s_text, sx.input_ids)[0])
    assert unfiltered_bad > 0, "the scenario no longer produces stray chunks: it does not test the filter"
    st = col([{"id": "a", "text": stored[:700] + other}])["stats"]["t"]
    assert st["short_run_chunks"] > 0 and st["present"] == 1


@pytest.mark.parametrize("pair", ["spm->tekken", "tekken->third"])
def test_two_chat_templates_keep_content_targets(spm, tek, gpt2_or_spm, shakespeare_text, pair):
    """Teacher store rendered with the [INST] template, student rows with ChatML (control tokens on one
    side, role names as text on the other, or both as text): the run filter keeps nearly every
    assistant-content target, and each one sits at the same content byte of the same message."""
    from xtok.chat import DEFAULT_TEMPLATES, render_chat

    teacher, student = (spm, tek) if pair == "spm->tekken" else (tek, gpt2_or_spm)
    paras = [p for p in shakespeare_text.split("\n\n") if 80 < len(p) < 400][:12]
    msgs = []
    for i in range(6):
        msgs += [{"role": "user", "content": paras[2 * i]}, {"role": "assistant", "content": paras[2 * i + 1]}]
    msgs[3:3] = [{"role": "user", "content": "Why?"}, {"role": "assistant", "content": "Aye, sir."}]
    rt = render_chat(teacher, msgs, template=DEFAULT_TEMPLATES["inst"])
    rs = render_chat(student, msgs, template=DEFAULT_TEMPLATES["chatml"])
    W = random_w(teacher.vocab_size, student.vocab_size, seed=2, max_nnz=1)
    store = DictStore({"c": synth_example(rt.ids, teacher.vocab_size)}, teacher)
    kw = dict(chat_template=DEFAULT_TEMPLATES["chatml"], max_length=4096)
    col = CrossTokenizerCollator(student, [TeacherSpec("t", teacher, store, W)], **kw)
    raw = CrossTokenizerCollator(student, [TeacherSpec("t", teacher, store, W, min_run_bytes=0)], **kw)
    sx = col.tokenize({"id": "c", "messages": msgs})
    assert np.array_equal(sx.input_ids, rs.ids)
    tg, tg0 = col.targets(col.teachers[0], sx), raw.targets(raw.teachers[0], sx)
    assert tg.present and len(tg.positions) >= 0.97 * len(tg0.positions) and len(tg.positions) > 150
    # each target: student token p+1 and teacher token tp+1 start at the same offset of the same
    # assistant message's content (an SPM teacher token may carry the space before it)
    tb, sb = rt.text.encode(), rs.text.encode()
    spans_t, spans_s, a_t, a_s = [], [], 0, 0
    for mm in msgs:
        c = mm["content"].encode()
        a_t, a_s = tb.index(c, a_t), sb.index(c, a_s)
        if mm["role"] == "assistant":
            spans_t.append(a_t)
            spans_s.append((a_s, a_s + len(c)))
        a_t, a_s = a_t + len(c), a_s + len(c)
    for tp, sp in zip(tg.teacher_positions.tolist(), tg.positions.tolist()):
        o_s, o_t = int(rs.offsets[sp + 1, 0]), int(rt.offsets[tp + 1, 0])
        k = [q for q, (x, y) in enumerate(spans_s) if x <= o_s < y]
        assert k, f"target at student byte {o_s}: not in assistant content"
        off = o_s - spans_s[k[0]][0]
        assert o_t == spans_t[k[0]] + off or (off == 0 and o_t == spans_t[k[0]] - 1), (o_s, o_t)


# ------------------------------------------------------------------------------------------
# store manifest: hashes and temperature
# ------------------------------------------------------------------------------------------


def test_store_without_tokenizer_hash_is_refused(spm, tek, e2e, tmp_path, text_rows, spm_teacher):
    """A store whose manifest records no tokenizer_hash cannot be checked: refused with a message
    naming the store and the fix, unless check_hashes=False."""
    import json as _json
    import shutil

    from xtok.collate import CollatorError

    W = random_w(spm.vocab_size, tek.vocab_size, seed=3)
    key = text_rows[0]["id"]
    data = {key: make_example(*spm_teacher[key], 8)}
    with pytest.raises(CollatorError, match="no tokenizer_hash.*check_hashes=False"):
        CrossTokenizerCollator(tek, [TeacherSpec("spm", spm, DictStore(data, None), W)])
    col = CrossTokenizerCollator(tek, [TeacherSpec("spm", spm, DictStore(data, None), W, check_hashes=False)])
    assert bool(col(text_rows[:1])["teachers"]["spm"]["present"][0])
    # a real store (xtok extract output) whose manifest lost the field
    d, rows, student, teachers = e2e
    shutil.copytree(d / "spm_store", tmp_path / "store")
    man = _json.loads((tmp_path / "store" / "manifest.json").read_text())
    del man["tokenizer_hash"]
    man.pop("manifest_sha256", None)  # as an older xtok wrote it (no self-checksum either)
    (tmp_path / "store" / "manifest.json").write_text(_json.dumps(man))
    spec = TeacherSpec("spm", MISTRAL_SPM, str(tmp_path / "store"), str(d / "spm_W.safetensors"))
    with pytest.raises(CollatorError, match=f"{tmp_path / 'store'}.*no tokenizer_hash"):
        CrossTokenizerCollator(_student_spec(), [spec])
    spec = TeacherSpec("spm", MISTRAL_SPM, str(tmp_path / "store"), str(d / "spm_W.safetensors"), check_hashes=False)
    b = CrossTokenizerCollator(_student_spec(), [spec])(rows[:2])
    assert b["teachers"]["spm"]["present"].all()


def test_temperature_from_store_manifest(spm, tek, text_rows, spm_teacher):
    """Each teacher's batch dict carries the store's extraction temperature (python float; 1.0 when the
    manifest has none), for the loss to check against its tau."""
    W = random_w(spm.vocab_size, tek.vocab_size, seed=4)
    key = text_rows[0]["id"]
    data = {key: make_example(*spm_teacher[key], 8)}
    col = CrossTokenizerCollator(tek, [TeacherSpec("hot", spm, DictStore(data, spm, temperature=2), W),
                                       TeacherSpec("plain", spm, DictStore(data, spm), W)])
    b = col(text_rows[:1])
    assert b["teachers"]["hot"]["temperature"] == 2.0 and type(b["teachers"]["hot"]["temperature"]) is float
    assert b["teachers"]["plain"]["temperature"] == 1.0 and type(b["teachers"]["plain"]["temperature"]) is float
    from xtok.collate import CollatorError

    with pytest.raises(CollatorError, match="temperature"):
        CrossTokenizerCollator(tek, [TeacherSpec("bad", spm, DictStore(data, spm, temperature="warm"), W)])(text_rows[:1])


# ------------------------------------------------------------------------------------------
# the collator's own decoding of `xtok extract` shards == the store's decoder
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("vocab", [1000, 200_000, 300_000])  # uint16 / 18-bit / uint32 id packing
def test_raw_rows_match_store_decoder(tmp_path, vocab):
    """`TeacherSpec.lookup` reads `xtok extract` stores without the store's full decode
    (`TeacherStore.packed`); its top-k ids, probabilities (top-p padding included) and sampled tail ids
    equal what `TeacherStore[key]` returns."""
    from xtok import store as st

    rng = np.random.default_rng(vocab)
    k, m = 8, 3
    w = st.StoreWriter(str(tmp_path / "s"), {"model": "synthetic", "tokenizer_hash": "x", "top_k": k,
                                             "vocab_size": vocab, "sample_tail": m, "temperature": 1.0})
    rows, keys = [], []
    for e in range(5):
        T = int(rng.integers(2, 60))
        P = T - 1
        lp = np.sort(np.log(rng.dirichlet(np.full(k, 0.3), P) * 0.8 + 1e-9), axis=1)[:, ::-1]
        lp[0, 3:] = -40.0  # far below the top-1: code 255
        n_kept = rng.integers(1, k + 1, P) if e % 2 else None
        tail_ids = rng.integers(0, vocab, (P, m))
        tail_ids[rng.random((P, m)) < 0.2] = -1
        keys.append(f"k{e}")
        rows.append(st.encode_example(keys[-1], "t", rng.integers(0, vocab, T), np.arange(P), rng.integers(0, vocab, (P, k)),
                                      st.quantize_logprobs(lp), rng.uniform(0.05, 0.3, P).astype(np.float32),
                                      rng.normal(size=P), np.zeros(P), vocab, tail_ids=tail_ids, n_kept=n_kept))
    w.write_shard(0, rows)
    w.finish()
    store = st.TeacherStore(str(tmp_path / "s"))
    for key in keys:
        ref, got = store[key], store.packed(key)
        assert isinstance(got, st.PackedExample)
        assert np.array_equal(got.input_ids, ref.input_ids) and np.array_equal(got.positions, ref.positions)
        assert np.array_equal(got.tail_mass, ref.tail_mass) and np.array_equal(got.target_logprob, ref.target_logprob)
        sel = np.arange(len(ref.positions))[::-1].copy()
        ids, p = got.decode_rows(sel)
        ref_ids = ref.topk_ids[sel]
        assert np.array_equal(ids[:, :k], ref_ids)
        ref_p = np.exp(ref.topk_logprobs[sel].astype(np.float64))
        assert np.allclose(p[:, :k], ref_p, rtol=1e-5, atol=1e-12) and (p[:, :k][ref_ids < 0] == 0).all()
        assert np.array_equal(ids[:, k:], ref.tail_ids[sel])
        tw = (ref.tail_mass[sel] / np.float32(m))[:, None]
        assert np.array_equal(p[:, k:], np.where(ref.tail_ids[sel] >= 0, tw, 0).astype(np.float32))
    assert store.packed("absent") is None


# ------------------------------------------------------------------------------------------
# worker requirements: light import, Numba on-disk cache
# ------------------------------------------------------------------------------------------


_CACHE_PROBE = r"""
import json, sys
import xtok.collate as c
light = sorted(m for m in ("torch",) if m in sys.modules)
store, W, student, key = sys.argv[1:5]
col = c.CrossTokenizerCollator(student, [c.TeacherSpec("spm", "mistral-common:tokenizer.model.v1", store, W)])
b = col([{"id": key, "text": sys.argv[5]}])
assert bool(b["teachers"]["spm"]["present"][0])
from xtok.alignment import streams
from xtok.collate import targets
from xtok.projection import kernels
fns = {"targets.decode_project_rows": targets.decode_project_rows, "streams.common_prefix": streams.common_prefix,
       "kernels.fill_rows": kernels.fill_rows, "streams.token_offsets": streams.token_offsets}
st = {n: {"hits": sum(f.stats.cache_hits.values()), "misses": sum(f.stats.cache_misses.values()),
          "path": f.stats.cache_path} for n, f in fns.items()}
print(json.dumps({"light": light, "kernels": st}))
"""


def test_import_is_light_and_numba_cache_is_used(e2e):
    """`import xtok.collate` does not load torch (workers start fast; numba is loaded: its kernels are
    module-level `njit`s, compiled lazily); a process that collates loads the kernels from Numba's
    on-disk cache instead of compiling them (the second of two runs: the first may have had to fill
    the cache)."""
    import json as _json
    import os
    import subprocess
    import sys

    d, rows, student, teachers = e2e
    args = [sys.executable, "-c", _CACHE_PROBE, str(d / "spm_store"), str(d / "spm_W.safetensors"), _student_spec(),
            rows[0]["id"], rows[0]["text"]]
    env = dict(os.environ, OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1")
    outs = []
    for _ in range(2):
        r = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        outs.append(_json.loads(r.stdout.strip().splitlines()[-1]))
    assert outs[0]["light"] == [], f"import xtok.collate loaded {outs[0]['light']}"
    ks = outs[1]["kernels"]
    for n, v in ks.items():  # called from Python for a text row (helpers called from kernels are linked in)
        assert v["misses"] == 0 and v["hits"] >= 1, (n, v)
        assert any(f.startswith(f"{n}-") and f.endswith(".nbi") for f in os.listdir(v["path"])), (n, v["path"])


def test_example_script_runs(tmp_path):
    """examples/distill_two_teachers.py end to end (xtok extract / build-projection through the CLI, 2
    DataLoader workers, a few steps)."""
    import os
    import subprocess
    import sys

    if not (ASSETS / "models" / "stories260K").exists() or not (ASSETS / "tokenizers" / "gpt2").exists():
        pytest.skip("../shared/assets (stories260K, gpt2 tokenizer) not present")
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1")
    r = subprocess.run([sys.executable, str(repo / "examples" / "distill_two_teachers.py"), "--steps", "3",
                        "--rows", "8", "--workdir", str(tmp_path)], capture_output=True, text=True, env=env,
                       timeout=300, cwd=repo)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    steps = [line for line in r.stdout.splitlines() if line.startswith("step ")]
    assert len(steps) >= 2 and all("nan" not in s for s in steps), r.stdout[-2000:]
