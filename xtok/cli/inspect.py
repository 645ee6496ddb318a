"""`xtok inspect PATH`: summary of a teacher store, one example rendered with its top-k, and a
histogram of how much probability mass the stored top-k covers. Damaged shards are reported (file and
reason) and skipped: the rest is still summarised, and the command exits with status 1. `--verify`
checks every shard completely (sha256 of the file, every row group's checksum, every row decoded)."""
from __future__ import annotations

import json
import sys

import click


def _piece(tok, i: int) -> str:
    if tok is None:
        return str(i)
    if i < 0:
        return "·"
    return repr(tok.token_str(int(i)))[1:-1]


@click.command("inspect")
@click.argument("path")
@click.option("--example", "-e", default="0", show_default=True, help="Example to render: an index or a key.")
@click.option("--positions", "-n", default=12, show_default=True, help="Positions of the example to show (0 = all).")
@click.option("--show-k", default=5, show_default=True, help="Top-k entries shown per position.")
@click.option("--tokenizer", default=None, help="Tokenizer to render tokens with (default: the one in the manifest).")
@click.option("--sample", default=2000, show_default=True, help="Examples used for the coverage histogram (0 = all).")
@click.option("--verify", is_flag=True, help="Check every shard completely: its sha256 and row-group checksums "
              "against the manifest and every row decoded (reads the whole store). Exit status 1 if any is damaged.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
def inspect_cmd(path, example, positions, show_k, tokenizer, sample, verify, as_json):
    """Summarise the teacher store at PATH (written by `xtok extract`)."""
    import numpy as np

    from xtok.store import DamagedShardError, StoreError, TeacherStore

    try:
        store = TeacherStore(path)
    except StoreError as e:
        raise click.ClickException(str(e))
    man = store.manifest
    n = len(store)
    n_shards = len(store.shard_files)
    idx = np.arange(n) if not sample or sample >= n else np.linspace(0, n - 1, sample).astype(int)
    in_sample = np.zeros(n, bool)
    in_sample[idx] = True
    damaged: dict[int, str] = {}  # shard -> error
    cover, n_pos, n_seen, checked = [], 0, 0, set()

    def take(ex):
        nonlocal n_pos, n_seen
        cover.append(1.0 - ex.tail_mass.astype(np.float64))
        n_pos += ex.positions.shape[0]
        n_seen += 1

    if verify:
        from tqdm.auto import tqdm

        for s in tqdm(range(n_shards), desc="verify", unit="shard", disable=as_json or n_shards < 2, file=sys.stderr):
            try:
                checked.update(store.verify_shard(s, rows=False))
                for i in store.shard_examples(s):
                    ex = store[i]  # every row decoded
                    if in_sample[i]:
                        take(ex)
                checked.add("every row decoded")
            except DamagedShardError as e:
                damaged[s] = str(e)
    else:
        for i in idx.tolist():
            s = store.shard_of(i)
            if s in damaged:
                continue
            try:
                take(store[i])
            except DamagedShardError as e:
                damaged[s] = str(e)
    cover = np.concatenate(cover) if cover else np.zeros(0)
    edges = np.linspace(0, 1, 11)
    hist = np.histogram(cover, bins=edges)[0]
    sizes = []
    for f in store.shard_files:
        try:
            sizes.append(store.io.size(f))
        except OSError:
            pass
    disk = sum(sizes)
    total_pos = n_pos * (n / max(1, n_seen))
    summary = {k: man.get(k) for k in ("model", "tokenizer", "tokenizer_hash", "dataset", "split", "top_k", "top_p",
                                       "sample_tail", "temperature", "targets", "dtype", "format_version")}
    summary.update({"examples": n, "shards": n_shards, "skipped": man.get("skipped"), "stats": man.get("stats"),
                    "disk_bytes": int(disk), "bytes_per_position": disk / max(total_pos, 1),
                    "topk_mass_mean": float(cover.mean()) if cover.size else None,
                    "topk_mass_histogram": {f"{edges[b]:.1f}-{edges[b + 1]:.1f}": int(hist[b]) for b in range(10)},
                    "checksums": "recorded" if store.checksummed else
                    "none recorded (a store written before xtok recorded checksums): reads are not verified"})
    if verify:
        summary["verified"] = {"shards": n_shards, "damaged": len(damaged), "checked": sorted(checked)}
    summary["damaged_shards"] = [{"file": store.shard_files[s], "error": damaged[s]} for s in sorted(damaged)]
    if as_json:
        click.echo(json.dumps(summary, indent=1))
        _exit_damaged(damaged, n_shards, store.path, quiet=True)
        return
    for k, v in summary.items():
        if k not in ("topk_mass_histogram", "damaged_shards"):
            click.echo(f"{k:>18}: {v}")
    click.echo("top-k mass covered per position" + (" (damaged shards left out)" if damaged else "") + ":")
    peak = max(1, int(hist.max()) if hist.size else 1)
    for b in range(10):
        click.echo(f"  {edges[b]:.1f}-{edges[b + 1]:.1f} {'#' * int(40 * hist[b] / peak):<40} {int(hist[b])}")
    if n:
        _render_example(store, example, positions, show_k, tokenizer or man.get("tokenizer"), damaged)
    _exit_damaged(damaged, n_shards, store.path)


def _exit_damaged(damaged: dict, n_shards: int, path: str, quiet: bool = False):
    """Report the damaged shards (stderr) and exit with status 1 when there are any."""
    if not damaged:
        return
    if not quiet:
        click.echo(f"\n{len(damaged)} of {n_shards} shards are damaged:", err=True)
        for msg in damaged.values():
            click.echo(f"  {msg}", err=True)
        click.echo(f"Delete the damaged shard files and re-run the same `xtok extract` command for {path}: it "
                   "rewrites missing shards and keeps the others.", err=True)
    sys.exit(1)


def _render_example(store, example, positions, show_k, spec, damaged):
    import numpy as np

    from xtok.store import DamagedShardError

    tok = None
    if spec:
        try:
            from xtok.tokens import load_tokenizer

            tok = load_tokenizer(spec)
        except Exception as e:  # noqa: BLE001
            click.echo(f"(cannot load tokenizer {spec!r}: {e}; showing ids)")
    try:
        ex = store[int(example)] if example.lstrip("-").isdigit() else store[example]
    except (KeyError, IndexError) as e:
        raise click.ClickException(str(e))
    except DamagedShardError as e:
        damaged.setdefault(store.shard_files.index(e.file), str(e))
        click.echo(f"\nexample {example}: in a damaged shard ({e.file}); not shown.")
        return
    click.echo(f"\nexample key={ex.key}  tokens={ex.input_ids.shape[0]}  positions={ex.positions.shape[0]}")
    click.echo("text: " + (ex.text[:500] + ("…" if len(ex.text) > 500 else "")))
    show = ex.positions.shape[0] if positions == 0 else min(positions, ex.positions.shape[0])
    for r in range(show):
        p = int(ex.positions[r])
        nxt = int(ex.input_ids[p + 1])
        tops = "  ".join(f"{_piece(tok, t)}:{np.exp(lp):.3f}" for t, lp in
                         zip(ex.topk_ids[r, :show_k].tolist(), ex.topk_logprobs[r, :show_k].tolist()) if t >= 0)
        click.echo(f"  @{p:<5} next={_piece(tok, nxt)!s:<14} lp={ex.target_logprob[r]:8.3f}  tail={ex.tail_mass[r]:.3f}"
                   f"  ws={ex.word_start_mass[r]:.2f} | {tops}")
