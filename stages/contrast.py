"""Language-centric contrastive refinement (LoRA, InfoNCE) that turns a VLM into an embedding model.

    python -m stages.contrast --config recipes/km.yaml
    python -m stages.contrast --config recipes/tiny.yaml --model_name_or_path checkpoints/tiny/pretrain/final

Training is issue #5; this entry point already parses and validates everything.
"""

from dataclasses import dataclass, field

from .artifacts import check_input_paths, check_model_source, check_output_dir
from .errors import UsageError, exit_not_built, run_cli
from .recipe import parse_stage_arguments


@dataclass
class ContrastArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "A pretrain `final/` folder, or any compatible VLM (the no-CPT baseline)."}
    )
    train_files: list[str] = field(
        default_factory=list, metadata={"help": "Any-to-any JSONL pair files (anchor/positive/negative)."}
    )
    pages_datasets: list[str] = field(
        default_factory=list, metadata={"help": "Pages datasets to build multimodal pairs from."}
    )
    output_dir: str | None = None
    multimodal_fraction: float = field(default=0.2, metadata={"help": "Share of page-image pairs; the rest is text."})
    lora_r: int = 64
    lora_alpha: int = field(default=128, metadata={"help": "The reference uses 16 for text-only training."})
    lora_dropout: float = 0.05
    temperature: float = field(default=0.03, metadata={"help": "InfoNCE temperature."})
    contrastive_batch_size: int = field(
        default=1024, metadata={"help": "Candidates each anchor is scored against, whatever the GPU count."}
    )
    mini_batch_size: int = field(default=32, metadata={"help": "Examples encoded at once (memory, not the loss)."})
    learning_rate: float = 4.0e-4
    num_train_epochs: float = 2.0
    warmup_steps: int = 100
    max_text_tokens: int = 650
    image_max_side: int = field(default=700, metadata={"help": "Images are thumbnailed to fit this square, in pixels."})
    resume: bool = False
    overwrite: bool = False

    def validate(self) -> None:
        check_model_source(self.model_name_or_path, "--model_name_or_path")
        if not self.train_files and not self.pages_datasets:
            raise UsageError("no training data: give --train_files (JSONL pairs) and/or --pages_datasets.")
        check_input_paths([*self.train_files, *self.pages_datasets], "--train_files/--pages_datasets")
        if not 0.0 <= self.multimodal_fraction <= 1.0:
            raise UsageError(f"--multimodal_fraction must be in [0, 1], got {self.multimodal_fraction}.")
        if self.temperature <= 0:
            raise UsageError(f"--temperature must be positive, got {self.temperature}.")
        if self.contrastive_batch_size < 2 or self.mini_batch_size < 1:
            raise UsageError("--contrastive_batch_size must be >= 2 and --mini_batch_size >= 1.")
        if self.output_dir is None:
            raise UsageError("--output_dir is not set (recipe `contrast.output_dir` or the flag).")
        check_output_dir(self.output_dir, resume=self.resume, overwrite=self.overwrite)


def main(argv: list[str] | None = None) -> None:
    parse_stage_arguments("contrast", (ContrastArguments,), argv)
    exit_not_built("stages.contrast (contrastive refinement)", issue=5)


if __name__ == "__main__":
    run_cli(main)
