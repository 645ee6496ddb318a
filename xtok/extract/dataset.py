"""The dataset of an extraction: `read_dataset` (local .jsonl/.json/.parquet/.arrow files or folders,
a `save_to_disk` folder, or a hub id), `split_files` (the files of a local folder by split, the way
`datasets` assigns them), and the rows that cannot be decoded: `undecodable_rows` (strings that are not
UTF-8) and `describe_rows` (where a row is: file and line)."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from .config import ExtractError


_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow"}


# split keywords as `datasets` reads them from file and folder names (datasets.data_files.SPLIT_KEYWORDS)
_SPLIT_KEYWORDS = {"train": ("train", "training"), "validation": ("validation", "valid", "dev", "val"),
                   "test": ("test", "testing", "eval", "evaluation")}
_SHARDED = re.compile(r"data/([\w-]+?)-\d{5}-of-\d{5}[^/]*")
_NON_WORD = re.compile(r"[-._ 0-9/]+")


def _canonical_split(split: str) -> str:
    for name, words in _SPLIT_KEYWORDS.items():
        if split.lower() in words:
            return name
    return split


def _words_split(text: str) -> list[str]:
    words = set(_NON_WORD.split(text.lower()))
    return [name for name, kws in _SPLIT_KEYWORDS.items() if words.intersection(kws)]


def split_files(root: Path, files: list[Path]) -> dict[str, list[Path]]:
    """Files of a local dataset folder by split, the way `datasets` assigns them: `data/{split}-NNNNN-of-NNNNN.*`
    shards first, else split keywords (train/training, validation/valid/dev/val, test/testing/eval/evaluation,
    delimited by - . _ space or digits) in folder names, else in file names; a folder with no split-named
    files is one 'train' split. Files that name no split are left out when others do."""
    rel = {f: f.relative_to(root).as_posix() for f in files}
    out: dict[str, list[Path]] = {}
    for f, r in rel.items():
        m = _SHARDED.fullmatch(r)
        if m:
            out.setdefault(m.group(1), []).append(f)
    if out:
        return out
    for part in ("dir", "name"):
        for f, r in rel.items():
            dirs, _, name = r.rpartition("/")
            for sp in _words_split(dirs if part == "dir" else name) if (dirs or part == "name") else []:
                out.setdefault(sp, []).append(f)
        if out:
            return out
    return {"train": list(files)}


def dataset_files(spec: str, split: str = "train") -> list[Path] | None:
    """The local files `read_dataset` reads for `spec` (one file, or a folder's files of `split`), or
    None for a `save_to_disk` folder or a hub id. ExtractError for a folder without usable files."""
    p = Path(spec).expanduser()
    if not p.exists() or (p.is_dir() and any((p / f).exists() for f in ("dataset_info.json", "state.json",
                                                                          "dataset_dict.json"))):
        return None
    if p.is_file():
        return [p]
    every = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in _BUILDERS
                   and not any(part.startswith(".") for part in f.relative_to(p).parts))
    if not every:
        raise ExtractError(f"--dataset {spec}: no .jsonl/.json/.parquet/.arrow files there.")
    by_split = split_files(p, every)
    want = _canonical_split(split)
    if want not in by_split:
        if list(by_split) == ["train"] and len(by_split["train"]) == len(every):
            raise ExtractError(f"--dataset {spec}: no files for --split {split}: no file or folder name "
                               "there names a split, so all its files form the 'train' split. Pass "
                               "--split train, or name the files e.g. test.jsonl.")
        raise ExtractError(f"--dataset {spec}: no files for --split {split} (splits there: "
                           f"{', '.join(sorted(by_split))}). Pass --split with one of them.")
    return sorted(by_split[want])


def read_dataset(spec: str, split: str = "train", skip_bad_rows: bool = False, skipped: dict | None = None):
    """A `datasets.Dataset`: a `save_to_disk` folder (its `split` when it is a DatasetDict), a local
    .jsonl/.json/.parquet/.arrow file (one file is the whole dataset: `split` is ignored), a folder of
    them (files chosen by `split`, see `split_files`), or a hub dataset id.

    Local JSON files that do not load are scanned for the first line that is not UTF-8, not JSON or not
    a JSON object, and the error names the file and the line; with `skip_bad_rows`, such lines of JSON
    lines files are left out instead and counted in `skipped["undecodable"]`. An empty file says so."""
    import datasets

    datasets.disable_progress_bars()
    p = Path(spec).expanduser()
    try:
        if p.is_dir() and any((p / f).exists() for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
            ds = datasets.load_from_disk(str(p))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise ExtractError(f"--dataset {spec}: no split {split!r} (have {sorted(ds)}); pass --split.")
                ds = ds[split]
            return ds
        if p.exists():
            files = dataset_files(spec, split)
            if not files:
                raise ExtractError(f"--dataset {spec}: no .jsonl/.json/.parquet/.arrow files there.")
            kinds = {_BUILDERS.get(f.suffix) for f in files}
            if None in kinds or len(kinds) != 1:
                raise ExtractError(f"--dataset {spec}: expected .jsonl, .json, .parquet or .arrow files of one kind, "
                                   f"got {sorted({f.suffix for f in files})}.")
            for f in files:
                if not os.access(f, os.R_OK):
                    raise ExtractError(f"--dataset {f}: file is not readable (permissions); fix with chmod or copy it.")
            kind = kinds.pop()
            empty = [f for f in files if _is_empty(f)]
            if len(empty) == len(files):
                what = ("the file is empty" if p.is_file() else f"its only file {files[0]} is empty" if len(files) == 1
                        else f"all its {len(files)} files are empty")
                raise ExtractError(f"--dataset {spec}: {what} (no rows). Point --dataset at a file with rows.")
            files = [f for f in files if f not in empty]
            try:
                return datasets.load_dataset(kind, data_files=[str(f) for f in files], split="train")
            except Exception as e:  # noqa: BLE001
                if kind != "json":
                    raise
                return _load_json_scanned(spec, files, e, skip_bad_rows, skipped)
        if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
            raise ExtractError(f"--dataset {spec}: no such file or folder.")
        return datasets.load_dataset(spec, split=split)
    except ExtractError:
        raise
    except Exception as e:  # noqa: BLE001
        cause = e.__cause__ or e
        raise ExtractError(f"--dataset {spec}: cannot read it ({type(cause).__name__}: {str(cause)[:300]}). "
                           "Check it is valid JSON lines / parquet / arrow.") from e


def _is_empty(f: Path) -> bool:
    """A file with no bytes, or (JSON) only whitespace."""
    size = f.stat().st_size
    if size == 0:
        return True
    if _BUILDERS.get(f.suffix) != "json" or size > 1 << 20:
        return False
    return not f.read_bytes().strip()


SKIP_HINT = "pass --skip-bad-rows to skip (and count) rows that cannot be decoded"


def _json_lines_problems(f: Path):
    """(line number, reason) of every non-blank line of a JSON lines file that is not UTF-8, not JSON or
    not a JSON object."""
    with open(f, "rb") as fh:
        for n, line in enumerate(fh, 1):
            b = line.strip()
            if not b:
                continue
            try:
                text = b.decode("utf-8")
            except UnicodeDecodeError as e:
                yield n, f"is not valid UTF-8 (byte 0x{b[e.start]:02x} at byte {e.start + 1} of the line)"
                continue
            try:
                obj = json.loads(text)
            except ValueError as e:
                yield n, f"is not valid JSON ({getattr(e, 'msg', e)}; column {getattr(e, 'colno', '?')})"
                continue
            if not isinstance(obj, dict):
                yield n, f"is a JSON {type(obj).__name__}, not an object (one row = one JSON object per line)"


def _is_json_document(f: Path) -> bool:
    """A .json file holding one JSON document (an array), not JSON lines."""
    with open(f, "rb") as fh:
        head = fh.read(4096).lstrip()
    return head[:1] == b"["


def _load_json_scanned(spec: str, files: list[Path], err: Exception, skip: bool, skipped: dict | None):
    """`datasets` could not load these JSON files: name the first bad line (file, line, why), or with
    `skip` load copies without the bad lines of JSON lines files and count them."""
    import datasets

    problems = {}
    for f in files:
        if _is_json_document(f):
            try:
                json.loads(f.read_bytes().decode("utf-8"))
            except UnicodeDecodeError as e:
                line = f.read_bytes()[: e.start].count(b"\n") + 1
                raise ExtractError(f"--dataset {spec}: {f} line {line} is not valid UTF-8; fix the file (a JSON "
                                   "array is read whole, so its rows cannot be skipped).") from None
            except ValueError as e:
                raise ExtractError(f"--dataset {spec}: {f} line {getattr(e, 'lineno', '?')} is not valid JSON "
                                   f"({getattr(e, 'msg', e)}); fix the file (a JSON array is read whole, so its "
                                   "rows cannot be skipped).") from None
            continue
        bad = list(_json_lines_problems(f))
        if bad:
            problems[f] = bad
    if not problems:  # not a row problem: the generic error
        cause = err.__cause__ or err
        raise ExtractError(f"--dataset {spec}: cannot read it ({type(cause).__name__}: {str(cause)[:300]}). "
                           "Check it is valid JSON lines.") from err
    if not skip:
        f, bad = next(iter(problems.items()))
        n, why = bad[0]
        more = sum(len(b) for b in problems.values()) - 1
        raise ExtractError(f"--dataset {spec}: {f} line {n} {why}"
                           + (f" ({more} more such lines)" if more else "")
                           + f". Fix or remove the line, or {SKIP_HINT}.") from None
    import tempfile

    with tempfile.TemporaryDirectory(prefix="xtok-dataset-") as tmp:
        clean = []
        for i, f in enumerate(files):
            if f not in problems:
                clean.append(str(f))
                continue
            drop = {n for n, _ in problems[f]}
            out = Path(tmp) / f"{i:05d}-{f.name}"
            with open(f, "rb") as src, open(out, "wb") as dst:
                for n, line in enumerate(src, 1):
                    if n not in drop:
                        dst.write(line)
            clean.append(str(out))
        ds = datasets.load_dataset("json", data_files=clean, split="train", keep_in_memory=True)
    if skipped is not None:
        skipped["undecodable"] = skipped.get("undecodable", 0) + sum(len(b) for b in problems.values())
    return ds


def _has_strings(t) -> bool:
    import pyarrow as pa

    if pa.types.is_string(t) or pa.types.is_large_string(t) or getattr(pa.types, "is_string_view", lambda _: False)(t):
        return True
    return any(_has_strings(t.field(i).type) for i in range(t.num_fields)) if t.num_fields else False


def undecodable_rows(ds, batch_size: int = 8192) -> list[int]:
    """Rows of `ds` holding a string that is not valid UTF-8 (datasets' JSON reader loads such bytes as
    they are; reading the row then fails): a full UTF-8 validation of every string column (C++, fast),
    then the rows of a failing batch one by one."""
    import pyarrow as pa

    bad, base = [], 0
    for b in ds.with_format("arrow").iter(batch_size=batch_size):
        for col in b.columns:
            if not _has_strings(col.type):
                continue
            off = 0
            for ch in (col.chunks if isinstance(col, pa.ChunkedArray) else [col]):
                try:
                    ch.validate(full=True)
                except pa.ArrowInvalid:
                    for r in range(len(ch)):
                        try:
                            ch.slice(r, 1).to_pylist()
                        except UnicodeDecodeError:
                            bad.append(base + off + r)
                off += len(ch)
        base += b.num_rows
    return sorted(set(bad))


def describe_rows(spec: str, split: str, rows: list[int]) -> dict[int, str]:
    """Where dataset rows are in the files: 'FILE line N' (JSON lines: non-blank lines are rows),
    'FILE row N' (parquet), else 'row N'."""
    out = {i: f"row {i}" for i in rows}
    try:
        files = dataset_files(spec, split)
    except ExtractError:
        files = None
    if not files or not rows:
        return out
    want = sorted(set(rows))
    w, base = 0, 0
    for f in files:
        kind = _BUILDERS.get(f.suffix)
        if kind == "json" and not _is_json_document(f):
            with open(f, "rb") as fh:
                r = base
                for n, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    while w < len(want) and want[w] == r:
                        out[want[w]] = f"{f} line {n}"
                        w += 1
                    r += 1
            base = r
        elif kind == "parquet":
            import pyarrow.parquet as pq

            n = pq.ParquetFile(f).metadata.num_rows
            while w < len(want) and want[w] < base + n:
                out[want[w]] = f"{f} row {want[w] - base}"
                w += 1
            base += n
        else:
            return out
        if w == len(want):
            break
    return out
