"""Store errors in words: the message naming the checkpoint URI, the object, what the store said
and what to do."""

from __future__ import annotations

import errno

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


_PLUGINS = {"s3": "s3", "s3a": "s3", "gcs": "gcs", "gs": "gcs"}


def plugin_install_hint(name: str | None = None) -> str:
    """How to install the backend plugin for a backend name or URI scheme: from a clone, and by
    its distribution name once published (the plugins are distributions, not extras)."""
    plugin = _PLUGINS.get((name or "").lower())
    if plugin is None:
        return (
            "its plugin (a distribution with a 'cloudckpt.backends' entry point; the S3 and GCS "
            "ones, from a clone of cloudckpt: pip install -e backends/s3 / -e backends/gcs, "
            "published as cloudckpt-s3 / cloudckpt-gcs)"
        )
    return (
        f"its plugin: from a clone of cloudckpt, pip install -e backends/{plugin} "
        f"(published as cloudckpt-{plugin})"
    )
