"""Training objectives of the `real` preset. Every distilled student minimises
``(1 - a) * CE + a * D`` (the same ``a`` for all); every teacher signal comes from the same
``xtok extract`` store (top-k log-probs + exact tail mass + the realised token's log-prob), so every
method gets the same teacher information.

- ``kd_same_tok`` (upper bound): the student uses the teacher's tokenizer; D = KL over the teacher's
  top-k ids + one tail bucket (``bucket_kl``) at every position.
- ``uld``: Universal Logit Distillation (Boizard et al. 2024): no alignment, student output position p
  paired with teacher position ``floor((p + 0.5) * n_t / n_s)``; D = L1 between the descending-sorted
  top-k probabilities of both sides + |tail difference| (``uld_topk``).
- ``gold``: GOLD-style hybrid (TRL's GOLDTrainer documentation: "aligns the textual spans produced by
  both tokenizers and merges the associated logits"; "uld_use_hybrid_loss ... compares exact vocabulary
  matches directly and falls back to the original sorted-probability ULD loss for unmatched tokens").
  Spans: the chunks of ``xtok.alignment.align`` (the finest groups of tokens with the same text on both sides).
  Per chunk, each side's distribution at the chunk's first token, merged with the log-prob of the
  rest of the chunk's realised tokens (teacher: the stored log-probs; student: its own), i.e.
  ``P(x) = p_t(x) * prod p_t(rest)``, ``Q(y) = q(y) * prod q(rest)``. Vocabulary: a teacher token and
  a student token *match* when their bytes are equal. D = GKL over the matched top-k ids + one bucket
  for the rest (a generalised KL, ``sum P log P/Q - P + Q``, since merged masses do not sum to 1) +
  the ULD distance between the sorted unmatched masses: the teacher's n_u unmatched top-k entries
  against the student's n_u largest unmatched masses, rank by rank, + |remainder difference|
  (teacher: its tail, whose matched/unmatched split is not stored, counted as unmatched; student: the
  rest of its unmatched mass); weights 1 and 1 (``gold_terms``).
- ``xtok_*``: xtok's own path: ``CrossTokenizerCollator`` (alignment + projection through W) and
  ``MultiTeacherLossAggregator`` (projected KL over target ids + tail bucket, optional chunk
  likelihood), ``normalize='per_component'``.

Students have compact vocabularies (data.py): teacher target ids outside it move to the tail bucket.
"""
from __future__ import annotations

import numpy as np
import torch

from .model import logits_of, pad, sft_loss, target_mask


# ------------------------------------------------------------------------------------ store reader
class StoreReader:
    """Decoded store examples (float32 probabilities), cached per key."""

    def __init__(self, path: str):
        from xtok.store import TeacherStore

        self.store = TeacherStore(str(path))
        self.k = int(self.store.top_k)
        self._cache: dict = {}

    def get(self, key: str) -> dict:
        got = self._cache.get(key)
        if got is None:
            ex = self.store[key]
            ids = np.asarray(ex.topk_ids, dtype=np.int64)
            probs = np.exp(np.asarray(ex.topk_logprobs, dtype=np.float64)).astype(np.float32)
            probs[ids < 0] = 0.0
            got = {"input_ids": np.asarray(ex.input_ids, dtype=np.int64), "positions": np.asarray(ex.positions),
                   "ids": ids, "probs": probs, "tail": np.asarray(ex.tail_mass, dtype=np.float32),
                   "target_lp": np.asarray(ex.target_logprob, dtype=np.float32)}
            if not np.array_equal(got["positions"], np.arange(len(got["input_ids"]) - 1)):
                raise ValueError(f"store example {key}: the benchmark needs every output position stored")
            self._cache[key] = got
        return got


def train_key(i: int) -> str:
    return f"train-{int(i):05d}"


