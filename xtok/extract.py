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

The output layer is re-applied by hand (body hidden states -> `OutputLayer.logits`): the lm_head
weight (and bias), then the model's known logit transforms (`logits_scaling` divides: Granite;
`logit_scale` / `lm_head_multiplier` multiply: Cohere, Falcon-H1; `final_logit_softcapping`: Gemma
2/3, ...), then the temperature. At load time the model's own forward runs on a short probe and its
log-softmax must agree with the hand-applied one (`check_output_layer`); a model with a transform xtok
does not know is refused instead of yielding silently wrong distributions.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .store import (StoreError, StoreWriter, content_json, content_key, encode_example, example_key, quantize_logprobs,
                    QSTEP, D_MAX)

__all__ = ["ExtractConfig", "ExtractError", "OutputLayer", "extract", "teacher_targets", "load_teacher", "read_dataset",
           "check_output_layer", "model_hash", "teacher_parts"]


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
    force_tokenizer: bool = False         # accept a --tokenizer that differs from the model folder's own


# ------------------------------------------------------------------------------------------
# The fused on-device computation
# ------------------------------------------------------------------------------------------


def _output_logits(h, w, b, logit_scale: float = 1.0, softcap: float | None = None):
    """float32 logits of the output layer: softcap(logit_scale * (h @ w.T + b)) (the order the models use)."""
    import torch

    logits = torch.nn.functional.linear(h, w, b).float()
    if logit_scale != 1.0:
        logits = logits * logit_scale
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def teacher_targets(hidden, weight, targets, *, vocab_size: int, top_k: int, word_start=None, bias=None,
                    temperature: float = 1.0, softcap: float | None = None, logit_scale: float = 1.0,
                    top_p: float | None = None,
                    sample_tail: int = 0, uniforms=None, chunk_rows: int | None = None, chunk_bytes: int = 256 << 20):
    """Teacher statistics for N output positions, computed in chunks of positions on hidden's device.

    hidden [N, D] (final hidden states at the positions), weight [V_model, D] (output layer), targets
    [N] (realised next token ids), vocab_size: the tokenizer's vocabulary (model rows beyond it are
    padding and are excluded from the softmax), logits = softcap(logit_scale * (hidden @ weight.T + bias)) /
    temperature, word_start bool [vocab_size], uniforms [N, m] in
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
        logits = _output_logits(h, w, b, logit_scale, softcap)
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
    """The torch device for `--device` (auto: cuda:LOCAL_RANK when CUDA is present, else cpu); an
    ExtractError for a name torch does not know or a device this machine does not have."""
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        return "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise ExtractError(f"--device {device}: not a device name torch knows. Expected auto, cpu, cuda, cuda:N "
                           "or mps.") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            how = f"built with CUDA {torch.version.cuda} but no GPU is visible" if torch.version.cuda else \
                "a CPU-only build"
            raise ExtractError(f"--device {device}: CUDA is not available here (torch {torch.__version__}: {how}). "
                               "Use --device cpu (or auto).")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ExtractError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here "
                               f"(cuda:0..cuda:{torch.cuda.device_count() - 1}).")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ExtractError(f"--device {device}: MPS is not available here. Use --device cpu (or auto).")
    elif dev.type != "cpu":
        try:
            torch.empty(1, device=dev)
        except Exception as e:  # noqa: BLE001
            raise ExtractError(f"--device {device}: not usable here ({type(e).__name__}: {str(e)[:160]}). "
                               "Use --device cpu (or auto).") from None
    return str(device)


_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")


def gguf_model_file(model: str) -> Path | None:
    """The GGUF file `--model` names: the path itself when it ends in .gguf, the one .gguf file of a
    folder without config.json; None otherwise (ExtractError for a folder with several)."""
    p = Path(model).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return p
    if p.is_dir() and not (p / "config.json").exists():
        from .tokens import gguf_files

        found = gguf_files(p)
        if len(found) > 1:
            raise ExtractError(f"--model {model}: the folder holds several .gguf files "
                               f"({', '.join(f.name for f in found)}); pass the one you mean.")
        return found[0] if found else None
    return None


def check_model_spec(model: str) -> None:
    """Cheap checks of `--model` before anything is loaded: a local folder must exist and hold a
    config.json (or one .gguf file); a .gguf file needs the `xtok[gguf]` extra; a hub id must be in
    the local Hugging Face cache or the hub must answer at once (no long retry loops when there is no
    network)."""
    p = Path(model).expanduser()
    if p.exists():
        gg = gguf_model_file(model)
        if gg is not None:
            from .tokens import TokenizerLoadError, require_gguf

            try:
                require_gguf(f"--model {model}", ("gguf", "accelerate"))
            except TokenizerLoadError as e:
                raise ExtractError(str(e)) from None
            return
        if not p.is_dir():
            raise ExtractError(f"--model {model}: is a file; pass the model folder (config.json + weights), a .gguf "
                               "file or a hub id.")
        if not (p / "config.json").exists():
            raise ExtractError(f"--model {model}: the folder has no config.json and no .gguf file; pass a "
                               "transformers model folder (config.json + weights), a .gguf file or a hub id like "
                               "'org/name'.")
        return
    if model.startswith((".", "/", "~")) or not _HUB_ID.fullmatch(model):
        raise ExtractError(f"--model {model}: no such folder (and not a hub id like 'org/name').")
    try:
        import huggingface_hub as hf
        from huggingface_hub import constants as hfc
    except ImportError:  # pragma: no cover - transformers depends on it
        return
    try:
        cached = hf.try_to_load_from_cache(model, "config.json")
    except Exception:  # noqa: BLE001
        cached = None
    if isinstance(cached, str):
        return
    where = getattr(hfc, "HF_HUB_CACHE", "the Hugging Face cache")
    if _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE") or getattr(hfc, "HF_HUB_OFFLINE", False):
        raise ExtractError(f"--model {model}: not a local folder and not in the local Hugging Face cache ({where}), "
                           "and HF_HUB_OFFLINE is set. Download it first (`hf download "
                           f"{model}`) or pass a local folder.")
    try:
        hf.model_info(model, timeout=10)
    except Exception as e:  # noqa: BLE001
        name = type(e).__name__
        if name in ("RepositoryNotFoundError", "GatedRepoError", "HfHubHTTPError") or "404" in str(e)[:200]:
            raise ExtractError(f"--model {model}: no such model on the hub, or it is private/gated ({name}); check "
                               "the id, or log in (`hf auth login`).") from None
        raise ExtractError(f"--model {model}: not a local folder, not in the local Hugging Face cache ({where}), "
                           f"and the hub cannot be reached ({name}: {str(e)[:120]}). Download it first with network "
                           "access, or pass a local folder.") from None


@dataclass
class OutputLayer:
    """The teacher's output layer as xtok applies it: logits = softcap(scale * (h @ weight.T + bias)).
    `source` names the config fields it came from (for messages and the manifest)."""
    weight: Any
    bias: Any = None
    scale: float = 1.0
    softcap: float | None = None
    source: str = "lm_head"

    def logits(self, h, vocab_size: int | None = None):
        V = self.weight.shape[0] if vocab_size is None else int(vocab_size)
        return _output_logits(h, self.weight[:V], self.bias[:V] if self.bias is not None else None, self.scale,
                              self.softcap)

    def describe(self) -> dict:
        return {"scale": self.scale, "softcap": self.softcap, "source": self.source}


def _num(x) -> float | None:
    if isinstance(x, bool) or x is None:
        return None
    try:
        v = float(x.item() if hasattr(x, "item") else x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _output_layer(mdl, head) -> OutputLayer:
    """The known logit transforms of transformers causal LMs (see transformers' modeling_*.py)."""
    cfg = mdl.config
    tc = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    mt = str(getattr(cfg, "model_type", "") or "")
    scale, src = 1.0, ["lm_head"]
    for c in (tc, cfg):
        v = _num(getattr(c, "logits_scaling", None))          # Granite family: logits / s
        if v:
            if v != 1.0:
                scale, src = 1.0 / v, src + [f"logits_scaling={v:g}"]
            break
    if mt.startswith("cohere"):                                  # Cohere family: logits * s
        v = _num(getattr(mdl, "logit_scale", None))
        if v is None:
            v = _num(getattr(tc, "logit_scale", None))
        if v is not None and v != 1.0:
            scale, src = scale * v, src + [f"logit_scale={v:g}"]
    v = _num(getattr(getattr(mdl, "model", None), "lm_head_multiplier", None))   # Falcon-H1: logits * s
    if v is None:
        v = _num(getattr(tc, "lm_head_multiplier", None))
    if v is not None and v != 1.0:
        scale, src = scale * v, src + [f"lm_head_multiplier={v:g}"]
    if mt.startswith("muse"):                                    # MuseSpark: logits * s, then the softcap
        v = _num(getattr(tc, "output_multiplier", None))
        if v is not None and v != 1.0:
            scale, src = scale * v, src + [f"output_multiplier={v:g}"]
    softcap = None
    for c in (tc, cfg):
        v = _num(getattr(c, "final_logit_softcapping", None))  # Gemma 2/3/4, ...: s * tanh(logits / s)
        if v:
            softcap = v
            src.append(f"final_logit_softcapping={v:g}")
            break
    return OutputLayer(head.weight, getattr(head, "bias", None), float(scale), softcap, " ".join(src))


def load_teacher(model: str, dtype: str = "auto", device: str = "cpu", check_spec: bool = True):
    """(model in eval mode, body, OutputLayer). The output layer is not yet checked against the
    model's own forward: `check_output_layer` does that."""
    import torch
    from transformers import AutoModelForCausalLM

    if dtype == "auto":
        tdt = "auto" if str(device).startswith("cuda") else torch.float32
    elif dtype in _DTYPES:
        tdt = getattr(torch, _DTYPES[dtype])
    else:
        raise ExtractError(f"--dtype {dtype}: expected auto, float32, bfloat16 or float16.")
    if check_spec:
        check_model_spec(model)
    p = Path(model).expanduser()
    gg = gguf_model_file(model) if p.exists() else None
    try:
        if gg is not None:  # llama.cpp file: transformers dequantises it to float tensors
            from transformers.utils import logging as hf_logging

            verbosity = hf_logging.get_verbosity()
            hf_logging.set_verbosity_error()
            try:
                mdl = AutoModelForCausalLM.from_pretrained(str(gg.parent), gguf_file=gg.name, dtype=tdt)
            finally:
                hf_logging.set_verbosity(verbosity)
        else:
            mdl = AutoModelForCausalLM.from_pretrained(str(p) if p.exists() else model, dtype=tdt)
    except Exception as e:  # noqa: BLE001
        what = "a GGUF file transformers can read (its architecture must be one transformers converts)" \
            if gg is not None else "a folder with config.json and weights"
        raise ExtractError(f"--model {model}: transformers could not load it as a causal LM "
                           f"({type(e).__name__}: {str(e)[:300]}). Pass {what}.") from e
    mdl.to(device).eval()
    body, head = teacher_parts(mdl, f"--model {model}")
    return mdl, body, head


def teacher_parts(mdl, name: str):
    """(body, OutputLayer) of a transformers causal LM: the model without its output layer, and the
    output layer with the model's known logit transforms (see OutputLayer). ExtractError naming `name`
    when the model has no separable output layer."""
    head = mdl.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise ExtractError(f"{name}: has no output embedding layer (lm_head); not a causal LM.")
    body = mdl.base_model if mdl.base_model is not mdl else None
    if body is None:
        raise ExtractError(f"{name}: cannot separate the model body from its output layer.")
    return body, _output_layer(mdl, head)


def _body_hidden(body, ids_t, att_t):
    out = body(input_ids=ids_t, attention_mask=att_t, use_cache=False)
    return out[0] if not hasattr(out, "last_hidden_state") else out.last_hidden_state


def check_output_layer(mdl, body, head: OutputLayer, probe_ids, vocab_size: int, name: str) -> float:
    """Run the model's own forward on `probe_ids` and compare its log-softmax (over the tokenizer's
    vocab) with the body + `head` as xtok applies them. Returns the max abs log-prob difference;
    raises ExtractError beyond the tolerance 1e-3 + 4 eps(dtype) max|logit| (the rounding of a
    dtype-precision transform of the logits; a missed transform is far larger on trained models)."""
    import torch

    dev = head.weight.device
    V = int(vocab_size)
    with torch.inference_mode():
        ids = torch.as_tensor(np.asarray(probe_ids, dtype=np.int64)[None], device=dev)
        att = torch.ones_like(ids)
        out = mdl(input_ids=ids, attention_mask=att, use_cache=False)
        ref = out.logits[0, :, :V].double()
        ours = head.logits(_body_hidden(body, ids, att)[0], V).double()
    lr, lo = torch.log_softmax(ref, -1), torch.log_softmax(ours, -1)
    both_inf = torch.isinf(lr) & torch.isinf(lo) & (lr.sign() == lo.sign())
    diff = torch.where(both_inf, torch.zeros_like(lr), (lr - lo).abs())
    err = float(diff.nan_to_num(math.inf).max()) if diff.numel() else 0.0
    wdt = head.weight.dtype
    eps = torch.finfo(wdt).eps if wdt.is_floating_point else 1e-2
    mx = float(ref[torch.isfinite(ref)].abs().max()) if torch.isfinite(ref).any() else 0.0
    tol = 1e-3 + 4 * eps * mx
    if not err <= tol:
        mt = getattr(mdl.config, "model_type", "?")
        raise ExtractError(
            f"--model {name}: the output layer could not be reproduced: the model's own forward ({mt}) and "
            f"xtok's body + output layer ({head.source}) disagree by {err:.3g} in log-prob (tolerance {tol:.2g}) "
            f"on a {ids.shape[1]}-token probe, so the stored distributions would be wrong. This architecture "
            "transforms its logits in a way xtok does not know (known: logits_scaling, logit_scale, "
            "lm_head_multiplier, final_logit_softcapping); please report it.")
    return err


def _probe_ids(tok, n: int, vocab: int) -> np.ndarray:
    ids = tok.encode("The quick brown fox jumps over the lazy dog. 1, 2, 3: Hello, world!")
    if tok.bos_id is not None:
        ids = np.concatenate([[tok.bos_id], ids])
    ids = np.asarray(ids, dtype=np.int64)
    ids = ids[(ids >= 0) & (ids < vocab)][:n]
    if ids.shape[0] < min(n, 4):
        ids = (np.arange(n, dtype=np.int64) * 7919 + 3) % vocab
    return ids


_POS_FIELDS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length", "max_seq_len")


def model_max_length(mdl) -> tuple[int | None, str | None]:
    """(the model's position limit, the config field it came from), or (None, None)."""
    cfg = mdl.config
    tc = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    for c in (tc, cfg):
        for f in _POS_FIELDS:
            v = getattr(c, f, None)
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return int(v), f
    return None, None


def model_hash(mdl, per_tensor: int = 1024, chunk: int = 1 << 24) -> str:
    """sha256 of the config and, for every parameter tensor (name, shape, dtype): a strided sample of
    `per_tensor` values (exact float32 bytes) and three float64 moments over *every* value (sum, sum of
    squares, and a sum weighted by (index mod 9973) + 1), computed on the device in chunks and recorded
    to 9 significant digits. So a change to any single weight changes the hash (a fine-tune, a LoRA
    merge, another quantisation: for a GGUF teacher these are the dequantised values transformers
    loaded), without copying the weights to the host."""
    import torch

    h = hashlib.sha256(mdl.config.to_json_string(use_diff=False).encode())
    samples, moments = [], []
    with torch.no_grad():
        for name, p in mdl.named_parameters():
            flat = p.detach().reshape(-1)
            n = flat.numel()
            stride = max(1, n // per_tensor)
            h.update(f"{name}:{tuple(p.shape)}:{p.dtype};".encode())
            samples.append(flat[::stride][:per_tensor].float())
            acc = torch.zeros(3, dtype=torch.float64, device=flat.device)
            for s0 in range(0, n, chunk):
                x = flat[s0: s0 + chunk].to(torch.float64)
                wgt = torch.arange(s0, s0 + x.numel(), device=x.device, dtype=torch.int64).remainder_(9973).add_(1)
                acc += torch.stack([x.sum(), (x * x).sum(), (x * wgt).sum()])
            moments.append(acc)
        if samples:
            h.update(np.ascontiguousarray(torch.cat(samples).cpu().numpy(), dtype="<f4").tobytes())
            h.update(";".join(f"{v:.9e}" for v in torch.cat(moments).cpu().tolist()).encode())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------
# Dataset
# ------------------------------------------------------------------------------------------


_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow"}


# split keywords as `datasets` reads them from file and folder names (datasets.data_files.SPLIT_KEYWORDS)
_SPLIT_KEYWORDS = {"train": ("train", "training"), "validation": ("validation", "valid", "dev", "val"),
                   "test": ("test", "testing", "eval", "evaluation")}
_SHARDED = re.compile(r"data/([\w-]+?)-\d{5}-of-\d{5}[^/]*")
_NON_WORD = re.compile(r"[-._ 0-9/]+")


def _canonical_split(split: str) -> str:
    for name, words in _SPLIT_KEYWORDS.items():
        if split.lower() in words:
            return name
    return split


def _words_split(text: str) -> list[str]:
    words = set(_NON_WORD.split(text.lower()))
    return [name for name, kws in _SPLIT_KEYWORDS.items() if words.intersection(kws)]


def split_files(root: Path, files: list[Path]) -> dict[str, list[Path]]:
    """Files of a local dataset folder by split, the way `datasets` assigns them: `data/{split}-NNNNN-of-NNNNN.*`
    shards first, else split keywords (train/training, validation/valid/dev/val, test/testing/eval/evaluation,
    delimited by - . _ space or digits) in folder names, else in file names; a folder with no split-named
    files is one 'train' split. Files that name no split are left out when others do."""
    rel = {f: f.relative_to(root).as_posix() for f in files}
    out: dict[str, list[Path]] = {}
    for f, r in rel.items():
        m = _SHARDED.fullmatch(r)
        if m:
            out.setdefault(m.group(1), []).append(f)
    if out:
        return out
    for part in ("dir", "name"):
        for f, r in rel.items():
            dirs, _, name = r.rpartition("/")
            for sp in _words_split(dirs if part == "dir" else name) if (dirs or part == "name") else []:
                out.setdefault(sp, []).append(f)
        if out:
            return out
    return {"train": list(files)}


def read_dataset(spec: str, split: str = "train"):
    """A `datasets.Dataset`: a `save_to_disk` folder (its `split` when it is a DatasetDict), a local
    .jsonl/.json/.parquet/.arrow file (one file is the whole dataset: `split` is ignored), a folder of
    them (files chosen by `split`, see `split_files`), or a hub dataset id."""
    import datasets

    datasets.disable_progress_bars()
    p = Path(spec).expanduser()
    try:
        if p.is_dir() and any((p / f).exists() for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
            ds = datasets.load_from_disk(str(p))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise ExtractError(f"--dataset {spec}: no split {split!r} (have {sorted(ds)}); pass --split.")
                ds = ds[split]
            return ds
        if p.exists():
            if p.is_file():
                files = [p]
            else:
                every = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in _BUILDERS
                               and not any(part.startswith(".") for part in f.relative_to(p).parts))
                if not every:
                    raise ExtractError(f"--dataset {spec}: no .jsonl/.json/.parquet/.arrow files there.")
                by_split = split_files(p, every)
                want = _canonical_split(split)
                if want not in by_split:
                    if list(by_split) == ["train"] and len(by_split["train"]) == len(every):
                        raise ExtractError(f"--dataset {spec}: no files for --split {split}: no file or folder name "
                                           "there names a split, so all its files form the 'train' split. Pass "
                                           "--split train, or name the files e.g. test.jsonl.")
                    raise ExtractError(f"--dataset {spec}: no files for --split {split} (splits there: "
                                       f"{', '.join(sorted(by_split))}). Pass --split with one of them.")
                files = sorted(by_split[want])
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
        if cfg.chat_template:
            from .chat import load_template

            try:
                self.template = load_template(cfg.chat_template)
            except Exception as e:  # noqa: BLE001
                raise ExtractError(f"--chat-template {cfg.chat_template}: {e}") from e
            if not self.chat:
                raise ExtractError(f"--chat-template {cfg.chat_template}: the dataset {cfg.dataset} is read as plain "
                                   f"text (column {tc!r}), and a chat template applies only to chat datasets (a "
                                   "messages column, or user+assistant columns). Drop --chat-template, or pass "
                                   "--messages-column.")
        self.template_source = None  # the jinja source the rows render with (hashed into the manifest)
        if self.chat:
            from .chat import chat_template_source

            try:
                self.template_source = chat_template_source(tok, self.template)
            except Exception as e:  # noqa: BLE001 - a --chat-template file with no jinja in it
                raise ExtractError(f"--chat-template {cfg.chat_template}: {e}") from e

    def messages(self, row) -> Any:
        if isinstance(self.mc, tuple):
            return [{"role": "user", "content": row["user"]}, {"role": "assistant", "content": row["assistant"]}]
        return [{k: v for k, v in m.items() if v is not None} for m in row[self.mc]]

    def key_row(self, row) -> dict:
        """The id fields example_key looks at ({--key-column: value}, else the non-null id/key
        columns); {} when the row is keyed by its content (`content`)."""
        if self.cfg.key_column:
            return {self.cfg.key_column: row[self.cfg.key_column]}
        return {c: row[c] for c in ("id", "key") if c in row and row[c] is not None}

    def content(self, row):
        """The part of a row that the teacher reads: what a content-hash key and the dataset
        fingerprint hash (the value example_key picks from the messages/text/user+assistant fields)."""
        if isinstance(self.mc, tuple):
            return {c: row[c] for c in self.mc}
        return row[self.mc] if self.chat else row[self.tc]

    def bad_type(self, row) -> str | None:
        """None, or what is wrong with the types of the row's fields."""
        def what(v):
            return f"{type(v).__name__} ({v!r:.40})"

        if not self.chat:
            v = row[self.tc]
            return None if v is None or isinstance(v, str) else f"column {self.tc!r} holds {what(v)}, expected a string"
        if isinstance(self.mc, tuple):
            for c in self.mc:
                if row[c] is not None and not isinstance(row[c], str):
                    return f"column {c!r} holds {what(row[c])}, expected a string"
            return None
        msgs = row[self.mc]
        if msgs is None:
            return None
        if not isinstance(msgs, (list, tuple)):
            return f"column {self.mc!r} holds {what(msgs)}, expected a list of {{'role', 'content'}} messages"
        for j, m in enumerate(msgs):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                return f"column {self.mc!r}, message {j}: expected an object with 'role' and 'content', got {what(m)}"
            if not isinstance(m["role"], str):
                return f"column {self.mc!r}, message {j}: 'role' holds {what(m['role'])}, expected a string"
            if m["content"] is not None and not isinstance(m["content"], str):
                return f"column {self.mc!r}, message {j}: 'content' holds {what(m['content'])}, expected a string"
        return None

    def bad_messages(self, row) -> str | None:
        """None, or why xtok.chat would refuse the messages `render` passes it (its own validation,
        e.g. a message whose content is None); for a row that passed bad_type and is not empty."""
        if not self.chat:
            return None
        from .chat import ChatFormatError, _validate

        try:
            _validate(self.messages(row))
        except ChatFormatError as e:
            return f"column {self.mc!r}: {str(e).rstrip('.')}"
        return None

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
        """(text, ids int64, positions int64); errors (ChatFormatError, TypeError...) propagate raw."""
        if self.chat:
            from .chat import render_chat

            rc = render_chat(self.tok, self.messages(row), template=self.template)
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


# The numeric options' bounds: name -> (int or float, lowest, highest or None, lowest excluded, message).
# `_check_options` checks them (a float must also be finite; None passes where the setting defaults to
# None) and the CLI builds its click IntRange / FloatRange types from them.
OPTION_BOUNDS: dict[str, tuple] = {
    "top_k": (int, 1, 65535, False, "expected 1..65535"),
    "top_p": (float, 0, 1, True, "expected 0 < p <= 1"),
    "temperature": (float, 0, None, True, "must be > 0"),
    "sample_tail": (int, 0, None, False, "must be >= 0"),
    "shard_size": (int, 1, None, False, "must be >= 1"),
    "token_budget": (int, 1, None, False, "must be >= 1"),
    "chunk_mb": (int, 1, None, False, "must be >= 1"),
    "max_length": (int, 2, None, False, "must be >= 2 (a target needs two tokens)"),
    "limit": (int, 1, None, False, "must be >= 1"),
    "max_vocab_padding": (int, 0, None, False, "must be >= 0"),
}


def _check_options(cfg: ExtractConfig) -> None:
    for name, (kind, lo, hi, lo_open, msg) in OPTION_BOUNDS.items():
        v = getattr(cfg, name)
        if v is None and getattr(ExtractConfig, name) is None:
            continue
        if not ((lo < v if lo_open else lo <= v) and (hi is None or v <= hi) and (kind is int or math.isfinite(v))):
            raise ExtractError(f"--{name.replace('_', '-')} {v}: {msg}.")


def _check_output(output: str) -> None:
    """Cheap checks of `--output` before anything is loaded (the folder itself is made later)."""
    out = str(output)
    if "://" in out:
        import fsspec

        proto = out.split("://", 1)[0]
        try:
            fsspec.get_filesystem_class(proto)
        except ValueError:
            raise ExtractError(f"--output {out}: unknown URL protocol {proto!r} (fsspec does not know it). Pass a "
                               "local folder or a URL such as s3://bucket/path (with s3fs installed).") from None
        except ImportError as e:
            raise ExtractError(f"--output {out}: the {proto!r} protocol needs an extra package ({e}).") from None
        return
    p = Path(out).expanduser()
    if p.exists() and not p.is_dir():
        raise ExtractError(f"--output {out}: is an existing file, not a folder. Pass a new folder (or an earlier "
                           "store of this command).")
    anc = p
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise ExtractError(f"--output {out}: {anc} is a file, so no folder can be made under it.")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise ExtractError(f"--output {out}: {anc} is not writable (permissions). Pass another folder.")


def _model_tokenizer(model: str):
    """The tokenizer in a local model folder, or None (not a folder, no tokenizer files there, not loadable)."""
    from .tokens import TokenizerLoadError, load_tokenizer

    p = Path(model).expanduser()
    if not p.is_dir() and p.suffix != ".gguf":
        return None
    try:
        return load_tokenizer(str(p))
    except TokenizerLoadError:
        return None


def _fingerprint_update(h, key: str, blob: str) -> None:
    """Add one example (its key and the content_json of its content) to the dataset fingerprint."""
    h.update(json.dumps(key, ensure_ascii=False).encode())
    h.update(b"\x00")
    h.update(blob.encode("utf-8", "surrogatepass"))
    h.update(b"\x01")


def max_length_note(requested: int, max_length: int, model_max_field: str | None) -> str | None:
    """The note that --max-length was capped at the model's position limit (None when it was not)."""
    if max_length >= requested:
        return None
    return (f"--max-length {requested} capped at the model's {max_length} positions ({model_max_field}); longer "
            "examples are skipped and counted (skipped_too_long)")


def extract(cfg: ExtractConfig, *, print_notes: bool = True) -> dict:
    """Run the extraction for this rank; returns {"manifest": merged manifest or None, "stats": ...}.
    With cfg.progress and print_notes, notes such as stats["max_length_note"] are also printed to stderr
    (the CLI passes print_notes=False: its JSON summary carries them)."""
    import torch

    from .tokens import TokenizerLoadError, load_tokenizer

    _check_options(cfg)
    rank, world = _rank_world(cfg)
    _check_output(cfg.output)
    device = resolve_device(cfg.device)
    check_model_spec(cfg.model)

    # -- dataset first (cheap checks before loading a model) ----------------------------------
    ds = read_dataset(cfg.dataset, cfg.split)
    if cfg.limit is not None:
        ds = ds.select(range(min(cfg.limit, len(ds))))
    tok_spec = cfg.tokenizer or cfg.model
    try:
        tok = load_tokenizer(tok_spec)
    except TokenizerLoadError as e:
        if cfg.tokenizer:
            raise ExtractError(f"--tokenizer {cfg.tokenizer}: {e}") from e
        raise ExtractError(f"--model {cfg.model}: no usable tokenizer in the model folder ({e}); pass --tokenizer.") \
            from e
    if cfg.tokenizer:
        own = _model_tokenizer(cfg.model)
        if own is not None and own.content_hash != tok.content_hash and not cfg.force_tokenizer:
            raise ExtractError(
                f"--tokenizer {cfg.tokenizer} ({tok.vocab_size} tokens, content hash {tok.content_hash[:12]}) is not "
                f"the tokenizer in the model folder {cfg.model} ({own.vocab_size} tokens, content hash "
                f"{own.content_hash[:12]}): the teacher's ids would stand for other tokens. Drop --tokenizer to use "
                "the model's own, or pass --force-tokenizer if you are sure they agree.")
    rend = _Renderer(tok, cfg, list(ds.column_names))
    key_cols = [c for c in ds.column_names if c in (cfg.key_column, "id", "key", rend.tc)
                or (isinstance(rend.mc, str) and c == rend.mc) or (isinstance(rend.mc, tuple) and c in rend.mc)]
    kds = ds.select_columns(key_cols)
    keys, rows_kept, seen, n_dup, n_empty = [], [], set(), 0, 0
    fph = hashlib.sha256()
    for i, row in enumerate(kds):
        bad = rend.bad_type(row)
        if bad is None:
            empty = rend.is_empty(row)
            if empty is not None:
                if cfg.skip_empty:
                    n_empty += 1
                    continue
                raise ExtractError(f"--dataset {cfg.dataset}: row {i}: field {empty!r} is empty. Remove empty rows "
                                   "or pass --skip-empty to skip (and count) them.")
            bad = rend.bad_messages(row)  # after is_empty: --skip-empty wins
        if bad is not None:
            raise ExtractError(f"--dataset {cfg.dataset}: row {i}: {bad}. Fix the row, or point --text-column / "
                               "--messages-column at the right column.")
        ids, blob = rend.key_row(row), None
        if ids or cfg.key_column is not None:
            try:
                k = example_key(ids, cfg.key_column)
            except KeyError:
                raise ExtractError(f"--dataset {cfg.dataset}: row {i}: --key-column {cfg.key_column!r} is missing "
                                   "or null.") from None
        else:  # keyed by its content: serialised once, for the key and the fingerprint
            blob = content_json(rend.content(row))
            k = content_key(blob)
        if k in seen:
            n_dup += 1
            continue
        seen.add(k)
        keys.append(k)
        rows_kept.append(i)
        _fingerprint_update(fph, k, content_json(rend.content(row), default=str) if blob is None else blob)
    if not keys:
        raise ExtractError(f"--dataset {cfg.dataset}: no examples to extract (empty dataset or all rows empty).")
    fp = fph.hexdigest()
    mine = list(range(rank, len(keys), world))

    # -- model ---------------------------------------------------------------------------------
    if not cfg.progress:
        import transformers

        transformers.utils.logging.disable_progress_bar()
    mdl, body, head = load_teacher(cfg.model, cfg.dtype, device, check_spec=False)
    weight = head.weight
    Vm, Vt = int(weight.shape[0]), tok.vocab_size
    if Vm < Vt:
        raise ExtractError(f"--model {cfg.model} has {Vm} output rows but the tokenizer {tok.name!r} has {Vt} tokens: "
                           "they do not belong together. Pass the model's own tokenizer with --tokenizer.")
    if Vm - Vt > cfg.max_vocab_padding:
        raise ExtractError(f"--model {cfg.model} has {Vm} output rows but the tokenizer {tok.name!r} has only {Vt} "
                           f"tokens ({Vm - Vt} extra rows is more than padding). Pass the model's own tokenizer with "
                           "--tokenizer (or raise --max-vocab-padding if the padding is real).")
    model_max, model_max_field = model_max_length(mdl)
    max_len = min(cfg.max_length, model_max) if model_max else cfg.max_length
    cap_note = max_length_note(cfg.max_length, max_len, model_max_field)
    if cap_note and cfg.progress and print_notes:
        print(f"xtok extract: {cap_note}.", file=sys.stderr)
    probe_err = check_output_layer(mdl, body, head, _probe_ids(tok, min(16, max_len), Vt), Vt, cfg.model)
    ws_mask = torch.as_tensor(tok.token_bytes.word_start.copy(), device=device)
    tmpl_src = rend.template_source
    tmpl_from = None if not rend.chat else "--chat-template" if rend.template is not None else \
        "tokenizer" if tok.chat_template else "built-in default"
    header = {
        "model": cfg.model, "model_hash": model_hash(mdl), "model_vocab_size": Vm,
        "output_layer": head.describe(),
        "tokenizer": tok_spec, "tokenizer_hash": tok.content_hash, "vocab_size": Vt,
        "chat_template_hash": hashlib.sha256(tmpl_src.encode()).hexdigest() if tmpl_src else None,
        "chat_template_source": tmpl_from,
        "dataset": cfg.dataset, "split": cfg.split, "limit": cfg.limit, "dataset_fingerprint": fp,
        "n_dataset_examples": len(keys),
        "top_k": min(cfg.top_k, Vt), "top_p": cfg.top_p, "sample_tail": cfg.sample_tail, "temperature": cfg.temperature,
        "targets": rend.targets, "add_bos": bool(rend.add_bos) if not rend.chat else None,
        "max_length": max_len, "token_budget": cfg.token_budget, "shard_size": cfg.shard_size,
        "dtype": str(weight.dtype).replace("torch.", ""), "seed": cfg.seed, "world": world,
        "quantization": {"logprobs": "uint8 sqrt-grid relative to top-1, delta-coded", "step": QSTEP, "d_max": D_MAX},
        "key_rule": "id/key column, else sha256 of content (xtok.store.example_key)",
    }
    try:
        writer = StoreWriter(cfg.output, header, rank=rank, world=world, overwrite=cfg.overwrite)
    except StoreError:
        raise
    except (OSError, ValueError, ImportError) as e:
        raise ExtractError(f"--output {cfg.output}: cannot make the store there ({type(e).__name__}: {e}). Pass "
                           "a writable local folder or a supported fsspec URL.") from e
    try:
        stats = _extract_shards(cfg, ds, rend, keys, rows_kept, mine, writer, body, head, Vt, ws_mask, device, max_len,
                                rank, world)
    except BaseException:
        writer.abort()  # no half-made store left behind (a new folder, nothing committed)
        raise
    stats["duplicates"] = n_dup
    stats["empty"] = n_empty
    stats["max_length"] = max_len
    stats["model_max_length"] = model_max
    stats["max_length_note"] = cap_note
    stats["output_layer_probe_error"] = probe_err
    man = writer.finish({k: stats[k] for k in ("duplicates", "empty")} if rank == 0 else None)
    return {"manifest": man, "stats": stats, "rank": rank, "world": world}


def _extract_shards(cfg, ds, rend, keys, rows_kept, mine, writer, body, head, Vt, ws_mask, device, max_len, rank,
                    world) -> dict:
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
            try:
                text, ids, pos = rend.render(row)
            except Exception as e:  # noqa: BLE001
                raise ExtractError(f"--dataset {cfg.dataset}: row {rows_kept[i]} (key {keys[i]!r}): cannot render "
                                   f"it ({type(e).__name__}: {str(e)[:300]}).") from e
            if ids.shape[0] > max_len:
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
            res = _run_batch(batch, body, head, Vt, ws_mask, cfg, device, chunk_bytes)
            for e, r in zip(batch, res):
                out_rows[e.row] = encode_example(e.key, e.text, e.ids, e.positions, r["topk_ids"], r["codes"],
                                                 r["tail_mass"], r["target_logprob"], r["word_start_mass"], Vt,
                                                 tail_ids=r.get("tail_ids"), n_kept=r.get("n_kept"))
                stats["positions"] += int(e.positions.shape[0])
                stats["tokens"] += int(e.ids.shape[0])
            bar.update(len(batch))
            dt = max(time.perf_counter() - t0, 1e-9)
            post = {"tok/s": f"{stats['tokens'] / dt:,.0f}"}
            n_skip = stats["too_long"] + skipped["too_long"]
            if n_skip:
                post[f">{max_len} tok skipped"] = n_skip
            bar.set_postfix(post, refresh=False)
        bar.update(skipped["too_long"] + skipped["no_targets"])
        writer.write_shard(j, [out_rows[r] for r in sorted(out_rows)], skipped)
        stats["examples"] += len(out_rows)
        stats["too_long"] += skipped["too_long"]
        stats["no_targets"] += skipped["no_targets"]
    bar.close()
    stats["seconds"] = time.perf_counter() - t0
    return stats


def _run_batch(batch, body, head: OutputLayer, Vt, ws_mask, cfg, device, chunk_bytes):
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
        hid = _body_hidden(body, torch.as_tensor(ids, device=device), torch.as_tensor(att, device=device))
        h = hid.reshape(B * T, -1)[torch.as_tensor(flat, device=device)]
        del hid
        r = teacher_targets(h, head.weight, torch.as_tensor(tgt), vocab_size=Vt, top_k=cfg.top_k, word_start=ws_mask,
                            bias=head.bias, temperature=cfg.temperature, softcap=head.softcap,
                            logit_scale=head.scale, top_p=cfg.top_p, sample_tail=cfg.sample_tail, uniforms=uni,
                            chunk_bytes=chunk_bytes)
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
