"""Scenarios with global leaves (DTensors on CPU device meshes, replicated plain leaves) on N
real ranks: the launcher of multirank_harness forks them; gloo and TCPStores on 127.0.0.1."""

from __future__ import annotations

import sys
from typing import Any

import multirank_harness
import torch
from multirank_harness import SCENARIOS, _config, _init_group

import cloudckpt

GLOBAL_SHAPES: dict[str, tuple[int, ...]] = {
    "row": (37, 5),  # Shard(0), uneven over 4 and 3 ranks
    "col": (6, 22),  # Shard(1), uneven
    "rep": (9, 4),  # Replicate
    "big": (20000, 16),  # Shard(0); 1.25 MiB: two checksum blocks per full tensor
    "grid": (8, 10),  # 2x2 mesh (Shard(0), Replicate)
    "grid2": (7, 6),  # 2x2 mesh (Replicate, Shard(1))
    "scalar": (),  # a 0-d replicated DTensor
}
REPLICATED = ["step", "sched.**", "opt_step"]


def global_tensor(name: str) -> torch.Tensor:
    """The full value of global leaf ``name`` (the same on every rank and in the test)."""
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    return torch.randn(GLOBAL_SHAPES[name], generator=g)


def plain_state() -> dict[str, Any]:
    return {
        "step": 7,
        "sched": {"lr": 0.5, "milestones": [3, 9], "buf": torch.arange(6.0)},
        "opt_step": torch.tensor(12.0),
    }


def _mesh(world: int, shape: tuple[int, ...]) -> Any:
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", shape)


def _placements(layout: str) -> dict[str, tuple[Any, ...]]:
    from torch.distributed.tensor import Replicate, Shard

    if layout == "save":
        return {
            "row": (Shard(0),),
            "col": (Shard(1),),
            "rep": (Replicate(),),
            "big": (Shard(0),),
            "scalar": (Replicate(),),
        }
    if layout == "other1d":  # what a job at another world size asks for
        return {
            "row": (Shard(0),),
            "col": (Shard(0),),
            "rep": (Shard(1),),
            "big": (Shard(0),),
            "grid": (Shard(1),),
            "grid2": (Replicate(),),
            "scalar": (Replicate(),),
        }
    if layout == "grid_save":
        return {"grid": (Shard(0), Replicate()), "grid2": (Replicate(), Shard(1))}
    assert layout == "grid_load"  # 2x2, other placements than saved
    return {
        "row": (Replicate(), Shard(1)),
        "col": (Shard(0), Shard(1)),
        "rep": (Shard(1), Replicate()),
        "big": (Shard(0), Shard(0)),
        "grid": (Shard(1), Shard(0)),
        "grid2": (Shard(0), Replicate()),
        "scalar": (Replicate(), Replicate()),
    }


def _distribute(names: dict[str, tuple[Any, ...]], mesh: Any, zeros: bool) -> dict[str, Any]:
    from torch.distributed.tensor import distribute_tensor

    out = {}
    for name, placements in names.items():
        full = global_tensor(name)
        out[name] = distribute_tensor(torch.zeros_like(full) if zeros else full, mesh, placements)
    return out


def scenario_save_globals(rank: int, world: int, args: dict[str, Any]) -> dict[str, Any]:
    """4 ranks save 1-D mesh DTensors, 2x2 mesh DTensors and replicated plain leaves."""
    _init_group(args, rank, world)
    model = _distribute(_placements("save"), _mesh(world, (world,)), zeros=False)
    model.update(_distribute(_placements("grid_save"), _mesh(world, (2, 2)), zeros=False))
    state = {"model": model, **plain_state()}
    cfg = _config({**args, "barrier": "auto"}, rank, world)
    cloudckpt.save(f"{args['root']}/globals", state, config=cfg, replicated=REPLICATED)
    state["rank"] = rank  # a per-rank leaf
    cloudckpt.save(f"{args['root']}/with-rank", state, config=cfg, replicated=REPLICATED)
    from torch.distributed.tensor import DTensor, Partial

    partial = DTensor.from_local(torch.ones(2), _mesh(world, (world,)), [Partial()])
    try:
        cloudckpt.save(f"{args['root']}/partial", {"p": partial}, config=cfg)
    except cloudckpt.UnsupportedValueError as e:
        return {"ok": True, "partial_error": str(e)}
    return {"ok": False, "error": "a Partial DTensor was saved"}


