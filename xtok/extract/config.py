"""`ExtractConfig`: every setting of an extraction with its default, its bounds and its help text, in
one place. The `xtok extract` command builds its options from these fields (xtok/cli/extract.py:
names, defaults, choices, numeric ranges, help), and `check_options` checks the same bounds for API
callers; `ExtractError` is the error of a bad input."""
from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field, fields


class ExtractError(ValueError):
    """Bad input to `xtok extract`; the message names the file/field and the fix."""


@dataclass(frozen=True)
class Bounds:
    """The values a numeric option accepts: `kind` (int or float; a float must also be finite), `lo`,
    `hi` (None: no upper bound), `lo_open` (lo itself excluded) and `message` (what the error says)."""
    kind: type
    lo: float
    hi: float | None = None
    lo_open: bool = False
    message: str = ""

    def admits(self, v) -> bool:
        return ((self.lo < v if self.lo_open else self.lo <= v) and (self.hi is None or v <= self.hi)
                and (self.kind is int or math.isfinite(v)))


def option(default=MISSING, help: str = "", *, short: str | None = None, bounds: Bounds | None = None,
           choices: tuple[str, ...] | None = None, parse=None, cli_flag: tuple[str, ...] | None = None):
    """A config field and how the command line offers it: `help` text, `short` option name (e.g. '-m'),
    `bounds` (numeric range), `choices` (the strings the command line accepts), `parse` (text -> value,
    raising ValueError with the reason, for an option given as text), `cli_flag` (the names of a flag
    that sets this boolean field to False, e.g. ('--quiet', '-q') for `progress`). A field without a
    default is a required option."""
    meta = {"help": help, "short": short, "bounds": bounds, "choices": choices, "parse": parse, "cli_flag": cli_flag}
    return field(default=default, metadata=meta)


