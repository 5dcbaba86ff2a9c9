"""DTensors and replicated plain tensors as global leaves: their layout as plain data.

A :class:`GlobalShard` is what the writer sees of a global leaf: this rank's local tensor and the
:class:`~cloudckpt.format.chunks.LayoutSpec` that places it in the global tensor. A ``DTensor`` becomes
one on the way into the writer (or the stager, which stages its local tensor); a plain tensor
declared replicated becomes one replicated over every rank.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any

import torch

from .errors import UnsupportedValueError
from .format.chunks import REPLICATE, Box, LayoutSpec, Placement, ShardOn


@dataclass
class GlobalShard:
    """This rank's part of a global leaf: ``local`` placed by ``layout``; ``kind`` is
    ``dtensor`` or ``replicated`` (a plain tensor the same on every rank)."""

    layout: LayoutSpec
    local: torch.Tensor
    kind: str = "dtensor"

    def box(self, rank: int) -> Box:
        return self.layout.box_of(rank)


def is_dtensor(value: Any) -> bool:
    """Whether ``value`` is a DTensor; never imports ``torch.distributed.tensor`` (slow to
    import): if nothing imported it, no DTensor exists."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(value, module.DTensor)


MeshCache = dict[int, tuple[tuple[int, ...], tuple[int, ...]]]
"""Meshes already read during one walk: ``id(mesh)`` -> (global ranks row-major, mesh shape).
Made per walk and dropped with it (the meshes it names are alive meanwhile)."""


def mesh_ranks(
    mesh: Any, cache: MeshCache | None = None
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``mesh``'s global ranks (row-major) and shape. ``DeviceMesh.mesh`` builds a new tensor
    from the mesh's layout on every access (~1 ms), so a walk over many DTensors of one mesh
    reads it once through ``cache``."""
    if cache is not None and (known := cache.get(id(mesh))) is not None:
        return known
    grid = mesh.mesh
    found = tuple(int(r) for r in grid.flatten().tolist()), tuple(grid.shape)
    if cache is not None:
        cache[id(mesh)] = found
    return found


def layout_of(dt: Any, key: str, meshes: MeshCache | None = None) -> LayoutSpec:
    """The plain-data layout of DTensor ``dt``; placements other than ``Shard`` and
    ``Replicate`` are refused with the key path and what to do. ``meshes``: the walk's
    :data:`MeshCache`, if it keeps one."""
    from torch.distributed.tensor import Replicate, Shard

    ranks, mesh_shape = mesh_ranks(dt.device_mesh, meshes)
    placements: list[Placement] = []
    strided: list[int] = []  # mesh dims of _StridedShard placements
    for mesh_dim, p in enumerate(dt.placements):
        if type(p) is Shard:
            placements.append(ShardOn(p.dim if p.dim >= 0 else p.dim + dt.ndim))
        elif type(p) is Replicate:
            placements.append(REPLICATE)
        elif type(p).__name__ == "_StridedShard":
            placements.append(ShardOn(p.dim if p.dim >= 0 else p.dim + dt.ndim))
            strided.append(mesh_dim)
        else:
            what = type(p).__name__
            hint = (
                "reduce it first: dt.redistribute(placements=[Replicate() or Shard(d), ...])"
                if what == "Partial"
                else "redistribute it to Shard/Replicate placements before saving"
            )
            raise UnsupportedValueError(
                f"{key}: cannot save a DTensor with placement {p!r} ({what}); only Shard and "
                f"Replicate are stored as global chunks; {hint}"
            )
    order: tuple[int, ...] = ()
    if strided:  # FSDP2 over TP: the plain shards first, then the strided ones right to left
        plain = [d for d in range(len(placements)) if d not in strided]
        order = (*plain, *reversed(strided))
        for d in strided:
            p = dt.placements[d]
            before = math.prod(
                mesh_shape[e] for e in order[: order.index(d)] if placements[e] == placements[d]
            )
            if int(p.split_factor) != before:
                raise UnsupportedValueError(
                    f"{key}: cannot save a DTensor with placement {p!r}: its split factor "
                    f"{p.split_factor} is not the {before} shards sharded before it (only the "
                    "FSDP2-over-tensor-parallel layout is understood); redistribute it to "
                    "Shard/Replicate placements before saving"
                )
    return LayoutSpec(tuple(dt.shape), ranks, mesh_shape, tuple(placements), order)


def global_shard_of(dt: Any, key: str, meshes: MeshCache | None = None) -> GlobalShard:
    """A DTensor as a :class:`GlobalShard` (its local tensor, not a copy, and not through
    autograd: with grad enabled ``to_local`` is an autograd function call, ~1 ms a tensor)."""
    layout = layout_of(dt, key, meshes)
    with torch.no_grad():
        local = dt.to_local()
    rank = torch.distributed.get_rank()
    expected = layout.box_of(rank).sizes
    if tuple(local.shape) != expected:
        raise UnsupportedValueError(
            f"{key}: the DTensor's local tensor is {tuple(local.shape)} but its mesh and "
            f"placements give rank {rank} a {expected} chunk (padded or uneven local shards are "
            "not stored); call dt.redistribute() to a regular layout first"
        )
    return GlobalShard(layout, local)
