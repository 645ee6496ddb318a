"""`extract(cfg)`: one rank's extraction run, from checked options to a committed store.

Pipeline (per rank): read the dataset -> example keys (the `id`/`key` column or a content hash; see
`xtok.store.example_key`), duplicate keys dropped -> this rank's subset (row i of the de-duplicated
rows goes to rank i % N) -> shards of `shard_size` consecutive examples -> per shard: render/tokenise,
length-sorted batches under a token budget (`length_batches`), the model body for hidden states, then
`teacher_targets()` on the device (only [N, k]-sized results leave it) -> atomic shard write.
Committed shards are skipped on a re-run (resume); every shard's content depends only on its own
examples (the sampled tail draws from `tail_uniforms`, seeded per example), so a resumed store equals
an uninterrupted one.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..store import D_MAX, QSTEP, StoreError, StoreWriter, content_json, encode_example
from .config import ExtractConfig, ExtractError, check_options
from .dataset import SKIP_HINT, describe_rows, read_dataset, undecodable_rows
from .model import (OutputLayer, body_hidden, check_model_spec, check_output_layer, load_teacher, model_hash,
                    model_max_length, model_tokenizer, probe_ids, resolve_device)
from .render import RenderedExample, RowRenderer
from .topk import store_rows, teacher_targets


def extract(cfg: ExtractConfig, *, print_notes: bool = True) -> dict:
    """Run the extraction for this rank; returns {"manifest": merged manifest or None, "stats": ...}.
    With cfg.progress and print_notes, notes such as stats["max_length_note"] are also printed to stderr
    (the CLI passes print_notes=False: its JSON summary carries them)."""
    import torch

    check_options(cfg)
    rank, world = _rank_world(cfg)
    _check_output(cfg.output)
    device = resolve_device(cfg.device)
    check_model_spec(cfg.model)

    # -- dataset first (cheap checks before loading a model) ----------------------------------
    skipped_rows: dict = {}
    ds = read_dataset(cfg.dataset, cfg.split, skip_bad_rows=cfg.skip_bad_rows, skipped=skipped_rows)
    if cfg.limit is not None:
        ds = ds.select(range(min(cfg.limit, len(ds))))
    if len(ds) == 0:
        raise ExtractError(f"--dataset {cfg.dataset}: is empty (0 rows). Point --dataset at a dataset with rows.")
    bad = _undecodable(cfg, ds)
    tok = _load_tokenizer(cfg)
    rend = RowRenderer(tok, cfg, list(ds.column_names))
    keys, rows_kept, fingerprint, n_dup, n_empty = _dataset_keys(cfg, ds, rend, bad)
    mine = list(range(rank, len(keys), world))

    # -- model ---------------------------------------------------------------------------------
    if not cfg.progress:
        import transformers

        transformers.utils.logging.disable_progress_bar()
    mdl, body, head = load_teacher(cfg.model, cfg.dtype, device, check_spec=False)
    _check_vocab(cfg, tok, head)
    model_max, model_max_field = model_max_length(mdl)
    max_len = min(cfg.max_length, model_max) if model_max else cfg.max_length
    cap_note = max_length_note(cfg.max_length, max_len, model_max_field)
    if cap_note and cfg.progress and print_notes:
        print(f"xtok extract: {cap_note}.", file=sys.stderr)
    Vt = tok.vocab_size
    probe_err = check_output_layer(mdl, body, head, probe_ids(tok, min(16, max_len), Vt), Vt, cfg.model)
    teacher = _Teacher(body, head, Vt, torch.as_tensor(tok.token_bytes.word_start.copy(), device=device), device)
    header = _manifest_header(cfg, tok, rend, mdl, head, fingerprint, len(keys), max_len, world)
    writer = _open_store(cfg, header, rank, world)
    try:
        stats = _extract_shards(cfg, _Rows(ds, rend, keys, rows_kept, mine), writer, teacher, max_len, rank, world)
    except BaseException:
        writer.abort()  # no half-made store left behind (a new folder, nothing committed)
        raise
    stats["duplicates"] = n_dup
    stats["empty"] = n_empty
    stats["undecodable"] = skipped_rows.get("undecodable", 0) + len(bad)
    stats["max_length"] = max_len
    stats["model_max_length"] = model_max
    stats["max_length_note"] = cap_note
    stats["output_layer_probe_error"] = probe_err
    man = writer.finish({k: stats[k] for k in ("duplicates", "empty", "undecodable")} if rank == 0 else None)
    return {"manifest": man, "stats": stats, "rank": rank, "world": world}


def max_length_note(requested: int, max_length: int, model_max_field: str | None) -> str | None:
    """The note that --max-length was capped at the model's position limit (None when it was not)."""
    if max_length >= requested:
        return None
    return (f"--max-length {requested} capped at the model's {max_length} positions ({model_max_field}); longer "
            "examples are skipped and counted (skipped_too_long)")