def parse_shard(text: str) -> tuple[int, int]:
    """`i/N` -> (i, N) for --shard; ValueError with the reason."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError("expected i/N, e.g. 0/4") from None
    if not (n >= 1 and 0 <= i < n):
        raise ValueError("need 0 <= i < N")
    return i, n


@dataclass
class ExtractConfig:
    """The settings of one extraction (`extract(cfg)`); the help of each field is what
    `xtok extract --help` shows for its option."""
    model: str = option(short="-m", help="Teacher: a transformers causal-LM folder (config.json + weights), a "
                        "llama.cpp .gguf file (or a folder holding one; dequantised by transformers, needs "
                        "pip install 'xtok[gguf]') or a hub id.")
    dataset: str = option(short="-d", help="A .jsonl/.json/.parquet/.arrow file, a folder of them, a `save_to_disk` "
                          "folder, or a hub dataset id.")
    output: str = option(short="-o", help="Store folder (local path or fsspec URL). Re-running the same command "
                         "resumes; other settings need a new folder or --overwrite.")
    tokenizer: str | None = option(None, "Tokenizer (folder, tokenizer.json, .model, Tekken .json, .gguf, "
                                   "mistral-common:<file>); default: the model's own (its folder, or the tokenizer "
                                   "inside its .gguf).")
    split: str = option("train", "Dataset split: of a hub dataset, a save_to_disk DatasetDict, or a folder of files "
                        "named by split like `datasets` does (train/training, validation/valid/dev/val, "
                        "test/testing/eval/evaluation in file or folder names; a folder without such names is all "
                        "'train'). A single file is the whole dataset and ignores --split.")
    text_column: str | None = option(None, "Column with plain text (default: 'text').")
    messages_column: str | None = option(None, "Column with chat messages [{role, content}] (default: 'messages' "
                                         "when present; 'user'+'assistant' columns also work).")
    key_column: str | None = option(None, "Column with the example key (default: 'id' or 'key' when present, else "
                                    "sha256 of the row's content).")
    chat_template: str | None = option(None, "Jinja chat template file (default: the tokenizer's own, else a "
                                       "built-in one). Chat datasets only: refused for a plain-text dataset.")
    targets: str = option("auto", "Positions that get teacher targets: assistant tokens only (chats), every token, "
                          "or auto (assistant for chats, all for text).", choices=("auto", "assistant", "all"))
    add_bos: bool | None = option(None, "Text datasets: prepend the BOS token (default: when the tokenizer has "
                                  "one).")
    max_length: int = option(4096, "Examples longer than this many tokens are skipped and counted; capped at the "
                             "model's own limit (max_position_embeddings / n_positions).",
                             bounds=Bounds(int, 2, message="must be >= 2 (a target needs two tokens)"))
    limit: int | None = option(None, "Use only the first N dataset rows.", bounds=Bounds(int, 1, message="must be >= 1"))
    top_k: int = option(32, "Teacher log-probs stored per position.", short="-k",
                        bounds=Bounds(int, 1, 65535, message="expected 1..65535"))
    top_p: float | None = option(None, "Nucleus cap: keep the smallest prefix of the top-k with mass >= p (k is the "
                                 "maximum).", bounds=Bounds(float, 0, 1, lo_open=True, message="expected 0 < p <= 1"))
    sample_tail: int = option(0, "Also store m tail token ids drawn with replacement from the teacher's distribution "
                              "beyond the top-k (each stands for tail_mass/m).",
                              bounds=Bounds(int, 0, message="must be >= 0"))
    temperature: float = option(1.0, "Divide the teacher's logits by this first (after the model's own logit "
                                "scaling/softcap).", bounds=Bounds(float, 0, lo_open=True, message="must be > 0"))
    dtype: str = option("auto", "Model weights dtype (auto: the checkpoint's on CUDA, float32 on CPU).",
                        choices=("auto", "float32", "bfloat16", "float16"))
    device: str = option("auto", "auto (CUDA when present, cuda:LOCAL_RANK under torchrun), cpu, cuda, cuda:1...")
    token_budget: int = option(16384, "Padded tokens per batch (length-sorted batching).",
                               bounds=Bounds(int, 1, message="must be >= 1"))
    shard_size: int = option(1024, "Examples per shard file (unit of resume).",
                             bounds=Bounds(int, 1, message="must be >= 1"))
    chunk_mb: int = option(256, "Device memory for one chunk of output-layer logits.",
                           bounds=Bounds(int, 1, message="must be >= 1"))
    seed: int = option(0, "Seed for the sampled tail (per example, reproducible).")
    shard: tuple[int, int] | None = option(None, "i/N: process only this rank's part (default: RANK/WORLD_SIZE under "
                                           "torchrun, else 0/1). Every rank writes its own shards; the last one to "
                                           "finish merges the manifest.", parse=parse_shard)
    skip_empty: bool = option(False, "Skip (and count) rows with empty text instead of failing.")
    skip_bad_rows: bool = option(False, "Skip (and count, in the manifest's stats.undecodable) dataset rows that "
                                 "cannot be decoded (text that is not UTF-8; a JSON lines row that is not a JSON "
                                 "object) instead of failing.")
    overwrite: bool = option(False, "Replace a store made with different settings at --output.")
    max_vocab_padding: int = option(4096, "Largest accepted excess of model output rows over the tokenizer's "
                                    "vocabulary (padded embeddings; those ids are excluded).",
                                    bounds=Bounds(int, 0, message="must be >= 0"))
    force_tokenizer: bool = option(False, "Accept a --tokenizer that differs from the tokenizer in the model folder "
                                   "(refused by default: the ids would stand for other tokens).")
    progress: bool = option(True, "No progress bar.", cli_flag=("--quiet", "-q"))


def check_options(cfg: ExtractConfig) -> None:
    """ExtractError for the first numeric setting outside its `Bounds` (None passes where the default is None)."""
    for f in fields(ExtractConfig):
        bounds = f.metadata.get("bounds")
        if bounds is None:
            continue
        v = getattr(cfg, f.name)
        if v is None and f.default is None:
            continue
        if not bounds.admits(v):
            raise ExtractError(f"--{f.name.replace('_', '-')} {v}: {bounds.message}.")
