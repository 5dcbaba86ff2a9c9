"""The URI calls: ``save(uri, state_dict)`` and ``load(uri, state_dict=None)``."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

from .builder import make_checkpoint_reader, make_sync_checkpointer, rank_info_for
from .checkpointer import load_with_reader
from .config import CheckpointerConfig, resolve_config
from .storage.registry import SharedBackends
from .types import STATE_DICT, RankInfo

ConfigArg = CheckpointerConfig | str | os.PathLike[str] | None


def _with_options(config: ConfigArg, storage_options: dict[str, Any] | None) -> CheckpointerConfig:
    cfg = resolve_config(config)
    if storage_options:
        storage = dataclasses.replace(
            cfg.storage, options=cfg.storage.options_with(storage_options)
        )
        cfg = dataclasses.replace(cfg, storage=storage)
    return cfg


def save(
    uri: str,
    state_dict: STATE_DICT,
    *,
    config: ConfigArg = None,
    storage_options: dict[str, Any] | None = None,
    overwrite: bool = False,
    metadata: dict[str, Any] | None = None,
    rank_info: RankInfo | None = None,
    replicated: Sequence[str] | None = None,
) -> None:
    """Save ``state_dict`` at ``uri`` and commit it; returns once the manifest exists.

    ``config`` is a :class:`CheckpointerConfig` or a TOML file (default ``$CLOUDCKPT_CONFIG``);
    ``storage_options`` override its ``[storage.options]``. ``replicated``: glob patterns over
    key paths of plain leaves that are the same on every rank (stored once; default
    ``[writer] replicated``); DTensors are always stored as global tensors.
    """
    cfg = _with_options(config, storage_options)
    # one call, one checkpointer: connections come from the shared cache, reused by the next
    with make_sync_checkpointer(cfg, rank_info=rank_info, backends=SharedBackends()) as ckpt:
        ckpt.save(uri, state_dict, overwrite=overwrite, metadata=metadata, replicated=replicated)


def load(
    uri: str,
    state_dict: STATE_DICT | None = None,
    *,
    default_map_location: Any = None,
    strict: bool = False,
    rank: int | None = None,
    config: ConfigArg = None,
    storage_options: dict[str, Any] | None = None,
    rank_info: RankInfo | None = None,
) -> STATE_DICT:
    """Load the committed checkpoint at ``uri``: everything, or only ``state_dict``'s keys
    (into its own tensors where they fit). ``strict`` raises on keys the checkpoint lacks.

    Tensors the load makes that are under 1 MiB are views of a storage of at most 4 MiB shared
    with their neighbours in the file (as ``torch.load(mmap=True)``'s share the file's);
    ``.clone()`` one to give it memory of its own."""
    cfg = _with_options(config, storage_options)
    reader = make_checkpoint_reader(cfg, rank_info_for(cfg, rank_info), SharedBackends())
    try:
        return load_with_reader(
            reader, uri, state_dict, default_map_location, strict, {"rank": rank}
        )
    finally:
        reader.close()
