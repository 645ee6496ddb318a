"""`xtok inspect PATH`: summary of a teacher store, one example rendered with its top-k, and a
histogram of how much probability mass the stored top-k covers."""
from __future__ import annotations

import json

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
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
def inspect_cmd(path, example, positions, show_k, tokenizer, sample, as_json):
    """Summarise the teacher store at PATH (written by `xtok extract`)."""
    import numpy as np

    from xtok.store import StoreError, TeacherStore

    try:
        store = TeacherStore(path)
    except StoreError as e:
        raise click.ClickException(str(e))
    man = store.manifest
    n = len(store)
    idx = np.arange(n) if not sample or sample >= n else np.linspace(0, n - 1, sample).astype(int)
    cover, n_pos, n_tok = [], 0, 0
    for i in idx.tolist():
        ex = store[i]
        cover.append(1.0 - ex.tail_mass.astype(np.float64))
        n_pos += ex.positions.shape[0]
        n_tok += ex.input_ids.shape[0]
    cover = np.concatenate(cover) if cover else np.zeros(0)
    edges = np.linspace(0, 1, 11)
    hist = np.histogram(cover, bins=edges)[0]
    disk = sum(store.shard_bytes())
    total_pos = n_pos * (n / max(1, len(idx)))
    summary = {k: man.get(k) for k in ("model", "tokenizer", "tokenizer_hash", "dataset", "split", "top_k", "top_p",
                                       "sample_tail", "temperature", "targets", "dtype", "format_version")}
    summary.update({"examples": n, "shards": len(store.shard_files), "skipped": man.get("skipped"),
                    "disk_bytes": int(disk), "bytes_per_position": disk / max(total_pos, 1),
                    "topk_mass_mean": float(cover.mean()) if cover.size else None,
                    "topk_mass_histogram": {f"{edges[b]:.1f}-{edges[b + 1]:.1f}": int(hist[b]) for b in range(10)}})
    if as_json:
        click.echo(json.dumps(summary, indent=1))
        return
    for k, v in summary.items():
        if k != "topk_mass_histogram":
            click.echo(f"{k:>18}: {v}")
    click.echo("top-k mass covered per position:")
    peak = max(1, int(hist.max()) if hist.size else 1)
    for b in range(10):
        click.echo(f"  {edges[b]:.1f}-{edges[b + 1]:.1f} {'#' * int(40 * hist[b] / peak):<40} {int(hist[b])}")
    if n == 0:
        return
    tok = None
    spec = tokenizer or man.get("tokenizer")
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
