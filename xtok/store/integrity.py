"""Checksums of store shards: what the writer records in the manifest and the reader verifies.

Per shard, the manifest's `shards` entry records (docs/formats.md, "Integrity"):

    bytes           the file's size
    sha256          sha256 of the whole file (`sha256sum` checks it too; `xtok inspect --verify` does)
    row_group_xxh3  xxh3-64 of each parquet row group's bytes (its column chunks, as written: pages
                    still compressed), in row-group order

The reader checks `bytes` when it opens a shard (a stat) and a row group's xxh3 before it decodes that
row group: exactly the bytes it reads anyway, at ~50 GB/s (~10 us per 512 KiB row group), so
verification costs nothing measurable and is on by default. A whole-file sha256 on every open would
read every byte of every shard a worker touches (a 1,024-example shard of 2k-token k = 64 examples is
~300 MB: ~0.2 s of CPU and the I/O of the whole file, for a worker that may need a few of its rows), so
it is left to `xtok inspect --verify`. Stores written before checksums existed have no such fields:
they read as before, unverified.
"""
from __future__ import annotations

import hashlib

__all__ = ["CHECKSUM_FIELDS", "row_group_ranges", "xxh3_hex", "shard_checksums", "sha256_hex"]

CHECKSUM_FIELDS = ("bytes", "sha256", "row_group_xxh3")


def xxh3_hex(data) -> str:
    """xxh3-64 of a bytes-like object, 16 hex digits."""
    import xxhash

    return xxhash.xxh3_64_hexdigest(data)


def sha256_hex(data) -> str:
    return hashlib.sha256(data).hexdigest()


def row_group_ranges(metadata, group: int | None = None) -> list[tuple[int, int]]:
    """(start, end) byte range of every row group of a parquet file (pyarrow FileMetaData), or only of
    row group `group`: from the first page of its first column chunk to the end of its last, pages as
    stored (compressed, with headers)."""
    out = []
    for g in range(metadata.num_row_groups) if group is None else (group,):
        rg = metadata.row_group(g)
        lo, hi = None, 0
        for c in range(rg.num_columns):
            cc = rg.column(c)
            start = cc.data_page_offset
            if cc.has_dictionary_page and cc.dictionary_page_offset is not None and cc.dictionary_page_offset > 0:
                start = min(start, cc.dictionary_page_offset)
            lo = start if lo is None else min(lo, start)
            hi = max(hi, start + cc.total_compressed_size)
        out.append((int(lo or 0), int(hi)))
    return out


def shard_checksums(data) -> dict:
    """The manifest record of a shard file's bytes `data` (bytes-like): {bytes, sha256, row_group_xxh3}."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    view = memoryview(data)
    md = pq.ParquetFile(pa.BufferReader(pa.py_buffer(data))).metadata
    return {"bytes": len(view), "sha256": sha256_hex(view),
            "row_group_xxh3": [xxh3_hex(view[a:b]) for a, b in row_group_ranges(md)]}
