"""Cross-tokenizer distillation losses (docs/losses.md has the maths, with the names used here).

Every loss reads the student only at the output positions that carry a target and processes those
rows in chunks, through one custom autograd Function (`_RowLossFunction`):

* from logits `[B,T,V]`: a chunk of rows is gathered, cast to fp32 and evaluated; backward recomputes
  the chunk and writes its gradient into the (unavoidable) gradient of the logits. No second full
  `[B,T,V]` tensor is made (no full `log_softmax`, no fp32 copy of bf16 logits, and no copy of a
  non-contiguous input such as `logits[:, :-1]`: rows are read as `x[b, t]`).
* fused, from `(hidden [B,T,H], lm_head_weight [V,H])`: each chunk's logits are `hidden[rows] @ W.T`,
  used and dropped; backward recomputes them and accumulates `grad_hidden` and `grad_W` chunk by chunk,
  so the full logits never exist.

Components (per row):
* `partition_logprobs` / `partition_divergence`: the student's log-probs of the target ids plus one
  tail bucket (its mass outside the target ids), against the teacher's projected probs `q` plus its
  tail mass `r`: forward KL, reverse KL or JSD(beta) over those K+1 cells. A true divergence whose
  minimiser is the teacher; never "teacher renormalised over top-k vs. a full-vocab student".
* token log-probs `log softmax(z)[token]` for the SFT cross-entropy and the chunk likelihoods.

The public losses (`CrossTokenizerKLLoss`, `ChunkLikelihoodLoss`, `SFTLoss`) build row items from the
collator's batch (docs/architecture.md, "collate -> losses") and reduce; `MultiTeacherLossAggregator`
evaluates all components of all teachers in a single pass over the rows. No module or global state;
everything is computed in fp32 (fp64 when given fp64) with autocast disabled inside.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping

import torch
from torch import nn

IGNORE_INDEX = -100
KL_VARIANTS = ("forward", "reverse", "jsd")
CHUNK_VARIANTS = ("forward", "reverse")
_NEG = -1e30  # stands for log(0) inside logsumexp: finite, so gradients stay finite
# Reverse-KL floor on the teacher's cell probabilities (`q~ = max(q, eps)`, renormalised). The
# collator computes tail_mass = max(0, 1 - sum q) from float32 probabilities, so a tail that is truly
# ~0 arrives as float32 rounding noise in [0, ~1.3e-7]; with a floor of 1e-5 every such value maps to
# the same cell probability, and noise on a genuine r >= eps moves log q~ by at most noise / eps ~ 1%.
REVERSE_EPS = 1e-5


# ------------------------------------------------------------------------------------------------
# per-row maths (pure torch, differentiable, run in the compute dtype)
# ------------------------------------------------------------------------------------------------


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def partition_logprobs(z: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor, tau: float = 1.0):
    """Student log-probs over the partition (target ids, tail bucket).

    z [n,V] logits, ids [n,K] long, valid [n,K] bool (ids must be distinct among valid entries).
    Returns (log_s [n,K] = log softmax(z/tau)[ids], log_u [n] = log of the student mass outside the valid
    ids), with log_u computed as logsumexp over the complement (exact, no 1 - sum cancellation).
    """
    zt = z / tau if tau != 1.0 else z
    lse = torch.logsumexp(zt, dim=-1)
    log_s = zt.gather(1, ids) - lse[:, None]
    inset = torch.zeros(zt.shape, dtype=torch.bool, device=zt.device)
    r_idx, k_idx = valid.nonzero(as_tuple=True)
    inset[r_idx, ids[r_idx, k_idx]] = True
    log_u = torch.logsumexp(zt.masked_fill(inset, _NEG), dim=-1) - lse
    return log_s, log_u


def partition_divergence(log_s, log_u, q, r, valid, variant: str = "forward", beta: float = 0.5,
                         eps: float = REVERSE_EPS):
    """Divergence per row over the K+1 cells (valid target ids + the tail bucket).

    log_s [n,K], log_u [n]: student; q [n,K], r [n]: teacher probs and tail mass, normalised here over
    the cells (q_k / Z, r / Z with Z = sum q + r, = 1 up to storage rounding).
      forward: KL(q || s) = sum_c q_c (log q_c - log s_c)
      reverse: KL(s || q~) = sum_c s_c (log s_c - log q~_c), q~ = max(q, eps) renormalised
      jsd:     beta KL(q || m) + (1 - beta) KL(s || m), m = beta q + (1 - beta) s
    The reverse floor `eps` (default REVERSE_EPS = 1e-5) keeps a cell the teacher gives 0 finite and
    sits well above the float32 noise of the collator's tail_mass (see REVERSE_EPS); the same function
    runs in the forward and (for the cell gradients) in the backward, so both see the same floor.
    forward and jsd need no floor (bounded and continuous in q, r).
    """
    dt = log_s.dtype
    vmask = torch.cat([valid, torch.ones_like(valid[:, :1])], dim=1)
    ls = torch.cat([log_s, log_u[:, None]], dim=1)
    qq = torch.cat([torch.where(valid, q.to(dt), 0.0), r.to(dt).clamp_min(0.0)[:, None]], dim=1)
    qq = qq.clamp_min(0.0)
    qq = qq / qq.sum(dim=1, keepdim=True).clamp_min(torch.finfo(dt).tiny)
    if variant == "forward":
        terms = torch.xlogy(qq, qq) - qq * ls
    elif variant == "reverse":
        qf = torch.where(vmask, qq.clamp_min(eps), 0.0)
        log_qf = torch.log(torch.where(vmask, qf / qf.sum(dim=1, keepdim=True), 1.0))
        terms = ls.exp() * (ls - log_qf)
    elif variant == "jsd":
        if not 0.0 < beta < 1.0:
            raise ValueError("jsd needs 0 < beta < 1 (use 'forward' / 'reverse' for the end points)")
        log_q = torch.log(torch.where(qq > 0, qq, 1.0))
        log_q = torch.where(qq > 0, log_q, _NEG)
        log_m = torch.logaddexp(log_q + torch.log(torch.tensor(beta, dtype=dt)),
                                ls + torch.log(torch.tensor(1.0 - beta, dtype=dt)))
        terms = beta * (torch.xlogy(qq, qq) - qq * log_m) + (1.0 - beta) * ls.exp() * (ls - log_m)
    else:
        raise ValueError(f"unknown KL variant {variant!r}; expected one of {KL_VARIANTS}")
    return torch.where(vmask, terms, 0.0).sum(dim=1)


def token_logprobs(z: torch.Tensor, tok: torch.Tensor) -> torch.Tensor:
    """log softmax(z)[tok] per row: z [n,V], tok [n] -> [n]."""
    return z.gather(1, tok[:, None])[:, 0] - torch.logsumexp(z, dim=-1)


def _log1mexp(a: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(a)) for a < 0 (both branches finite for a <= -1e-30)."""
    return torch.where(a > -0.6931471805599453, torch.log(-torch.expm1(a)), torch.log1p(-torch.exp(a)))


