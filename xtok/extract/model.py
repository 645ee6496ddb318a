"""The teacher model: `--device` resolution, `--model` checks before loading (local folder, GGUF file,
hub id), `load_teacher` (model, body, `OutputLayer`), `check_output_layer` against the model's own
forward, the model's position limit and `model_hash`.

The output layer is re-applied by hand (body hidden states -> `OutputLayer.logits`): the lm_head
weight (and bias), then the model's known logit transforms (`logits_scaling` divides: Granite;
`logit_scale` / `lm_head_multiplier` multiply: Cohere, Falcon-H1; `final_logit_softcapping`: Gemma
2/3, ...), then the temperature. At load time the model's own forward runs on a short probe and its
log-softmax must agree with the hand-applied one (`check_output_layer`); a model with a transform xtok
does not know is refused instead of yielding silently wrong distributions.
"""
from __future__ import annotations

import hashlib
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .config import ExtractError
from .topk import output_logits


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
        from ..tokens import gguf_files

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
            from ..tokens import TokenizerLoadError, require_gguf

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
        return output_logits(h, self.weight[:V], self.bias[:V] if self.bias is not None else None, self.scale,
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


def body_hidden(body, ids_t, att_t):
    """The model body's final hidden states [B, T, D] for ids / attention mask tensors."""
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
        ours = head.logits(body_hidden(body, ids, att)[0], V).double()
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


def probe_ids(tok, n: int, vocab: int) -> np.ndarray:
    """Up to n ids (< vocab) of a short English probe text for `check_output_layer` (arbitrary ids when
    the tokenizer gives fewer than min(n, 4))."""
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


def model_tokenizer(model: str):
    """The tokenizer in a local model folder, or None (not a folder, no tokenizer files there, not loadable)."""
    from ..tokens import TokenizerLoadError, load_tokenizer

    p = Path(model).expanduser()
    if not p.is_dir() and p.suffix != ".gguf":
        return None
    try:
        return load_tokenizer(str(p))
    except TokenizerLoadError:
        return None
