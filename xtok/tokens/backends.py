"""The tokenizer libraries behind `Tokenizer`: Hugging Face `tokenizers` (tokenizer.json),
`sentencepiece` (.model files) and tiktoken-style byte BPE (mistral-common Tekken). Each backend
encodes (one text or a batch, through the library's own batch encoder), decodes and names a token;
all three pickle without their library object (rebuilt on first use, for DataLoader workers).

`encode(text, add_special_tokens, parse_special, owner)` / `encode_batch(texts, ..., owner,
num_threads)`: `owner` is the `Tokenizer` (its bos id and special tokens). Hugging Face parses
special tokens itself; the SentencePiece and Tekken libraries encode plain text only, so for them
bos and the owner's special-token strings (`Tokenizer.split_special`) are handled here.
"""
from __future__ import annotations

from typing import Sequence


class HFBackend:
    """tokenizers.Tokenizer (tokenizer.json)."""

    def __init__(self, tok):
        self.tok = tok
        self._literal = None

    def __getstate__(self):
        return {"tok": self.tok, "_literal": None}

    @property
    def literal(self):
        """A private copy of the tokenizer with `encode_special_tokens = True`: special-token strings
        in the text are encoded as the text they are. Built on first use (a copy, so the shared
        `tok` that other callers and threads use is never mutated)."""
        lit = self._literal
        if lit is None:
            from tokenizers import Tokenizer as HFTok

            lit = HFTok.from_str(self.tok.to_str())
            if not hasattr(lit, "encode_special_tokens"):
                raise RuntimeError("encode(parse_special=False) needs tokenizers >= 0.15.1 "
                                   "(Tokenizer.encode_special_tokens); upgrade with pip install -U tokenizers.")
            lit.encode_special_tokens = True
            self._literal = lit
        return lit

    def encode(self, text, add_special_tokens, parse_special, owner):
        tok = self.tok if parse_special else self.literal
        return tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens, parse_special, owner, num_threads: int):
        """`tokenizers`' encode_batch (its own thread pool; `num_threads` is not used)."""
        tok = self.tok if parse_special else self.literal
        return [e.ids for e in tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids):
        return self.tok.decode(ids, skip_special_tokens=False)

    def id_to_text(self, i):
        return self.tok.id_to_token(i) or f"<{i}>"


class _PlainTextBackend:
    """A library that encodes plain text only (`encode_plain` / `encode_plain_batch`): the bos token
    and the owner's special-token strings are added here, the text between them is encoded by the
    library."""

    def encode_plain(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_plain_batch(self, texts: list[str], num_threads: int) -> list[list[int]]:
        raise NotImplementedError

    def encode(self, text, add_special_tokens, parse_special, owner):
        out: list[int] = []
        if add_special_tokens and owner.bos_id is not None:
            out.append(owner.bos_id)
        parts = owner.split_special(text) if parse_special else [(False, text)]
        for is_sp, part in parts:
            if is_sp:
                out.append(owner.special_tokens[part])
            else:
                out.extend(self.encode_plain(part))
        return out

    def encode_batch(self, texts: Sequence[str], add_special_tokens, parse_special, owner, num_threads: int):
        """What `encode` gives for each text, with every plain-text part of every text encoded in one
        call of the library's batch encoder."""
        head = [owner.bos_id] if add_special_tokens and owner.bos_id is not None else []
        layouts, plain = [], []  # per text: special ids, and None where the next plain part goes
        for text in texts:
            layout = []
            for is_sp, part in (owner.split_special(text) if parse_special else [(False, text)]):
                if is_sp:
                    layout.append(owner.special_tokens[part])
                else:
                    layout.append(None)
                    plain.append(part)
            layouts.append(layout)
        encoded = iter(self.encode_plain_batch(plain, num_threads) if plain else [])
        out = []
        for layout in layouts:
            ids = list(head)
            for x in layout:
                if x is None:
                    ids.extend(next(encoded))
                else:
                    ids.append(x)
            out.append(ids)
        return out


class SentencePieceBackend(_PlainTextBackend):
    """sentencepiece.SentencePieceProcessor (.model files). Pickles by its serialized proto."""

    def __init__(self, proto: bytes):
        self._proto = proto
        self._sp = None

    @property
    def sp(self):
        if self._sp is None:
            import sentencepiece as spm

            self._sp = spm.SentencePieceProcessor()
            self._sp.LoadFromSerializedProto(self._proto)
        return self._sp

    def __getstate__(self):
        return {"_proto": self._proto, "_sp": None}

    def encode_plain(self, text):
        return self.sp.EncodeAsIds(text)

    def encode_plain_batch(self, texts, num_threads):
        try:
            return self.sp.encode(texts, out_type=int, num_threads=num_threads)
        except TypeError:  # older sentencepiece: no num_threads
            return [self.sp.EncodeAsIds(t) for t in texts]

    def decode(self, ids):
        return self.sp.DecodeIds(ids)

    def id_to_text(self, i):
        return self.sp.IdToPiece(i)


class TekkenBackend(_PlainTextBackend):
    """mistral-common Tekken vocabulary (tiktoken-style byte BPE, ids = n_special + rank)."""

    def __init__(self, pattern: str, ranks: list[bytes], n_special: int, special_names: list[str]):
        self.pattern, self.ranks, self.n_special, self.special_names = pattern, ranks, n_special, special_names
        self._enc = None

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_enc"] = None
        return d

    @property
    def enc(self):
        if self._enc is None:
            import tiktoken

            self._enc = tiktoken.Encoding(
                name="tekken", pat_str=self.pattern,
                mergeable_ranks={b: r for r, b in enumerate(self.ranks)}, special_tokens={},
            )
        return self._enc

    def encode_plain(self, text):
        return [r + self.n_special for r in self.enc.encode_ordinary(text)]

    def encode_plain_batch(self, texts, num_threads):
        n = self.n_special
        return [[r + n for r in ids] for ids in self.enc.encode_ordinary_batch(texts, num_threads=num_threads)]

    def decode(self, ids):
        b = b"".join(self.ranks[i - self.n_special] for i in ids if i >= self.n_special)
        return b.decode("utf-8", errors="replace")

    def id_to_text(self, i):
        return self.special_names[i] if i < self.n_special else self.ranks[i - self.n_special].decode("utf-8", "replace")