def scenario_load_globals(rank: int, world: int, args: dict[str, Any]) -> dict[str, Any]:
    """Load into DTensors of another mesh and placements, in place; check every value."""
    _init_group(args, rank, world)
    layout = args["layout"]
    mesh = _mesh(world, (2, 2) if layout == "grid_load" else (world,))
    model = _distribute(_placements(layout), mesh, zeros=True)
    locals_before = {k: v.to_local().data_ptr() for k, v in model.items()}
    target = {"model": model, "step": 0, "sched": None, "opt_step": torch.zeros(())}
    cfg = _config({**args, "barrier": "auto"}, rank, world)
    out = cloudckpt.load(f"{args['root']}/globals", target, config=cfg, strict=True)
    for name, dt in out["model"].items():
        assert dt is model[name], name
        assert dt.to_local().data_ptr() == locals_before[name], f"{name} not loaded in place"
        assert torch.equal(dt.full_tensor(), global_tensor(name)), f"{name} differs"
    plain = plain_state()
    assert out["step"] == 7 and out["sched"]["lr"] == 0.5 and out["sched"]["milestones"] == [3, 9]
    assert torch.equal(out["sched"]["buf"], plain["sched"]["buf"])
    assert torch.equal(out["opt_step"], plain["opt_step"])
    try:
        mine = cloudckpt.load(f"{args['root']}/with-rank", config=cfg)
    except cloudckpt.CheckpointError as e:
        return {"ok": True, "per_rank_error": str(e)}
    if world != 4:
        return {"ok": False, "error": "per-rank leaf loaded at another world size"}
    assert mine["rank"] == rank  # same world size: this rank's own per-rank leaves
    return {"ok": True}


def scenario_save_globals_async(rank: int, world: int, args: dict[str, Any]) -> dict[str, Any]:
    """Save DTensors and replicated leaves through the async checkpointer (thread or process
    writer), twice; training mutates in between. Returns where each save staged the DTensor
    shards (the second save reuses the first one's slab)."""
    _init_group(args, rank, world)
    model = _distribute(_placements("save"), _mesh(world, (world,)), zeros=False)
    cfg = _config({**args, "barrier": "auto"}, rank, world)
    cfg.process_config.writer = args["writer"]
    ckpt = cloudckpt.make_async_checkpointer(cfg)
    slabs = []  # where each save's staged DTensor shards live
    for step in range(2):
        state = {"model": model, **plain_state()}
        stage_f, write_f = ckpt.save(f"{args['root']}/async-{step}", state, replicated=REPLICATED)
        stage_f.result()
        staged = ckpt._staged  # type: ignore[attr-defined]
        staged = staged.result() if hasattr(staged, "result") else staged
        slabs.append([s.local.untyped_storage().data_ptr() for s in staged["model"].values()])
        kept = {k: dt.to_local().clone() for k, dt in model.items()}
        for dt in model.values():  # staged: the save must not see this
            dt.to_local().add_(1000.0)
        write_f.result()
        for k, dt in model.items():
            dt.to_local().copy_(kept[k])
    ckpt.close()
    return {"ok": True, "slabs": slabs}


GLOBAL_BATCH, SEQ, VOCAB = 8, 6, 32


def _fsdp_model_and_optim(world: int) -> tuple[Any, Any]:
    """A two-layer transformer under FSDP2 (``fully_shard`` per layer and at the root)."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Embedding(VOCAB, 16),
        *[
            torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
            for _ in range(2)
        ],
        torch.nn.Linear(16, VOCAB),
    )
    for layer in list(model)[1:3]:
        fully_shard(layer)
    fully_shard(model)
    optim = torch.optim.Adam(model.parameters(), lr=1e-2)
    return model, optim


def _train_step(model: Any, optim: Any, step: int, rank: int, world: int) -> float:
    """One step on this rank's slice of the step's global batch; the global mean loss."""
    import torch.distributed as dist

    g = torch.Generator().manual_seed(step)
    tokens = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=g)
    per = GLOBAL_BATCH // world
    mine = tokens[rank * per : (rank + 1) * per]
    logits = model(mine[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), mine[:, 1:].reshape(-1))
    optim.zero_grad()
    loss.backward()
    optim.step()
    total = loss.detach().clone()
    dist.all_reduce(total)
    return float(total) / world


def scenario_fsdp_train(rank: int, world: int, args: dict[str, Any]) -> dict[str, Any]:
    """Train under FSDP2; save through the state-dict helpers after ``save_after`` steps, or
    resume from ``resume`` first; returns the losses of steps ``first..last``."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    _init_group(args, rank, world)
    model, optim = _fsdp_model_and_optim(world)
    cfg = _config({**args, "barrier": "auto"}, rank, world)
    first = 0
    if args.get("resume"):
        msd, osd = get_state_dict(model, optim)
        loaded = cloudckpt.load(
            args["resume"], {"model": msd, "optim": osd}, config=cfg, strict=True
        )
        set_state_dict(
            model, optim, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"]
        )
        first = args["save_after"]
    losses = {}
    for step in range(first, args["steps"]):
        if step == args["save_after"] and not args.get("resume"):
            msd, osd = get_state_dict(model, optim)
            cloudckpt.save(
                f"{args['root']}/fsdp", {"model": msd, "optim": osd}, config=cfg,
                replicated=["**"],
            )  # fmt: skip
        losses[step] = _train_step(model, optim, step, rank, world)
    return {"ok": True, "losses": losses}


