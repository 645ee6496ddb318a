"""Tokenizers from a Hugging Face tokenizer.json: the `tokenizers` library encodes, and every id gets
its canonical bytes from the vocabulary's conventions.

Byte conventions handled here:
- byte-level BPE (GPT-2 / Llama-3 / Qwen / DeepSeek): token strings use the GPT-2 byte->unicode map;
- SentencePiece / metaspace (Llama-2 / Mistral / Gemma): `▁` is a space, `<0xNN>` pieces are raw bytes
  (byte fallback; several of them may form one UTF-8 character);
- WordPiece (BERT): `##x` continues a word (bytes `x`), any other piece starts a word (bytes ` x`),
  then the WordPiece decoder's `cleanup` (when the tokenizer.json enables it) is applied to each piece
  exactly as the `tokenizers` decoder applies it to each token: `.` `,` `!` `?` (and pieces such as
  `...`) lose the space that would start a new word, so `hello, world!` has bytes ` hello` `,` ` world`
  `!` and concatenates to what the tokenizer's own decode gives. What per-token bytes cannot follow:
  the decoder adds no space before the first token of a sequence (our bytes keep it: `prefix_space`)
  and keeps `##` on a sequence-initial continuation; the cleanup's apostrophe rules (`" ' "` -> `'`,
  `" n't"`, `" 's"`, `" do not"` -> `" don't"`, ...) need the neighbouring token, which the `tokenizers`
  decoder does not look at either (it decodes `don't` as `don ' t`, and so do our bytes), while
  transformers' `clean_up_tokenization_spaces` applies them to the whole decoded string (`don't`):
  that string-level step is not reproduced. The BERT normaliser (lower-casing, accent stripping, spaces
  around CJK characters) also means the bytes spell the normalised text, not the input.
- Tekken: the vocabulary stores raw bytes directly.
Special / control tokens are flagged `is_special` and have no bytes.
"""
from __future__ import annotations

import json
import lzma
from pathlib import Path

from .backends import HFBackend
from .token_bytes import BYTE_PIECE, unicode_to_byte
from .tokenizer import Tokenizer


def _decoder_types(dec) -> list[str]:
    if not dec:
        return []
    if dec.get("type") == "Sequence":
        return [t for d in dec.get("decoders", []) for t in _decoder_types(d)]
    return [dec.get("type")]


def _wordpiece_cleanup_enabled(dec) -> bool:
    """Whether the tokenizer.json decoder is a WordPiece decoder with `cleanup` on (its default)."""
    if not dec:
        return False
    if dec.get("type") == "Sequence":
        return any(_wordpiece_cleanup_enabled(d) for d in dec.get("decoders", []))
    return dec.get("type") == "WordPiece" and bool(dec.get("cleanup", True))


def _wordpiece_cleanup(s: str) -> str:
    """The `tokenizers` WordPiece decoder's cleanup, applied (as the decoder does) to one token's text."""
    return (s.replace(" .", ".").replace(" ?", "?").replace(" !", "!").replace(" ,", ",")
            .replace(" ' ", "'").replace(" n't", "n't").replace(" 'm", "'m").replace(" do not", " don't")
            .replace(" 's", "'s").replace(" 've", "'ve").replace(" 're", "'re"))


def _json_has(obj, key_type: str) -> bool:
    """Whether any nested component of a tokenizer.json section has type key_type."""
    if isinstance(obj, dict):
        if obj.get("type") == key_type:
            return True
        return any(_json_has(v, key_type) for v in obj.values())
    if isinstance(obj, list):
        return any(_json_has(v, key_type) for v in obj)
    return False


