"""The teacher store: what `xtok extract` writes and the collator reads.

Modules: `codec` (the packed example: encode + decode), `fs` (local or fsspec folders), `integrity`
(shard checksums), `writer` (`StoreWriter`, `merge_manifests`), `reader` (`TeacherStore`).

Layout of a store at PATH (a local folder or any fsspec URL):

    PATH/manifest.json                     merged manifest (written last; its presence = store complete)
    PATH/parts/r{rank}of{N}.json           one per writer rank: header + complete flag (+ shard files and counts
                                           when complete); written when the writer opens and when it finishes
    PATH/shards/r{rank}of{N}-{j:05d}.parquet   zstd parquet, one row per example; its schema metadata holds the
                                           writer's header and the shard's record (rank, world, j, n, skip counts)

Every shard is written to a temporary name and renamed into place (atomic): that rename is the whole
commit (O(shard) bytes). A shard file that exists is complete and says with which settings it was made,
so a resumed writer adopts exactly the shards of its own settings and refuses others. The merge reads
the example keys from the shards' `key` columns. The manifest records each shard's size, sha256 and
per-row-group xxh3 (`xtok.store.integrity`); the reader verifies what it reads against them.

The per-example packed format and its quantisation: `xtok.store.codec` (and docs/formats.md).
"""
from __future__ import annotations

from ..rows import content_json, content_key, example_key
from .codec import (D_MAX, FORMAT_VERSION, QSTEP, PackedExample, TeacherExample, dequantize_logprobs, encode_example,
                    pack_ids, quantize_logprobs, unpack_ids)
from .reader import TeacherStore
from .writer import DamagedShardError, StoreError, StoreWriter, merge_manifests

__all__ = [
    "FORMAT_VERSION", "TeacherExample", "PackedExample", "TeacherStore", "StoreWriter", "StoreError",
    "DamagedShardError", "example_key",
    "content_json", "content_key", "quantize_logprobs", "dequantize_logprobs", "pack_ids", "unpack_ids",
    "encode_example", "merge_manifests", "D_MAX", "QSTEP",
]