def binary_divergence(logp_teacher, logp_student, variant: str = "forward", tau: float = 1.0,
                      max_logp: float = -1e-6):
    """Bernoulli divergence between p_t = exp(logp_t / tau) and p_s = exp(logp_s / tau) (per chunk).

    forward: p_t log(p_t/p_s) + (1-p_t) log((1-p_t)/(1-p_s)); reverse swaps the roles. Log-probs are
    clamped to <= max_logp so that log(1 - p) stays finite.
    """
    a_t = (logp_teacher / tau).clamp(max=max_logp)
    a_s = (logp_student / tau).clamp(max=max_logp)
    if variant == "reverse":
        a_t, a_s = a_s, a_t
    elif variant != "forward":
        raise ValueError(f"unknown chunk variant {variant!r}; expected one of {CHUNK_VARIANTS}")
    p = a_t.exp()
    return p * (a_t - a_s) + (1.0 - p) * (_log1mexp(a_t) - _log1mexp(a_s))


# ------------------------------------------------------------------------------------------------
# row items and the chunked / fused autograd Function
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _KLSpec:
    variant: str = "forward"
    tau: float = 1.0
    beta: float = 0.5
    eps: float = REVERSE_EPS


@dataclass
class _KLGroup:
    rows: torch.Tensor    # [N] flat row index b*T + t
    ids: torch.Tensor     # [N,K]
    q: torch.Tensor       # [N,K]
    r: torch.Tensor       # [N]
    valid: torch.Tensor   # [N,K]
    spec: _KLSpec


