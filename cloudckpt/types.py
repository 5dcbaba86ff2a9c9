"""Shared types, as in ``torch.distributed.checkpoint._experimental.types``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeAlias

STATE_DICT: TypeAlias = dict[str, Any]


@dataclass
class RankInfo:
    """This process's rank and the job's world size."""

    global_rank: int
    global_world_size: int


def default_rank_info() -> RankInfo:
    """Rank and world size from an initialized process group, else a single rank."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return RankInfo(global_rank=dist.get_rank(), global_world_size=dist.get_world_size())
    return RankInfo(global_rank=0, global_world_size=1)
