"""Corpus of the `real` preset: text the pretrained teachers know, with a held-out split.

Sources (../shared/assets/corpora, or the files named by ``RealCorpusConfig``):

- ``tinyshakespeare.txt``: the first ``shakespeare_bytes`` bytes (cut on a line boundary), cut on line
  boundaries into ``shakespeare_blocks`` contiguous blocks; every ``heldout_every``-th block is held out;
  blocks are cut on line boundaries into examples of about ``example_bytes`` UTF-8 bytes.
- ``gsm8k_test.jsonl``: the first ``gsm8k_problems`` problems, each one example whose text is
  ``question + "\\n" + answer`` (the worked solution with its ``<<a*b=c>>`` calculator notes and the
  final ``#### n`` line); every ``heldout_every``-th problem is held out.

Every example has a key (``train-00012``, ``heldout-00003``), the ``id`` column of the JSONL dataset
that ``xtok extract`` reads, so the store rows, the collator and every student see the same texts.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .data import ASSETS, TokenizedSide, cut_lines, split_examples, tokenize_side

SHAKESPEARE = ASSETS / "corpora" / "tinyshakespeare.txt"
GSM8K = ASSETS / "corpora" / "gsm8k_test.jsonl"


@dataclass
class RealCorpusConfig:
    shakespeare: str = str(SHAKESPEARE)
    gsm8k: str = str(GSM8K)
    shakespeare_bytes: int = 450_000
    shakespeare_blocks: int = 20
    gsm8k_problems: int = 800
    heldout_every: int = 10
    example_bytes: int = 512


@dataclass
class RealSplit:
    train: list[str]
    heldout: list[str]
    train_source: list[str]
    heldout_source: list[str]

    def keys(self, part: str) -> list[str]:
        n = len(self.train if part == "train" else self.heldout)
        return [f"{part}-{i:05d}" for i in range(n)]


def build_split(cfg: RealCorpusConfig) -> RealSplit:
    train, held, tsrc, hsrc = [], [], [], []
    sp = Path(cfg.shakespeare)
    if cfg.shakespeare_bytes > 0:
        text = sp.read_text(encoding="utf-8")
        if len(text.encode("utf-8")) > cfg.shakespeare_bytes:
            lines, acc, keep = text.splitlines(keepends=True), 0, []
            for line in lines:
                acc += len(line.encode("utf-8"))
                if acc > cfg.shakespeare_bytes:
                    break
                keep.append(line)
            text = "".join(keep)
        for i, block in enumerate(cut_lines(text, cfg.shakespeare_blocks)):
            ex = split_examples(block, cfg.example_bytes)
            if (i + 1) % cfg.heldout_every == 0:
                held += ex; hsrc += ["shakespeare"] * len(ex)
            else:
                train += ex; tsrc += ["shakespeare"] * len(ex)
    if cfg.gsm8k_problems > 0:
        with open(cfg.gsm8k, encoding="utf-8") as f:
            rows = [json.loads(line) for line, _ in zip(f, range(cfg.gsm8k_problems))]
        for i, r in enumerate(rows):
            t = r["question"].strip() + "\n" + r["answer"].strip() + "\n"
            if (i + 1) % cfg.heldout_every == 0:
                held.append(t); hsrc.append("gsm8k")
            else:
                train.append(t); tsrc.append("gsm8k")
    return RealSplit(train, held, tsrc, hsrc)


@dataclass
class RealCorpus:
    cfg: RealCorpusConfig
    split: RealSplit
    heldout_bytes: int
    sides: dict = field(default_factory=dict)   # name -> TokenizedSide (compact ids, BOS first)

    def fingerprint(self) -> str:
        """sha256 of the ordered (key, text) pairs: what the teacher stores are keyed by."""
        h = hashlib.sha256()
        for part, texts in (("train", self.split.train), ("heldout", self.split.heldout)):
            for k, t in zip(self.split.keys(part), texts):
                h.update(json.dumps([k, t], ensure_ascii=False).encode("utf-8"))
        return h.hexdigest()[:16]

    def write_jsonl(self, path: Path) -> None:
        """The dataset `xtok extract` reads: {"id": key, "text": text}, train rows then held-out rows."""
        rows = []
        for part, texts in (("train", self.split.train), ("heldout", self.split.heldout)):
            rows += [{"id": k, "text": t} for k, t in zip(self.split.keys(part), texts)]
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        tmp.replace(path)

    def add_side(self, name: str, tokenizer) -> TokenizedSide:
        side = tokenize_side(name, tokenizer, self.split)
        self.sides[name] = side
        return side

    def summary(self) -> dict:
        s = self.split
        out = {"corpus": "tinyshakespeare + gsm8k (question + answer)", "config": asdict(self.cfg),
               "train_examples": len(s.train), "heldout_examples": len(s.heldout),
               "train_bytes": sum(len(t.encode()) for t in s.train), "heldout_bytes": self.heldout_bytes,
               "fingerprint": self.fingerprint()}
        for src in ("shakespeare", "gsm8k"):
            out[f"{src}_train_examples"] = s.train_source.count(src)
            out[f"{src}_heldout_examples"] = s.heldout_source.count(src)
            out[f"{src}_heldout_bytes"] = sum(len(t.encode()) for t, x in zip(s.heldout, s.heldout_source) if x == src)
        for name, side in self.sides.items():
            tr_types = set(np.concatenate(side.train).tolist())
            he_types = set(np.concatenate(side.heldout).tolist())
            out[name] = {"tokenizer": side.tokenizer.name, "full_vocab": side.tokenizer.vocab_size,
                         "compact_vocab": side.vocab,
                         "train_tokens": int(sum(len(x) - 1 for x in side.train)),
                         "heldout_tokens": int(sum(len(x) - 1 for x in side.heldout)),
                         "heldout_types_unseen_in_train": len(he_types - tr_types)}
        return out


def build_real_corpus(cfg: RealCorpusConfig) -> RealCorpus:
    split = build_split(cfg)
    return RealCorpus(cfg, split, sum(len(t.encode("utf-8")) for t in split.heldout))