def length_batches(lengths: np.ndarray, budget: int) -> list[np.ndarray]:
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


def tail_uniforms(key: str, seed: int, n: int, m: int) -> np.ndarray:
    """The [n, m] uniforms in [0, 1) of an example's sampled tail: a Philox stream keyed by sha256 of
    (seed, example key), so an example's tail ids depend only on itself (not on its batch or shard)."""
    s = int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:16], "little")
    return np.random.Generator(np.random.Philox(key=s)).random((n, m))


# ------------------------------------------------------------------------------------------
# Checks and set-up
# ------------------------------------------------------------------------------------------


def _rank_world(cfg: ExtractConfig) -> tuple[int, int]:
    if cfg.shard is not None:
        i, n = cfg.shard
    else:
        i, n = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if not (n >= 1 and 0 <= i < n):
        raise ExtractError(f"--shard {i}/{n}: need 0 <= i < N.")
    return int(i), int(n)


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


def _load_tokenizer(cfg: ExtractConfig):
    """The tokenizer of --tokenizer (refused when it is not the model folder's own, unless
    --force-tokenizer), else the model's own."""
    from ..tokens import TokenizerLoadError, load_tokenizer

    try:
        tok = load_tokenizer(cfg.tokenizer or cfg.model)
    except TokenizerLoadError as e:
        if cfg.tokenizer:
            raise ExtractError(f"--tokenizer {cfg.tokenizer}: {e}") from e
        raise ExtractError(f"--model {cfg.model}: no usable tokenizer in the model folder ({e}); pass --tokenizer.") \
            from e
    if cfg.tokenizer:
        own = model_tokenizer(cfg.model)
        if own is not None and own.content_hash != tok.content_hash and not cfg.force_tokenizer:
            raise ExtractError(
                f"--tokenizer {cfg.tokenizer} ({tok.vocab_size} tokens, content hash {tok.content_hash[:12]}) is not "
                f"the tokenizer in the model folder {cfg.model} ({own.vocab_size} tokens, content hash "
                f"{own.content_hash[:12]}): the teacher's ids would stand for other tokens. Drop --tokenizer to use "
                "the model's own, or pass --force-tokenizer if you are sure they agree.")
    return tok


def _undecodable(cfg: ExtractConfig, ds) -> list[int]:
    """The rows of ds that cannot be decoded (strings that are not UTF-8): an ExtractError naming the
    first (file and line) unless --skip-bad-rows, which skips them."""
    bad = undecodable_rows(ds)
    if bad and not cfg.skip_bad_rows:
        where = describe_rows(cfg.dataset, cfg.split, bad[:1])[bad[0]]
        more = f" ({len(bad) - 1} more such rows)" if len(bad) > 1 else ""
        raise ExtractError(f"--dataset {cfg.dataset}: {where} (dataset row {bad[0]}) holds text that is not valid "
                           f"UTF-8{more}. Fix or remove it, or {SKIP_HINT}.")
    return bad


def _dataset_keys(cfg: ExtractConfig, ds, rend: RowRenderer, bad: list[int] = ()):
    """(keys, dataset row of each key, dataset fingerprint, duplicates dropped, empty rows skipped): every
    row checked (but the `bad` ones, skipped), keyed (example_key, or the content hash of a row without
    id fields) and de-duplicated (first wins); the fingerprint hashes every kept key and content."""
    kds = ds.select_columns(rend.key_columns(list(ds.column_names)))
    keys, rows_kept, seen, n_dup, n_empty = [], [], set(), 0, 0
    fph = hashlib.sha256()
    rows = enumerate(kds)
    if len(bad):
        skip = set(bad)
        good = [i for i in range(len(kds)) if i not in skip]
        rows = zip(good, kds.select(good))
    for i, row in rows:
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
        try:  # a row keyed by its content is serialised once, for the key and the fingerprint
            k, blob = rend.key_and_blob(row)
        except KeyError:
            raise ExtractError(f"--dataset {cfg.dataset}: row {i}: --key-column {cfg.key_column!r} is missing "
                               "or null.") from None
        if k in seen:
            n_dup += 1
            continue
        seen.add(k)
        keys.append(k)
        rows_kept.append(i)
        _fingerprint_update(fph, k, content_json(rend.content(row), default=str) if blob is None else blob)
    if not keys:
        raise ExtractError(f"--dataset {cfg.dataset}: no examples to extract (empty dataset or all rows empty).")
    return keys, rows_kept, fph.hexdigest(), n_dup, n_empty