class _Plan:
    """Which rows are read, in which chunks, and what is evaluated on each row."""

    def __init__(self, tok_rows, tok_ids, groups: list[_KLGroup], chunk_rows: int, device, T: int):
        self.groups = groups
        self.tok_ids = tok_ids
        parts = [tok_rows] + [g.rows for g in groups]
        allrows = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long, device=device)
        self.rows, inv = torch.unique(allrows, sorted=True, return_inverse=True)
        # (b, t) of every row: a chunk is read as x[b, t], which copies only its rows whatever the strides
        # of x (x.reshape(-1, V) would copy all of a non-contiguous x, e.g. logits[:, :-1], per chunk)
        self.rows_b, self.rows_t = self.rows // max(T, 1), self.rows % max(T, 1)
        R = self.rows.numel()
        self.chunk_rows = max(1, int(chunk_rows))
        self.bounds = list(range(0, R, self.chunk_rows)) + [R]
        if R == 0:
            self.bounds = [0]
        sizes = [p.numel() for p in parts]
        self.inv = list(torch.split(inv, sizes))
        bnd = torch.tensor(self.bounds, dtype=torch.long, device=inv.device)
        self.order, self.cuts = [], []
        for iv in self.inv:
            o = torch.argsort(iv, stable=True)
            self.order.append(o)
            self.cuts.append(torch.searchsorted(iv[o], bnd).tolist())
        self.n_out = sizes
        dt = torch.float64  # per-item log-normalisers saved by the forward for the backward
        self.saved = [(torch.zeros(n, dtype=dt, device=device), torch.zeros(n if j else 0, dtype=dt, device=device))
                      for j, n in enumerate(sizes)]

    @property
    def n_chunks(self) -> int:
        return len(self.bounds) - 1

    def chunk_rows_of(self, x, c: int):
        """The rows of chunk c of x [B,T,F], as a new [n, F] tensor (never a copy of all of x, whatever
        its strides). Advanced indexing, not index_select: on CPU index_select of wide rows (F = 128k)
        runs ~10x slower than this gather."""
        lo, hi = self.bounds[c], self.bounds[c + 1]
        return x[self.rows_b[lo:hi], self.rows_t[lo:hi]]

    def chunk_logits(self, x, weight, c: int, cd: torch.dtype):
        rows = self.rows[self.bounds[c]: self.bounds[c + 1]]
        if weight is None:
            return self.chunk_rows_of(x, c).to(cd), rows, None
        h = self.chunk_rows_of(x, c)
        common = torch.promote_types(h.dtype, weight.dtype)
        z = (h.to(common) @ weight.to(common).t()).to(cd)
        return z, rows, h

    def _items(self, c: int):
        """(j, selection into output j, local row of each item, identity flag) for chunk c."""
        base, n = self.bounds[c], self.bounds[c + 1] - self.bounds[c]
        for j in range(len(self.inv)):
            sel = self.order[j][self.cuts[j][c]: self.cuts[j][c + 1]]
            if sel.numel() == 0:
                continue
            loc = self.inv[j][sel] - base
            ident = sel.numel() == n and bool((loc == torch.arange(n, device=loc.device)).all())
            yield j, sel, loc, ident

    def _zt(self, z, tau, loc, ident):
        zt = z if ident else z[loc]  # not index_select (slow on CPU for wide rows)
        return zt / tau if tau != 1.0 else zt

    def eval_chunk(self, z, c: int):
        """Forward values for chunk c: [(j, selection into output j, values)], and it stores the
        per-item log-normalisers (`lse`, `log_u`) in `self.saved` for the backward. One exp pass over
        the [n, V] logits per item set: lse = m + log sum e, log_u = log sum_{j not in S} e_j - log sum e,
        e = exp(zt - rowmax), the in-set entries of e zeroed in place before the second sum."""
        res = []
        lse1 = None
        for j, sel, loc, ident in self._items(c):
            if j == 0:
                if lse1 is None:
                    lse1 = torch.logsumexp(z, dim=-1)
                lse = lse1[loc]
                vals = z[loc, self.tok_ids[sel]] - lse
                self.saved[j][0][sel] = lse
            else:
                g = self.groups[j - 1]
                zt = self._zt(z, g.spec.tau, loc, ident)
                m = zt.amax(dim=-1)
                e = torch.sub(zt, m[:, None]).exp_()
                log_tot = torch.log(e.sum(dim=-1))
                lse = m + log_tot
                ids, valid = g.ids[sel], g.valid[sel]
                r_idx, k_idx = valid.nonzero(as_tuple=True)
                e[r_idx, ids[r_idx, k_idx]] = 0.0
                tiny = torch.finfo(e.dtype).tiny
                log_u = torch.log(e.sum(dim=-1).clamp_min(tiny)) - log_tot
                del e
                log_s = zt.gather(1, ids) - lse[:, None]
                vals = partition_divergence(log_s, log_u, g.q[sel], g.r[sel], valid,
                                            g.spec.variant, g.spec.beta, g.spec.eps)
                self.saved[j][0][sel] = lse
                self.saved[j][1][sel] = log_u
            res.append((j, sel, vals))
        return res

    def grad_chunk(self, z, c: int, grads):
        """d(sum_j grads[j] . out_j)/dz for chunk c, analytically, from the saved normalisers: only the
        [n, K+1] cell maths goes through autograd; the [n, V] part is one softmax per temperature,
        built in place (token items share the buffer of a tau = 1 KL group on the same rows)."""
        log_big = 0.5 * float(torch.log(torch.tensor(torch.finfo(z.dtype).max, dtype=torch.float64)))  # 1/u clamp
        n = z.shape[0]
        items = list(self._items(c))
        tok = [it for it in items if it[0] == 0]
        gz = None
        tok_done = not tok
        tok_sparse = None
        if tok:
            _, sel, loc, _ = tok[0]
            gj = grads[0][sel]
            csum = torch.zeros(n, dtype=z.dtype, device=z.device).index_add_(0, loc, gj)
            lse1 = torch.full((n,), float('inf'), dtype=z.dtype, device=z.device).index_copy_(0, loc, self.saved[0][0][sel])
            tok_sparse = (loc, self.tok_ids[sel], gj)
        for j, sel, loc, ident in items:
            if j == 0:
                continue
            g = self.groups[j - 1]
            gj = grads[j][sel]
            lse, log_u = self.saved[j][0][sel], self.saved[j][1][sel]
            zt = self._zt(z, g.spec.tau, loc, ident)
            ids, valid = g.ids[sel], g.valid[sel]
            log_s = zt.gather(1, ids) - lse[:, None]
            with torch.enable_grad():
                ls = log_s.detach().requires_grad_(True)
                lu = log_u.detach().requires_grad_(True)
                vals = partition_divergence(ls, lu, g.q[sel], g.r[sel], valid,
                                            g.spec.variant, g.spec.beta, g.spec.eps)
                cs, cu = torch.autograd.grad((gj * vals).sum(), (ls, lu))
            cs = torch.where(valid, cs, 0.0)
            # a_k = zt[i_k] - lse, a_0 = log_u = lse_complement - lse:
            # dL/dzt_j = sum_k cs_k [j = i_k] + cu [j not in S] s_j / u - (sum_k cs_k + cu) s_j
            coef = -(cs.sum(dim=1) + cu)
            ratio = cu * torch.exp((-log_u).clamp(max=log_big))
            merge = (not tok_done) and ident and g.spec.tau == 1.0
            if merge:  # the token items' softmax is the same s (tau = 1, same rows)
                tcoef = -csum
                coef_in = coef + tcoef
            else:
                tcoef, coef_in = 0.0, coef
            G = torch.sub(zt, lse[:, None]).exp_().mul_((coef_in + ratio)[:, None])
            r_idx, k_idx = valid.nonzero(as_tuple=True)
            G[r_idx, ids[r_idx, k_idx]] = (log_s.exp() * coef_in[:, None] + cs)[r_idx, k_idx]
            if g.spec.tau != 1.0:
                G.div_(g.spec.tau)
            if merge:
                G.index_put_(tok_sparse[:2], tok_sparse[2], accumulate=True)
                tok_done = True
            if gz is None and ident:
                gz = G
            else:
                if gz is None:
                    gz = torch.zeros_like(z)
                if ident:
                    gz.add_(G)
                else:
                    gz.index_add_(0, loc, G)
            del G
        if not tok_done:
            # out = z[row, tok] - lse(z[row]); d/dz = g (e_tok - softmax(z))
            G = torch.sub(z, lse1[:, None]).exp_().mul_(-csum[:, None])
            G.index_put_(tok_sparse[:2], tok_sparse[2], accumulate=True)
            if gz is None:
                gz = G
            else:
                gz.add_(G)
        return gz


