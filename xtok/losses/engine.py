"""The row engine of the losses: one plan of the output rows that carry any loss item and one custom
autograd Function (`_RowLossFunction`) that evaluates them chunk by chunk (docs/losses.md, section 5).

* from logits `[B,T,V]`: a chunk of rows is gathered, cast to fp32 and evaluated; backward recomputes
  the chunk and writes its gradient into the (unavoidable) gradient of the logits. No second full
  `[B,T,V]` tensor is made (no full `log_softmax`, no fp32 copy of bf16 logits, and no copy of a
  non-contiguous input such as `logits[:, :-1]`: rows are read as `x[b, t]`).
* fused, from `(hidden [B,T,H], lm_head_weight [V,H])`: each chunk's logits are `hidden[rows] @ W.T`,
  used and dropped; backward recomputes them and accumulates `grad_hidden` and `grad_W` chunk by chunk,
  so the full logits never exist.

Items: token log-probs `log softmax(z)[token]` (SFT, chunk likelihoods) and KL groups (`KLGroup`: one
teacher's target rows, evaluated with `partition_divergence`). `run_rows` is the entry point.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .divergences import REVERSE_EPS, partition_divergence


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class KLSpec:
    """How one teacher's KL items are evaluated: `partition_divergence` arguments; `tau` divides the
    student logits."""
    variant: str = "forward"
    tau: float = 1.0
    beta: float = 0.5
    eps: float = REVERSE_EPS


@dataclass
class KLGroup:
    """One teacher's KL items: the flat student rows and the projected targets at them."""
    rows: torch.Tensor    # [N] flat row index b*T + t
    ids: torch.Tensor     # [N,K]
    q: torch.Tensor       # [N,K]
    r: torch.Tensor       # [N]
    valid: torch.Tensor   # [N,K]
    spec: KLSpec


class _Plan:
    """Which rows are read, in which chunks, and what is evaluated on each row."""

    def __init__(self, tok_rows, tok_ids, groups: list[KLGroup], chunk_rows: int, device, T: int):
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
            merge = (not tok_done) and ident and self.groups[j - 1].spec.tau == 1.0
            # merge: the token items' softmax is the same s (tau = 1, same rows)
            G = self._kl_grad(z, j, sel, loc, ident, grads[j][sel], csum if merge else None)
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

    def _kl_grad(self, z, j: int, sel, loc, ident, gj, tok_csum):
        """The [n_items, V] gradient of KL group j's items of this chunk (w.r.t. their rows of z), and,
        when `tok_csum` is given, the dense softmax part of the token items on the same rows (whose
        sparse part the caller adds)."""
        log_big = 0.5 * float(torch.log(torch.tensor(torch.finfo(z.dtype).max, dtype=torch.float64)))  # 1/u clamp
        g = self.groups[j - 1]
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
        if tok_csum is not None:
            tcoef = -tok_csum
            coef_in = coef + tcoef
        else:
            coef_in = coef
        G = torch.sub(zt, lse[:, None]).exp_().mul_((coef_in + ratio)[:, None])
        r_idx, k_idx = valid.nonzero(as_tuple=True)
        G[r_idx, ids[r_idx, k_idx]] = (log_s.exp() * coef_in[:, None] + cs)[r_idx, k_idx]
        if g.spec.tau != 1.0:
            G.div_(g.spec.tau)
        return G


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


def run_rows(student, tok_rows, tok_ids, groups: list[KLGroup], chunk_size: int | None):
    """Evaluate the items on the student's rows: returns (token log-probs [M] of (tok_rows [M] flat rows
    b*T + t, tok_ids [M]), then the KL values [N_g] of each group g), differentiable w.r.t. the student.
    student: logits [B,T,V] or (hidden [B,T,H], lm_head_weight [V,H]); chunk_size: rows per chunk
    (None: ~64 MiB of fp32 logits)."""
    x, w, V = _split_student(student)
    plan = _Plan(tok_rows, tok_ids, groups, _auto_chunk_rows(V, chunk_size), x.device, x.shape[1])
    return _RowLossFunction.apply(plan, x, w)


def limit_vocab(student, vocab_size: int | None, who: str = "the loss"):
    """The student restricted to its tokenizer's `vocab_size` ids: logits [..., :V], or (hidden,
    lm_head_weight[:V]). A model whose output layer has more rows than the tokenizer has ids (embedding
    padding) then gives the padded rows no mass in any term (they get no gradient either); fewer rows
    is a ValueError naming both numbers. vocab_size None: the student as it is."""
    if vocab_size is None:
        return student
    V = int(vocab_size)
    fused = isinstance(student, (tuple, list))
    rows = int(student[1].shape[0]) if fused else int(student.shape[-1])
    if rows < V:
        raise ValueError(f"{who}: the student's output layer has {rows} rows but its tokenizer has {V} ids (the "
                         "collator's student tokenizer); they do not belong together.")
    if rows == V:
        return student
    return (student[0], student[1][:V]) if fused else student[..., :V]


def student_tensor(student):
    """The [B, T, *] tensor of a student input: the logits, or the hidden states of (hidden, lm_head_weight)."""
    return student[0] if isinstance(student, (tuple, list)) else student
