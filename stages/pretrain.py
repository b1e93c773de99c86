"""Continual generative pretraining of a VLM on page images (page image -> its text), with TRL's SFTTrainer.

    python -m stages.pretrain --config recipes/km.yaml
    python -m stages.pretrain --config recipes/tiny.yaml --output_dir checkpoints/tiny/pretrain --max_steps 20
    accelerate launch --config_file recipes/accelerate/zero2.yaml -m stages.pretrain --config recipes/km.yaml
    torchrun --nproc_per_node 8 -m stages.pretrain --config recipes/km.yaml --deepspeed recipes/deepspeed/zero3.json

Reads pages datasets written by `python -m data_prep pages`; every field of TRL's `SFTConfig` can be set
in the recipe's `pretrain` section or as a flag. Writes `<output_dir>/checkpoint-*`, `<output_dir>/final/`
(a complete model folder; LoRA merged, the adapter kept in `<output_dir>/adapter/`) and a run record
with the held-out transcription CER and eval loss at the start, at each evaluation and at the end.
"""

import json
import logging
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from data_prep.pages import read_pages_manifest

from .artifacts import atomic_directory, check_input_paths, check_model_source, check_output_dir, finished_checkpoints
from .errors import UsageError, run_cli
from .lora import lora_config, save_merged
from .recipe import parse_stage_arguments, recipe_section
from .run_record import RUN_RECORD, read_run_record, write_run_record

logger = logging.getLogger(__name__)
# on the CPU: no bf16, and without use_cpu several processes may silently not synchronise
CPU_DEFAULTS = {"use_cpu": True, "bf16": False}