class _RowLossFunction(torch.autograd.Function):
    """(plan, x, weight) -> (token log-probs [M], KL values [N_g] for each group g).

    x is logits [B,T,V] when weight is None, else hidden [B,T,H] with weight [V,H] (fused)."""

    @staticmethod
    def forward(ctx, plan: _Plan, x, weight):
        cd = _compute_dtype(torch.promote_types(x.dtype, weight.dtype) if weight is not None else x.dtype)
        ctx.plan, ctx.cd = plan, cd
        plan.saved = [(a.to(cd), b.to(cd)) for a, b in plan.saved]
        ctx.save_for_backward(x, weight)
        outs = [torch.zeros(n, dtype=cd, device=x.device) for n in plan.n_out]
        with torch.autocast(x.device.type, enabled=False):
            for c in range(plan.n_chunks):
                z, _, _ = plan.chunk_logits(x, weight, c, cd)
                for j, sel, vals in plan.eval_chunk(z, c):
                    outs[j][sel] = vals
                del z
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        plan, cd = ctx.plan, ctx.cd
        x, weight = ctx.saved_tensors
        need_x = ctx.needs_input_grad[1]
        # contiguous whatever x's strides (a view of it is indexed by flat row); None for frozen hidden states
        gx = torch.zeros(x.shape, dtype=x.dtype, device=x.device) if need_x else None
        gx_flat = gx.view(-1, x.shape[-1]) if need_x else None
        gw = None
        if weight is not None and ctx.needs_input_grad[2]:
            gw = torch.zeros(weight.shape, dtype=_compute_dtype(weight.dtype), device=weight.device)
        grads = [g.to(cd) for g in grads]
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            for c in range(plan.n_chunks):
                z, rows, h = plan.chunk_logits(x, weight, c, cd)
                gz = plan.grad_chunk(z, c, grads)
                del z
                if gz is None:
                    continue
                if weight is None:
                    gx_flat.index_copy_(0, rows, gz.to(x.dtype))
                else:
                    common = torch.promote_types(h.dtype, weight.dtype)
                    if need_x:
                        gx_flat.index_copy_(0, rows, (gz.to(common) @ weight.to(common)).to(x.dtype))
                    if gw is not None:
                        gw.addmm_(gz.to(gw.dtype).t(), h.to(gw.dtype))
                del gz
        if gw is not None:
            gw = gw.to(weight.dtype)
        return None, gx, gw


