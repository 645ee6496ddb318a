"""`load_tokenizer`: any tokenizer spec a user can name (a folder, a tokenizer.json(.xz), a
SentencePiece .model, a mistral-common Tekken .json, a llama.cpp .gguf, `mistral-common:<file>`, a hub
id) -> a `Tokenizer`. The SentencePiece and Tekken formats are read here (a SentencePiece `▁` is a
space and `<0xNN>` pieces are raw bytes; Tekken's vocabulary stores raw bytes directly);
tokenizer.json in `hf_json`, GGUF files in `gguf`."""
from __future__ import annotations

import base64
import functools
import json
import lzma
import os
import re
from pathlib import Path

from .backends import SentencePieceBackend, TekkenBackend
from .gguf import gguf_files, load_gguf
from .hf_json import load_hf_json, read_json
from .token_bytes import BYTE_PIECE
from .tokenizer import Tokenizer, TokenizerLoadError


def _load_spm(path: Path) -> Tokenizer:
    import sentencepiece as spm

    proto = path.read_bytes()
    sp = spm.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(proto)
    except Exception as e:  # noqa: BLE001
        raise TokenizerLoadError(f"{path}: not a SentencePiece model ({e}).") from e
    pieces: list[bytes | None] = []
    specials: dict[str, int] = {}
    for i in range(sp.GetPieceSize()):
        p = sp.IdToPiece(i)
        if sp.IsControl(i) or sp.IsUnknown(i):
            pieces.append(None)
            specials[p] = i
        elif sp.IsByte(i):
            pieces.append(bytes([int(BYTE_PIECE.match(p).group(1), 16)]))
        else:
            pieces.append(p.replace("\u2581", " ").encode("utf-8"))
    probe = sp.EncodeAsIds("a")
    prefix_space = b"".join(pieces[i] or b"" for i in probe).startswith(b" ")
    # SentencePiece user-defined / control symbols that look like "[INST]" should parse as specials
    specials = {k: v for k, v in specials.items() if k not in ("<unk>",)}
    ids = lambda i: i if i >= 0 else None  # noqa: E731
    return Tokenizer(SentencePieceBackend(proto), name=path.name, kind="sentencepiece", pieces=pieces,
                     prefix_space=prefix_space, special_tokens=specials, chat_template=None,
                     bos_id=ids(sp.bos_id()), eos_id=ids(sp.eos_id()), pad_id=ids(sp.pad_id()),
                     unk_id=ids(sp.unk_id()), source=str(path))


_TEKKEN_SPECIALS = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                    "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]",
                    "[IMG_END]", "[PREFIX]", "[MIDDLE]", "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
                    "[TOOL_CONTENT]"]


def _load_tekken(path: Path, spec: dict) -> Tokenizer:
    cfg = spec["config"]
    n_special = int(cfg.get("default_num_special_tokens", 1000))
    vocab_size = int(cfg.get("default_vocab_size", n_special + len(spec["vocab"])))
    n_ranks = vocab_size - n_special
    ranks = [base64.b64decode(v["token_bytes"]) for v in spec["vocab"][:n_ranks]]
    names = [s["token_str"] for s in spec.get("special_tokens", [])] or list(_TEKKEN_SPECIALS)
    names = names + [f"<SPECIAL_{i}>" for i in range(len(names), n_special)]
    pieces: list[bytes | None] = [None] * n_special + ranks
    specials = {n: i for i, n in enumerate(names) if not n.startswith("<SPECIAL_")}
    return Tokenizer(TekkenBackend(cfg["pattern"], ranks, n_special, names), name=path.name, kind="tekken",
                     pieces=pieces, prefix_space=False, special_tokens=specials, chat_template=None,
                     bos_id=specials.get("<s>"), eos_id=specials.get("</s>"), pad_id=specials.get("<pad>"),
                     unk_id=specials.get("<unk>"), source=str(path))


def mistral_common_data_dir() -> Path | None:
    """Folder of real tokenizers shipped by the `mistral-common` package (or None)."""
    try:
        import importlib.util

        spec = importlib.util.find_spec("mistral_common")
    except Exception:  # noqa: BLE001
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    d = Path(list(spec.submodule_search_locations)[0]) / "data"
    return d if d.is_dir() else None


def builtin_tokenizer_path(name: str) -> Path | None:
    """`mistral-common:<file>` names one of the tokenizers mistral-common ships."""
    if not name.startswith("mistral-common:"):
        return None
    d = mistral_common_data_dir()
    if d is None:
        raise TokenizerLoadError(f"{name}: the `mistral-common` package is not installed (pip install mistral-common).")
    p = d / name.split(":", 1)[1]
    if not p.exists():
        avail = ", ".join(sorted(x.name for x in d.iterdir() if not x.name.startswith("_")))
        raise TokenizerLoadError(f"{name}: no such file in {d}. Available: {avail}")
    return p


