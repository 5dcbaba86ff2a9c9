"""Save planning of global leaves at scale: one rank's chunk holders and writers.

    python bench/bench_holders.py [--ranks 64 1024 4096] [--leaves 32] [--replicated 8] [--runs 3]

Simulates one rank of a square 2-D mesh (``Shard(0)`` x ``Replicate``) holding ``--leaves``
DTensors of (rows, 1024) float32 plus ``--replicated`` plain tensors declared replicated over
the whole world, and times ``plan_global_leaves`` (the writer's planning step: each leaf's box,
its holders, then who writes what) for the mesh's last rank. Local tensors are on the meta
device: nothing is allocated, only the planning is measured. Prints one JSON line per world
size (median seconds over ``--runs``). Compare trees by putting each first on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch

from cloudckpt.checkpoint_writer import plan_global_leaves
from cloudckpt.format.chunks import REPLICATE, LayoutSpec, ShardOn
from cloudckpt.global_tensors import GlobalShard
from cloudckpt.tree import TensorLeaf


def leaves_for(world: int, rank: int, n_dtensors: int, n_replicated: int) -> list[TensorLeaf]:
    """Rank ``rank``'s global leaves on a square mesh of ``world`` ranks."""
    side = math.isqrt(world)
    if side * side != world:
        raise SystemExit(
            f"--ranks {world}: a square number of ranks is needed (a side x side mesh)"
        )
    out = []
    for n in range(n_dtensors):
        spec = LayoutSpec(
            (side * (n % 7 + 1), 1024),
            tuple(range(world)),
            (side, side),
            (ShardOn(0), REPLICATE),
        )
        local = torch.empty(spec.box_of(rank).sizes, device="meta")
        out.append(TensorLeaf(f"layer{n}.w", local, GlobalShard(spec, local)))
    for n in range(n_replicated):
        spec = LayoutSpec.replicated((n % 5 + 1, 1024), world)
        local = torch.empty(spec.shape, device="meta")
        out.append(TensorLeaf(f"norm{n}.w", local, GlobalShard(spec, local, "replicated")))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[64, 1024, 4096])
    ap.add_argument("--leaves", type=int, default=32)
    ap.add_argument("--replicated", type=int, default=8)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    for world in args.ranks:
        rank = world - 1
        leaves = leaves_for(world, rank, args.leaves, args.replicated)
        times = []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            to_write, _, _ = plan_global_leaves(leaves, rank)
            times.append(time.perf_counter() - t0)
        print(
            json.dumps(
                {
                    "ranks": world,
                    "leaves": len(leaves),
                    "writes": len(to_write),
                    "median_s": round(statistics.median(times), 6),
                    "per_leaf_ms": round(statistics.median(times) / len(leaves) * 1e3, 4),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