def _fingerprint_update(h, key: str, blob: str) -> None:
    """Add one example (its key and the content_json of its content) to the dataset fingerprint."""
    h.update(json.dumps(key, ensure_ascii=False).encode())
    h.update(b"\x00")
    h.update(blob.encode("utf-8", "surrogatepass"))
    h.update(b"\x01")


def _check_vocab(cfg: ExtractConfig, tok, head: OutputLayer) -> None:
    """The model's output rows must cover the tokenizer's vocabulary, with at most --max-vocab-padding more."""
    Vm, Vt = int(head.weight.shape[0]), tok.vocab_size
    if Vm < Vt:
        raise ExtractError(f"--model {cfg.model} has {Vm} output rows but the tokenizer {tok.name!r} has {Vt} tokens: "
                           "they do not belong together. Pass the model's own tokenizer with --tokenizer.")
    if Vm - Vt > cfg.max_vocab_padding:
        raise ExtractError(f"--model {cfg.model} has {Vm} output rows but the tokenizer {tok.name!r} has only {Vt} "
                           f"tokens ({Vm - Vt} extra rows is more than padding). Pass the model's own tokenizer with "
                           "--tokenizer (or raise --max-vocab-padding if the padding is real).")


def _manifest_header(cfg: ExtractConfig, tok, rend: RowRenderer, mdl, head: OutputLayer, fingerprint: str,
                     n_examples: int, max_len: int, world: int) -> dict:
    """The store manifest's description of this extraction (what makes its content)."""
    Vt = tok.vocab_size
    tmpl_src = rend.template_source
    tmpl_from = None if not rend.chat else "--chat-template" if rend.template is not None else \
        "tokenizer" if tok.chat_template else "built-in default"
    return {
        "model": cfg.model, "model_hash": model_hash(mdl), "model_vocab_size": int(head.weight.shape[0]),
        "output_layer": head.describe(),
        "tokenizer": cfg.tokenizer or cfg.model, "tokenizer_hash": tok.content_hash, "vocab_size": Vt,
        "chat_template_hash": hashlib.sha256(tmpl_src.encode()).hexdigest() if tmpl_src else None,
        "chat_template_source": tmpl_from,
        "dataset": cfg.dataset, "split": cfg.split, "limit": cfg.limit, "dataset_fingerprint": fingerprint,
        "n_dataset_examples": n_examples,
        "top_k": min(cfg.top_k, Vt), "top_p": cfg.top_p, "sample_tail": cfg.sample_tail, "temperature": cfg.temperature,
        "targets": rend.targets, "add_bos": bool(rend.add_bos) if not rend.chat else None,
        "max_length": max_len, "token_budget": cfg.token_budget, "shard_size": cfg.shard_size,
        "dtype": str(head.weight.dtype).replace("torch.", ""), "seed": cfg.seed, "world": world,
        "quantization": {"logprobs": "uint8 sqrt-grid relative to top-1, delta-coded", "step": QSTEP, "d_max": D_MAX},
        "key_rule": "id/key column, else sha256 of content (xtok.store.example_key)",
    }


def _open_store(cfg: ExtractConfig, header: dict, rank: int, world: int) -> StoreWriter:
    try:
        return StoreWriter(cfg.output, header, rank=rank, world=world, overwrite=cfg.overwrite)
    except StoreError:
        raise
    except (OSError, ValueError, ImportError) as e:
        raise ExtractError(f"--output {cfg.output}: cannot make the store there ({type(e).__name__}: {e}). Pass "
                           "a writable local folder or a supported fsspec URL.") from e


# ------------------------------------------------------------------------------------------
# The shard loop
# ------------------------------------------------------------------------------------------


@dataclass
class _Teacher:
    body: Any              # the model body (hidden states)
    head: OutputLayer
    vocab_size: int        # the tokenizer's
    word_start: Any        # bool [vocab_size] on the device
    device: str


