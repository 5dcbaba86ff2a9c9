"""The state-dict walkers on 20,000 small tensors: CPU time of ``tree.flatten`` (every save),
and of the stager's collect and replace (the part of an async save that walks the tree).

    python bench/bench_walkers.py

Medians of 21 repetitions of each, in milliseconds of this thread's CPU time (less disturbed
than wall time on a shared machine). To compare two source trees, run it with ``PYTHONPATH``
naming each in turn, from an interpreter that does not have cloudckpt installed in editable
mode (an editable install's import hook wins over ``PYTHONPATH``).
"""

from __future__ import annotations

import inspect
import statistics
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch

from cloudckpt.staging import _collect, _replace
from cloudckpt.tree import flatten


def main() -> None:
    sd: dict[str, Any] = {
        "model": OrderedDict((f"layer{i}.weight", torch.empty(960)) for i in range(20000)),
        "step": 3,
        "opt": [{"lr": 0.1, "betas": (0.9, 0.99)}],
    }
    keyed = len(inspect.signature(_collect).parameters) == 4  # older trees: (value, key, ...)
    times: dict[str, list[float]] = {"flatten": [], "collect": [], "replace": []}

    def timed(name: str, fn: Callable[..., Any], *args: Any) -> Any:
        started = time.thread_time()
        out = fn(*args)
        times[name].append(time.thread_time() - started)
        return out

    for _ in range(21):
        timed("flatten", flatten, sd)
        tensors: list[torch.Tensor] = []
        shards: dict[int, Any] = {}
        args = (sd, "", tensors, shards) if keyed else (sd, tensors, shards)
        timed("collect", _collect, *args)
        staged = {id(t): t for t in tensors}
        timed("replace", _replace, sd, staged, shards)
    print(" ".join(f"{k} {statistics.median(v) * 1e3:.1f} ms" for k, v in times.items()))


if __name__ == "__main__":
    main()