@functools.lru_cache(maxsize=16)
def _load_cached(spec: str) -> Tokenizer:
    return _load_uncached(spec)


def load_tokenizer(spec: "str | os.PathLike | Tokenizer", *, cache: bool = True) -> Tokenizer:
    """Load a tokenizer from a local folder/file, a `mistral-common:<file>` name, or a hub id.

    Accepted: a folder with tokenizer.json (+ tokenizer_config.json for specials/chat template) or
    tokenizer.model (or holding one .gguf file); a tokenizer.json (or .json.xz); a SentencePiece
    .model (also mistral's `.model.v1/.v3`); a Tekken .json; a llama.cpp .gguf file (its embedded
    tokenizer; needs `xtok[gguf]`); `mistral-common:tekken_240911.json`; a hub id (needs network
    or the HF cache). Raises TokenizerLoadError naming the path and what to do when nothing loads.
    """
    if isinstance(spec, Tokenizer):
        return spec
    spec = str(spec)
    return _load_cached(spec) if cache else _load_uncached(spec)


def _load_uncached(spec: str) -> Tokenizer:
    p = builtin_tokenizer_path(spec) or Path(spec).expanduser()
    if p.is_dir():
        for cand in ("tokenizer.json", "tokenizer.json.xz"):
            if (p / cand).exists():
                return load_hf_json(p / cand, p)
        for cand in sorted(p.glob("*.model*")) + sorted(p.glob("tekken*.json")):
            return _load_file(cand)
        ggufs = gguf_files(p)
        if len(ggufs) == 1:
            return load_gguf(ggufs[0])
        if ggufs:
            raise TokenizerLoadError(f"{p}: folder holds several .gguf files ({', '.join(g.name for g in ggufs)}); "
                                     "pass the one you mean.")
        raise TokenizerLoadError(
            f"{p}: folder has no tokenizer.json, tokenizer.model, tekken*.json or .gguf file. "
            "Point --teacher/--student at a tokenizer folder or file.")
    if p.is_file():
        return _load_file(p)
    if spec.startswith((".", "/", "~")) or not re.fullmatch(r"[\w.-]+/[\w.-]+", spec):
        raise TokenizerLoadError(f"{spec}: no such file or folder (and not a hub id like 'org/name').")
    return _load_hub(spec)


def _load_file(p: Path) -> Tokenizer:
    name = p.name
    if name.endswith(".gguf"):
        return load_gguf(p)
    if name.endswith((".json", ".json.xz")):
        try:
            spec = read_json(p)
        except (json.JSONDecodeError, UnicodeDecodeError, lzma.LZMAError) as e:
            raise TokenizerLoadError(f"{p}: not valid JSON ({e}); expected a tokenizer.json or Tekken .json.") from e
        if isinstance(spec, dict) and "config" in spec and "vocab" in spec and isinstance(spec["vocab"], list):
            return _load_tekken(p, spec)
        if isinstance(spec, dict) and "model" in spec:
            cfg_dir = p.parent if (p.parent / "tokenizer_config.json").exists() else None
            try:
                t = load_hf_json(p, cfg_dir)
            except TokenizerLoadError:
                raise
            except Exception as e:  # noqa: BLE001
                raise TokenizerLoadError(f"{p}: the tokenizers library could not load it ({e}).") from e
            if cfg_dir is None:
                t.name = p.name
            return t
        raise TokenizerLoadError(f"{p}: JSON without a 'model' (tokenizer.json) or 'config'+'vocab' (Tekken) section.")
    if ".model" in name or name.endswith(".spm"):
        return _load_spm(p)
    raise TokenizerLoadError(
        f"{p}: unknown tokenizer file type; expected tokenizer.json, a SentencePiece .model, a Tekken .json or a "
        ".gguf file.")


def _load_hub(spec: str) -> Tokenizer:
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as e:  # pragma: no cover
        raise TokenizerLoadError(f"{spec}: not a local path and huggingface_hub is missing.") from e
    try:
        path = Path(hf_hub_download(spec, "tokenizer.json"))
    except Exception as e:  # noqa: BLE001
        raise TokenizerLoadError(
            f"{spec}: not a local file/folder, and the hub copy could not be fetched ({type(e).__name__}). "
            "Pass a local tokenizer folder/file, or download it first with network access.") from e
    try:
        hf_hub_download(spec, "tokenizer_config.json")
    except Exception:  # noqa: BLE001
        pass
    t = load_hf_json(path, path.parent)
    t.name = spec
    return t
