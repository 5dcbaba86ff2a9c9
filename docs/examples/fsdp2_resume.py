"""FSDP2 with cloudckpt: train on N ranks, save model and optimizer, resume on another N.

    torchrun --nproc-per-node 4 docs/examples/fsdp2_resume.py /tmp/fsdp-run save
    torchrun --nproc-per-node 2 docs/examples/fsdp2_resume.py /tmp/fsdp-run resume

CPU and gloo here; on GPUs use init_device_mesh("cuda", ...) and the nccl backend.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import cloudckpt


def build() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Embedding(32, 16),
        torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True),
        torch.nn.Linear(16, 32),
    )
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    fully_shard(model[1], mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, torch.optim.Adam(model.parameters(), lr=1e-2)


def step(model: torch.nn.Module, optim: torch.optim.Optimizer, n: int) -> float:
    rank, world = dist.get_rank(), dist.get_world_size()
    tokens = torch.randint(0, 32, (8, 7), generator=torch.Generator().manual_seed(n))
    mine = tokens[rank * 8 // world : (rank + 1) * 8 // world]
    loss = torch.nn.functional.cross_entropy(
        model(mine[:, :-1]).flatten(0, 1), mine[:, 1:].flatten()
    )
    optim.zero_grad()
    loss.backward()
    optim.step()
    return loss.item()


def main() -> None:
    root, mode = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    model, optim = build()
    if mode == "save":
        for n in range(3):
            step(model, optim, n)
        msd, osd = get_state_dict(model, optim)  # DTensors, plus plain "step" and param_groups
        # DTensors are stored once as global tensors; replicated=["**"] stores the plain leaves
        # (Adam's step, the param groups, "step") once too, so any world size can load them
        cloudckpt.save(f"{root}/step-3", {"model": msd, "optim": osd, "step": 3},
                       replicated=["**"], overwrite=True)  # fmt: skip
    else:
        msd, osd = get_state_dict(model, optim)  # the target: this job's own mesh and shards
        state = cloudckpt.load(f"{root}/step-3", {"model": msd, "optim": osd, "step": 0})
        set_state_dict(
            model, optim, model_state_dict=state["model"], optim_state_dict=state["optim"]
        )
        print(f"rank {dist.get_rank()}: resumed at step {state['step']}, "
              f"loss {step(model, optim, state['step']):.4f}")  # fmt: skip
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