def _hf_pieces(spec: dict, tok) -> tuple[str, list[bytes | None], bool]:
    """Per-id canonical bytes for a tokenizer.json; returns (kind, pieces, prefix_space)."""
    model = spec["model"]
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    id_to_tok: list[str | None] = [None] * vocab_size
    vocab = model.get("vocab")
    if isinstance(vocab, dict):
        for t, i in vocab.items():
            if i < vocab_size:
                id_to_tok[i] = t
    elif isinstance(vocab, list):  # Unigram: [[piece, score], ...]
        for i, (t, _s) in enumerate(vocab):
            id_to_tok[i] = t
    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    dec_types = _decoder_types(spec.get("decoder"))
    if "ByteLevel" in dec_types or _json_has(spec.get("pre_tokenizer"), "ByteLevel"):
        kind = "byte_level"
    elif model.get("type") == "WordPiece" or "WordPiece" in dec_types:
        kind = "wordpiece"
    elif "Metaspace" in dec_types or "Replace" in dec_types or _json_has(spec.get("pre_tokenizer"), "Metaspace"):
        kind = "sentencepiece"
    else:
        kind = "raw"

    u2b = unicode_to_byte()
    prefix = model.get("continuing_subword_prefix") or "##"
    clean = _wordpiece_cleanup if _wordpiece_cleanup_enabled(spec.get("decoder")) else (lambda x: x)
    pieces: list[bytes | None] = []
    for i in range(vocab_size):
        a = added.get(i)
        t = id_to_tok[i]
        if a is not None:
            if a.get("special", False):
                pieces.append(None)
                continue
            pieces.append(a["content"].encode("utf-8"))  # added tokens are literal text
            continue
        if t is None:
            t = tok.id_to_token(i)
        if t is None:
            pieces.append(None)
            continue
        if kind == "byte_level":
            try:
                pieces.append(bytes(u2b[c] for c in t))
            except KeyError:  # not a byte-mapped string (rare added pieces)
                pieces.append(t.encode("utf-8"))
        elif kind == "sentencepiece":
            m = BYTE_PIECE.match(t)
            pieces.append(bytes([int(m.group(1), 16)]) if m else t.replace("\u2581", " ").encode("utf-8"))
        elif kind == "wordpiece":
            if t.startswith(prefix):
                pieces.append(clean(t[len(prefix):]).encode("utf-8"))
            elif t.startswith("[") and t.endswith("]") and t.isupper():
                pieces.append(None)  # [UNK]-style markers
            else:  # a new word: " " + t, then the decoder's cleanup (" ," -> ",")
                pieces.append(clean(" " + t).encode("utf-8"))
        else:
            pieces.append(t.encode("utf-8"))
    # prefix space: whatever the tokenizer does with a word at text start
    probe = tok.encode("a", add_special_tokens=False).ids
    b = b"".join(pieces[i] or b"" for i in probe)
    prefix_space = b.startswith(b" ") and b.strip() == b"a"
    return kind, pieces, prefix_space


def read_json(path: Path) -> dict:
    """A JSON file, or an xz-compressed one (`.xz`)."""
    if path.suffix == ".xz":
        with lzma.open(path, "rt", encoding="utf-8") as f:
            return json.load(f)
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def load_hf_json(path: Path, config_dir: Path | None) -> Tokenizer:
    spec = read_json(path)
    cfg = {}
    if config_dir is not None and (config_dir / "tokenizer_config.json").exists():
        cfg = json.loads((config_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    chat = None
    if config_dir is not None and (config_dir / "chat_template.jinja").exists():
        chat = (config_dir / "chat_template.jinja").read_text(encoding="utf-8")
    name = config_dir.name if config_dir is not None else path.name
    return load_hf_spec(spec, cfg, name=name, source=str(path), chat_fallback=chat)


def load_hf_spec(spec: dict, cfg: dict, *, name: str, source: str, chat_fallback: str | None = None) -> Tokenizer:
    """A Tokenizer from a parsed tokenizer.json (`spec`) and tokenizer_config.json fields (`cfg`:
    bos/eos/pad/unk_token, chat_template)."""
    from tokenizers import Tokenizer as HFTok

    tok = HFTok.from_str(json.dumps(spec))
    kind, pieces, prefix_space = _hf_pieces(spec, tok)
    added_special = {a["content"]: a["id"] for a in spec.get("added_tokens", []) if a.get("special")}

    def tok_of(key):
        v = cfg.get(key)
        if isinstance(v, dict):
            v = v.get("content")
        if v is None:
            return None
        return tok.token_to_id(v)

    bos, eos, pad, unk = (tok_of(k) for k in ("bos_token", "eos_token", "pad_token", "unk_token"))
    chat = cfg.get("chat_template")
    if isinstance(chat, list):  # named templates
        chat = next((c["template"] for c in chat if c.get("name") == "default"), chat[0]["template"])
    if chat is None:
        chat = chat_fallback
    return Tokenizer(HFBackend(tok), name=name, kind=kind, pieces=pieces, prefix_space=prefix_space,
                     special_tokens=added_special, chat_template=chat, bos_id=bos, eos_id=eos, pad_id=pad,
                     unk_id=unk, source=source)
