"""The checkpoint's data format, as plain data (no I/O; torch only where a tensor is handed in):

- :mod:`~cloudckpt.format.encoding`: CRC32C, checked JSON and tree nodes, dtype tables,
  safetensors headers;
- :mod:`~cloudckpt.format.chunks`: global tensors as boxes (placements, who writes each chunk,
  which rows a read needs) and the index records of their chunks.

Every layer may import these. The encoding's names are importable from here too.
"""

from __future__ import annotations

import importlib
from typing import Any

from .encoding import (
    MAX_HEADER_BYTES,
    MAX_TREE_DEPTH,
    TREE_NODE_KINDS,
    SafetensorsEntry,
    build_safetensors_header,
    check_no_overlap,
    check_tree,
    crc32c,
    crc32c_concat,
    dtype_from_name,
    dtype_itemsize,
    dtype_name,
    parse_json,
    parse_safetensors_header,
    safetensors_entry,
    tensor_bytes,
)

_RECORDS = frozenset(
    {
        "FORMAT_VERSION", "MANIFEST_NAME", "DATA_DIR", "INDEX_DIR", "data_file_name", "index_name",
        "TensorRecord", "FileRecord", "RankIndex", "RankEntry", "Manifest",
    }
)  # fmt: skip


def __getattr__(name: str) -> Any:
    """The records of :mod:`cloudckpt.protocol.records`, by the names they had here."""
    if name in _RECORDS:
        return getattr(importlib.import_module("cloudckpt.protocol.records"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "MAX_HEADER_BYTES",
    "MAX_TREE_DEPTH",
    "TREE_NODE_KINDS",
    "SafetensorsEntry",
    "build_safetensors_header",
    "check_no_overlap",
    "check_tree",
    "crc32c",
    "crc32c_concat",
    "dtype_from_name",
    "dtype_itemsize",
    "dtype_name",
    "parse_json",
    "parse_safetensors_header",
    "safetensors_entry",
    "tensor_bytes",
]