def _split_student(student):
    """logits tensor, or (hidden, lm_head_weight) -> (x, weight or None, V)."""
    if isinstance(student, (tuple, list)):
        x, w = student
        if x.dim() != 3 or w.dim() != 2 or x.shape[-1] != w.shape[1]:
            raise ValueError(f"fused path needs hidden [B, T, H] and weight [V, H]; got {tuple(x.shape)}, {tuple(w.shape)}")
        return x, w, w.shape[0]
    if student.dim() != 3:
        raise ValueError(f"student logits must be [B, T, V]; got {tuple(student.shape)}")
    return student, None, student.shape[-1]


def _auto_chunk_rows(V: int, chunk_size: int | None) -> int:
    if chunk_size is not None:
        return max(1, int(chunk_size))
    return max(8, (1 << 24) // max(V, 1))  # ~64 MiB per fp32 [rows, V] temporary


def _run(student, tok_rows, tok_ids, groups, chunk_size):
    x, w, V = _split_student(student)
    plan = _Plan(tok_rows, tok_ids, groups, _auto_chunk_rows(V, chunk_size), x.device, x.shape[1])
    return _RowLossFunction.apply(plan, x, w)


# ------------------------------------------------------------------------------------------------
# building row items from the collated batch
# ------------------------------------------------------------------------------------------------


def _kl_items(tb: Mapping, T: int, spec: _KLSpec, device):
    """Valid target positions of one teacher -> (_KLGroup, (b, p) index of each item)."""
    pos = tb["positions"].to(device).long()
    ok = tb["mask"].to(device).bool() & tb["present"].to(device).bool()[:, None] & (pos >= 0) & (pos < T)
    b, p = ok.nonzero(as_tuple=True)
    rows = b * T + pos[b, p]
    q = tb["target_probs"].to(device)[b, p]
    g = _KLGroup(rows, tb["target_ids"].to(device).long()[b, p], q, tb["tail_mass"].to(device)[b, p], q > 0, spec)
    return g, (b, p)


def _chunk_items(tb: Mapping, input_ids: torch.Tensor):
    """Valid chunks -> token items (rows, token ids, chunk index) and the chunks' (b, c)."""
    B, T = input_ids.shape
    dev = input_ids.device
    spans = tb["chunk_spans"].to(dev).long()
    s0, s1 = spans[..., 0], spans[..., 1]
    ok = tb["chunk_mask"].to(dev).bool() & tb["present"].to(dev).bool()[:, None] & (s0 >= 1) & (s1 > s0) & (s1 <= T)
    b, c = ok.nonzero(as_tuple=True)
    lens = (s1 - s0)[b, c]
    n = b.numel()
    chunk_of = torch.repeat_interleave(torch.arange(n, device=dev), lens)
    starts = torch.cumsum(lens, 0) - lens
    tok_pos = s0[b, c][chunk_of] + (torch.arange(chunk_of.numel(), device=dev) - starts[chunk_of])
    tb_ = b[chunk_of]
    rows = tb_ * T + tok_pos - 1
    toks = input_ids.long()[tb_, tok_pos]
    return rows, toks, chunk_of, (b, c)


def _sft_items(labels: torch.Tensor):
    B, T = labels.shape
    nxt = labels[:, 1:].long()
    b, t = (nxt != IGNORE_INDEX).nonzero(as_tuple=True)
    return b * T + t, nxt[b, t], b


def _empty_long(device):
    return torch.zeros(0, dtype=torch.long, device=device)


def _reduce(vals: torch.Tensor, reduction: str, index=None, shape=None):
    if reduction == "mean":
        return vals.sum() / max(vals.numel(), 1)
    if reduction == "sum":
        return vals.sum()
    if reduction == "none":
        out = vals.new_zeros(shape)
        out[index] = vals
        return out
    raise ValueError(f"unknown reduction {reduction!r}")


def _as_x(student):
    return student[0] if isinstance(student, (tuple, list)) else student


def _check_temperature(teacher_batch: Mapping, tau: float, where: str, fix: str):
    """ValueError if the teacher batch says its targets were extracted at a temperature != tau.

    The collator puts the store's temperature (manifest 'temperature') under the teacher's key
    'temperature' (a python float); a missing key or None means unknown: no check."""
    t = teacher_batch.get("temperature") if hasattr(teacher_batch, "get") else None
    if t is None:
        return
    vals = sorted(set(torch.as_tensor(t, dtype=torch.float64).flatten().tolist())) if isinstance(t, torch.Tensor) \
        else [float(t)]
    for v in vals:
        if not math.isclose(v, tau, rel_tol=1e-6, abs_tol=1e-12):
            raise ValueError(
                f"{where}: the teacher targets were extracted at temperature {v:g} (teacher batch 'temperature', "
                f"from the store's manifest) but the loss applies tau={tau:g} to the student logits, so the student "
                f"would be matched to a teacher at another temperature. Fix: {fix.format(t=f'{v:g}')}, or re-extract "
                f"the store with `xtok extract --temperature {tau:g}`; pass check_temperature=False if the mismatch "
                f"is intended.")


# ------------------------------------------------------------------------------------------------
# public losses
# ------------------------------------------------------------------------------------------------


class CrossTokenizerKLLoss(nn.Module):
    """KL-type divergence between one teacher's projected sparse target (+ tail bucket) and the student.

    variant: 'forward' KL(teacher || student), 'reverse' KL(student || teacher), 'jsd' JSD(beta).
    tau: temperature on the student logits (the teacher targets are used as stored). tau_squared:
    multiply by tau**2. eps: the reverse-KL floor on the teacher's cell probabilities (REVERSE_EPS).
    reduction: 'mean' over valid target positions, 'sum', or 'none' ([B,P], zeros where masked).
    chunk_size: rows per chunk (default: 2**24 / V rows, ~64 MiB of fp32 logits per chunk).
    check_temperature: if the teacher batch has a 'temperature' (the store's extraction temperature,
    put there by the collator) that differs from tau, raise ValueError (False: no check).
    Call: loss(logits [B,T,V] or (hidden [B,T,H], lm_head_weight [V,H]), teacher_batch).
    """

    def __init__(self, variant: str = "forward", tau: float = 1.0, tau_squared: bool = False, beta: float = 0.5,
                 eps: float = REVERSE_EPS, reduction: str = "mean", chunk_size: int | None = None,
                 check_temperature: bool = True):
        super().__init__()
        if variant not in KL_VARIANTS:
            raise ValueError(f"unknown KL variant {variant!r}; expected one of {KL_VARIANTS}")
        if variant == "jsd" and not 0.0 < beta < 1.0:
            raise ValueError("jsd needs 0 < beta < 1")
        if tau <= 0:
            raise ValueError("tau must be > 0")
        if not eps > 0:
            raise ValueError("eps (the reverse-KL floor) must be > 0")
        self.spec = _KLSpec(variant, float(tau), float(beta), float(eps))
        self.tau_squared, self.reduction, self.chunk_size = tau_squared, reduction, chunk_size
        self.check_temperature = bool(check_temperature)

    def check_batch_temperature(self, teacher_batch: Mapping, where: str = "CrossTokenizerKLLoss",
                                fix: str = "construct CrossTokenizerKLLoss(..., tau={t})"):
        if self.check_temperature:
            _check_temperature(teacher_batch, self.spec.tau, where, fix)

    @property
    def scale(self) -> float:
        return self.spec.tau ** 2 if self.tau_squared else 1.0

    def forward(self, student, teacher_batch: Mapping, reduction: str | None = None):
        x = _as_x(student)
        self.check_batch_temperature(teacher_batch)
        T = x.shape[1]
        g, idx = _kl_items(teacher_batch, T, self.spec, x.device)
        _, vals = _run(student, _empty_long(x.device), _empty_long(x.device), [g], self.chunk_size)
        return _reduce(vals * self.scale, reduction or self.reduction, idx, teacher_batch["positions"].shape)


class ChunkLikelihoodLoss(nn.Module):
    """Binary divergence between the teacher's and the student's log-likelihood of each aligned chunk.

    For chunk c with student span [s0, s1): logp_s(c) = sum_{s0<=j<s1} log p_student(input_ids[j] | <j)
    (output position j-1, tau = 1) and logp_t(c) = chunk_teacher_logprob; loss = binary_divergence(
    logp_t, logp_s, variant, tau). reduction: 'mean' over valid chunks, 'sum', 'none' ([B,C]).
    Call: loss(student, teacher_batch, input_ids).
    """

    def __init__(self, variant: str = "forward", tau: float = 1.0, max_logp: float = -1e-6,
                 reduction: str = "mean", chunk_size: int | None = None):
        super().__init__()
        if variant not in CHUNK_VARIANTS:
            raise ValueError(f"unknown chunk variant {variant!r}; expected one of {CHUNK_VARIANTS}")
        self.variant, self.tau, self.max_logp = variant, float(tau), float(max_logp)
        self.reduction, self.chunk_size = reduction, chunk_size

    def from_token_logprobs(self, tok_lp, chunk_of, n_chunks, teacher_lp):
        lp_s = tok_lp.new_zeros(n_chunks).index_add(0, chunk_of, tok_lp)
        return binary_divergence(teacher_lp.to(lp_s.dtype), lp_s, self.variant, self.tau, self.max_logp)

    def forward(self, student, teacher_batch: Mapping, input_ids: torch.Tensor, reduction: str | None = None):
        x = _as_x(student)
        rows, toks, chunk_of, (b, c) = _chunk_items(teacher_batch, input_ids.to(x.device))
        tok_lp, = _run(student, rows, toks, [], self.chunk_size)
        vals = self.from_token_logprobs(tok_lp, chunk_of, b.numel(),
                                        teacher_batch["chunk_teacher_logprob"].to(x.device)[b, c])
        return _reduce(vals, reduction or self.reduction, (b, c), teacher_batch["chunk_mask"].shape)


class SFTLoss(nn.Module):
    """Cross-entropy of the student on its own labels: output position t predicts labels[t+1];
    labels == -100 are ignored. reduction: 'mean' over label tokens, 'sum', 'none' ([B,T], at t)."""

    def __init__(self, reduction: str = "mean", chunk_size: int | None = None):
        super().__init__()
        self.reduction, self.chunk_size = reduction, chunk_size

    def forward(self, student, labels: torch.Tensor, reduction: str | None = None):
        x = _as_x(student)
        labels = labels.to(x.device)
        rows, toks, b = _sft_items(labels)
        tok_lp, = _run(student, rows, toks, [], self.chunk_size)
        T = labels.shape[1]
        return _reduce(-tok_lp, reduction or self.reduction, (b, rows - b * T), labels.shape)


@dataclass
class TeacherLoss:
    """Per-teacher configuration of MultiTeacherLossAggregator: KL weight, chunk-likelihood weight, and
    the two loss objects (their reduction / chunk_size are not used by the aggregator)."""
    weight: float = 1.0
    chunk_weight: float = 0.0
    kl: CrossTokenizerKLLoss = field(default_factory=CrossTokenizerKLLoss)
    chunk: ChunkLikelihoodLoss = field(default_factory=ChunkLikelihoodLoss)


class MultiTeacherLossAggregator(nn.Module):
    """Weighted sum of the per-teacher KL and chunk losses and the SFT cross-entropy, in one pass.

    teachers: {name: weight or TeacherLoss}. sft_weight: weight of SFTLoss on batch["labels"].
    Normalisation (`normalize`):
      'tokens' (default): every component is a sum over its items divided by the same D = number of
        trained label tokens in the batch (labels[:, 1:] != -100), or `num_items` if given (pass a
        global count under DDP). An absent teacher therefore contributes exactly nothing and the other
        weights are untouched.
      'per_component': each component is the mean over its own valid items (classic per-teacher mean;
        note this spreads a teacher's weight over the examples where it is present).
    renormalize_absent: if True, every teacher term (KL and chunk) of example b is multiplied by
      f_b = (sum over all configured teachers of weight + chunk_weight) /
            (sum over the teachers present in b of weight + chunk_weight),
      so the teachers present in an example carry the full teacher weight (a teacher's total weight
      counts, so chunk-only teachers are renormalised like the others); f_b = 1 otherwise.
    check_temperature: raise ValueError when a teacher batch's 'temperature' (its store's) differs from
      that teacher's KL tau (also disabled per teacher by its CrossTokenizerKLLoss(check_temperature=False)).
    Returns (loss, logs): logs holds detached tensors: 'loss', 'sft', 'kl/<name>', 'chunk/<name>'
    (unweighted component values), 'kl_per_position/<name>', 'present/<name>', 'tokens'.
    A configured teacher missing from batch['teachers'] is absent; batch teachers not configured are
    ignored.
    """

    def __init__(self, teachers: Mapping[str, float | TeacherLoss], sft_weight: float = 0.0,
                 normalize: str = "tokens", renormalize_absent: bool = False, chunk_size: int | None = None,
                 check_temperature: bool = True):
        super().__init__()
        self.teachers = {n: (c if isinstance(c, TeacherLoss) else TeacherLoss(weight=float(c))) for n, c in teachers.items()}
        if normalize not in ("tokens", "per_component"):
            raise ValueError("normalize must be 'tokens' or 'per_component'")
        self.sft_weight, self.normalize = float(sft_weight), normalize
        self.renormalize_absent, self.chunk_size = renormalize_absent, chunk_size
        self.check_temperature = bool(check_temperature)

    def forward(self, student, batch: Mapping, num_items=None):
        x = _as_x(student)
        dev = x.device
        B, T = x.shape[0], x.shape[1]
        labels = batch["labels"].to(dev)
        tbs = batch.get("teachers", {}) or {}
        names = list(self.teachers)

        # per-example teacher factors
        present = torch.stack([tbs[n]["present"].to(dev).bool() if n in tbs else torch.zeros(B, dtype=torch.bool, device=dev)
                               for n in names], 1) if names else torch.zeros(B, 0, dtype=torch.bool, device=dev)
        if self.check_temperature:
            for n in names:
                if n in tbs and self.teachers[n].weight != 0.0:
                    self.teachers[n].kl.check_batch_temperature(
                        tbs[n], f"MultiTeacherLossAggregator, teacher {n!r}",
                        "configure it as TeacherLoss(..., kl=CrossTokenizerKLLoss(..., tau={t}))")
        # a teacher's total weight (KL + chunk) decides how its absence is renormalised
        w = torch.tensor([self.teachers[n].weight + self.teachers[n].chunk_weight for n in names],
                         dtype=torch.float64, device=dev)
        if self.renormalize_absent and names:
            wp = (present.double() * w).sum(1)
            factor = torch.where(wp > 0, w.sum() / wp.clamp_min(1e-300), 0.0)
        else:
            factor = torch.ones(B, dtype=torch.float64, device=dev)

        # items
        tok_rows, tok_ids, groups = [], [], []
        sft_n = 0
        if self.sft_weight != 0.0:
            r, t, _ = _sft_items(labels)
            tok_rows.append(r); tok_ids.append(t); sft_n = r.numel()
        kl_meta, chunk_meta = {}, {}
        off = sft_n
        for n in names:
            cfg = self.teachers[n]
            if n not in tbs:
                continue
            if cfg.weight != 0.0:
                g, (b, _p) = _kl_items(tbs[n], T, cfg.kl.spec, dev)
                kl_meta[n] = (len(groups), b)
                groups.append(g)
            if cfg.chunk_weight != 0.0:
                r, t, chunk_of, (b, c) = _chunk_items(tbs[n], batch["input_ids"].to(dev))
                chunk_meta[n] = (off, r.numel(), chunk_of, b, tbs[n]["chunk_teacher_logprob"].to(dev)[b, c])
                tok_rows.append(r); tok_ids.append(t); off += r.numel()
        tr = torch.cat(tok_rows) if tok_rows else _empty_long(dev)
        ti = torch.cat(tok_ids) if tok_ids else _empty_long(dev)
        outs = _run(student, tr, ti, groups, self.chunk_size)
        tok_lp, kl_vals = outs[0], outs[1:]

        with torch.autocast(dev.type, enabled=False):
            n_tok = (labels[:, 1:] != IGNORE_INDEX).sum()
            D = (torch.as_tensor(num_items, device=dev, dtype=tok_lp.dtype) if num_items is not None
                 else n_tok.to(tok_lp.dtype).clamp_min(1))
            per = self.normalize == "per_component"
            total = tok_lp.sum() * 0.0 + sum(v.sum() * 0.0 for v in kl_vals)  # keeps the graph when empty
            logs = {"tokens": n_tok.detach()}
            if self.sft_weight != 0.0:
                ce = -tok_lp[:sft_n]
                sft = ce.sum() / (max(sft_n, 1) if per else D)
                total = total + self.sft_weight * sft
                logs["sft"] = sft.detach()
            for i, n in enumerate(names):
                cfg = self.teachers[n]
                logs[f"present/{n}"] = present[:, i].float().mean().detach()
                if n in kl_meta:
                    gi, b = kl_meta[n]
                    d = kl_vals[gi] * cfg.kl.scale
                    kl = (d * factor[b].to(d.dtype)).sum() / (max(d.numel(), 1) if per else D)
                    total = total + cfg.weight * kl
                    logs[f"kl/{n}"] = kl.detach()
                    logs[f"kl_per_position/{n}"] = (d.sum() / max(d.numel(), 1)).detach()
                if n in chunk_meta:
                    o, m, chunk_of, b, tlp = chunk_meta[n]
                    cl = cfg.chunk.from_token_logprobs(tok_lp[o:o + m], chunk_of, b.numel(), tlp)
                    cv = (cl * factor[b].to(cl.dtype)).sum() / (max(cl.numel(), 1) if per else D)
                    total = total + cfg.chunk_weight * cv
                    logs[f"chunk/{n}"] = cv.detach()
            logs["loss"] = total.detach()
        return total, logs