def scenario_fsdp_tp(rank: int, world: int, args: dict[str, Any]) -> dict[str, Any]:
    """FSDP2 over tensor parallelism on a 2x2 mesh: what placements torch builds, and what a
    save of them does."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    _init_group(args, rank, world)
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    model = tp_model()
    parallelize_module(model, mesh["tp"], {"0": ColwiseParallel()})
    fully_shard(model, mesh=mesh["dp"])
    placements = repr(model[0].weight.placements)
    cfg = _config({**args, "barrier": "auto"}, rank, world)
    cloudckpt.save(f"{args['root']}/fsdp-tp", {"model": model.state_dict()}, config=cfg)
    target = tp_model()  # load back into the same layout, zeroed first
    parallelize_module(target, mesh["tp"], {"0": ColwiseParallel()})
    fully_shard(target, mesh=mesh["dp"])
    sd = target.state_dict()
    for v in sd.values():
        v.to_local().zero_()
    cloudckpt.load(f"{args['root']}/fsdp-tp", {"model": sd}, config=cfg, strict=True)
    for k, v in sd.items():
        assert torch.equal(v.full_tensor(), tp_model().state_dict()[k]), k
    return {"ok": True, "placements": placements}


def tp_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 10))


def scenario_ddp(rank: int, world: int, args: dict[str, Any]) -> dict[str, Any]:
    """Plain DDP through the state-dict helpers: saved once with replicated=["**"] by 4 ranks,
    resumed by 2; returns a digest of the loaded parameters and Adam state."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.nn.parallel import DistributedDataParallel

    _init_group(args, rank, world)
    torch.manual_seed(0)
    model = DistributedDataParallel(torch.nn.Linear(6, 4))
    optim = torch.optim.Adam(model.parameters(), lr=0.1)
    cfg = _config({**args, "barrier": "auto"}, rank, world)
    uri = f"{args['root']}/ddp"
    if args.get("resume"):
        msd, osd = get_state_dict(model, optim)
        state = cloudckpt.load(uri, {"model": msd, "optim": osd}, config=cfg, strict=True)
        set_state_dict(
            model, optim, model_state_dict=state["model"], optim_state_dict=state["optim"]
        )
    else:
        model(torch.ones(2, 6)).sum().backward()
        optim.step()
        msd, osd = get_state_dict(model, optim)
        cloudckpt.save(uri, {"model": msd, "optim": osd}, config=cfg, replicated=["**"])
    msd, osd = get_state_dict(model, optim)
    digest = [float(v.sum()) for v in msd.values()]
    digest += [float(v.sum()) for s in osd["state"].values() for v in s.values()]
    return {"ok": True, "digest": digest}


SCENARIOS.update(
    ddp=scenario_ddp,
    fsdp_tp=scenario_fsdp_tp,
    fsdp_train=scenario_fsdp_train,
    save_globals=scenario_save_globals,
    load_globals=scenario_load_globals,
    save_globals_async=scenario_save_globals_async,
)


def run_ranks(name: str, world: int, args: dict[str, Any], timeout: float = 180) -> dict[int, Any]:
    """From a test: run scenario ``name`` of this file on ``world`` forked ranks."""
    return multirank_harness.run_ranks(name, world, args, timeout, script=__file__)


if __name__ == "__main__":
    multirank_harness.main(sys.argv[1:])
