"""The dataset of an extraction: `read_dataset` (local .jsonl/.json/.parquet/.arrow files or folders,
a `save_to_disk` folder, or a hub id) and `split_files` (the files of a local folder by split, the
way `datasets` assigns them)."""
from __future__ import annotations

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


def read_dataset(spec: str, split: str = "train"):
    """A `datasets.Dataset`: a `save_to_disk` folder (its `split` when it is a DatasetDict), a local
    .jsonl/.json/.parquet/.arrow file (one file is the whole dataset: `split` is ignored), a folder of
    them (files chosen by `split`, see `split_files`), or a hub dataset id."""
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
            if p.is_file():
                files = [p]
            else:
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
                files = sorted(by_split[want])
            if not files:
                raise ExtractError(f"--dataset {spec}: no .jsonl/.json/.parquet/.arrow files there.")
            kinds = {_BUILDERS.get(f.suffix) for f in files}
            if None in kinds or len(kinds) != 1:
                raise ExtractError(f"--dataset {spec}: expected .jsonl, .json, .parquet or .arrow files of one kind, "
                                   f"got {sorted({f.suffix for f in files})}.")
            for f in files:
                if not os.access(f, os.R_OK):
                    raise ExtractError(f"--dataset {f}: file is not readable (permissions); fix with chmod or copy it.")
            return datasets.load_dataset(kinds.pop(), data_files=[str(f) for f in files], split="train")
        if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
            raise ExtractError(f"--dataset {spec}: no such file or folder.")
        return datasets.load_dataset(spec, split=split)
    except ExtractError:
        raise
    except Exception as e:  # noqa: BLE001
        cause = e.__cause__ or e
        raise ExtractError(f"--dataset {spec}: cannot read it ({type(cause).__name__}: {str(cause)[:300]}). "
                           "Check it is valid JSON lines / parquet / arrow.") from e
