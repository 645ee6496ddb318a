"""Corpus, deterministic train/held-out split, tokenisation and the compact vocabularies.

Corpus: ``../shared/assets/corpora/tinyshakespeare.txt`` (Karpathy's char-rnn corpus, public domain
text); when the assets are absent, real Python standard-library source read from the local install.

Split: the text is cut on line boundaries into ``n_blocks`` contiguous blocks of (almost) equal size;
every ``heldout_every``-th block (starting at block ``heldout_every - 1``) is held out. Blocks are
then cut on line boundaries into examples of about ``example_bytes`` UTF-8 bytes. Every model (teacher
and students, either tokenizer) sees exactly the same example texts.

Compact vocabulary: the model's softmax runs over the token ids that occur anywhere in the corpus
(train *and* held-out) under that tokenizer, plus BOS, remapped to ``0..V'-1``. That keeps tiny CPU
models fast on 32k/131k vocabularies. It is exact for bits per byte: each model is a proper
distribution over that compact vocabulary and every held-out token is in it (no ``<unk>``). The only
information it uses from the held-out text is *which* token types occur (the same for every
model of a tokenizer); ``Corpus.summary()`` reports how many held-out token types never occur in the
training split.
"""
from __future__ import annotations

import hashlib
import inspect
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
ASSETS = Path(os.environ.get("XTOK_ASSETS", REPO.parent / "shared" / "assets"))
SHAKESPEARE = ASSETS / "corpora" / "tinyshakespeare.txt"

TOKENIZER_A = "mistral-common:tekken_240911.json"   # teacher: byte-level BPE, 131k
TOKENIZER_B = "mistral-common:tokenizer.model.v1"   # student: SentencePiece, 32k


def load_corpus_text() -> tuple[str, str]:
    """Return ``(name, text)``."""
    if SHAKESPEARE.exists():
        return "tinyshakespeare", SHAKESPEARE.read_text(encoding="utf-8")
    import argparse, json.decoder, json.encoder, textwrap, string, difflib, csv  # noqa: E401
    mods = [argparse, json.decoder, json.encoder, textwrap, string, difflib, csv]
    return "python-stdlib", "\n\n".join(inspect.getsource(m) for m in mods)


def cut_lines(text: str, n_pieces: int) -> list[str]:
    """Cut ``text`` on line boundaries into ``n_pieces`` contiguous pieces of about equal size."""
    lines = text.splitlines(keepends=True)
    total = sum(len(l) for l in lines)
    pieces, cur, acc, k = [], [], 0, 1
    for line in lines:
        cur.append(line)
        acc += len(line)
        if k < n_pieces and acc >= total * k / n_pieces:
            pieces.append("".join(cur))
            cur, k = [], k + 1
    pieces.append("".join(cur))
    return pieces


def split_examples(block: str, example_bytes: int) -> list[str]:
    out, cur, n = [], [], 0
    for line in block.splitlines(keepends=True):
        cur.append(line)
        n += len(line.encode("utf-8"))
        if n >= example_bytes:
            out.append("".join(cur))
            cur, n = [], 0
    if cur:
        out.append("".join(cur))
    return [e for e in out if e.strip()]


@dataclass
class Split:
    train: list[str]
    heldout: list[str]


def split_corpus(text: str, n_blocks: int = 40, heldout_every: int = 10, example_bytes: int = 256) -> Split:
    blocks = cut_lines(text, n_blocks)
    train, held = [], []
    for i, b in enumerate(blocks):
        (held if (i + 1) % heldout_every == 0 else train).extend(split_examples(b, example_bytes))
    return Split(train, held)


@dataclass
class TokenizedSide:
    """One tokenizer's view of the corpus: compact ids, with BOS (compact id 0) prepended."""
    name: str
    tokenizer: object
    full_ids: np.ndarray            # compact -> original token id
    to_compact: dict = field(repr=False, default_factory=dict)
    train: list = field(repr=False, default_factory=list)     # list[np.ndarray int64] compact ids
    heldout: list = field(repr=False, default_factory=list)

    @property
    def vocab(self) -> int:
        return len(self.full_ids)

    def compact_lut(self) -> np.ndarray:
        lut = np.full(self.tokenizer.vocab_size, -1, dtype=np.int64)
        lut[self.full_ids] = np.arange(len(self.full_ids))
        return lut


def tokenize_side(name: str, tokenizer, split: Split) -> TokenizedSide:
    bos = tokenizer.bos_id
    enc = lambda texts: [np.asarray(tokenizer.encode(t), dtype=np.int64) for t in texts]  # noqa: E731
    tr, he = enc(split.train), enc(split.heldout)
    used = np.unique(np.concatenate(tr + he))
    full_ids = np.concatenate([[bos], used[used != bos]]).astype(np.int64)
    side = TokenizedSide(name, tokenizer, full_ids)
    lut = side.compact_lut()
    side.train = [np.concatenate([[0], lut[x]]) for x in tr]
    side.heldout = [np.concatenate([[0], lut[x]]) for x in he]
    side.raw_train, side.raw_heldout = tr, he
    return side


@dataclass
class Corpus:
    name: str
    split: Split
    A: TokenizedSide
    B: TokenizedSide
    heldout_bytes: int

    def summary(self) -> dict:
        out = {"corpus": self.name, "train_examples": len(self.split.train),
               "heldout_examples": len(self.split.heldout),
               "train_bytes": sum(len(t.encode()) for t in self.split.train),
               "heldout_bytes": self.heldout_bytes}
        for s in (self.A, self.B):
            tr_types = set(np.concatenate(s.train).tolist())
            he_types = set(np.concatenate(s.heldout).tolist())
            out[s.name] = {"tokenizer": s.tokenizer.name, "full_vocab": s.tokenizer.vocab_size,
                           "compact_vocab": s.vocab,
                           "train_tokens": int(sum(len(x) - 1 for x in s.train)),
                           "heldout_tokens": int(sum(len(x) - 1 for x in s.heldout)),
                           "heldout_types_unseen_in_train": len(he_types - tr_types)}
        return out

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for part, texts in (("train", self.split.train), ("heldout", self.split.heldout)):
            h.update(f"{part}:{len(texts)}\0".encode())
            for t in texts:                       # example boundaries matter, not just the text
                b = t.encode()
                h.update(len(b).to_bytes(8, "little") + b)
        h.update(self.A.tokenizer.content_hash.encode())
        h.update(self.B.tokenizer.content_hash.encode())
        return h.hexdigest()[:16]


def build_corpus(max_bytes: int | None = None, tokenizer_a: str = TOKENIZER_A,
                 tokenizer_b: str = TOKENIZER_B) -> Corpus:
    from xtok.tokens import load_tokenizer

    name, text = load_corpus_text()
    if max_bytes is not None and len(text) > max_bytes:
        text = "".join(cut_lines(text, max(1, round(len(text) / max_bytes)))[0])
    split = split_corpus(text)
    A = tokenize_side("A", load_tokenizer(tokenizer_a), split)
    B = tokenize_side("B", load_tokenizer(tokenizer_b), split)
    return Corpus(name, split, A, B, sum(len(t.encode("utf-8")) for t in split.heldout))
