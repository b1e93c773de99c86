"""Where this process stands in a `torchrun` / `accelerate launch` / `deepspeed` run, read from the environment
the launchers set, so that it is known before any process group exists (argument checks, logging); and the
process group of the stages that start their own (evaluate, index, hard-negative mining): the device each process
binds, joining the group, and the collectives they share work with (shares, gathering, rank 0 first)."""

import json
import os
from contextlib import contextmanager
from pathlib import Path

from common.errors import ProcessUsageError


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_world_size() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def deepspeed_stage(config: str | dict | None) -> int | None:
    """The ZeRO stage of a DeepSpeed config (a JSON file or its content); None without one."""
    if not config:
        return None
    if isinstance(config, str):
        config = json.loads(Path(config).read_text(encoding="utf-8"))
    return config.get("zero_optimization", {}).get("stage")


def process_device():
    """The device this process computes on: under torchrun, the GPU of its local rank where the process sees every
    GPU of its node; the one GPU it sees where a launcher gives each process its own (`srun --gpus-per-task`,
    Kubernetes: LOCAL_RANK 1 and a single visible cuda:0); the CPU without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return torch.device("cpu")
    visible = torch.cuda.device_count()
    if local_rank() < visible:
        return torch.device("cuda", local_rank())
    if visible == 1:
        return torch.device("cuda", 0)
    raise ProcessUsageError(
        f"LOCAL_RANK is {local_rank()} but this process sees {visible} GPUs (cuda:0 to cuda:{visible - 1}); start at "
        "most one process per visible GPU (torchrun --nproc_per_node), or give each process one GPU of its own."
    )


def join_process_group() -> int:
    """Under torchrun (WORLD_SIZE > 1), join the process group (NCCL on GPUs, gloo otherwise), bound to this
    process's device first: NCCL collectives, object ones included, run on the current CUDA device, and with every
    rank on cuda:0 they fail ("Duplicate GPU detected") or hang. This process's rank."""
    import torch

    if world_size() > 1 and not torch.distributed.is_initialized():
        device = process_device()
        if device.type == "cuda":
            torch.cuda.set_device(device)
            torch.distributed.init_process_group("nccl", device_id=device)
        else:
            torch.distributed.init_process_group("gloo")
    return rank()


def process_group() -> tuple[int, int]:
    """(world size, rank) of the initialised process group, (1, 0) without one."""
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


def share(count: int) -> range:
    """This process's contiguous share of `count` items in the process group (all of them without one); the
    shares of the ranks, in rank order, are the items in order."""
    world, rank = process_group()
    return range(count * rank // world, count * (rank + 1) // world)


@contextmanager
def main_process_first():
    """Rank 0 runs the block first, alone; the other processes run it once rank 0 is through (and read what it
    wrote). Without a process group, the block runs as it is."""
    import torch

    world, rank = process_group()
    if world > 1 and rank > 0:
        torch.distributed.barrier()
    try:
        yield
    finally:  # where rank 0 fails, the others go on and fail on what it left undone, rather than wait forever
        if world > 1 and rank == 0:
            torch.distributed.barrier()


def main_process_decides(value):
    """`value` as rank 0 sees it, on every process: they take the same branch (a cache file may appear between
    one process's look and another's)."""
    import torch

    if process_group()[0] == 1:
        return value
    decided = [value]
    torch.distributed.broadcast_object_list(decided, src=0)
    return decided[0]


def collective_device():
    """Where the group's collectives take their tensors: the current GPU under NCCL, else the CPU."""
    import torch

    nccl = torch.distributed.get_backend() == "nccl"
    return torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")


def sum_across(values: list[float]) -> list[float]:
    """`values` summed element-wise over the processes of the group (as they are without one)."""
    import torch

    if process_group()[0] == 1:
        return list(values)
    summed = torch.tensor(values, dtype=torch.float64, device=collective_device())
    torch.distributed.all_reduce(summed)
    return summed.tolist()


def gather_rows(rows):
    """Every process's 2-D `rows` (its own number of them, none included; one width) concatenated in rank order,
    on the CPU, on every process. Tensors travel as tensors (no pickling): each process's rows are padded to the
    longest share and cut back after the gathering, on the group's device (the current GPU under NCCL)."""
    import torch
    import torch.distributed as dist

    device = collective_device()
    shape = torch.tensor([rows.shape[0], rows[0].numel() if rows.shape[0] else 0], device=device)
    shapes = [torch.empty_like(shape) for _ in range(dist.get_world_size())]
    dist.all_gather(shapes, shape)
    longest, width = (max(int(s[i]) for s in shapes) for i in (0, 1))
    padded = torch.zeros(longest, width, dtype=rows.dtype, device=device)
    padded[: rows.shape[0]] = rows.reshape(rows.shape[0], width).to(device)
    gathered = [torch.empty_like(padded) for _ in shapes]
    dist.all_gather(gathered, padded)
    return torch.cat([part[: int(s[0])] for part, s in zip(gathered, shapes)]).cpu()
