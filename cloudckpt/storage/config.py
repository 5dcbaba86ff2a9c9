"""Where checkpoints go: the ``[storage]`` config (backend, root, options) and how a relative
checkpoint name resolves against its root."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from ..config_types import check_fields, masked, setting
from .registry import split_scheme


@dataclass
class StorageConfig:
    """``backend``: a registered backend name (default: by the URI's scheme); ``root``: a URI
    that relative names resolve against; ``options``: the backend's storage options.

    Its repr masks the values of options that look like credentials."""

    backend: str | None = setting(
        None,
        doc="Registered backend name (`local`, `fsspec`, `s3`, `gcs`, ...). Absent: the URI's "
        "scheme decides.",
        types=(str, type(None)),
    )
    root: str | None = setting(
        None,
        doc="URI that relative checkpoint names resolve against; the `CheckpointManager` root "
        "and the command's default ROOT.",
        types=(str, type(None)),
    )
    options: dict[str, Any] = setting(
        doc="Table `[storage.options]`: handed to the backend, which declares the options it "
        "takes (its own and, for fsspec-based backends, the fsspec filesystem's, e.g. "
        "`endpoint_url`); an unknown option is a `ConfigError`. A call's `storage_options=` / "
        "`--storage-option` wins. Values of keys that look secret are masked in reprs.",
        types=(dict,),
        default_factory=dict,
    )

    def __post_init__(self) -> None:
        check_fields(self, "storage")

    def __repr__(self) -> str:
        return (
            f"StorageConfig(backend={self.backend!r}, root={self.root!r}, "
            f"options={masked(self.options)!r})"
        )

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
