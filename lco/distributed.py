"""Where this process stands in a `torchrun` / `accelerate launch` / `deepspeed` run, read from the environment
the launchers set, so that it is known before any process group exists (argument checks, logging)."""

import json
import os
from pathlib import Path


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
