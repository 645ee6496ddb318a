"""`xtok extract`: run a teacher over a dataset and store its top-k log-probs (resumable, sharded)."""
from __future__ import annotations

import json

import click

from xtok.extract import OPTION_BOUNDS


def _range(name: str):
    """The click type for a numeric option, from the bounds `xtok.extract` checks (one table for both)."""
    kind, lo, hi, lo_open, _ = OPTION_BOUNDS[name]
    return (click.IntRange if kind is int else click.FloatRange)(lo, hi, min_open=lo_open)


def _shard(ctx, param, value):
    if value is None:
        return None
    try:
        i, n = (int(x) for x in value.split("/"))
    except ValueError:
        raise click.BadParameter("expected i/N, e.g. 0/4") from None
    if not (n >= 1 and 0 <= i < n):
        raise click.BadParameter("need 0 <= i < N")
    return i, n


@click.command("extract")
@click.option("--model", "-m", required=True, help="Teacher: a transformers causal-LM folder (config.json + weights), "
              "a llama.cpp .gguf file (or a folder holding one; dequantised by transformers, needs "
              "pip install 'xtok[gguf]') or a hub id.")
@click.option("--dataset", "-d", required=True, help="A .jsonl/.json/.parquet/.arrow file, a folder of them, a "
              "`save_to_disk` folder, or a hub dataset id.")
@click.option("--output", "-o", required=True, help="Store folder (local path or fsspec URL). Re-running the same "
              "command resumes; other settings need a new folder or --overwrite.")
@click.option("--tokenizer", default=None, help="Tokenizer (folder, tokenizer.json, .model, Tekken .json, .gguf, "
              "mistral-common:<file>); default: the model's own (its folder, or the tokenizer inside its .gguf).")
@click.option("--split", default="train", show_default=True, help="Dataset split: of a hub dataset, a save_to_disk "
              "DatasetDict, or a folder of files named by split like `datasets` does (train/training, "
              "validation/valid/dev/val, test/testing/eval/evaluation in file or folder names; a folder without "
              "such names is all 'train'). A single file is the whole dataset and ignores --split.")
@click.option("--text-column", default=None, help="Column with plain text (default: 'text').")
@click.option("--messages-column", default=None, help="Column with chat messages [{role, content}] (default: "
              "'messages' when present; 'user'+'assistant' columns also work).")
@click.option("--key-column", default=None, help="Column with the example key (default: 'id' or 'key' when present, "
              "else sha256 of the row's content).")
@click.option("--chat-template", default=None, help="Jinja chat template file (default: the tokenizer's own, else a "
              "built-in one). Chat datasets only: refused for a plain-text dataset.")
@click.option("--targets", type=click.Choice(["auto", "assistant", "all"]), default="auto", show_default=True,
              help="Positions that get teacher targets: assistant tokens only (chats), every token, or auto "
              "(assistant for chats, all for text).")
@click.option("--add-bos/--no-add-bos", default=None, help="Text datasets: prepend the BOS token (default: when the "
              "tokenizer has one).")
@click.option("--max-length", default=4096, show_default=True, type=_range("max_length"), help="Examples longer "
              "than this many tokens are skipped and counted; capped at the model's own limit "
              "(max_position_embeddings / n_positions).")
@click.option("--limit", default=None, type=_range("limit"), help="Use only the first N dataset rows.")
@click.option("--top-k", "-k", default=32, show_default=True, type=_range("top_k"),
              help="Teacher log-probs stored per position.")
@click.option("--top-p", default=None, type=_range("top_p"), help="Nucleus cap: keep the smallest prefix of the "
              "top-k with mass >= p (k is the maximum).")
@click.option("--sample-tail", default=0, show_default=True, type=_range("sample_tail"), help="Also store m tail "
              "token ids drawn with replacement from the teacher's distribution beyond the top-k (each stands for "
              "tail_mass/m).")
@click.option("--temperature", default=1.0, show_default=True, type=_range("temperature"),
              help="Divide the teacher's logits by this first (after the model's own logit scaling/softcap).")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto",
              show_default=True, help="Model weights dtype (auto: the checkpoint's on CUDA, float32 on CPU).")
@click.option("--device", default="auto", show_default=True, help="auto (CUDA when present, cuda:LOCAL_RANK under "
              "torchrun), cpu, cuda, cuda:1...")
@click.option("--token-budget", default=16384, show_default=True, type=_range("token_budget"), help="Padded tokens "
              "per batch (length-sorted batching).")
@click.option("--shard-size", default=1024, show_default=True, type=_range("shard_size"), help="Examples per shard "
              "file (unit of resume).")
@click.option("--chunk-mb", default=256, show_default=True, type=_range("chunk_mb"), help="Device memory for one "
              "chunk of output-layer logits.")
@click.option("--seed", default=0, show_default=True, help="Seed for the sampled tail (per example, reproducible).")
@click.option("--shard", "shard", default=None, callback=_shard, help="i/N: process only this rank's part "
              "(default: RANK/WORLD_SIZE under torchrun, else 0/1). Every rank writes its own shards; the last one "
              "to finish merges the manifest.")
@click.option("--skip-empty", is_flag=True, help="Skip (and count) rows with empty text instead of failing.")
@click.option("--overwrite", is_flag=True, help="Replace a store made with different settings at --output.")
@click.option("--max-vocab-padding", default=4096, show_default=True, type=_range("max_vocab_padding"), help="Largest "
              "accepted excess of model output rows over the tokenizer's vocabulary (padded embeddings; those ids "
              "are excluded).")
@click.option("--force-tokenizer", is_flag=True, help="Accept a --tokenizer that differs from the tokenizer in the "
              "model folder (refused by default: the ids would stand for other tokens).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def extract_cmd(**kw):
    """Run a teacher model over a dataset and store, per target position, its top-k log-probs
    (exactly normalised), tail mass, the realised token's log-prob, word-start mass and optional
    sampled tail ids. Output: parquet shards + manifest.json (see docs/formats.md).

    Kill it at any moment and run the same command again: it resumes and every example ends up in
    the store exactly once.
    """
    from xtok.extract import ExtractConfig, ExtractError, extract
    from xtok.store import StoreError

    quiet = kw.pop("quiet")
    cfg = ExtractConfig(**kw, progress=not quiet)
    try:
        res = extract(cfg, print_notes=False)
    except (ExtractError, StoreError) as e:
        raise click.ClickException(str(e)) from None
    except OSError as e:  # e.g. the disk filled up while writing a shard
        raise click.ClickException(f"--output {cfg.output}: {type(e).__name__}: {e}") from None
    st = res["stats"]
    man = res["manifest"]
    msg = {"rank": res["rank"], "world": res["world"], "new_examples": st["examples"], "positions": st["positions"],
           "tokens": st["tokens"], "skipped_too_long": st["too_long"], "skipped_no_targets": st["no_targets"],
           "duplicates": st["duplicates"], "empty": st["empty"], "seconds": round(st["seconds"], 2),
           "max_length": st["max_length"]}
    if st["max_length_note"]:
        msg["max_length_note"] = st["max_length_note"]
    if man is not None:
        msg["store_examples"] = man["n_examples"]
        msg["complete"] = True
    else:
        msg["complete"] = False
        msg["note"] = "other ranks still running; the last to finish writes manifest.json"
    click.echo(json.dumps(msg))
