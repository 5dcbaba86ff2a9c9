"""The quick-start job: train a small model, save its state to a local directory, load it back,
verify it, and say what happened. ``python -m cloudckpt.demo [DIR]`` (default ``./cloudckpt-demo``).

No server and no cloud account: it shows the whole save/commit/load/verify path on local disk.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

import torch

from . import load, save
from .checkpoint_reader import open_checkpoint
from .errors import CheckpointExistsError
from .tree import container_kind
from .units import format_size


def _train(steps: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(256, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 256)
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(steps):
        x = torch.randn(32, 256)
        loss = (model(x) - x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, opt


def _same(a: Any, b: Any) -> bool:
    """Whether two state dicts hold the same containers (exact types, keys in order) and
    equal leaves (tensors of the same dtype and values)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    kind = container_kind(a, "")
    if kind is None:
        return bool(a == b)
    if type(a) is not type(b) or len(a) != len(b):
        return False
    if kind == "dict" or kind == "odict":
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    return all(map(_same, a, b))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cloudckpt.demo", description=__doc__)
    parser.add_argument("directory", nargs="?", default="cloudckpt-demo")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)

    model, opt = _train(args.steps)
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": args.steps}
    uri = os.path.join(os.path.abspath(args.directory), f"step-{args.steps:010d}")

    started = time.perf_counter()
    try:
        save(uri, state)
    except CheckpointExistsError:
        save(uri, state, overwrite=True)
    saved = time.perf_counter() - started
    ckpt = open_checkpoint(uri)
    files = [f for r in ckpt.manifest.ranks for f in r.files]
    print(f"saved    {uri}")
    print(
        f"         {format_size(ckpt.manifest.total_bytes)} in {len(files)} data file(s), {saved:.3f} s"
    )

    started = time.perf_counter()
    loaded = load(uri)
    took = time.perf_counter() - started
    print(f"loaded   every tensor back in {took:.3f} s, each CRC32C checked")

    fresh, _ = _train(0)
    target = {"model": fresh.state_dict()}
    load(uri, target, strict=True)  # in place, into a new model's own tensors
    ok = _same(loaded, state) and _same(fresh.state_dict(), model.state_dict())
    print(f"verified {'identical to the trained state' if ok else 'MISMATCH'}; resume from it with")
    print(f"         cloudckpt.load({uri!r}, {{'model': model.state_dict()}})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
