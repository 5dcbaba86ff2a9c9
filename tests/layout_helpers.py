"""Where a local checkpoint's objects are, read from its manifest (names carry the attempt)."""

from __future__ import annotations

import json
from pathlib import Path


def _manifest(root: Path) -> dict:  # type: ignore[type-arg]
    return dict(json.loads((root / "manifest.json").read_bytes()))


def index_file(root: Path, rank: int = 0) -> Path:
    """The index of ``rank`` the manifest names."""
    entry = next(r for r in _manifest(root)["ranks"] if r["rank"] == rank)
    return root / entry["index"]


def data_files(root: Path, rank: int | None = None) -> list[Path]:
    """The data files the manifest names (of one rank, or of all), in order."""
    return [
        root / f
        for r in _manifest(root)["ranks"]
        if rank is None or r["rank"] == rank
        for f in r["files"]
    ]


def data_file(root: Path, rank: int = 0, n: int = 0) -> Path:
    return data_files(root, rank)[n]


def all_objects(root: Path) -> set[str]:
    """Every file under ``root``, relative, as a set of ``/``-joined names."""
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def read_manifest_doc(root: Path) -> dict:  # type: ignore[type-arg]
    return _manifest(root)


def write_manifest_doc(root: Path, doc: dict) -> None:  # type: ignore[type-arg]
    """Write an edited manifest with its own CRC32C made to match (as a forger would)."""
    from cloudckpt.protocol.records import manifest_crc

    doc = dict(doc)
    doc["crc32c"] = manifest_crc(doc)
    (root / "manifest.json").write_text(json.dumps(doc))
