"""Continual generative pretraining of a VLM on page images (page image -> its text), with TRL's SFTTrainer.

    python -m stages.pretrain --config recipes/km.yaml
    python -m stages.pretrain --config recipes/tiny.yaml --output_dir checkpoints/tiny/pretrain --max_steps 20
    accelerate launch --config_file recipes/accelerate/zero2.yaml -m stages.pretrain --config recipes/km.yaml
    torchrun --nproc_per_node 8 -m stages.pretrain --config recipes/km.yaml --deepspeed recipes/deepspeed/zero3.json

Reads pages datasets written by `python -m data_prep pages`; every field of TRL's `SFTConfig` can be set
in the recipe's `pretrain` section or as a flag; `padding_free: true` packs each micro-batch's pages into
one row without attention across them (lco/packing.py; the Qwen families). Writes `<output_dir>/checkpoint-*`,
`<output_dir>/final/` (a complete model folder; LoRA merged, the adapter kept in `<output_dir>/adapter/`) and a run
record with the held-out transcription CER and eval loss at the start, at each evaluation and at the end.
"""

import functools
import json
import logging
import os
import random
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from common.artifacts import (
    atomic_directory,
    check_input_paths,
    check_model_source,
    check_output_dir,
    finished_checkpoints,
    staged_output,
)
from common.errors import UsageError, run_cli
from common.output import dataset_progress, set_up_output
from common.recipe import parse_stage_arguments
from common.run_record import RUN_RECORD, parent_run, read_run_record, stage_record, write_run_record
from data_prep.pages import read_pages_manifest
from lco.distributed import deepspeed_stage, local_world_size, world_size
from lco.engine import check_engine, describe_engine, engine_record, prepare_deepspeed
from lco.families import check_packs, check_reads, model_type_in, towers
from lco.lora import lora_config, save_merged

logger = logging.getLogger(__name__)
# on the CPU: no bf16, and without use_cpu several processes may silently not synchronise
CPU_DEFAULTS = {"use_cpu": True, "bf16": False}


def deepspeed_requested(argv: list[str] | None) -> bool:
    """Whether the flags or the recipe's `pretrain` section name a DeepSpeed config: known before the arguments are
    parsed, since parsing them sets up the devices and the process group."""
    from common.recipe import _find_recipe, load_recipe

    given = argv if argv is not None else sys.argv[1:]
    if any(arg == "--deepspeed" or arg.startswith("--deepspeed=") for arg in given):
        return True
    recipe = _find_recipe(argv)
    return recipe is not None and bool((load_recipe(recipe).get("pretrain") or {}).get("deepspeed"))


def cpu_deepspeed_defaults() -> dict:
    """Machine defaults for DeepSpeed without a GPU, with Accelerate's state set up first. Not `use_cpu`: it sets up
    Accelerate for plain CPU training (an `Accelerator(cpu=True)` drops a DeepSpeed plugin). And Accelerate finds no
    process-group backend on the CPU, so it would report one process on every rank; with gloo named it reads rank and
    world size from torch.distributed, and the Trainer is told to use that state."""
    from accelerate import PartialState
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # as the Trainer does: an earlier run's state goes
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"  # what the Trainer sets while it sets up its state
    PartialState(backend="gloo")
    return {"bf16": False, "accelerator_config": {"use_configured_state": True}}


def gpu_defaults() -> dict:
    """Batches collated (images processed, text tokenised) in worker processes, a few per GPU, while the GPU trains."""
    cpus_per_process = (os.cpu_count() or 1) // max(1, local_world_size())
    # not persistent: with them a recipe setting `dataloader_num_workers: 0` would fail in torch's DataLoader
    return {"dataloader_num_workers": max(1, min(4, cpus_per_process - 1))}


# the Trainer's settings that the stage's `checkpointing` decides
CHECKPOINTING_FIELDS = ("gradient_checkpointing", "activation_checkpointing")


