"""The tokenizer inside a llama.cpp GGUF file (converted by transformers' GGUF reader to a
tokenizer.json, cached), and the `xtok[gguf]` extra it needs."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Sequence

from .hf_json import load_hf_spec
from .tokenizer import Tokenizer, TokenizerLoadError

GGUF_EXTRA_HINT = "pip install 'xtok[gguf]' (the gguf and accelerate packages)"


def require_gguf(what: str, packages: Sequence[str] = ("gguf",)) -> None:
    """Raise TokenizerLoadError naming the `xtok[gguf]` extra when a package GGUF files need is missing."""
    import importlib.util

    missing = [m for m in packages if importlib.util.find_spec(m) is None]
    if missing:
        raise TokenizerLoadError(f"{what}: a GGUF file needs the {', '.join(missing)} package(s), which are not "
                                 f"installed. Install them with {GGUF_EXTRA_HINT}.")


def gguf_files(folder: Path) -> list[Path]:
    """The .gguf files directly in `folder`, sorted."""
    return sorted(f for f in folder.glob("*.gguf") if f.is_file())


def _cache_dir() -> Path:
    return Path(os.environ.get("XTOK_CACHE_DIR") or Path.home() / ".cache" / "xtok")


def load_gguf(p: Path) -> Tokenizer:
    """The tokenizer stored in a GGUF file's metadata, converted by transformers' GGUF reader to a
    tokenizer.json (+ specials and chat template). The conversion (seconds to tens of seconds for a
    262k vocabulary) is cached under $XTOK_CACHE_DIR (default ~/.cache/xtok), keyed by the file's
    path, size and modification time."""
    require_gguf(str(p))
    st = p.stat()
    key = hashlib.sha256(f"{p.resolve()}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:24]
    cached = _cache_dir() / "gguf-tokenizers" / f"{key}.json"
    got = None
    if cached.is_file():
        try:
            got = json.loads(cached.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            got = None
    if got is None:
        try:
            from transformers import AutoTokenizer
            from transformers.utils import logging as hf_logging

            verbosity = hf_logging.get_verbosity()
            hf_logging.set_verbosity_error()
            try:
                t = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
            finally:
                hf_logging.set_verbosity(verbosity)
            spec = json.loads(t.backend_tokenizer.to_str())
        except Exception as e:  # noqa: BLE001 - transformers/gguf raise many types on odd files
            raise TokenizerLoadError(f"{p}: transformers could not read a tokenizer from this GGUF file "
                                     f"({type(e).__name__}: {str(e)[:300]}).") from e
        cfg = {k: getattr(t, k, None) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        cfg["chat_template"] = getattr(t, "chat_template", None)
        got = {"spec": spec, "config": {k: (str(v) if v is not None and k != "chat_template" else v)
                                        for k, v in cfg.items()}}
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_name(f"{cached.name}.tmp-{os.getpid()}")
            tmp.write_text(json.dumps(got), encoding="utf-8")
            os.replace(tmp, cached)
        except OSError:
            pass  # a read-only home: convert again next time
    return load_hf_spec(got["spec"], got["config"], name=p.name, source=str(p))
