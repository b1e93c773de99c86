"""Continual generative pretraining of a VLM on page images (page image -> its text), with TRL's SFTTrainer.

    python -m stages.pretrain --config recipes/km.yaml
    python -m stages.pretrain --config recipes/tiny.yaml --output_dir checkpoints/tiny/pretrain --max_steps 20

Reads pages datasets written by `python -m data_prep pages` and writes `<output_dir>/final/` with a
run record. Training itself is issue #4; this entry point already parses and validates everything.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .artifacts import check_input_paths, check_model_source, check_output_dir
from .errors import UsageError, exit_not_built, run_cli
from .recipe import parse_stage_arguments


@dataclass
class PretrainArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Base VLM: a local model folder (e.g. checkpoints/tiny/base) or a hub id."}
    )
    datasets: list[str] = field(
        default_factory=list, metadata={"help": "Pages datasets written by `python -m data_prep pages`."}
    )
    output_dir: str | None = field(default=None, metadata={"help": "Run folder: checkpoint-*/ and final/."})
    tuning: Literal["full", "lora"] = field(default="full", metadata={"help": "Full fine-tuning or LoRA."})
    freeze_vision: bool = field(default=True, metadata={"help": "Freeze the vision tower and merger."})
    learning_rate: float = 1.0e-5
    max_steps: int = field(default=-1, metadata={"help": "Stop after this many steps (-1: num_train_epochs)."})
    num_train_epochs: float = 1.0
    per_device_train_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    max_length: int = field(default=4096, metadata={"help": "Tokens per example, image tokens included."})
    max_pixels: int = field(default=1003520, metadata={"help": "Image pixel budget per page (1280*28*28)."})
    text_only_fraction: float = field(default=0.0, metadata={"help": "Share of text-only continuation examples."})
    eval_fraction: float = field(default=0.05, metadata={"help": "Share of documents held out (never trained on)."})
    resume: bool = field(default=False, metadata={"help": "Continue from the last checkpoint in --output_dir."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing --output_dir."})

    def validate(self) -> None:
        check_model_source(self.model_name_or_path, "--model_name_or_path")
        if not self.datasets:
            raise UsageError("--datasets is empty; give pages datasets written by `python -m data_prep pages`.")
        check_input_paths(self.datasets, "--datasets")
        for dataset in map(Path, self.datasets):
            if not (dataset / "manifest.json").is_file():
                raise UsageError(
                    f"--datasets {dataset} has no manifest.json: it is not a finished pages dataset; "
                    "write one with `python -m data_prep pages`."
                )
        for name in ("text_only_fraction", "eval_fraction"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise UsageError(f"--{name} must be in [0, 1), got {getattr(self, name)}.")
        if self.output_dir is None:
            raise UsageError("--output_dir is not set (recipe `pretrain.output_dir` or the flag).")
        check_output_dir(self.output_dir, resume=self.resume, overwrite=self.overwrite)


def main(argv: list[str] | None = None) -> None:
    parse_stage_arguments("pretrain", (PretrainArguments,), argv)
    exit_not_built("stages.pretrain (continual generative pretraining)", issue=4)


if __name__ == "__main__":
    run_cli(main)
