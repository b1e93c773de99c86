"""DeepSpeed where there is no GPU, and which engine and precision a run really trained with.

An engine asked for is not evidence that it ran: an `Accelerator(cpu=True)` or the Trainer's `use_cpu` drop a
DeepSpeed plugin without a word. `engine_record` reads the live model and optimizer instead of the settings."""

import os
import socket
import sys

from common.errors import UsageError


def prepare_deepspeed() -> None:
    """Before DeepSpeed is imported (or before Accelerate or the Trainer import it): without CUDA, DeepSpeed's CPU
    accelerator (gloo where oneCCL is not installed); unlaunched, the environment of a one-process launch, since
    DeepSpeed's process group otherwise looks for MPI (mpi4py) and fails."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        if os.environ["DS_ACCELERATOR"] != "cpu" or _chosen_accelerator() not in (None, "cpu"):
            raise UsageError(
                f"--deepspeed without a GPU runs on DeepSpeed's CPU accelerator, but DS_ACCELERATOR is "
                f"{os.environ['DS_ACCELERATOR']!r}; unset it or set DS_ACCELERATOR=cpu."
            )
    if "RANK" not in os.environ:
        with socket.socket() as probe:  # a free port for the one-process group
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        os.environ.update(
            RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )  # fmt: skip


def _chosen_accelerator() -> str | None:
    """The accelerator DeepSpeed already chose in this process, if it did (it keeps its first choice)."""
    if "deepspeed.accelerator.real_accelerator" not in sys.modules:
        return None
    chosen = sys.modules["deepspeed.accelerator.real_accelerator"].ds_accelerator
    return None if chosen is None else chosen.device_name()


def engine_record(model, optimizer, autocast_bf16: bool) -> dict:
    """{engine, master_weights, compute} of a prepared `model` (what Accelerate or the Trainer wraps) and its
    optimizer: "deepspeed-zero<stage>" with the stage the live engine runs, "ddp" or "single-process"; the dtype of
    the weights the optimizer updates (DeepSpeed's fp32 copies, not the module's bf16 ones); the compute dtype."""
    import torch

    if "deepspeed" in sys.modules and isinstance(model, sys.modules["deepspeed"].DeepSpeedEngine):
        engine = f"deepspeed-zero{model.zero_optimization_stage()}"
        compute = "bf16" if model.bfloat16_enabled() else "fp16" if model.fp16_enabled() else None
    else:
        engine = "ddp" if isinstance(model, torch.nn.parallel.DistributedDataParallel) else "single-process"
        compute = "bf16" if autocast_bf16 else None
    inner = optimizer
    while hasattr(inner, "optimizer"):  # Accelerate's wrapper, then DeepSpeed's ZeRO optimizer, then torch's
        if hasattr(inner, "fp32_partitioned_groups_flat"):
            # ZeRO-3's own copies: it hands them to torch's optimizer only for the length of a step
            updated = inner.fp32_partitioned_groups_flat
            break
        inner = inner.optimizer
    else:
        updated = [parameter for group in inner.param_groups for parameter in group["params"]]
    master = _dtype_name({parameter.dtype for parameter in updated})
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    record = {
        "engine": engine,
        "master_weights": master,
        "compute": compute or _dtype_name({p.dtype for p in trainable}),
    }
    zero3 = [parameter for parameter in model.parameters() if hasattr(parameter, "ds_status")]
    if zero3:  # ZeRO-3: a partitioned parameter's local tensor is empty outside a forward
        record["partitioned_parameters"] = sum(parameter.numel() == 0 for parameter in zero3)
        record["parameters"] = len(list(model.parameters()))
    return record


def check_engine(record: dict, deepspeed: str | None) -> None:
    """Refuse a run that was given a DeepSpeed config and trained without DeepSpeed's engine."""
    if deepspeed and not record["engine"].startswith("deepspeed"):
        raise RuntimeError(f"--deepspeed {deepspeed} was given but the run trained with {record['engine']}.")


def describe_engine(record: dict) -> str:
    return f"engine {record['engine']}, {record['master_weights']} master weights, {record['compute']} compute"


def _dtype_name(dtypes: set) -> str:
    names = {"torch.float32": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16"}
    return "+".join(sorted(names.get(str(dtype), str(dtype)) for dtype in dtypes))
