"""`xtok extract`: run a teacher over a dataset and store its top-k log-probs (resumable, sharded).

The options are generated from `xtok.extract.ExtractConfig`'s fields (name, default, help, choices,
numeric bounds), so a setting, its default and its help are written once."""
from __future__ import annotations

import dataclasses
import json
import typing

import click

from xtok.extract.config import ExtractConfig


def _field_type(hint):
    """The type of a field annotation without its None (`int | None` -> int)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if args else hint
    return typing.get_origin(base) or base


def _parse_callback(parse):
    """A click callback from a config parser (text -> value, ValueError with the reason)."""
    def callback(ctx, param, value):
        if value is None:
            return None
        try:
            return parse(value)
        except ValueError as e:
            raise click.BadParameter(str(e)) from None
    return callback


def _click_option(f: dataclasses.Field, kind: type):
    """The click option of one ExtractConfig field (see `xtok.extract.config.option`)."""
    meta = f.metadata
    if meta["cli_flag"]:  # a flag that turns the boolean field off (--quiet -> progress=False)
        return click.option(*meta["cli_flag"], is_flag=True, help=meta["help"])
    name = "--" + f.name.replace("_", "-")
    decls = [name] + ([meta["short"]] if meta["short"] else [])
    kw: dict[str, typing.Any] = {"help": meta["help"]}
    if f.default is dataclasses.MISSING:
        kw["required"] = True
    elif kind is bool and f.default is None:  # unset, --x or --no-x
        decls = [f"{name}/--no-{name[2:]}"]
        kw["default"] = None
    elif kind is bool:
        kw["is_flag"] = True
    else:
        kw["default"] = f.default
        if f.default is not None:
            kw["show_default"] = True
    if meta["choices"]:
        kw["type"] = click.Choice(list(meta["choices"]))
    elif meta["bounds"]:
        b = meta["bounds"]
        kw["type"] = (click.IntRange if b.kind is int else click.FloatRange)(b.lo, b.hi, min_open=b.lo_open)
    if meta["parse"]:
        kw["callback"] = _parse_callback(meta["parse"])
    return click.option(*decls, **kw)


def _config_options(cmd):
    """Decorate `cmd` with one option per ExtractConfig field, in field order."""
    hints = typing.get_type_hints(ExtractConfig)
    for f in reversed(dataclasses.fields(ExtractConfig)):
        cmd = _click_option(f, _field_type(hints[f.name]))(cmd)
    return cmd


def _config(kw: dict) -> ExtractConfig:
    """The ExtractConfig of the parsed options (flags that turn a field off, e.g. --quiet, inverted)."""
    for f in dataclasses.fields(ExtractConfig):
        flag = f.metadata["cli_flag"]
        if flag:
            kw[f.name] = not kw.pop(flag[0].lstrip("-").replace("-", "_"))
    return ExtractConfig(**kw)


@click.command("extract")
@_config_options
def extract_cmd(**kw):
    """Run a teacher model over a dataset and store, per target position, its top-k log-probs
    (exactly normalised), tail mass, the realised token's log-prob, word-start mass and optional
    sampled tail ids. Output: parquet shards + manifest.json (see docs/formats.md).

    Kill it at any moment and run the same command again: it resumes and every example ends up in
    the store exactly once.
    """
    from xtok.extract import ExtractError, extract
    from xtok.store import StoreError

    cfg = _config(kw)
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
           "duplicates": st["duplicates"], "empty": st["empty"], "undecodable": st.get("undecodable", 0),
           "seconds": round(st["seconds"], 2),
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
