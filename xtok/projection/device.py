"""The torch side of the projection: `project_torch` (the projection on an accelerator, same result
as the CPU kernel) and `torch_sparse_mm` (dense distributions through W, for references)."""
from __future__ import annotations

__all__ = ["project_torch", "torch_sparse_mm"]


def project_torch(indptr, indices, data, n_teacher: int, max_row_nnz: int, topk_ids, topk_probs, K: int | None,
                  pad_id: int = -1):
    """`ProjectionMatrix.project` with torch ops on the inputs' device: W's CSR arrays (indptr,
    indices int64, data float32 torch tensors on that device), teacher top-k ids [..., k] / probs
    [..., k] -> (ids [..., K] int64, probs [..., K]) sorted by prob, pad_id/0 padding. K None: k *
    max row nnz (nothing truncated)."""
    import torch

    ids, probs = topk_ids, topk_probs
    if ids.shape != probs.shape:
        raise ValueError(f"topk_ids {tuple(ids.shape)} and topk_probs {tuple(probs.shape)} differ in shape")
    lead, k = tuple(ids.shape[:-1]), int(ids.shape[-1]) if ids.dim() else 1
    K = max(1, k * max(1, max_row_nnz)) if K is None else int(K)
    dev = ids.device
    ids2 = ids.reshape(-1, k).long()
    probs2 = probs.reshape(-1, k)
    if not probs2.is_floating_point():
        probs2 = probs2.float()
    P = ids2.shape[0]
    if ids2.numel() and int(ids2.max()) >= n_teacher:
        raise IndexError(f"teacher id {int(ids2.max())} out of range for a W with {n_teacher} rows")
    valid = ids2 >= 0
    safe = ids2.clamp_min(0)
    start = indptr[safe]
    cnt = torch.where(valid, indptr[safe + 1] - start, torch.zeros_like(start))
    m = max(1, max_row_nnz)
    if m == 1:
        has = cnt > 0
        pos = start.clamp_max(max(indices.numel() - 1, 0))
        sid = torch.where(has, indices[pos] if indices.numel() else safe, torch.full_like(safe, -1))
        sp = torch.where(has, (data[pos] if indices.numel() else probs2.new_zeros(())).to(probs2.dtype) * probs2,
                         probs2.new_zeros(()))
    else:
        j = torch.arange(m, device=dev)
        has = j.view(1, 1, m) < cnt.unsqueeze(-1)  # [P, k, m]
        pos = (start.unsqueeze(-1) + j).clamp_max(max(indices.numel() - 1, 0))
        sid = torch.where(has, indices[pos], torch.full_like(pos, -1)).reshape(P, k * m)
        sp = torch.where(has, data[pos].to(probs2.dtype) * probs2.unsqueeze(-1),
                         probs2.new_zeros(())).reshape(P, k * m)
    # merge duplicate student ids per position: sort by id, segment-sum
    big = torch.iinfo(torch.int64).max
    key = torch.where(sid >= 0, sid, torch.full_like(sid, big))
    skey, order = torch.sort(key, dim=1)
    sprob = torch.gather(sp, 1, order)
    L = skey.shape[1]
    new = torch.ones_like(skey, dtype=torch.bool)
    if L > 1:
        new[:, 1:] = skey[:, 1:] != skey[:, :-1]
    grp = torch.cumsum(new.long(), dim=1) - 1
    merged_p = torch.zeros_like(sprob).scatter_add_(1, grp, sprob)
    merged_id = torch.full_like(skey, big).scatter_(1, grp, skey)
    real = merged_id != big
    merged_p = torch.where(real, merged_p, merged_p.new_full((), -1.0))  # pads sort last
    top_p, top_i = torch.sort(merged_p, dim=1, descending=True, stable=True)
    top_id = torch.gather(merged_id, 1, top_i)
    if K <= L:
        top_p, top_id = top_p[:, :K], top_id[:, :K]
    else:
        top_p = torch.cat([top_p, top_p.new_full((P, K - L), -1.0)], 1)
        top_id = torch.cat([top_id, top_id.new_full((P, K - L), big)], 1)
    pad = top_p < 0
    out_id = torch.where(pad, torch.full_like(top_id, pad_id), top_id).reshape(*lead, K)
    out_p = torch.where(pad, top_p.new_zeros(()), top_p).reshape(*lead, K)
    return out_id, out_p


def torch_sparse_mm(csr, dense):
    """dense [N, V_t] @ W [V_t, V_s] with W sparse: computed as (W^T @ dense^T)^T."""
    return (csr.t().to_sparse_coo() @ dense.t().to(csr.dtype)).t()