@dataclass
class PretrainArguments:
    # the values each numeric field can take (common.recipe.check_ranges, before anything loads)
    RANGES: ClassVar[dict[str, str]] = {
        "lora_r": "[1, inf)",
        "lora_alpha": "[1, inf)",
        "lora_dropout": "[0, 1)",
        "max_pixels": "[1, inf)",
        "text_only_fraction": "[0, 1)",
        "eval_fraction": "[0, 1)",
        "cer_pages": "[0, inf)",
        "cer_batch_size": "[1, inf)",
        "cer_time_budget_s": "[0, inf)",
    }

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Base VLM: a local model folder (e.g. checkpoints/tiny/base) or a hub id."}
    )
    datasets: list[str] = field(
        default_factory=list, metadata={"help": "Pages datasets written by `python -m data_prep pages`."}
    )
    tuning: Literal["full", "lora"] = field(default="full", metadata={"help": "Full fine-tuning or LoRA."})
    freeze_vision: bool = field(
        default=True, metadata={"help": "Freeze the modules that read images (the family's, lco/families.py)."}
    )
    lora_r: int = field(default=64, metadata={"help": "--tuning lora: rank of the adapters."})
    lora_alpha: int = field(default=128, metadata={"help": "--tuning lora: scale of the adapters (alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "--tuning lora: dropout on the adapters' input."})
    max_pixels: int = field(default=1003520, metadata={"help": "Image pixel budget per page (1280*28*28)."})
    text_only_fraction: float = field(
        default=0.0, metadata={"help": "Share of training examples that are text-only continuations of page text."}
    )
    eval_fraction: float = field(default=0.05, metadata={"help": "Share of documents held out (never trained on)."})
    exclude_evalsets: list[str] = field(
        default_factory=list,
        metadata={"help": "Eval sets (`data_prep evalset` folders) whose documents are left out of training."},
    )
    checkpointing: str = field(
        default="auto",
        metadata={
            "help": "Activation checkpointing: auto (none when the step's estimated peak memory fits the device, else "
            "every 4th, 3rd or 2nd layer, or all; lco/memory.py), none, all, or every_N (every N-th layer)."
        },
    )
    cer_pages: int = field(
        default=16, metadata={"help": "Held-out pages transcribed greedily for the CER (drawn across documents)."}
    )
    cer_batch_size: int = field(default=8, metadata={"help": "Held-out pages transcribed at once (GPU memory)."})
    cer_time_budget_s: float = field(
        default=300.0,
        metadata={
            "help": "Seconds one CER measurement may take (0: no bound); pages past it are left out of the CER, and "
            "the run record counts them."
        },
    )
    resume: bool = field(default=False, metadata={"help": "Continue from the last checkpoint in --output_dir."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing --output_dir."})

    def validate(self) -> None:
        check_model_source(self.model_name_or_path, "--model_name_or_path")
        if not self.datasets:
            raise UsageError("--datasets is empty; give pages datasets written by `python -m data_prep pages`.")
        check_input_paths(self.datasets, "--datasets")
        check_input_paths(self.exclude_evalsets, "--exclude_evalsets")
        if not re.fullmatch(r"auto|none|all|every_[1-9]\d*", self.checkpointing):
            raise UsageError(
                f"--checkpointing must be auto, none, all or every_N (e.g. every_2); got {self.checkpointing!r}."
            )


def validate_run(args: PretrainArguments, training, lang: str) -> None:
    """Checks that need the recipe's language and the trainer settings too."""
    from transformers import AutoProcessor

    check_reads(args.model_name_or_path, {"image"})  # a supported family, before the weights are loaded
    if training.padding_free:
        check_packs(model_type_in(args.model_name_or_path))
    for dataset in args.datasets:
        dataset_lang = read_pages_manifest(dataset, "--datasets").get("lang")
        if lang != "multi" and dataset_lang != lang:
            raise UsageError(
                f"--datasets {dataset} holds `{dataset_lang}` pages but the recipe's language is `{lang}`."
            )
    if training.per_device_train_batch_size < 1 or training.gradient_accumulation_steps < 1:
        raise UsageError("per_device_train_batch_size and gradient_accumulation_steps must be at least 1.")
    logger.info(
        "global batch: %d per device x %d accumulation x %d processes = %d pages per step",
        training.per_device_train_batch_size,
        training.gradient_accumulation_steps,
        world_size(),
        training.per_device_train_batch_size * training.gradient_accumulation_steps * world_size(),
    )
    if args.text_only_fraction > 0 and deepspeed_stage(training.deepspeed) == 3:
        raise UsageError(
            "--text_only_fraction > 0 with ZeRO-3: ranks whose batch has no image while another's has one hang; "
            "use recipes/deepspeed/zero2.json, or set text_only_fraction to 0."
        )
    if training.max_length is None:
        raise UsageError("--max_length must be set (tokens per example, image tokens included).")
    if model_type_in(args.model_name_or_path):  # a model folder; a hub id is checked when its processor loads
        check_max_length(AutoProcessor.from_pretrained(args.model_name_or_path), training.max_length)
    if training.output_dir is None or training.output_dir == "trainer_output":
        raise UsageError("--output_dir is not set (recipe `pretrain.output_dir` or the flag).")
    check_output_dir(training.output_dir, resume=args.resume, overwrite=args.overwrite)


def check_max_length(processor, max_length: int) -> None:
    from lco.pretrain_data import smallest_max_length

    smallest = smallest_max_length(processor)
    if max_length < smallest:
        raise UsageError(
            f"--max_length {max_length} leaves no room for a page: this model's prompt, its smallest page image "
            f"and some text need at least {smallest} tokens; set --max_length {smallest} or more."
        )


def resume_checkpoint(args: PretrainArguments, training) -> str | None:
    """The checkpoint to continue from with `--resume`: the newest finished one."""
    output_dir = Path(training.output_dir)
    if not args.resume:
        return None
    finished = finished_checkpoints(output_dir, RUN_RECORD)  # a checkpoint gets its run record last
    if not finished:
        raise UsageError(
            f"--resume: {output_dir} holds no finished checkpoint-* folder to continue from; "
            "run again with --overwrite to start over."
        )
    return str(finished[-1])


def load_examples(args: PretrainArguments, processor, max_length: int, seed: int, cache_dir: Path | None = None):
    """(train, held_out) datasets of prompt/completion examples; held-out pages are whole documents. In a process
    group, rank 0 alone makes the examples (an image re-encoded per page), into `cache_dir`, and the others read
    them from there; one process keeps them in memory."""
    import datasets

    from lco.distributed import main_process_first, process_group
    from lco.pretrain_data import continuation_example, evaluated_in, held_out_documents, page_example

    pages = datasets.concatenate_datasets([datasets.load_from_disk(path) for path in args.datasets])
    excluded = evaluated_in(args.datasets, args.exclude_evalsets)
    all_pages = len(pages)
    if excluded:
        pages = pages.filter(lambda doc_id: doc_id not in excluded, input_columns="doc_id", keep_in_memory=True)
    if not len(pages):
        raise UsageError(
            f"every page of --datasets belongs to a document of --exclude_evalsets {' '.join(args.exclude_evalsets)}; "
            "train on other documents than the ones you evaluate on."
        )
    held_out = held_out_documents(pages["doc_id"], args.eval_fraction, seed)
    world, rank = process_group()
    cache = cache_dir and world > 1 and Path(cache_dir) / "examples.arrow"
    map_pages = functools.partial(
        pages.map,
        lambda row: page_example(row, processor, max_length=max_length, max_pixels=args.max_pixels, seed=seed),
        remove_columns=pages.column_names,
        features=datasets.Features(
            images=datasets.Sequence(datasets.Image()),
            prompt=[
                {
                    "role": datasets.Value("string"),
                    "content": [{"type": datasets.Value("string"), "text": datasets.Value("string")}],
                }
            ],
            completion=[
                {
                    "role": datasets.Value("string"),
                    "content": [{"type": datasets.Value("string"), "text": datasets.Value("string")}],
                }
            ],
            doc_id=datasets.Value("string"),
            page=datasets.Value("int32"),
            image_tokens=datasets.Value("int32"),
            truncated=datasets.Value("bool"),
        ),
        desc="pages to examples",
    )
    if not cache:
        examples = map_pages(keep_in_memory=True)  # no cache files written into the input datasets' folders
    else:
        with main_process_first():
            if rank == 0:  # made anew, never an earlier run's file (--resume, other settings)
                cache.parent.mkdir(parents=True, exist_ok=True)
                examples = map_pages(cache_file_name=str(cache), load_from_cache_file=False)
            else:
                examples = datasets.Dataset.from_file(str(cache))
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
            remove_columns=pages.column_names,
            features=examples.features,
            desc="text-only examples",
            keep_in_memory=True,
        )
        train = datasets.concatenate_datasets([train, continuations])
    counts = {
        "train_pages": sum(not out for out in is_held_out),
        "text_only": len(train) - sum(not out for out in is_held_out),
        "held_out_pages": len(evaluation),
        "held_out_documents": len(held_out),
        "truncated_pages": sum(examples["truncated"]),
        "excluded_documents": len(excluded),  # covered by --exclude_evalsets
        "excluded_pages": all_pages - len(pages),
    }
    logger.info("examples: %s (max_length=%d)", counts, max_length)
    return train, evaluation, counts


def load_model(args: PretrainArguments, training, checkpoint: str | None):
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from transformers.integrations import is_deepspeed_zero3_enabled

    # Trained weights stay fp32 (master weights) under bf16: bf16 autocast computes in bf16, DeepSpeed's bf16 mode
    # keeps its own fp32 copies; an AdamW step on bf16 weights loses every update under 2^-8 of a weight (lr 1e-5
    # full fine-tuning would learn almost nothing). LoRA's frozen base stays bf16 (PEFT keeps the adapters fp32).
    dtype = torch.bfloat16 if training.bf16 and args.tuning == "lora" else torch.float32
    # Resuming full fine-tuning: the weights come from the checkpoint through from_pretrained, which maps
    # the checkpoint's saved key names; the Trainer's own resume loads them with strict=False under the
    # in-memory names, matches none for Qwen2.5-VL in transformers 5.24, and silently keeps the base weights
    weights = checkpoint if checkpoint and args.tuning == "full" else args.model_name_or_path
    processor = AutoProcessor.from_pretrained(args.model_name_or_path)
    check_max_length(processor, training.max_length)  # before the weights load
    model = AutoModelForImageTextToText.from_pretrained(weights, dtype=dtype)
    if is_deepspeed_zero3_enabled():
        # transformers 5.24's ZeRO-3 loader keeps every known key conversion, used or not, and saving reverses
        # them all (model.layers -> model.model.layers); keep the used ones, as its plain loader does
        model._weight_conversions = [c for c in model._weight_conversions if c.was_used()]
    if args.freeze_vision:
        for tower in towers(model):
            freeze(tower)
    lora = args.tuning == "lora"
    peft_config = lora_config(model.config, args.lora_r, args.lora_alpha, args.lora_dropout) if lora else None
    return model, processor, peft_config


def set_checkpointing(args: PretrainArguments, training, model) -> dict:
    """Decide activation checkpointing (`--checkpointing`; with auto, from the step's estimated peak memory against
    the device's) and set it in the Trainer's arguments. Returns the decision and its figures, for the run record."""
    from lco.memory import device_memory_bytes, estimate_memory, plan

    if args.checkpointing == "auto":
        tokens = training.per_device_train_batch_size * training.max_length  # the longest micro-batch
        lora_r = args.lora_r if args.tuning == "lora" else None
        estimate = estimate_memory(
            model,
            tokens,
            lora_r,
            deepspeed_stage(training.deepspeed),
            world_size(),
            sequence=training.max_length,
            max_pixels=args.max_pixels,
            deepspeed=training.deepspeed,
            optim=getattr(training.optim, "value", training.optim),
        )
        decided = plan(estimate, device_memory_bytes())
    elif args.checkpointing in ("none", "all"):
        decided = {"every_n_layers": 0 if args.checkpointing == "none" else 1}
    else:
        decided = {"every_n_layers": int(args.checkpointing.removeprefix("every_"))}
    every_n_layers = decided["every_n_layers"]
    kwargs = dict(training.activation_checkpointing_kwargs or {})  # the user's (e.g. use_reentrant) are kept
    kwargs.pop("every_n_layers", None)
    if every_n_layers > 1:
        kwargs["every_n_layers"] = every_n_layers
    # both names: TRL reads the deprecated one, the Trainer the new one
    training.activation_checkpointing = training.gradient_checkpointing = every_n_layers > 0
    training.activation_checkpointing_kwargs = training.gradient_checkpointing_kwargs = kwargs or None
    logger.info("activation checkpointing (%s): %s", args.checkpointing, decided)
    return {"setting": args.checkpointing, **decided}


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
    """`final/`: a complete model folder in the base model's dtype (LoRA merged into the base weights; the adapter
    kept beside it)."""
    import contextlib

    from transformers import AutoConfig
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
        else:
            # final/ in the base model's dtype (a bf16 checkpoint stays bf16, the size users expect): the fp32
            # master weights rounded once, at the end (ZeRO-3's gathered weights are in DeepSpeed's compute dtype)
            model.to(AutoConfig.from_pretrained(args.model_name_or_path).dtype or model.dtype)
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
            write_run_record(tmp, parent=parent_run(args.model_name_or_path), **record)
    trainer.accelerator.wait_for_everyone()
    return final


def main(argv: list[str] | None = None) -> None:
    import torch
    from trl import SFTConfig

    machine_defaults = gpu_defaults() if torch.cuda.is_available() else CPU_DEFAULTS
    if deepspeed_requested(argv):
        prepare_deepspeed()
        if not torch.cuda.is_available():
            machine_defaults = cpu_deepspeed_defaults()
    recipe_args, args, training = parse_stage_arguments(
        "pretrain",
        (PretrainArguments, SFTConfig),
        argv,
        machine_defaults=machine_defaults,
        replaced={name: "checkpointing" for name in CHECKPOINTING_FIELDS},
    )
    if training.deepspeed and training.use_cpu:
        raise UsageError(
            "--deepspeed with use_cpu: DeepSpeed runs on the CPU through its own CPU accelerator; remove use_cpu."
        )
    if not training.deepspeed:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        # an earlier DeepSpeed run in this process (the pipeline, tests) leaves its config registered
        # while it lives, and from_pretrained would then partition the weights as under ZeRO-3
        unset_hf_deepspeed_config()
    validate_run(args, training, recipe_args.lang)

    set_up_output(recipe_args.verbose)
    training.remove_unused_columns = False  # the collator needs `images`, `prompt`, `completion`
    if training.dataloader_num_workers:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the collating workers are forked after tokenising
    if training.include_num_input_tokens_seen == "no":
        training.include_num_input_tokens_seen = "non_padding"  # for the tokens/s in the run record
    # the starting point of the CER curve; evaluated by the Trainer once DeepSpeed is set up for training
    # (an evaluate() before train() would ask ZeRO-2 for inference, which only ZeRO-3 supports)
    # (on --resume, the curve so far comes from the checkpoint's run record)
    training.eval_on_start = (training.eval_on_start or args.eval_fraction > 0) and not args.resume
    checkpoint = resume_checkpoint(args, training)
    record = stage_record(
        "pretrain",
        recipe_args,
        {"pretrain": asdict(args), "sft": training.to_dict()},
        [
            *(Path(path) / "manifest.json" for path in args.datasets),
            *(Path(path) / "evalset.json" for path in args.exclude_evalsets),
        ],
    )
    # --overwrite: the new run is written beside the earlier one, which it replaces only once complete
    output_dir = training.output_dir
    with staged_output(output_dir, overwrite=args.overwrite, is_main=training.process_index == 0) as staging:
        training.output_dir = str(staging)
        results = train_and_save(args, training, recipe_args, checkpoint, record)
    if training.process_index == 0:
        print(summary(results, Path(output_dir) / "final"))
    training.distributed_state.destroy_process_group()  # as in stages.contrast: no group alive at exit


def train_and_save(args: PretrainArguments, training, recipe_args, checkpoint: str | None, record: dict) -> dict:
    """Load, train, evaluate and save `final/` under `training.output_dir`; return the run record's results."""
    import transformers

    from lco.generation_eval import TranscriptionCER, sample_across_documents
    from lco.packing import PackingSFTTrainer
    from lco.pretrain_data import document_sha256
    from lco.throughput import Throughput

    # SFTTrainer draws the LoRA initialisation before the Trainer seeds anything
    transformers.set_seed(training.seed)
    model, processor, peft_config = load_model(args, training, checkpoint)
    checkpointing = set_checkpointing(args, training, model)
    examples_cache = Path(training.output_dir) / ".examples"  # removed once the run is saved
    with dataset_progress():  # the stage's own step: pages tokenised into examples
        train, held_out, example_counts = load_examples(
            args, processor, training.max_length, recipe_args.seed, examples_cache
        )
    cer_sample = sample_across_documents(held_out["doc_id"], args.cer_pages, recipe_args.seed)
    cer = TranscriptionCER(processor, held_out.select(cer_sample), args.cer_batch_size, args.cer_time_budget_s)
    if checkpoint and (Path(checkpoint) / RUN_RECORD).is_file():  # the curve so far, for the records to come
        cer.history = read_run_record(checkpoint, expected_stage="pretrain")["results"]["generation_quality"]
    throughput = Throughput()
    # `padding_free`: a micro-batch's examples packed into one row (lco/packing.py), which TRL refuses for images
    trainer = PackingSFTTrainer(
        model=model,
        args=training,
        train_dataset=train,
        eval_dataset=held_out if len(held_out) else None,
        processing_class=processor,
        peft_config=peft_config,
        callbacks=[cer, throughput, CheckpointRecords(record, parent_run(args.model_name_or_path), cer)],
    )

    if training.deepspeed and not trainer.is_deepspeed_enabled:
        raise RuntimeError(f"--deepspeed {training.deepspeed} was given but the Trainer set up no DeepSpeed.")
    started = time.monotonic()
    result = trainer.train(resume_from_checkpoint=checkpoint)
    engine = engine_record(trainer.model_wrapped, trainer.optimizer, trainer.accelerator.mixed_precision == "bf16")
    check_engine(engine, training.deepspeed)
    if trainer.accelerator.is_main_process:
        print(f"pretrain: {describe_engine(engine)}")
    if len(held_out) and (not cer.history or cer.history[-1]["step"] != trainer.state.global_step):
        trainer.evaluate()
    record["results"] = {
        "examples": example_counts,
        # by content: `stages.evaluate` checks them against the documents of the eval sets it scores
        "training_documents": document_sha256(args.datasets, set(train["doc_id"])),
        "train_loss": result.training_loss,
        "steps": result.global_step,
        # where this run started and how many steps it trained itself: a resume that retrained from step 0 would
        # log the same losses
        "resumed_from": resumed_from(checkpoint),
        "steps_this_run": throughput.steps,
        "engine": engine,
        "wall_time_s": round(time.monotonic() - started, 1),
        "throughput": throughput.summary(),
        "checkpointing": checkpointing,
        "generation_quality": cer.history,
        "loss_history": [entry for entry in trainer.state.log_history if "loss" in entry],
    }
    save_final(trainer, args, processor, Path(training.output_dir), record)
    shutil.rmtree(examples_cache, ignore_errors=True)  # every process: after the final save's barrier
    return record["results"]


def resumed_from(checkpoint: str | None) -> dict | None:
    if checkpoint is None:
        return None
    name = Path(checkpoint).name
    return {"checkpoint": name, "step": int(name.removeprefix(f"{PREFIX_CHECKPOINT_DIR}-"))}


def summary(results: dict, final: Path) -> str:
    lines = [f"pretrain: throughput {json.dumps(results['throughput'])}"]
    if results["generation_quality"]:
        first, last = results["generation_quality"][0], results["generation_quality"][-1]
        lines.insert(
            0,
            f"pretrain: {results['steps']} steps in {results['wall_time_s']}s; held-out CER {first['cer']} -> "
            f"{last['cer']}, eval loss {first['eval_loss']:.3f} -> {last['eval_loss']:.3f}; model in {final}",
        )
    return "\n".join(lines)


if __name__ == "__main__":
    run_cli(main)
