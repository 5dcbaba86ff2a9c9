"""Where checkpoints go: the ``[storage]`` config (backend, root, options) and URI resolution."""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field
from typing import Any

from .backends import split_scheme


@dataclass
class StorageConfig:
    """``backend``: a registered backend name (default: by the URI's scheme); ``root``: a URI
    that relative names resolve against; ``options``: the backend's fsspec storage options."""

    backend: str | None = None
    root: str | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def resolve_uri(self, path: str) -> str:
        """``path`` itself if it is a URI or absolute path, else ``root``/``path``."""
        if not isinstance(path, str) or not path:
            raise ValueError(f"a checkpoint URI must be a non-empty string, got {path!r}")
        path = os.fspath(path)
        if self.root and not split_scheme(path) and not os.path.isabs(path):
            return f"{self.root.rstrip('/')}/{path}"
        return path

    def options_with(self, overrides: dict[str, Any] | None) -> dict[str, Any]:
        """These options with a call's ``storage_options`` on top."""
        return {**self.options, **(overrides or {})}


_HINTS = {
    errno.ENOSPC: "the disk is full: free space or save elsewhere",
    errno.EDQUOT: "the disk quota is exhausted: free space or save elsewhere",
    errno.EACCES: "permission denied: check the path's permissions or credentials",
    errno.EPERM: "operation not permitted: check the path's permissions or credentials",
    errno.EROFS: "the filesystem is read-only: save elsewhere",
}


def describe_store_error(uri: str, path: str, e: OSError, *, reading: bool = False) -> str:
    """A message naming the checkpoint URI, the object and what the store said."""
    again = "try again" if reading else "save again"
    hint = _HINTS.get(e.errno or -1, f"check the store and the URI, then {again}")
    if reading and e.errno == errno.EROFS:
        hint = f"check the store and the URI, then {again}"
    return f"{uri}: {'reading' if reading else 'storing'} {path} failed: {e.strerror or e} ({hint})"
