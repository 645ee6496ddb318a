"""Run a teacher model over a dataset and write its top-k log-probs to a teacher store.

Pipeline (per rank): read the dataset (`datasets`: local jsonl/json/parquet/arrow files or folders, a
`save_to_disk` folder, or a hub id) -> example keys (the `id`/`key` column or a content hash; see
`xtok.store.example_key`), duplicate keys dropped -> this rank's subset (row i of the de-duplicated
rows goes to rank i % N) -> shards of `shard_size` consecutive examples -> per shard: render/tokenise,
length-sorted batches under a token budget, the model body for hidden states, then
`teacher_targets()` on the device: the output layer in chunks of positions fused with log-sum-exp,
top-k (optionally a top-p cap), the exact tail mass, the realised token's log-prob, the word-start
mass and sampled tail ids, so no [B, T, V] fp32 logits ever exist and only [N, k]-sized results
leave the device -> atomic shard write. Committed shards are skipped on a re-run (resume); every
shard's content depends only on its own examples, so a resumed store equals an uninterrupted one.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .store import StoreWriter, encode_example, example_key, quantize_logprobs, QSTEP, D_MAX, FORMAT_VERSION

__all__ = ["ExtractConfig", "ExtractError", "extract", "teacher_targets", "load_teacher", "read_dataset"]


class ExtractError(ValueError):
    """Bad input to `xtok extract`; the message names the file/field and the fix."""


@dataclass
class ExtractConfig:
    model: str
    dataset: str
    output: str
    tokenizer: str | None = None          # default: the model folder / id
    split: str = "train"
    text_column: str | None = None        # default: "text"
    messages_column: str | None = None    # default: "messages" when present
    key_column: str | None = None         # default: "id"/"key" when present, else a content hash
    chat_template: str | None = None      # jinja file/text; default: the tokenizer's (or a built-in one)
    targets: str = "auto"                 # "assistant" | "all" | "auto" (assistant for chats, all for text)
    add_bos: bool | None = None           # text datasets: prepend BOS (default: when the tokenizer has one)
    max_length: int = 4096
    limit: int | None = None
    top_k: int = 32
    top_p: float | None = None
    sample_tail: int = 0
    temperature: float = 1.0
    dtype: str = "auto"
    device: str = "auto"
    token_budget: int = 16384
    shard_size: int = 1024
    chunk_mb: int = 256
    seed: int = 0
    shard: tuple[int, int] | None = None  # (i, N); default: torchrun's RANK/WORLD_SIZE, else (0, 1)
    skip_empty: bool = False
    overwrite: bool = False
    progress: bool = True
    max_vocab_padding: int = 4096


# ------------------------------------------------------------------------------------------
# The fused on-device computation
# ------------------------------------------------------------------------------------------


def teacher_targets(hidden, weight, targets, *, vocab_size: int, top_k: int, word_start=None, bias=None,
                    temperature: float = 1.0, softcap: float | None = None, top_p: float | None = None,
                    sample_tail: int = 0, uniforms=None, chunk_rows: int | None = None, chunk_bytes: int = 256 << 20):
    """Teacher statistics for N output positions, computed in chunks of positions on hidden's device.

    hidden [N, D] (final hidden states at the positions), weight [V_model, D] (output layer), targets
    [N] (realised next token ids), vocab_size: the tokenizer's vocabulary (model rows beyond it are
    padding and are excluded from the softmax), word_start bool [vocab_size], uniforms [N, m] in
    [0, 1) for the sampled tail (inverse-CDF sampling, so results depend only on the uniforms).
    Returns CPU tensors: topk_ids int32 [N, k], topk_logprobs float32 [N, k] (descending, normalised
    by the exact full-vocab log-sum-exp), n_kept int64 [N] (top-p), tail_mass float32 [N] (exact,
    from the log-sum-exp of the tail), target_logprob float32 [N], word_start_mass float32 [N],
    tail_ids int32 [N, m] (-1 when the tail is empty).
    """
    import torch

    N, V = hidden.shape[0], int(vocab_size)
    k = min(int(top_k), V)
    m = int(sample_tail)
    dev = hidden.device
    if chunk_rows is None:
        chunk_rows = max(1, int(chunk_bytes // (V * 4 * 5)))
    w = weight[:V]
    b = bias[:V] if bias is not None else None
    ws = word_start.to(dev) if word_start is not None else None
    targets = targets.to(dev)
    out = {n: [] for n in ("topk_ids", "topk_logprobs", "n_kept", "tail_mass", "target_logprob", "word_start_mass",
                           "tail_ids")}
    for s in range(0, N, chunk_rows):
        h = hidden[s: s + chunk_rows]
        logits = torch.nn.functional.linear(h, w, b).float()
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        if temperature != 1.0:
            logits = logits / temperature
        vals, ids = torch.topk(logits, k, dim=-1, sorted=True)
        tgt = targets[s: s + chunk_rows].long()
        tl = logits.gather(1, tgt.clamp(0, V - 1)[:, None]).squeeze(-1)
        # one exp pass: probs = exp(logits - max) in place, lse = max + log(sum)
        mx = vals[:, :1]
        probs = logits.sub_(mx).exp_()                       # unnormalised; logits is consumed
        z = probs.sum(-1, keepdim=True)
        lse = mx + z.log()
        lp = vals - lse
        tlp = tl - lse.squeeze(-1)
        if top_p is not None:
            cum = torch.cumsum(lp.exp(), dim=-1)
            n_kept = ((cum < top_p).sum(-1) + 1).clamp(max=k)
        else:
            n_kept = torch.full((h.shape[0],), k, dtype=torch.long, device=dev)
        kept = torch.arange(k, device=dev)[None, :] < n_kept[:, None]
        if ws is not None:
            wsm = (probs @ ws.to(probs.dtype)) / z.squeeze(-1)
        else:
            wsm = torch.zeros_like(tlp)
        # tail: zero the kept top-k entries and sum what is left (no cancellation for tiny tails)
        probs.scatter_(1, ids, torch.where(kept, torch.zeros_like(vals), vals.sub(mx).exp()))
        tail_mass = probs.sum(-1) / z.squeeze(-1)
        if m:
            u = uniforms[s: s + chunk_rows].to(dev, torch.float32)
            cdf = torch.cumsum(probs, dim=-1)
            total = cdf[:, -1:]
            tid = torch.searchsorted(cdf, (u * total).contiguous(), right=True).clamp(max=V - 1)
            tid = torch.where(total > 0, tid, torch.full_like(tid, -1))
            out["tail_ids"].append(tid.to(torch.int32).cpu())
            del cdf
        del logits, probs
        lp = torch.where(kept, lp, torch.full_like(lp, -math.inf))
        ids = torch.where(kept, ids, torch.full_like(ids, -1))
        out["topk_ids"].append(ids.to(torch.int32).cpu())
        out["topk_logprobs"].append(lp.cpu())
        out["n_kept"].append(n_kept.cpu())
        out["tail_mass"].append(tail_mass.cpu())
        out["target_logprob"].append(tlp.cpu())
        out["word_start_mass"].append(wsm.float().cpu())
    res = {}
    for n, parts in out.items():
        if parts:
            res[n] = torch.cat(parts)
    if "tail_ids" not in res:
        res["tail_ids"] = torch.zeros((N, 0), dtype=torch.int32)
    if N == 0:
        res = {"topk_ids": torch.zeros((0, k), dtype=torch.int32), "topk_logprobs": torch.zeros((0, k)),
               "n_kept": torch.zeros(0, dtype=torch.long), "tail_mass": torch.zeros(0), "target_logprob": torch.zeros(0),
               "word_start_mass": torch.zeros(0), "tail_ids": torch.zeros((0, m), dtype=torch.int32)}
    return res


# ------------------------------------------------------------------------------------------
# Model
# ------------------------------------------------------------------------------------------


_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16"}


def resolve_device(device: str) -> str:
    import torch

    if device != "auto":
        return device
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return "cpu"


def load_teacher(model: str, dtype: str = "auto", device: str = "cpu"):
    """(model in eval mode, body, output weight [V, D], bias or None, logit softcap or None)."""
    import torch
    from transformers import AutoModelForCausalLM

    if dtype == "auto":
        tdt = "auto" if str(device).startswith("cuda") else torch.float32
    elif dtype in _DTYPES:
        tdt = getattr(torch, _DTYPES[dtype])
    else:
        raise ExtractError(f"--dtype {dtype}: expected auto, float32, bfloat16 or float16.")
    p = Path(model).expanduser()
    if not p.exists() and (model.startswith((".", "/", "~")) or model.count("/") != 1):
        raise ExtractError(f"--model {model}: no such folder (and not a hub id like 'org/name').")
    try:
        mdl = AutoModelForCausalLM.from_pretrained(str(p) if p.exists() else model, dtype=tdt)
    except Exception as e:  # noqa: BLE001
        raise ExtractError(f"--model {model}: transformers could not load it as a causal LM "
                           f"({type(e).__name__}: {str(e)[:300]}). Pass a folder with config.json and weights.") from e
    mdl.to(device).eval()
    head = mdl.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise ExtractError(f"--model {model}: has no output embedding layer (lm_head); not a causal LM.")
    body = mdl.base_model if mdl.base_model is not mdl else None
    if body is None:
        raise ExtractError(f"--model {model}: cannot separate the model body from its output layer.")
    softcap = getattr(mdl.config, "final_logit_softcapping", None)
    return mdl, body, head.weight, getattr(head, "bias", None), softcap


def model_hash(mdl) -> str:
    h = hashlib.sha256(mdl.config.to_json_string(use_diff=False).encode())
    w = mdl.get_output_embeddings().weight
    h.update(np.asarray(w[:4].detach().float().cpu().numpy(), dtype="<f4").tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------
# Dataset
# ------------------------------------------------------------------------------------------


_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow"}


def read_dataset(spec: str, split: str = "train"):
    import datasets

    datasets.disable_progress_bars()
    p = Path(spec).expanduser()
    try:
        if p.is_dir() and ((p / "dataset_info.json").exists() or (p / "state.json").exists()):
            ds = datasets.load_from_disk(str(p))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise ExtractError(f"--dataset {spec}: no split {split!r} (have {sorted(ds)}); pass --split.")
                ds = ds[split]
            return ds
        if p.exists():
            files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in _BUILDERS)
            if not files:
                raise ExtractError(f"--dataset {spec}: no .jsonl/.json/.parquet/.arrow files there.")
            kinds = {_BUILDERS.get(f.suffix) for f in files}
            if None in kinds or len(kinds) != 1:
                raise ExtractError(f"--dataset {spec}: expected .jsonl, .json, .parquet or .arrow files of one kind, "
                                   f"got {sorted({f.suffix for f in files})}.")
            for f in files:
                if not os.access(f, os.R_OK):
                    raise ExtractError(f"--dataset {f}: file is not readable (permissions); fix with chmod or copy it.")
            return datasets.load_dataset(kinds.pop(), data_files=[str(f) for f in files], split="train")
        if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
            raise ExtractError(f"--dataset {spec}: no such file or folder.")
        return datasets.load_dataset(spec, split=split)
    except ExtractError:
        raise
    except Exception as e:  # noqa: BLE001
        cause = e.__cause__ or e
        raise ExtractError(f"--dataset {spec}: cannot read it ({type(cause).__name__}: {str(cause)[:300]}). "
                           "Check it is valid JSON lines / parquet / arrow.") from e


@dataclass
class _Example:
    row: int
    key: str
    text: str
    ids: np.ndarray        # int64 [T]
    positions: np.ndarray  # int64 [P]


class _Renderer:
    def __init__(self, tok, cfg: ExtractConfig, columns: list[str]):
        self.tok, self.cfg = tok, cfg
        mc = cfg.messages_column
        tc = cfg.text_column
        if mc is None and tc is None:
            if "messages" in columns:
                mc = "messages"
            elif "text" in columns:
                tc = "text"
            elif "user" in columns and "assistant" in columns:
                mc = ("user", "assistant")
            else:
                raise ExtractError(f"--dataset {cfg.dataset}: no 'text', 'messages' or 'user'+'assistant' column "
                                   f"(columns: {columns}). Pass --text-column or --messages-column.")
        for c in ([tc] if tc else []) + ([mc] if isinstance(mc, str) else list(mc or ())):
            if c not in columns:
                raise ExtractError(f"--dataset {cfg.dataset}: column {c!r} not found (columns: {columns}). "
                                   "Pass the right --text-column / --messages-column.")
        if cfg.key_column and cfg.key_column not in columns:
            raise ExtractError(f"--dataset {cfg.dataset}: --key-column {cfg.key_column!r} not found (columns: {columns}).")
        self.mc, self.tc = mc, tc
        self.chat = mc is not None
        self.targets = cfg.targets if cfg.targets != "auto" else ("assistant" if self.chat else "all")
        if self.targets not in ("assistant", "all"):
            raise ExtractError(f"--targets {cfg.targets}: expected assistant, all or auto.")
        if self.targets == "assistant" and not self.chat:
            raise ExtractError("--targets assistant needs a chat dataset (a messages or user+assistant column).")
        self.add_bos = (tok.bos_id is not None) if cfg.add_bos is None else cfg.add_bos
        self.template = None
        if self.chat:
            from .chat import load_template

            try:
                self.template = load_template(cfg.chat_template) if cfg.chat_template else None
            except Exception as e:  # noqa: BLE001
                raise ExtractError(f"--chat-template {cfg.chat_template}: {e}") from e

    def messages(self, row) -> Any:
        if isinstance(self.mc, tuple):
            return [{"role": "user", "content": row["user"]}, {"role": "assistant", "content": row["assistant"]}]
        return [{k: v for k, v in m.items() if v is not None} for m in row[self.mc]]

    def key_row(self, row) -> dict:
        """The fields example_key looks at."""
        if self.cfg.key_column:
            return {self.cfg.key_column: row[self.cfg.key_column]}
        d = {c: row[c] for c in ("id", "key") if c in row and row[c] is not None}
        if d:
            return d
        if self.chat:
            if isinstance(self.mc, tuple):
                return {c: row[c] for c in self.mc}
            return {"messages": row[self.mc]}
        return {"text": row[self.tc]}

    def is_empty(self, row) -> str | None:
        """None, or the name of the empty field."""
        if self.chat:
            if isinstance(self.mc, tuple):
                for c in self.mc:
                    if not row[c]:
                        return c
                return None
            msgs = row[self.mc]
            if not msgs:
                return self.mc
            return None
        return self.tc if not row[self.tc] else None

    def render(self, row):
        """(text, ids int64, positions int64)."""
        if self.chat:
            from .chat import ChatFormatError, render_chat

            try:
                rc = render_chat(self.tok, self.messages(row), template=self.template)
            except ChatFormatError as e:
                raise ExtractError(f"--dataset {self.cfg.dataset}: {e}") from e
            text, ids, mask = rc.text, rc.ids, rc.assistant_mask
        else:
            text = row[self.tc]
            ids = self.tok.encode(text)
            if self.add_bos and self.tok.bos_id is not None:
                ids = np.concatenate([[self.tok.bos_id], ids])
            mask = None
        ids = np.asarray(ids, dtype=np.int64)
        T = ids.shape[0]
        if self.targets == "all" or mask is None:
            pos = np.arange(max(T - 1, 0), dtype=np.int64)
        else:
            pos = np.nonzero(mask[1:])[0].astype(np.int64)
        return text, ids, pos


def _rank_world(cfg: ExtractConfig) -> tuple[int, int]:
    if cfg.shard is not None:
        i, n = cfg.shard
    else:
        i, n = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if not (n >= 1 and 0 <= i < n):
        raise ExtractError(f"--shard {i}/{n}: need 0 <= i < N.")
    return int(i), int(n)


def _batches(lengths: np.ndarray, budget: int) -> list[np.ndarray]:
    """Length-sorted batches (indices into lengths) with padded tokens (B * max_len) <= budget."""
    order = np.argsort(-lengths, kind="stable")
    out, cur, cur_max = [], [], 0
    for i in order.tolist():
        L = int(lengths[i])
        if cur and max(cur_max, L) * (len(cur) + 1) > budget:
            out.append(np.asarray(cur))
            cur, cur_max = [], 0
        cur.append(i)
        cur_max = max(cur_max, L)
    if cur:
        out.append(np.asarray(cur))
    return out


def _uniforms(key: str, seed: int, n: int, m: int) -> np.ndarray:
    s = int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:16], "little")
    return np.random.Generator(np.random.Philox(key=s)).random((n, m))


# ------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------


def extract(cfg: ExtractConfig) -> dict:
    """Run the extraction for this rank; returns {"manifest": merged manifest or None, "stats": ...}."""
    import torch

    from .tokens import TokenizerLoadError, load_tokenizer

    if cfg.top_k < 1 or cfg.top_k > 65535:
        raise ExtractError(f"--top-k {cfg.top_k}: expected 1..65535.")
    if cfg.top_p is not None and not (0.0 < cfg.top_p <= 1.0):
        raise ExtractError(f"--top-p {cfg.top_p}: expected 0 < p <= 1.")
    if cfg.temperature <= 0:
        raise ExtractError(f"--temperature {cfg.temperature}: must be > 0.")
    if cfg.sample_tail < 0:
        raise ExtractError("--sample-tail must be >= 0.")
    rank, world = _rank_world(cfg)

    # -- dataset first (cheap checks before loading a model) ----------------------------------
    ds = read_dataset(cfg.dataset, cfg.split)
    if cfg.limit is not None:
        ds = ds.select(range(min(cfg.limit, len(ds))))
    tok_spec = cfg.tokenizer or cfg.model
    try:
        tok = load_tokenizer(tok_spec)
    except TokenizerLoadError as e:
        raise ExtractError(f"--tokenizer: {e} (pass --tokenizer when the model folder has none).") from e
    rend = _Renderer(tok, cfg, list(ds.column_names))
    key_cols = [c for c in ds.column_names if c in (cfg.key_column, "id", "key", rend.tc)
                or (isinstance(rend.mc, str) and c == rend.mc) or (isinstance(rend.mc, tuple) and c in rend.mc)]
    kds = ds.select_columns(key_cols)
    keys, rows_kept, seen, n_dup, n_empty = [], [], set(), 0, 0
    for i, row in enumerate(kds):
        empty = rend.is_empty(row)
        if empty is not None:
            if cfg.skip_empty:
                n_empty += 1
                continue
            raise ExtractError(f"--dataset {cfg.dataset}: row {i}: field {empty!r} is empty. Remove empty rows or "
                               "pass --skip-empty to skip (and count) them.")
        k = example_key(rend.key_row(row), cfg.key_column)
        if k in seen:
            n_dup += 1
            continue
        seen.add(k)
        keys.append(k)
        rows_kept.append(i)
    if not keys:
        raise ExtractError(f"--dataset {cfg.dataset}: no examples to extract (empty dataset or all rows empty).")
    fp = hashlib.sha256("\n".join(keys).encode()).hexdigest()
    mine = list(range(rank, len(keys), world))

    # -- model ---------------------------------------------------------------------------------
    device = resolve_device(cfg.device)
    if not cfg.progress:
        import transformers

        transformers.utils.logging.disable_progress_bar()
    mdl, body, weight, bias, softcap = load_teacher(cfg.model, cfg.dtype, device)
    Vm, Vt = int(weight.shape[0]), tok.vocab_size
    if Vm < Vt:
        raise ExtractError(f"--model {cfg.model} has {Vm} output rows but the tokenizer {tok.name!r} has {Vt} tokens: "
                           "they do not belong together. Pass the model's own tokenizer with --tokenizer.")
    if Vm - Vt > cfg.max_vocab_padding:
        raise ExtractError(f"--model {cfg.model} has {Vm} output rows but the tokenizer {tok.name!r} has only {Vt} "
                           f"tokens ({Vm - Vt} extra rows is more than padding). Pass the model's own tokenizer with "
                           "--tokenizer (or raise --max-vocab-padding if the padding is real).")
    ws_mask = torch.as_tensor(tok.token_bytes.word_start.copy(), device=device)
    tmpl_src = rend.template or (tok.chat_template if rend.chat else None)
    header = {
        "model": cfg.model, "model_hash": model_hash(mdl), "model_vocab_size": Vm,
        "tokenizer": tok_spec, "tokenizer_hash": tok.content_hash, "vocab_size": Vt,
        "chat_template_hash": hashlib.sha256(tmpl_src.encode()).hexdigest() if tmpl_src else None,
        "dataset": cfg.dataset, "split": cfg.split, "limit": cfg.limit, "dataset_fingerprint": fp,
        "n_dataset_examples": len(keys),
        "top_k": min(cfg.top_k, Vt), "top_p": cfg.top_p, "sample_tail": cfg.sample_tail, "temperature": cfg.temperature,
        "targets": rend.targets, "add_bos": bool(rend.add_bos) if not rend.chat else None,
        "max_length": cfg.max_length, "token_budget": cfg.token_budget, "shard_size": cfg.shard_size,
        "dtype": str(weight.dtype).replace("torch.", ""), "seed": cfg.seed, "world": world,
        "quantization": {"logprobs": "uint8 sqrt-grid relative to top-1, delta-coded", "step": QSTEP, "d_max": D_MAX},
        "key_rule": "id/key column, else sha256 of content (xtok.store.example_key)",
    }
    writer = StoreWriter(cfg.output, header, rank=rank, world=world, overwrite=cfg.overwrite)
    done = writer.committed()
    n_shards = math.ceil(len(mine) / cfg.shard_size)
    todo = [j for j in range(n_shards) if j not in done]

    from tqdm.auto import tqdm

    n_done_ex = sum(min(cfg.shard_size, len(mine) - j * cfg.shard_size) for j in done if j < n_shards)
    bar = tqdm(total=len(mine), initial=n_done_ex, unit="ex", disable=not cfg.progress, dynamic_ncols=True,
               desc=f"extract r{rank}/{world}" if world > 1 else "extract")
    t0 = time.perf_counter()
    stats = {"examples": 0, "positions": 0, "tokens": 0, "too_long": 0, "no_targets": 0}
    chunk_bytes = int(cfg.chunk_mb) << 20
    for j in todo:
        sel = mine[j * cfg.shard_size: (j + 1) * cfg.shard_size]
        rows = ds.select([rows_kept[i] for i in sel])
        exs: list[_Example] = []
        skipped = {"too_long": 0, "no_targets": 0}
        for r, (i, row) in enumerate(zip(sel, rows)):
            text, ids, pos = rend.render(row)
            if ids.shape[0] > cfg.max_length:
                skipped["too_long"] += 1
                continue
            if pos.size == 0:
                skipped["no_targets"] += 1
                continue
            exs.append(_Example(row=r, key=keys[i], text=text, ids=ids, positions=pos))
        out_rows: dict[int, dict] = {}
        lengths = np.array([e.ids.shape[0] for e in exs], dtype=np.int64)
        for bidx in _batches(lengths, cfg.token_budget):
            batch = [exs[i] for i in bidx.tolist()]
            res = _run_batch(batch, body, weight, bias, softcap, Vt, ws_mask, cfg, device, chunk_bytes)
            for e, r in zip(batch, res):
                out_rows[e.row] = encode_example(e.key, e.text, e.ids, e.positions, r["topk_ids"], r["codes"],
                                                 r["tail_mass"], r["target_logprob"], r["word_start_mass"], Vt,
                                                 tail_ids=r.get("tail_ids"), n_kept=r.get("n_kept"))
                stats["positions"] += int(e.positions.shape[0])
                stats["tokens"] += int(e.ids.shape[0])
            bar.update(len(batch))
            dt = max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix({"tok/s": f"{stats['tokens'] / dt:,.0f}"}, refresh=False)
        bar.update(skipped["too_long"] + skipped["no_targets"])
        writer.write_shard(j, [out_rows[r] for r in sorted(out_rows)], skipped)
        stats["examples"] += len(out_rows)
        stats["too_long"] += skipped["too_long"]
        stats["no_targets"] += skipped["no_targets"]
    bar.close()
    stats["seconds"] = time.perf_counter() - t0
    stats["duplicates"] = n_dup
    stats["empty"] = n_empty
    man = writer.finish({k: stats[k] for k in ("duplicates", "empty")} if rank == 0 else None)
    return {"manifest": man, "stats": stats, "rank": rank, "world": world}


def _run_batch(batch, body, weight, bias, softcap, Vt, ws_mask, cfg, device, chunk_bytes):
    import torch

    B = len(batch)
    T = max(e.ids.shape[0] for e in batch)
    ids = np.zeros((B, T), dtype=np.int64)
    att = np.zeros((B, T), dtype=np.int64)
    for b, e in enumerate(batch):
        ids[b, : e.ids.shape[0]] = e.ids
        att[b, : e.ids.shape[0]] = 1
    counts = [e.positions.shape[0] for e in batch]
    flat = np.concatenate([b * T + e.positions for b, e in enumerate(batch)])
    tgt = ids.reshape(-1)[flat + 1]
    uni = None
    if cfg.sample_tail:
        uni = torch.as_tensor(np.concatenate([_uniforms(e.key, cfg.seed, c, cfg.sample_tail)
                                              for e, c in zip(batch, counts)]))
    with torch.inference_mode():
        ids_t = torch.as_tensor(ids, device=device)
        out = body(input_ids=ids_t, attention_mask=torch.as_tensor(att, device=device), use_cache=False)
        hid = out[0] if not hasattr(out, "last_hidden_state") else out.last_hidden_state
        h = hid.reshape(B * T, -1)[torch.as_tensor(flat, device=device)]
        del out, hid
        r = teacher_targets(h, weight, torch.as_tensor(tgt), vocab_size=Vt, top_k=cfg.top_k, word_start=ws_mask,
                            bias=bias, temperature=cfg.temperature, softcap=softcap, top_p=cfg.top_p,
                            sample_tail=cfg.sample_tail, uniforms=uni, chunk_bytes=chunk_bytes)
    lp = r["topk_logprobs"].numpy()
    codes = quantize_logprobs(np.where(np.isfinite(lp), lp, -np.inf))
    splits = np.cumsum(counts)[:-1]
    parts = {n: np.split(v, splits) for n, v in (
        ("topk_ids", r["topk_ids"].numpy()), ("codes", codes), ("tail_mass", r["tail_mass"].numpy()),
        ("target_logprob", r["target_logprob"].numpy()), ("word_start_mass", r["word_start_mass"].numpy()),
        ("n_kept", r["n_kept"].numpy()), ("tail_ids", r["tail_ids"].numpy()))}
    res = []
    for b in range(B):
        d = {n: parts[n][b] for n in parts}
        if cfg.top_p is None:
            d["n_kept"] = None
        if not cfg.sample_tail:
            d["tail_ids"] = None
        res.append(d)
    return res