@dataclass
class PretrainArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Base VLM: a local model folder (e.g. checkpoints/tiny/base) or a hub id."}
    )
    datasets: list[str] = field(
        default_factory=list, metadata={"help": "Pages datasets written by `python -m data_prep pages`."}
    )
    tuning: Literal["full", "lora"] = field(default="full", metadata={"help": "Full fine-tuning or LoRA."})
    freeze_vision: bool = field(default=True, metadata={"help": "Freeze the vision tower and merger."})
    lora_r: int = 64
    lora_alpha: int = 128
    lora_dropout: float = 0.05
    max_pixels: int = field(default=1003520, metadata={"help": "Image pixel budget per page (1280*28*28)."})
    text_only_fraction: float = field(
        default=0.0, metadata={"help": "Share of training examples that are text-only continuations of page text."}
    )
    eval_fraction: float = field(default=0.05, metadata={"help": "Share of documents held out (never trained on)."})
    cer_pages: int = field(default=16, metadata={"help": "Held-out pages transcribed greedily for the CER."})
    resume: bool = field(default=False, metadata={"help": "Continue from the last checkpoint in --output_dir."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing --output_dir."})

    def validate(self) -> None:
        check_model_source(self.model_name_or_path, "--model_name_or_path")
        if not self.datasets:
            raise UsageError("--datasets is empty; give pages datasets written by `python -m data_prep pages`.")
        check_input_paths(self.datasets, "--datasets")
        for name in ("text_only_fraction", "eval_fraction"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise UsageError(f"--{name} must be in [0, 1), got {getattr(self, name)}.")


def validate_run(args: PretrainArguments, training, lang: str) -> None:
    """Checks that need the recipe's language and the trainer settings too."""
    for dataset in args.datasets:
        dataset_lang = read_pages_manifest(dataset, "--datasets").get("lang")
        if lang != "multi" and dataset_lang != lang:
            raise UsageError(f"--datasets {dataset} holds `{dataset_lang}` pages but the recipe's language is `{lang}`.")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if training.per_device_train_batch_size < 1 or training.gradient_accumulation_steps < 1:
        raise UsageError("per_device_train_batch_size and gradient_accumulation_steps must be at least 1.")
    logger.info(
        "global batch: %d per device x %d accumulation x %d processes = %d pages per step",
        training.per_device_train_batch_size, training.gradient_accumulation_steps, world_size,
        training.per_device_train_batch_size * training.gradient_accumulation_steps * world_size,
    )
    if args.text_only_fraction > 0 and deepspeed_stage(training.deepspeed) == 3:
        raise UsageError(
            "--text_only_fraction > 0 with ZeRO-3: ranks whose batch has no image while another's has one hang; "
            "use recipes/deepspeed/zero2.json, or set text_only_fraction to 0."
        )
    if training.max_length is None or training.max_length < 64:
        raise UsageError(f"--max_length must be set, and at least 64 tokens (image tokens included); got {training.max_length}.")
    if training.output_dir is None or training.output_dir == "trainer_output":
        raise UsageError("--output_dir is not set (recipe `pretrain.output_dir` or the flag).")
    check_output_dir(training.output_dir, resume=args.resume, overwrite=args.overwrite)


def prepare_output_dir(args: PretrainArguments, training) -> str | None:
    """The checkpoint to resume from (`--resume`), after clearing an earlier run (`--overwrite`)."""
    output_dir = Path(training.output_dir)
    if args.overwrite and output_dir.exists():
        with training.main_process_first():
            if training.process_index == 0:
                shutil.rmtree(output_dir)  # old checkpoint-* folders would otherwise be mixed with the new ones
    if not args.resume:
        return None
    finished = finished_checkpoints(output_dir, RUN_RECORD)  # a checkpoint gets its run record last
    if not finished:
        raise UsageError(
            f"--resume: {output_dir} holds no finished checkpoint-* folder to continue from; "
            "run again with --overwrite to start over."
        )
    return str(finished[-1])


def deepspeed_stage(config) -> int | None:
    if not config:
        return None
    if isinstance(config, str):
        config = json.loads(Path(config).read_text(encoding="utf-8"))
    return config.get("zero_optimization", {}).get("stage")


def load_examples(args: PretrainArguments, processor, max_length: int, seed: int):
    """(train, held_out) datasets of prompt/completion examples; held-out pages are whole documents."""
    import datasets

    from .pretrain_data import continuation_example, held_out_documents, page_example

    pages = datasets.concatenate_datasets([datasets.load_from_disk(path) for path in args.datasets])
    held_out = held_out_documents(pages["doc_id"], args.eval_fraction, seed)
    examples = pages.map(
        lambda row: page_example(row, processor, max_length=max_length, max_pixels=args.max_pixels, seed=seed),
        remove_columns=pages.column_names,
        keep_in_memory=True,  # no cache files written into the input datasets' folders
        features=datasets.Features(
            images=datasets.Sequence(datasets.Image()),
            prompt=[{"role": datasets.Value("string"), "content": [{"type": datasets.Value("string"), "text": datasets.Value("string")}]}],
            completion=[{"role": datasets.Value("string"), "content": [{"type": datasets.Value("string"), "text": datasets.Value("string")}]}],
            doc_id=datasets.Value("string"), page=datasets.Value("int32"),
            image_tokens=datasets.Value("int32"), truncated=datasets.Value("bool"),
        ),
        desc="pages to examples",
    )
    is_held_out = [doc_id in held_out for doc_id in examples["doc_id"]]
    train = examples.select([i for i, out in enumerate(is_held_out) if not out])
    evaluation = examples.select([i for i, out in enumerate(is_held_out) if out])
    if args.text_only_fraction > 0:
        # text-only continuations of training pages, making up `text_only_fraction` of the training examples
        train_pages = [i for i, out in enumerate(is_held_out) if not out]
        count = round(args.text_only_fraction / (1 - args.text_only_fraction) * len(train_pages))
        chosen = sorted(random.Random(seed).choices(train_pages, k=count))
        continuations = pages.select(chosen).map(
            lambda row: continuation_example(row, processor, max_length=max_length),
            remove_columns=pages.column_names, features=examples.features, desc="text-only examples", keep_in_memory=True,
        )
        train = datasets.concatenate_datasets([train, continuations])
    counts = {
        "train_pages": sum(not out for out in is_held_out),
        "text_only": len(train) - sum(not out for out in is_held_out),
        "held_out_pages": len(evaluation),
        "held_out_documents": len(held_out),
        "truncated_pages": sum(examples["truncated"]),
    }
    logger.info("examples: %s (max_length=%d)", counts, max_length)
    return train, evaluation, counts


def load_model(args: PretrainArguments, training, checkpoint: str | None):
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from transformers.integrations import is_deepspeed_zero3_enabled

    dtype = torch.bfloat16 if training.bf16 else torch.float32
    # Resuming full fine-tuning: the weights come from the checkpoint through from_pretrained, which maps
    # the checkpoint's saved key names; the Trainer's own resume loads them with strict=False under the
    # in-memory names, matches none for Qwen2.5-VL in transformers 5.24, and silently keeps the base weights
    weights = checkpoint if checkpoint and args.tuning == "full" else args.model_name_or_path
    model = AutoModelForImageTextToText.from_pretrained(weights, dtype=dtype)
    if is_deepspeed_zero3_enabled():
        # transformers 5.24's ZeRO-3 loader keeps every known key conversion, used or not, and saving reverses
        # them all (model.layers -> model.model.layers); keep the used ones, as its plain loader does
        model._weight_conversions = [c for c in model._weight_conversions if c.was_used()]
    processor = AutoProcessor.from_pretrained(args.model_name_or_path)
    if args.freeze_vision:
        freeze(model.model.visual)
    peft_config = lora_config(args.lora_r, args.lora_alpha, args.lora_dropout) if args.tuning == "lora" else None
    return model, processor, peft_config


def freeze(module) -> None:
    """Freeze `module` and run its forward without autograd. Frozen weights alone do not spare its backward:
    activation checkpointing makes every input embedding's output require grad, the vision tower's patch
    embedding included, so autograd would still back-propagate through the whole tower (and recompute it)."""
    import torch

    module.requires_grad_(False)
    module.forward = torch.no_grad()(module.forward)


def weight_names(folder: Path) -> set[str]:
    from safetensors import safe_open

    names = set()
    for path in folder.glob("*.safetensors"):
        with safe_open(path, framework="pt") as weights:
            names.update(weights.keys())
    return names


def check_weight_names(base: Path, final: Path) -> None:
    """Refuse a `final/` whose weights are saved under other names than the base model's: from_pretrained
    would skip them silently and start from random weights (seen with ZeRO-3 before `load_model`'s fix)."""
    expected = weight_names(base) if base.is_dir() else set()
    saved = weight_names(final)
    if expected and saved != expected:
        odd = sorted(saved - expected)[:3]
        raise RuntimeError(
            f"the trained weights were saved under names the model does not load (e.g. {odd}); final/ not written. "
            "Report it with the DeepSpeed config used; the checkpoint-* folders hold the trained state."
        )


def base_parent(args: PretrainArguments) -> str | None:
    """The base model as the parent run, when it was written by a stage of this project."""
    return args.model_name_or_path if (Path(args.model_name_or_path) / RUN_RECORD).is_file() else None


class CheckpointRecords(TrainerCallback):
    """A run record in each `checkpoint-*` folder, written after the Trainer has saved it, with the
    held-out CER and eval loss up to that step: the checkpoint is then a model a later stage can start
    from and chain to (the scaling analysis refines every one)."""

    def __init__(self, record: dict, parent: str | None, cer):
        self.record, self.parent, self.cer = record, parent, cer

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            results = {"steps": state.global_step, "generation_quality": list(self.cer.history)}
            write_run_record(folder, parent=self.parent, **{**self.record, "results": results})


def save_final(trainer, args: PretrainArguments, processor, output_dir: Path, record: dict) -> Path:
    """`final/`: a complete model folder (LoRA merged into the base weights; the adapter kept beside it)."""
    import contextlib

    from transformers.integrations import is_deepspeed_zero3_enabled

    final = output_dir / "final"
    if args.tuning == "lora":
        trainer.save_model(str(output_dir / "adapter"))
    else:
        # the model's own save_pretrained, on whole weights (gathered from the ZeRO-3 shards)
        model = trainer.accelerator.unwrap_model(trainer.model)
        gathered = contextlib.nullcontext()
        if is_deepspeed_zero3_enabled():
            import deepspeed

            gathered = deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)
        with gathered:
            if trainer.accelerator.is_main_process:
                model.save_pretrained(output_dir / ".final-weights")
    trainer.accelerator.wait_for_everyone()
    if trainer.accelerator.is_main_process:
        with atomic_directory(final) as tmp:
            if args.tuning == "lora":
                # merged from the saved adapter onto freshly loaded base weights: works whatever the ZeRO stage
                save_merged(args.model_name_or_path, output_dir / "adapter", tmp)
            else:
                for path in (output_dir / ".final-weights").iterdir():
                    path.rename(tmp / path.name)
                (output_dir / ".final-weights").rmdir()
            check_weight_names(Path(args.model_name_or_path), tmp)
            processor.save_pretrained(tmp)
            write_run_record(tmp, parent=base_parent(args), **record)
    trainer.accelerator.wait_for_everyone()
    return final


def main(argv: list[str] | None = None) -> None:
    import torch
    import transformers
    from trl import SFTConfig, SFTTrainer

    recipe_args, args, training = parse_stage_arguments(
        "pretrain", (PretrainArguments, SFTConfig), argv, machine_defaults=None if torch.cuda.is_available() else CPU_DEFAULTS
    )
    if not training.deepspeed:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        # an earlier DeepSpeed run in this process (the pipeline, tests) leaves its config registered
        # while it lives, and from_pretrained would then partition the weights as under ZeRO-3
        unset_hf_deepspeed_config()
    validate_run(args, training, recipe_args.lang)

    from .generation_eval import TranscriptionCER
    from .throughput import Throughput

    logging.basicConfig(level=logging.INFO if training.process_index == 0 else logging.WARNING, format="%(message)s")
    training.remove_unused_columns = False  # the collator needs `images`, `prompt`, `completion`
    if training.include_num_input_tokens_seen == "no":
        training.include_num_input_tokens_seen = "non_padding"  # for the tokens/s in the run record
    # the starting point of the CER curve; evaluated by the Trainer once DeepSpeed is set up for training
    # (an evaluate() before train() would ask ZeRO-2 for inference, which only ZeRO-3 supports)
    # (on --resume, the curve so far comes from the checkpoint's run record)
    training.eval_on_start = (training.eval_on_start or args.eval_fraction > 0) and not args.resume
    checkpoint = prepare_output_dir(args, training)
    if training.deepspeed and not torch.cuda.is_available():
        import deepspeed

        # ZeRO-3 partitions the weights while they load, so DeepSpeed's process group must exist first;
        # on the CPU the Trainer would not set it up before then
        deepspeed.init_distributed(dist_backend="gloo")
    # SFTTrainer draws the LoRA initialisation before the Trainer seeds anything
    transformers.set_seed(training.seed)
    model, processor, peft_config = load_model(args, training, checkpoint)
    train, held_out, example_counts = load_examples(args, processor, training.max_length, recipe_args.seed)
    cer = TranscriptionCER(processor, held_out.select(range(min(args.cer_pages, len(held_out)))))
    if checkpoint and (Path(checkpoint) / RUN_RECORD).is_file():  # the curve so far, for the records to come
        cer.history = read_run_record(checkpoint, expected_stage="pretrain")["results"]["generation_quality"]
    throughput = Throughput()
    record = dict(
        stage="pretrain",
        config={"recipe": vars(recipe_args), "recipe_section": recipe_section(recipe_args.config, "pretrain"),
                "pretrain": asdict(args), "sft": training.to_dict()},
        seed=recipe_args.seed,
        inputs=[*([recipe_args.config] if recipe_args.config else []), *(Path(path) / "manifest.json" for path in args.datasets)],
    )
    trainer = SFTTrainer(
        model=model, args=training, train_dataset=train, eval_dataset=held_out if len(held_out) else None,
        processing_class=processor, peft_config=peft_config,
        callbacks=[cer, throughput, CheckpointRecords(record, base_parent(args), cer)],
    )

    started = time.monotonic()
    result = trainer.train(resume_from_checkpoint=checkpoint)
    if len(held_out) and (not cer.history or cer.history[-1]["step"] != trainer.state.global_step):
        trainer.evaluate()
    record["results"] = {
        "examples": example_counts,
        "train_loss": result.training_loss,
        "steps": result.global_step,
        "wall_time_s": round(time.monotonic() - started, 1),
        "throughput": throughput.summary(),
        "generation_quality": cer.history,
        "loss_history": [entry for entry in trainer.state.log_history if "loss" in entry],
    }
    final = save_final(trainer, args, processor, Path(training.output_dir), record)
    if trainer.accelerator.is_main_process and cer.history:
        first, last = cer.history[0], cer.history[-1]
        print(
            f"pretrain: {result.global_step} steps in {record['results']['wall_time_s']}s; held-out CER "
            f"{first['cer']:.3f} -> {last['cer']:.3f}, eval loss {first['eval_loss']:.3f} -> {last['eval_loss']:.3f}; "
            f"model in {final}"
        )
    if trainer.accelerator.is_main_process:
        print(f"pretrain: throughput {json.dumps(record['results']['throughput'])}")


if __name__ == "__main__":
    run_cli(main)