# -------------------------------------------------------------------------------------- the maths
def bucket_kl(lq: torch.Tensor, ids: torch.Tensor, probs: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """KL(p || q) over the buckets {valid target ids} + {everything else}, per row.

    lq [N, V] student log-probs; ids [N, k] distinct target ids per row; probs [N, k] teacher
    probabilities; valid [N, k]. Teacher tail = 1 - sum(valid probs); student tail = 1 - sum q[ids]."""
    eps = 1e-12
    p = torch.where(valid, probs, 0.0)
    lq_k = lq.gather(-1, ids.clamp_min(0))
    q_in = torch.where(valid, lq_k.exp(), 0.0).sum(-1)
    p_tail = (1 - p.sum(-1)).clamp_min(0)
    q_tail = (1 - q_in).clamp_min(eps)
    head = torch.where(valid, p * (torch.log(p + eps) - lq_k), 0.0).sum(-1)
    return head + p_tail * (torch.log(p_tail + eps) - torch.log(q_tail))


def uld_topk(p_student: torch.Tensor, t_sorted: torch.Tensor, t_tail: torch.Tensor) -> torch.Tensor:
    """ULD distance from the teacher's stored top-k: L1 between the k largest student probabilities and
    the teacher's k stored probabilities (both descending), plus |student rest - teacher tail|. Equals
    the exact sorted-L1 over the full vocabularies when both sides have no mass beyond rank k; a lower
    bound of it otherwise. ``p_student [N, V]``, ``t_sorted [N, k]``, ``t_tail [N]``."""
    k = t_sorted.shape[-1]
    s = p_student.topk(k, dim=-1).values
    return (s - t_sorted).abs().sum(-1) + ((1 - s.sum(-1)) - t_tail).abs()


def gold_terms(lq: torch.Tensor, c_s: torch.Tensor, t_match: torch.Tensor, t_probs: torch.Tensor,
               t_valid: torch.Tensor, t_tail: torch.Tensor, c_t: torch.Tensor, s_matched: torch.Tensor):
    """GOLD-style hybrid per chunk. Returns (matched GKL [N], unmatched ULD [N]).

    lq [N, V]: student log-probs at the chunk's first student token; c_s [N]: student log-prob of the
    rest of the chunk's student tokens; t_match [N, k]: for each teacher top-k id the student id with
    the same bytes (-1: no match); t_probs/t_valid [N, k]; t_tail [N]; c_t [N]: teacher log-prob of
    the rest of the chunk's teacher tokens; s_matched [V] bool: student ids some teacher id matches."""
    eps = 1e-12
    k = t_probs.shape[-1]
    et, es = c_t.exp(), c_s.exp()
    P = torch.where(t_valid, t_probs, 0.0) * et[:, None]                       # merged teacher masses
    m = t_valid & (t_match >= 0)
    lQm = lq.gather(-1, t_match.clamp_min(0)) + c_s[:, None]
    Pm = torch.where(m, P, 0.0)
    head = torch.where(m, Pm * (torch.log(Pm + eps) - lQm), 0.0).sum(-1)
    P_rest = (et - Pm.sum(-1)).clamp_min(0)
    Q_rest = (es - torch.where(m, lQm.exp(), 0.0).sum(-1)).clamp_min(eps)
    gkl = head + P_rest * (torch.log(P_rest + eps) - torch.log(Q_rest)) - et + es
    # unmatched: the teacher's n_u listed unmatched masses (sorted) against the student's n_u largest
    # unmatched masses, rank by rank, + one remainder bucket each (teacher: its tail, whose split into
    # matched/unmatched ids is not stored, counted as unmatched; student: its other unmatched mass)
    u = t_valid & (t_match < 0)
    n_u = u.sum(-1, keepdim=True)
    Pu = torch.where(u, P, 0.0).sort(dim=-1, descending=True).values
    lq_u = lq.masked_fill(s_matched[None, :], float("-inf"))
    q_u_total = torch.logsumexp(lq_u, dim=-1).exp() * es                         # student unmatched mass
    kk = min(k, lq.shape[-1])
    Qu = lq_u.topk(kk, dim=-1).values.exp() * es[:, None]
    ranks = torch.arange(kk)[None, :] < n_u
    Qu = torch.where(ranks, Qu, 0.0)
    R_t = t_tail * et
    R_s = (q_u_total - Qu.sum(-1)).clamp_min(0)
    uld = (Qu - Pu[:, :kk]).abs().sum(-1) + Pu[:, kk:].sum(-1) + (R_s - R_t).abs()
    return gkl, uld


# ---------------------------------------------------------------------------------- objectives
def sft_objective(side):
    def objective(model, idx):
        ids, lengths = pad([side.train[i] for i in idx])
        return sft_loss(logits_of(model, ids), ids, lengths), {}
    return objective


def _check_same_tokens(side, i: int, ex: dict):
    want = side.full_ids[side.train[i]]
    if not np.array_equal(ex["input_ids"], want):
        raise ValueError(f"example {i}: the store's teacher ids differ from the same-tokenizer student's")


def kd_same_tok_objective(side, reader: StoreReader, alpha: float):
    """Upper bound: the student on the teacher's tokenizer, KL over the stored top-k + tail bucket."""
    lut = torch.as_tensor(side.compact_lut())
    checked: set = set()

    def objective(model, idx):
        ids, lengths = pad([side.train[i] for i in idx])
        B, T = ids.shape
        k = reader.k
        t_ids = torch.zeros(B, T - 1, k, dtype=torch.long)
        t_p = torch.zeros(B, T - 1, k)
        for b, i in enumerate(idx):
            ex = reader.get(train_key(i))
            if i not in checked:
                _check_same_tokens(side, i, ex)
                checked.add(i)
            n = len(ex["ids"])
            t_ids[b, :n] = lut[torch.from_numpy(ex["ids"]).clamp_min(0)]
            t_p[b, :n] = torch.from_numpy(ex["probs"]) * torch.from_numpy(ex["ids"] >= 0)
        valid = (t_ids >= 0) & (t_p > 0)
        logits = logits_of(model, ids)
        mask = target_mask(lengths, T)
        ce = sft_loss(logits, ids, lengths)
        lq = logits[:, :-1][mask].float().log_softmax(-1)
        kd = bucket_kl(lq, t_ids[mask], t_p[mask], valid[mask]).mean()
        return (1 - alpha) * ce + alpha * kd, {"ce": float(ce.detach()), "kd": float(kd.detach())}
    return objective


def proportional_pairs(n_student: int, n_teacher: int) -> np.ndarray:
    p = np.arange(n_student)
    return np.minimum(((p + 0.5) * n_teacher / n_student).astype(np.int64), n_teacher - 1)


def uld_objective(side, reader: StoreReader, alpha: float):
    def objective(model, idx):
        ids, lengths = pad([side.train[i] for i in idx])
        logits = logits_of(model, ids)
        ce = sft_loss(logits, ids, lengths)
        sb, sp, tp_, tt = [], [], [], []
        for b, i in enumerate(idx):
            ex = reader.get(train_key(i))
            ns, nt = int(lengths[b]) - 1, len(ex["ids"])
            q = proportional_pairs(ns, nt)
            sb.append(np.full(ns, b)); sp.append(np.arange(ns))
            tp_.append(ex["probs"][q]); tt.append(ex["tail"][q])
        sb, sp = (torch.from_numpy(np.concatenate(x)) for x in (sb, sp))
        t_sorted = torch.from_numpy(np.concatenate(tp_))
        t_tail = torch.from_numpy(np.concatenate(tt))
        p_s = logits[:, :-1][sb, sp].float().softmax(-1)
        d = uld_topk(p_s, t_sorted, t_tail).mean()
        return (1 - alpha) * ce + alpha * d, {"ce": float(ce.detach()), "uld": float(d.detach())}
    return objective


def vocab_match(teacher_tok, student_side) -> tuple[np.ndarray, np.ndarray]:
    """(t2s [V_teacher] compact student id with the same bytes or -1, s_matched [V_compact] bool).
    Special tokens never match. When several compact student ids share the bytes, the one most frequent
    in the student's training tokens is used; the map is one-to-one."""
    stb, ttb = student_side.tokenizer.token_bytes, teacher_tok.token_bytes
    freq = np.bincount(np.concatenate(student_side.train), minlength=student_side.vocab)
    best: dict = {}
    for v, f in enumerate(student_side.full_ids.tolist()):
        if stb.is_special[f]:
            continue
        bb = stb.get(f)
        if bb and (bb not in best or freq[v] > freq[best[bb]]):
            best[bb] = v
    t2s = np.full(ttb.vocab_size, -1, np.int64)
    used = np.zeros(student_side.vocab, bool)
    for j in range(ttb.vocab_size):
        if ttb.is_special[j]:
            continue
        v = best.get(ttb.get(j))
        if v is not None and not used[v]:
            t2s[j] = v
            used[v] = True
    return t2s, used


def gold_chunks(teacher_tok, student_tok, t_ids: np.ndarray, s_ids: np.ndarray, target_lp: np.ndarray):
    """Per aligned chunk: (teacher position, student output position, c_t, student continuation
    positions). ``t_ids`` / ``s_ids`` include BOS at 0; chunks start after it."""
    from xtok.alignment import align

    al = align(teacher_tok, student_tok, t_ids, s_ids)
    ch = np.asarray(al.chunks, dtype=np.int64)
    ch = ch[(ch[:, 0] >= 1) & (ch[:, 2] >= 1)]
    tpos = ch[:, 0] - 1
    spos = ch[:, 2] - 1
    cum = np.concatenate([[0.0], np.cumsum(target_lp.astype(np.float64))])
    c_t = (cum[ch[:, 1] - 1] - cum[ch[:, 0]]).astype(np.float32)   # positions t0 .. t1-2
    cont_chunk = np.repeat(np.arange(len(ch)), np.maximum(ch[:, 3] - ch[:, 2] - 1, 0))
    cont_pos = np.concatenate([np.arange(a, b - 1) for a, b in zip(ch[:, 2], ch[:, 3])] or [np.zeros(0, np.int64)])
    return {"tpos": tpos, "spos": spos, "c_t": c_t, "cont_chunk": cont_chunk, "cont_pos": cont_pos.astype(np.int64),
            "n_tokens": len(s_ids) - 1}


def gold_objective(side, teacher_tok, reader: StoreReader, alpha: float):
    t2s_np, s_matched_np = vocab_match(teacher_tok, side)
    t2s = torch.from_numpy(t2s_np)
    s_matched = torch.from_numpy(s_matched_np)
    cache: dict = {}

    def chunks_of(i):
        got = cache.get(i)
        if got is None:
            ex = reader.get(train_key(i))
            got = cache[i] = gold_chunks(teacher_tok, side.tokenizer, ex["input_ids"], side.full_ids[side.train[i]],
                                         ex["target_lp"])
        return got

    def objective(model, idx):
        ids, lengths = pad([side.train[i] for i in idx])
        logits = logits_of(model, ids)
        ce = sft_loss(logits, ids, lengths)
        rb, rp, tids, tpr, ttail, ct, cb, cp, cc = [], [], [], [], [], [], [], [], []
        base = 0
        for b, i in enumerate(idx):
            g = chunks_of(i)
            ex = reader.get(train_key(i))
            n = len(g["spos"])
            rb.append(np.full(n, b)); rp.append(g["spos"])
            tids.append(ex["ids"][g["tpos"]]); tpr.append(ex["probs"][g["tpos"]]); ttail.append(ex["tail"][g["tpos"]])
            ct.append(g["c_t"])
            cb.append(np.full(len(g["cont_pos"]), b)); cp.append(g["cont_pos"]); cc.append(g["cont_chunk"] + base)
            base += n
        rb, rp, cb, cp, cc = (torch.from_numpy(np.concatenate(x).astype(np.int64)) for x in (rb, rp, cb, cp, cc))
        t_ids = torch.from_numpy(np.concatenate(tids))
        t_valid = t_ids >= 0
        t_match = torch.where(t_valid, t2s[t_ids.clamp_min(0)], -1)
        t_probs = torch.from_numpy(np.concatenate(tpr))
        t_tail = torch.from_numpy(np.concatenate(ttail))
        c_t = torch.from_numpy(np.concatenate(ct))
        z = logits[:, :-1]
        lq = z[rb, rp].float().log_softmax(-1)
        if cp.numel():
            zc = z[cb, cp].float()
            tok = ids[cb, cp + 1]
            tok_lp = zc.gather(-1, tok[:, None])[:, 0] - torch.logsumexp(zc, -1)
            c_s = torch.zeros(len(rb), dtype=lq.dtype).index_add(0, cc, tok_lp)
        else:
            c_s = torch.zeros(len(rb), dtype=lq.dtype)
        gkl, uld = gold_terms(lq, c_s, t_match, t_probs, t_valid, t_tail, c_t, s_matched)
        d = (gkl + uld).mean()
        return (1 - alpha) * ce + alpha * d, {"ce": float(ce.detach()), "gkl": float(gkl.mean().detach()),
                                              "uld": float(uld.mean().detach())}
    return objective


def _compact_batch(batch: dict, lut: torch.Tensor) -> dict:
    """Collator batch (student full ids) -> compact ids; target mass on ids outside the compact
    vocabulary moves to the tail bucket."""
    ids = batch["input_ids"]
    cid = lut[ids]
    real = batch["attention_mask"].bool()
    if not (cid[real] >= 0).all():
        raise ValueError("student token outside the compact vocabulary")
    cid = cid.clamp_min(0)
    labels = torch.where(batch["labels"] == -100, batch["labels"], cid)
    teachers = {}
    for name, tb in batch["teachers"].items():
        tid = lut[tb["target_ids"].long()]
        probs = tb["target_probs"]
        out = tid < 0
        moved = torch.where(out, probs, 0.0).sum(-1)
        teachers[name] = dict(tb, target_ids=tid.clamp_min(0), target_probs=torch.where(out, 0.0, probs),
                              tail_mass=tb["tail_mass"] + moved)
    return {"input_ids": cid, "labels": labels, "attention_mask": batch["attention_mask"], "teachers": teachers}


def xtok_collator(side, teachers: list[dict]):
    """teachers: [{name, tokenizer, store, W}] -> CrossTokenizerCollator (text rows keyed train-NNNNN)."""
    from xtok import CrossTokenizerCollator, TeacherSpec

    specs = [TeacherSpec(t["name"], t["tokenizer"], t["store"], t["W"]) for t in teachers]
    return CrossTokenizerCollator(side.tokenizer, specs, max_length=4096, add_special_tokens=True)


def xtok_objective(side, split, collator, weights: dict, chunk_weights: dict, alpha: float):
    """xtok students: collator batch -> compact ids -> MultiTeacherLossAggregator.
    weights / chunk_weights: {teacher: share of alpha}."""
    from xtok import MultiTeacherLossAggregator
    from xtok.losses import TeacherLoss

    lut = torch.as_tensor(side.compact_lut())
    agg = MultiTeacherLossAggregator(
        {n: TeacherLoss(weight=alpha * w, chunk_weight=alpha * chunk_weights.get(n, 0.0)) for n, w in weights.items()},
        sft_weight=1 - alpha, normalize="per_component")

    def objective(model, idx):
        batch = _compact_batch(collator([{"id": train_key(i), "text": split.train[i]} for i in idx]), lut)
        logits = logits_of(model, batch["input_ids"])
        loss, logs = agg(logits, batch)
        return loss, {k: float(v) for k, v in logs.items() if k.startswith(("sft", "kl/", "chunk/"))}
    return objective