@dataclass
class _Rows:
    ds: Any                # the dataset
    rend: RowRenderer
    keys: list[str]        # per kept example
    rows_kept: list[int]   # its dataset row
    mine: list[int]        # this rank's examples (indices into keys)


def _extract_shards(cfg: ExtractConfig, rows: _Rows, writer: StoreWriter, teacher: _Teacher, max_len: int, rank: int,
                    world: int) -> dict:
    mine = rows.mine
    done = writer.committed()
    n_shards = math.ceil(len(mine) / cfg.shard_size)
    todo = [j for j in range(n_shards) if j not in done]

    from tqdm.auto import tqdm

    n_done_ex = sum(min(cfg.shard_size, len(mine) - j * cfg.shard_size) for j in done if j < n_shards)
    bar = tqdm(total=len(mine), initial=n_done_ex, unit="ex", disable=not cfg.progress, dynamic_ncols=True,
               desc=f"extract r{rank}/{world}" if world > 1 else "extract")
    t0 = time.perf_counter()
    stats = {"examples": 0, "positions": 0, "tokens": 0, "too_long": 0, "no_targets": 0}
    for j in todo:
        exs, skipped = _render_shard(cfg, rows, mine[j * cfg.shard_size: (j + 1) * cfg.shard_size], max_len)
        out_rows: dict[int, dict] = {}
        lengths = np.array([e.ids.shape[0] for e in exs], dtype=np.int64)
        for bidx in length_batches(lengths, cfg.token_budget):
            batch = [exs[i] for i in bidx.tolist()]
            res = _run_batch(batch, teacher, cfg)
            for e, r in zip(batch, res):
                out_rows[e.row] = encode_example(e.key, e.text, e.ids, e.positions, r["topk_ids"], r["codes"],
                                                 r["tail_mass"], r["target_logprob"], r["word_start_mass"],
                                                 teacher.vocab_size, tail_ids=r.get("tail_ids"), n_kept=r.get("n_kept"))
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


def _render_shard(cfg: ExtractConfig, rows: _Rows, sel: list[int], max_len: int):
    """The rendered examples of one shard (examples `sel`) and the counts of those skipped (too long,
    no target position)."""
    keys, rows_kept = rows.keys, rows.rows_kept
    exs: list[RenderedExample] = []
    skipped = {"too_long": 0, "no_targets": 0}
    for r, (i, row) in enumerate(zip(sel, rows.ds.select([rows_kept[i] for i in sel]))):
        try:
            text, ids, pos = rows.rend.render(row)
        except Exception as e:  # noqa: BLE001
            raise ExtractError(f"--dataset {cfg.dataset}: row {rows_kept[i]} (key {keys[i]!r}): cannot render "
                               f"it ({type(e).__name__}: {str(e)[:300]}).") from e
        if ids.shape[0] > max_len:
            skipped["too_long"] += 1
            continue
        if pos.size == 0:
            skipped["no_targets"] += 1
            continue
        exs.append(RenderedExample(row=r, key=keys[i], text=text, ids=ids, positions=pos))
    return exs, skipped


def _run_batch(batch: list[RenderedExample], teacher: _Teacher, cfg: ExtractConfig) -> list[dict]:
    """The stored targets of each example of a batch (`store_rows`): one padded forward of the body,
    then `teacher_targets` at the examples' target positions."""
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
        uni = torch.as_tensor(np.concatenate([tail_uniforms(e.key, cfg.seed, c, cfg.sample_tail)
                                              for e, c in zip(batch, counts)]))
    device, head = teacher.device, teacher.head
    with torch.inference_mode():
        hid = body_hidden(teacher.body, torch.as_tensor(ids, device=device), torch.as_tensor(att, device=device))
        h = hid.reshape(B * T, -1)[torch.as_tensor(flat, device=device)]
        del hid
        r = teacher_targets(h, head.weight, torch.as_tensor(tgt), vocab_size=teacher.vocab_size, top_k=cfg.top_k,
                            word_start=teacher.word_start, bias=head.bias, temperature=cfg.temperature,
                            softcap=head.softcap, logit_scale=head.scale, top_p=cfg.top_p, sample_tail=cfg.sample_tail,
                            uniforms=uni, chunk_bytes=int(cfg.chunk_mb) << 20)
    return store_rows(r, counts, top_p=cfg.top_p, sample_tail=cfg.sample_tail)
