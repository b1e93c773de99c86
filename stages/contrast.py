"""Language-centric contrastive refinement (LoRA, InfoNCE) that turns a VLM into an embedding model.

    python -m stages.contrast --config recipes/km.yaml
    python -m stages.contrast --config recipes/tiny.yaml --model_name_or_path checkpoints/tiny/base
    torchrun --nproc_per_node 8 -m stages.contrast --config recipes/km.yaml --deepspeed recipes/deepspeed/zero2.json

Trains LoRA adapters on the language model's linear layers with InfoNCE over in-batch positives (and
hard negatives) gathered from every process, computed in cached mini-batches: `contrastive_batch_size`
anchors per step, each scored against every positive (and negative) of the step, whatever the number
of processes and however small `mini_batch_size` must be to fit memory. Writes `<output_dir>/adapter/`,
`<output_dir>/final/` (LoRA merged into the base weights; a complete model folder) and a run record
with the loss history and the in-batch retrieval accuracy on held-out pairs.
"""

import contextlib
import json
import logging
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import ClassVar

from common.artifacts import (
    atomic_directory,
    check_input_paths,
    check_model_source,
    check_output_dir,
    finished_checkpoints,
    staged_output,
    write_text_atomic,
)
from common.errors import UsageError, run_cli
from common.output import set_up_output
from common.recipe import parse_stage_arguments
from common.run_record import RUN_RECORD, parent_run, read_run_record, stage_record, write_run_record
from lco.distributed import deepspeed_stage, join_process_group, process_device, rank, world_size
from lco.engine import check_engine, describe_engine, engine_record, prepare_deepspeed
from lco.families import check_reads

logger = logging.getLogger(__name__)
PROGRESS = "progress.json"  # in a checkpoint: where training was, and the curves so far


@dataclass
class ContrastArguments:
    # the values each numeric field can take (common.recipe.check_ranges, before anything loads)
    RANGES: ClassVar[dict[str, str]] = {
        "multimodal_fraction": "[0, 1]",
        "contrastive_batch_size": "[2, inf)",
        "mini_batch_size": "[1, inf)",
        "warmup_ratio": "[0, 1)",
        "eval_fraction": "[0, 1)",
        "lora_r": "[1, inf)",
        "lora_alpha": "[1, inf)",
        "lora_dropout": "[0, 1)",
        "temperature": "(0, inf)",
        "kept_graphs": "[0, inf)",
        "learning_rate": "(0, inf)",
        "num_train_epochs": "(0, inf)",
        "max_steps": "[0, inf)",
        "weight_decay": "[0, inf)",
        "max_text_tokens": "[1, inf)",
        "image_max_side": "[1, inf)",
        "passage_chars": "[1, inf)",
        "eval_steps": "[0, inf)",
        "logging_steps": "[1, inf)",
        "save_steps": "[0, inf)",
    }

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "A pretrain `final/` folder, or any compatible VLM (the no-CPT baseline)."}
    )
    train_files: list[str] = field(
        default_factory=list, metadata={"help": "Any-to-any JSONL pair files (anchor/positive/negative)."}
    )
    pages_datasets: list[str] = field(
        default_factory=list, metadata={"help": "Pages datasets to build multimodal pairs from."}
    )
    exclude_evalsets: list[str] = field(
        default_factory=list,
        metadata={"help": "Eval sets (`data_prep evalset` folders) whose documents no pair is built from."},
    )
    output_dir: str | None = field(
        default=None, metadata={"help": "Folder of the run: checkpoints, adapter/, final/ (required; no default)."}
    )
    multimodal_fraction: float = field(default=0.2, metadata={"help": "Share of page-image pairs; the rest is text."})
    lora_r: int = field(default=64, metadata={"help": "LoRA rank of the adapters on the language model."})
    lora_alpha: int = field(default=128, metadata={"help": "The reference uses 16 for text-only training."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA adapters' input."})
    temperature: float = field(default=0.03, metadata={"help": "InfoNCE temperature."})
    matryoshka_dims: list[int] = field(
        default_factory=list,
        metadata={
            "help": "Embedding sizes whose InfoNCE losses are summed (e.g. 256 128 64 with the full size first), "
            "so that truncated, re-normalised embeddings work (stages.index --dim); empty: the plain loss."
        },
    )
    contrastive_batch_size: int = field(
        default=1024, metadata={"help": "Candidates each anchor is scored against, whatever the GPU count."}
    )
    mini_batch_size: int = field(default=32, metadata={"help": "Examples encoded at once (memory, not the loss)."})
    kept_graphs: int = field(
        default=1,
        metadata={
            "help": "Mini-batches per step whose graph the cached loss keeps from its first pass instead of encoding "
            "them again: each saves a forward and holds a mini-batch's activations (1 costs no extra memory)."
        },
    )
    learning_rate: float = field(
        default=4.0e-4, metadata={"help": "Peak AdamW learning rate (linear decay after warm-up)."}
    )
    num_train_epochs: float = field(
        default=2.0, metadata={"help": "Passes over the training pairs (unless --max_steps)."}
    )
    max_steps: int = field(default=0, metadata={"help": "Optimizer steps; 0 = num_train_epochs over the pairs."})
    warmup_ratio: float = field(
        default=0.1, metadata={"help": "Share of the steps over which the learning rate rises linearly from 0."}
    )
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (the reference uses none)."})
    max_text_tokens: int = field(default=650, metadata={"help": "Texts are cut to this many tokens before encoding."})
    image_max_side: int = field(default=700, metadata={"help": "Images are thumbnailed to fit this square, in pixels."})
    passage_chars: int = field(default=400, metadata={"help": "Length of the passages cut from page text for pairs."})
    eval_fraction: float = field(default=0.05, metadata={"help": "Share of documents whose pairs are held out."})
    eval_steps: int = field(default=0, metadata={"help": "Held-out accuracy every N steps (0: at start and end only)."})
    logging_steps: int = field(default=10, metadata={"help": "Print the training loss every N steps."})
    save_steps: int = field(
        default=0,
        metadata={
            "help": "Save a checkpoint to continue from (LoRA, optimizer, scheduler, RNG) every N steps; 0: none."
        },
    )
    mine_hard_negatives: bool = field(
        default=False,
        metadata={
            "help": "Before training, give each pair as hard negative the positive of another document that the "
            "starting model finds most similar to its anchor."
        },
    )
    homogeneous_batches: bool = field(
        default=False, metadata={"help": "Each step all text or all multimodal (needed under ZeRO-3)."}
    )
    deepspeed: str | None = field(default=None, metadata={"help": "DeepSpeed JSON, e.g. recipes/deepspeed/zero2.json."})
    bf16: bool = field(default=True, metadata={"help": "bf16 weights and compute on a GPU (the CPU always uses fp32)."})
    resume: bool = field(default=False, metadata={"help": "Continue from the last checkpoint in --output_dir."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing --output_dir."})

    def validate(self) -> None:
        check_model_source(self.model_name_or_path, "--model_name_or_path")
        if any(dim < 1 for dim in self.matryoshka_dims) or len(set(self.matryoshka_dims)) < len(self.matryoshka_dims):
            raise UsageError(f"--matryoshka_dims must be distinct positive sizes, got {self.matryoshka_dims}.")
        from lco.embedder import embedding_size

        size = embedding_size(self.model_name_or_path) if self.matryoshka_dims else None
        if size and max(self.matryoshka_dims) > size:
            raise UsageError(
                f"--matryoshka_dims {self.matryoshka_dims}: the model's embeddings have {size} components; "
                f"use sizes up to {size}."
            )
        if not self.train_files and not self.pages_datasets:
            raise UsageError("no training data: give --train_files (JSONL pairs) and/or --pages_datasets.")
        check_input_paths([*self.train_files, *self.pages_datasets], "--train_files/--pages_datasets")
        check_input_paths(self.exclude_evalsets, "--exclude_evalsets")
        if self.contrastive_batch_size % world_size():
            raise UsageError(
                f"--contrastive_batch_size {self.contrastive_batch_size} does not split evenly over {world_size()} "
                "processes."
            )
        if self.deepspeed and not Path(self.deepspeed).is_file():
            raise UsageError(f"--deepspeed {self.deepspeed} not found; see recipes/deepspeed/.")
        if (
            self.deepspeed
            and deepspeed_stage(self.deepspeed) == 3
            and 0 < self.multimodal_fraction < 1
            and not self.homogeneous_batches
        ):
            raise UsageError(
                "ZeRO-3 with mixed text and image batches hangs (ranks disagree about running the vision tower); "
                "set --homogeneous_batches true, or use recipes/deepspeed/zero2.json."
            )
        if self.output_dir is None:
            raise UsageError("--output_dir is not set (recipe `contrast.output_dir` or the flag).")
        check_output_dir(self.output_dir, resume=self.resume, overwrite=self.overwrite)
        if self.resume and last_checkpoint(self.output_dir) is None:
            raise UsageError(
                f"--resume: {self.output_dir} holds no finished checkpoint-* folder to continue from; "
                "run again with --overwrite to start over."
            )

    def input_files(self) -> list[str]:
        """The files whose content the run depends on, hashed into its run record."""
        return [
            *self.train_files,
            *(str(Path(path) / "manifest.json") for path in self.pages_datasets),
            *(str(Path(path) / "evalset.json") for path in self.exclude_evalsets),
        ]


def last_checkpoint(output_dir: str) -> Path | None:
    """The newest checkpoint whose progress file was written (the last thing a checkpoint gets)."""
    finished = finished_checkpoints(output_dir, PROGRESS)
    return finished[-1] if finished else None


def announce_base(model: str, lang: str) -> str | None:
    """The base model's run record, if it has one: checked against the recipe's language and announced (by rank 0)."""
    if not (Path(model) / RUN_RECORD).is_file():
        if rank() == 0:
            print(f"contrast: base {model} has no run record (a plain VLM: the no-CPT baseline)")
        return None
    record = read_run_record(model)
    base_lang = record["config"].get("recipe", {}).get("lang")
    if lang != "multi" and base_lang not in (lang, "multi", None):
        raise UsageError(f"--model_name_or_path {model} was trained for `{base_lang}` but this recipe is for `{lang}`.")
    history = record.get("results", {}).get("generation_quality") or []
    cer = f", held-out CER {history[0]['cer']} -> {history[-1]['cer']}" if history else ""
    if rank() == 0:
        print(f"contrast: base {model}: a {record['stage']} run of {record['created']} for `{base_lang}`{cer}")
    return model


def input_kinds(pairs) -> set[str]:
    """The kinds of input besides text that the pairs' sides hold (image, audio, video)."""
    sides = [side for pair in pairs for side in (pair.anchor, pair.positive, pair.negative) if side is not None]
    return {kind for side in sides for kind in ("image", "audio", "video") if getattr(side, kind) is not None}


def load_pairs(args: ContrastArguments, seed: int):
    """(train pairs, held-out pairs); held-out pairs come from whole documents never trained on."""
    from data_prep.evalset import evaluated_documents
    from lco.contrast_data import mix, pages_pairs, read_jsonl_pairs
    from lco.pretrain_data import evaluated_in, held_out_documents

    given = [pair for path in args.train_files for pair in read_jsonl_pairs(path)]
    unsourced = {pair.document for pair in given if pair.source_sha256 is None}  # path:line of each such line
    text_pairs = [pair for pair in given if pair.kind == "text"]
    image_pairs = [pair for pair in given if pair.kind == "multimodal"]
    for folder in args.pages_datasets:
        built_text, built_images = pages_pairs(folder, args.passage_chars, seed)
        text_pairs += built_text
        image_pairs += built_images
    excluded = evaluated_in(args.pages_datasets, args.exclude_evalsets)  # doc_id -> sha256 of pages datasets
    covered = set().union(*(evaluated_documents(folder, "--exclude_evalsets") for folder in args.exclude_evalsets))

    def evaluated(pair) -> bool:
        return pair.document in excluded or pair.source_sha256 in covered

    dropped = [pair for pair in text_pairs + image_pairs if evaluated(pair)]
    text_pairs = [pair for pair in text_pairs if not evaluated(pair)]
    image_pairs = [pair for pair in image_pairs if not evaluated(pair)]
    pairs = mix(text_pairs, image_pairs, args.multimodal_fraction, seed)
    held_out = held_out_documents([pair.document for pair in pairs], args.eval_fraction, seed)
    train = [pair for pair in pairs if pair.document not in held_out]
    evaluation = [pair for pair in pairs if pair.document in held_out]
    with_negative = sum(pair.negative is not None for pair in train)
    if 0 < with_negative < len(train):
        if rank() == 0:
            print(
                f"contrast: only {with_negative} of {len(train)} training pairs have a hard negative; negatives are "
                "not used"
            )
        train = [replace(pair, negative=None) for pair in train]
    if len(train) < args.contrastive_batch_size:
        raise UsageError(
            f"{len(train)} training pairs are fewer than --contrastive_batch_size {args.contrastive_batch_size}; "
            "lower it or give more data."
        )
    counts = {
        "train_pairs": len(train),
        "train_text": sum(p.kind == "text" for p in train),
        "train_multimodal": sum(p.kind == "multimodal" for p in train),
        "train_with_negative": sum(p.negative is not None for p in train),
        "held_out_pairs": len(evaluation),
        "held_out_documents": len(held_out),
        # covered by --exclude_evalsets: documents of the pages datasets or named by --train_files lines
        "excluded_documents": len({excluded.get(pair.document) or pair.source_sha256 for pair in dropped}),
        "excluded_pairs": len(dropped),
        # --train_files lines that name no source document: no eval set can be checked against them
        "unsourced_pairs": sum(pair.document in unsourced for pair in train),
    }
    logger.info("pairs: %s", counts)
    return train, evaluation, counts


def deepspeed_config(path: str, mini_batch_size: int, accumulation: int, bf16: bool, hidden_size: int) -> dict:
    """The DeepSpeed config at `path` with its "auto" values filled in: no dataloader to infer the batch ones from,
    and no `model.config` on the embedding wrapper for Accelerate to fill ZeRO-3's sizes from (Accelerate would
    raise), so they come from the backbone's text `hidden_size` by Accelerate's own rule."""
    config = json.loads(Path(path).read_text(encoding="utf-8"))
    resolved = {
        "train_micro_batch_size_per_gpu": mini_batch_size,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": mini_batch_size * accumulation * world_size(),
        "gradient_clipping": 1.0,
    }
    for key, value in resolved.items():
        if config.get(key, "auto") == "auto":
            config[key] = value
    for key, enabled in (("bf16", bf16), ("fp16", False)):
        if key in config and config[key].get("enabled") == "auto":
            config[key]["enabled"] = enabled
    zero = config.get("zero_optimization", {})
    sizes = {
        "reduce_bucket_size": 5e8,
        "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
        "stage3_param_persistence_threshold": 10 * hidden_size,
    }
    for key, value in sizes.items():
        if zero.get(key) == "auto":
            zero[key] = value
    return config


def embed(model, processor, sides, args: ContrastArguments, split: bool = False):
    """Embeddings of pair sides (on the CPU), `mini_batch_size` at a time, without a graph; images are opened
    batch by batch. `split`: in a process group, each process embeds its contiguous share and all get the whole."""
    from lco.contrast_data import Side
    from lco.distributed import gather_rows, process_group, share
    from lco.embedder import LazyItems, encode_items

    split = split and process_group()[0] > 1
    embeddings = encode_items(
        model,
        processor,
        LazyItems(sides, Side.item),
        batch_size=args.mini_batch_size,
        max_text_tokens=args.max_text_tokens,
        image_max_side=args.image_max_side,
        indices=share(len(sides)) if split else None,
    )
    return gather_rows(embeddings) if split else embeddings


def held_out_accuracy(model, processor, pairs, args: ContrastArguments, seed: int) -> dict | None:
    """Share of held-out anchors whose nearest positive, among those of their group of `contrastive_batch_size`
    held-out pairs (seeded order; the last group shorter), is their own: overall and by kind of pair.

    Positives of other pairs cut from the same source (the crop of a passage and the next passage after
    it, say) are left out of an anchor's candidates: they match it too, and would count as misses."""
    import torch

    if len(pairs) < 2:
        return None
    order = list(pairs)
    random.Random(seed).shuffle(order)
    size = min(args.contrastive_batch_size, len(order))
    hits, kinds = [], []
    for group in (order[start : start + size] for start in range(0, len(order), size)):
        if len(group) < 2:
            continue
        anchors = embed(model, processor, [pair.anchor for pair in group], args)
        positives = embed(model, processor, [pair.positive for pair in group], args)
        scores = anchors @ positives.T
        shared = torch.tensor(
            [[i != j and not a.sources.isdisjoint(b.sources) for j, b in enumerate(group)] for i, a in enumerate(group)]
        )
        scores[shared] = float("-inf")
        hits += (scores.argmax(dim=1) == torch.arange(len(group))).tolist()
        kinds += [pair.kind for pair in group]
    accuracy = {"in_batch_accuracy": round(sum(hits) / len(hits), 4)}
    for kind in sorted(set(kinds)):
        of_kind = [hit for hit, k in zip(hits, kinds) if k == kind]
        accuracy[f"{kind}_pairs"] = {"accuracy": round(sum(of_kind) / len(of_kind), 4), "count": len(of_kind)}
    return accuracy


def mine_hard_negatives(model, processor, pairs, args: ContrastArguments):
    """Each pair with, as its negative, the positive of another document's pair that the model scores
    highest for its anchor (other documents only, to keep true positives out). In a process group, each process
    embeds a share of the pairs, and every process chooses from all the embeddings: the same negatives."""
    import torch

    names = {name: i for i, name in enumerate(dict.fromkeys(pair.document for pair in pairs))}
    if len(names) < 2:
        raise UsageError("--mine_hard_negatives needs pairs from at least two documents.")
    documents = torch.tensor([names[pair.document] for pair in pairs])
    anchors = embed(model, processor, [pair.anchor for pair in pairs], args, split=True)
    positives = embed(model, processor, [pair.positive for pair in pairs], args, split=True)
    chosen = []
    for start in range(0, len(pairs), 1024):  # a block of anchors at a time: the full score matrix is pairs x pairs
        scores = anchors[start : start + 1024] @ positives.T
        scores[documents[start : start + 1024, None] == documents[None, :]] = float("-inf")
        chosen += scores.argmax(dim=1).tolist()
    return [replace(pair, negative=pairs[j].positive) for pair, j in zip(pairs, chosen)]


def load_model(args: ContrastArguments, seed: int):
    """(the base model with fresh LoRA adapters, as an `EmbeddingModel`; its processor)."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForImageTextToText, AutoProcessor, set_seed

    from lco.embedder import EmbeddingModel
    from lco.lora import lora_config

    set_seed(seed)  # before the LoRA initialisation
    dtype = torch.bfloat16 if uses_bf16(args) else torch.float32
    base = AutoModelForImageTextToText.from_pretrained(args.model_name_or_path, dtype=dtype)
    processor = AutoProcessor.from_pretrained(args.model_name_or_path)
    model = EmbeddingModel(
        get_peft_model(base, lora_config(base.config, args.lora_r, args.lora_alpha, args.lora_dropout))
    )
    return model, processor


def uses_bf16(args: ContrastArguments) -> bool:
    import torch

    return args.bf16 and torch.cuda.is_available()


@dataclass
class TrainState:
    """Where training is and the curves so far: what a checkpoint keeps beside Accelerate's state."""

    step: int = 0
    epoch: int = 0
    batches_done: int = 0  # of the current epoch
    loss_history: list[dict] = field(default_factory=list)
    accuracy_history: list[dict] = field(default_factory=list)


class ContrastiveTraining:
    """One contrastive run under Accelerate (plain, DDP or DeepSpeed): the cached InfoNCE step, the held-out
    accuracy, and the checkpoints that `--resume` continues from."""

    def __init__(
        self, args: ContrastArguments, model, processor, train_pairs, seed: int, output_dir: Path | None = None
    ):
        import torch
        from accelerate import Accelerator
        from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs
        from transformers import get_scheduler

        self.args, self.processor, self.train_pairs, self.seed = args, processor, train_pairs, seed
        self.output_dir = Path(output_dir or args.output_dir)  # where checkpoints go (a staging folder, see main)
        self.local_batch = args.contrastive_batch_size // world_size()
        with_negative = train_pairs[0].negative is not None
        self.roles = ("anchor", "positive", "negative") if with_negative else ("anchor", "positive")
        # one backward per mini-batch of each role
        self.accumulation = len(self.roles) * math.ceil(self.local_batch / args.mini_batch_size)
        bf16 = uses_bf16(args)
        plugin, handlers = None, []
        if args.deepspeed:
            hidden_size = model.model.config.get_text_config().hidden_size  # the backbone's
            config = deepspeed_config(args.deepspeed, args.mini_batch_size, self.accumulation, bf16, hidden_size)
            plugin = DeepSpeedPlugin(hf_ds_config=config, gradient_accumulation_steps=self.accumulation)
            if not torch.cuda.is_available():
                # Accelerate finds no process-group backend on the CPU and would report 1 process on every rank
                # (process_index 0 everywhere); with gloo named it reads rank and world size from torch.distributed
                handlers.append(InitProcessGroupKwargs(backend="gloo"))
        self.accelerator = Accelerator(
            # `cpu=True` (which several CPU processes need to form a gloo group for DDP) drops a DeepSpeed plugin
            # silently: no engine, plain DDP. DeepSpeed runs on the CPU through its CPU accelerator (lco/engine.py)
            cpu=not torch.cuda.is_available() and plugin is None,
            kwargs_handlers=handlers,
            gradient_accumulation_steps=self.accumulation,
            deepspeed_plugin=plugin,
            mixed_precision="bf16" if bf16 else "no",
            # the schedule moves once per optimizer step; by default Accelerate steps it once per process
            # (it assumes each process's data loader ran through its own share of the steps), N times too fast
            step_scheduler_with_optimizer=False,
        )
        self.trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
        steps_per_epoch = len(self.epoch_batches(0))
        if not steps_per_epoch:
            raise UsageError(
                f"no batch of {args.contrastive_batch_size} pairs from different sources can be made from the "
                f"{len(train_pairs)} training pairs (too many are cut from the same passages); "
                "lower --contrastive_batch_size or give more data."
            )
        self.total_steps = args.max_steps or math.ceil(args.num_train_epochs * steps_per_epoch)
        optimizer = torch.optim.AdamW(self.trainable, lr=args.learning_rate, weight_decay=args.weight_decay)
        warmup = math.ceil(args.warmup_ratio * self.total_steps)
        scheduler = get_scheduler("linear", optimizer, num_warmup_steps=warmup, num_training_steps=self.total_steps)
        self.model, self.optimizer, self.scheduler = self.accelerator.prepare(model, optimizer, scheduler)

    def epoch_batches(self, epoch: int) -> list:
        from lco.contrast_data import batches

        args = self.args
        return batches(
            self.train_pairs, args.contrastive_batch_size, homogeneous=args.homogeneous_batches, seed=self.seed + epoch
        )

    def describe(self) -> str:
        args = self.args
        return (
            f"{self.total_steps} steps of {args.contrastive_batch_size} anchors ({self.local_batch} per process x "
            f"{world_size()}), mini-batches of {args.mini_batch_size}; "
            f"{sum(getattr(p, 'ds_numel', p.numel()) for p in self.trainable):,} trainable (LoRA) parameters"
        )

    def encode(self, inputs):
        return self.model(**inputs.to(self.accelerator.device))

    def backward_chunk(self, inputs, grad) -> None:
        """Re-encode a mini-batch with a graph and backpropagate the loss's cached gradient through it. Both under
        `accumulate`, which syncs gradients across processes on the step's last mini-batch only: DDP decides in
        the forward whether the backward all-reduces."""
        with self.accelerator.accumulate(self.model):
            self.backward(self.encode(inputs), grad)

    def forward_chunk(self, inputs):
        """A mini-batch encoded with a graph in the cached loss's first pass (a kept graph), under `accumulate` as
        the re-encoded ones are: one of the step's accumulation steps, never its last, so DDP does not all-reduce
        in its backward and DeepSpeed's `sync_gradients` is still unset when `backward` runs, after the loss."""
        with self.accelerator.accumulate(self.model):
            return self.encode(inputs)

    def backward(self, embeddings, grad) -> None:
        from lco.contrastive_loss import backpropagate

        # both DeepSpeed and Accelerate divide by the accumulation steps; the cached gradients are already whole
        self.accelerator.backward(backpropagate(embeddings, grad) * self.accumulation)

    def step(self, batch) -> dict:
        """One optimizer step on this process's share of `batch`: {loss (mean over processes), candidates, lr}."""
        import torch

        from lco.contrastive_loss import cached_contrastive_step
        from lco.embedder import model_inputs

        args, rank = self.args, self.accelerator.process_index
        mine = batch[rank * self.local_batch : (rank + 1) * self.local_batch]
        chunks_by_role = [
            [
                model_inputs(
                    self.processor,
                    [getattr(pair, role).item() for pair in mine[i : i + args.mini_batch_size]],
                    args.max_text_tokens,
                    args.image_max_side,
                )
                for i in range(0, len(mine), args.mini_batch_size)
            ]
            for role in self.roles
        ]
        loss, candidates = cached_contrastive_step(
            self.encode,
            chunks_by_role,
            self.backward_chunk,
            args.temperature,
            args.matryoshka_dims,
            forward_chunk=self.forward_chunk,
            backward=self.backward,
            kept_graphs=args.kept_graphs,
        )
        self.accelerator.clip_grad_norm_(self.trainable, 1.0)  # DeepSpeed clips by its config's gradient_clipping
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad()
        loss = self.accelerator.reduce(torch.tensor(loss, device=self.accelerator.device), reduction="mean").item()
        return {"loss": round(loss, 4), "candidates": candidates, "lr": self.scheduler.get_last_lr()[0]}

    def held_out_accuracy(self, pairs, step: int) -> dict:
        """The held-out accuracy entry of `step`, measured on the main process while the others wait; under
        ZeRO-3 on every process, as each forward gathers the weights' shards from all of them."""
        entry = None
        if self.accelerator.is_main_process or deepspeed_stage(self.args.deepspeed) == 3:
            model = self.accelerator.unwrap_model(self.model)
            accuracy = held_out_accuracy(model, self.processor, pairs, self.args, self.seed)
            entry = {"step": step, **(accuracy or {"in_batch_accuracy": None})}
            logger.info("held-out in-batch retrieval accuracy at step %d: %s", step, accuracy)
        self.accelerator.wait_for_everyone()
        return entry

    def save_checkpoint(self, state: TrainState) -> None:
        """`checkpoint-<step>/`: Accelerate's state (LoRA, optimizer, scheduler, RNG), then the progress file,
        written last: a checkpoint without it was cut short. Older checkpoints go: one is enough to continue."""
        folder = self.output_dir / f"checkpoint-{state.step}"
        self.accelerator.save_state(str(folder))  # every process: DeepSpeed saves its own shards
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            write_text_atomic(folder / PROGRESS, json.dumps(asdict(state)) + "\n")
            for older in self.output_dir.glob("checkpoint-*"):
                if older != folder:
                    shutil.rmtree(older)
        self.accelerator.wait_for_everyone()

    def restore(self, checkpoint: Path) -> TrainState:
        """The state saved in `checkpoint`, with weights, optimizer, scheduler and RNG states loaded."""
        self.accelerator.load_state(str(checkpoint))
        state = TrainState(**json.loads((checkpoint / PROGRESS).read_text(encoding="utf-8")))
        logger.info("resuming from %s at step %d", checkpoint, state.step)
        return state


def train(args: ContrastArguments, train_pairs, held_out, seed: int, output_dir: Path | None = None):
    """The training loop, checkpoints in `output_dir` (default: --output_dir); returns (the run, its results)."""
    import torch

    model, processor = load_model(args, seed)
    if args.mine_hard_negatives:
        # the processes mine together (each embeds a share), in the group the Accelerator then takes over
        join_process_group()
        train_pairs = mine_hard_negatives(model.to(process_device()), processor, train_pairs, args)
        logger.info("mined a hard negative for each of the %d training pairs", len(train_pairs))
    run = ContrastiveTraining(args, model, processor, train_pairs, seed, output_dir)
    engine = engine_record(run.model, run.optimizer, run.accelerator.mixed_precision == "bf16")
    check_engine(engine, args.deepspeed)
    if run.accelerator.is_main_process:
        print(f"contrast: {run.describe()}")
        print(f"contrast: {describe_engine(engine)}")

    started, step_seconds = time.monotonic(), []
    resumed_from = None
    if args.resume:
        checkpoint = last_checkpoint(run.output_dir)
        state = run.restore(checkpoint)
        resumed_from = {"checkpoint": checkpoint.name, "step": state.step}
    else:
        state = TrainState(accuracy_history=[run.held_out_accuracy(held_out, 0)])
    while state.step < run.total_steps:
        for batch in run.epoch_batches(state.epoch)[state.batches_done :]:
            if state.step == run.total_steps:
                break
            step_started = time.perf_counter()
            logged = run.step(batch)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            step_seconds.append(time.perf_counter() - step_started)
            state.step += 1
            state.batches_done += 1
            state.loss_history.append({"step": state.step, **logged})
            if run.accelerator.is_main_process and (state.step % args.logging_steps == 0 or state.step == 1):
                logger.info(
                    "step %d/%d: loss %.4f, %d candidates per anchor",
                    state.step, run.total_steps, logged["loss"], logged["candidates"],
                )  # fmt: skip
            if args.eval_steps and state.step % args.eval_steps == 0 and state.step < run.total_steps:
                state.accuracy_history.append(run.held_out_accuracy(held_out, state.step))
            if args.save_steps and state.step % args.save_steps == 0 and state.step < run.total_steps:
                run.save_checkpoint(state)  # after the evaluation: the RNG state saved is the next step's
        state.epoch, state.batches_done = state.epoch + 1, 0
    state.accuracy_history.append(run.held_out_accuracy(held_out, state.step))
    # over the steps after the first (warm-up), evaluation excluded
    timed = step_seconds[1:]
    on_gpu = torch.cuda.is_available()
    results = {
        "steps": state.step,
        # where this run started and how many steps it trained itself: a resume that retrained from step 0 would
        # log the same losses
        "resumed_from": resumed_from,
        "steps_this_run": len(step_seconds),
        "engine": engine,
        "wall_time_s": round(time.monotonic() - started, 1),
        "candidates_per_anchor": state.loss_history[-1]["candidates"],
        "mined_negatives": args.mine_hard_negatives,
        "loss_history": state.loss_history,
        "held_out_accuracy": state.accuracy_history,
        "pairs_per_second": round(args.contrastive_batch_size * len(timed) / sum(timed), 2) if timed else None,
        "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if on_gpu else None,
    }
    return run, results


def save(run: ContrastiveTraining, args: ContrastArguments, record: dict) -> Path:
    """`adapter/` and `final/` (LoRA merged into the base weights in their own dtype; complete folder)."""
    from lco.lora import save_merged

    output_dir = run.output_dir
    final = output_dir / "final"
    gathered = contextlib.nullcontext()
    if deepspeed_stage(args.deepspeed) == 3:
        import deepspeed

        # every process takes part: each holds a shard of the LoRA weights, whole only inside this block
        gathered = deepspeed.zero.GatheredParameters(run.trainable, modifier_rank=None)
    with gathered:
        if run.accelerator.is_main_process:
            output_dir.mkdir(parents=True, exist_ok=True)
            with atomic_directory(output_dir / "adapter") as tmp:
                run.accelerator.unwrap_model(run.model).model.save_pretrained(tmp)
    if run.accelerator.is_main_process:
        with atomic_directory(final) as tmp:
            save_merged(args.model_name_or_path, output_dir / "adapter", tmp)
            run.processor.save_pretrained(tmp)
            write_run_record(tmp, parent=parent_run(args.model_name_or_path), **record)
    run.accelerator.wait_for_everyone()
    return final


def summary(results: dict, final: Path) -> str:
    losses, accuracy = results["loss_history"], results["held_out_accuracy"]
    by_kind = "".join(
        f", {kind} {accuracy[0][f'{kind}_pairs']['accuracy']} -> {accuracy[-1][f'{kind}_pairs']['accuracy']}"
        for kind in ("text", "multimodal")
        if f"{kind}_pairs" in accuracy[0]
    )
    return (
        f"contrast: {results['steps']} steps in {results['wall_time_s']}s; loss {losses[0]['loss']:.3f} -> "
        f"{losses[-1]['loss']:.3f}; held-out in-batch accuracy {accuracy[0]['in_batch_accuracy']} -> "
        f"{accuracy[-1]['in_batch_accuracy']}{by_kind}; model in {final}\n"
        f"contrast: {results['pairs_per_second']} pairs/s, peak GPU memory {results['peak_gpu_memory_gib']} GiB"
    )


def main(argv: list[str] | None = None) -> None:
    from lco.pretrain_data import document_sha256

    recipe_args, args = parse_stage_arguments("contrast", (ContrastArguments,), argv)
    set_up_output(recipe_args.verbose)
    if args.deepspeed:
        prepare_deepspeed()
    announce_base(args.model_name_or_path, recipe_args.lang)
    train_pairs, held_out, counts = load_pairs(args, recipe_args.seed)
    check_reads(args.model_name_or_path, input_kinds([*train_pairs, *held_out]))

    with staged_output(args.output_dir, overwrite=args.overwrite, is_main=rank() == 0) as output_dir:
        run, results = train(args, train_pairs, held_out, recipe_args.seed, output_dir)
        record = stage_record("contrast", recipe_args, {"contrast": asdict(args)}, args.input_files())
        # by content: `stages.evaluate` checks them against the documents of the eval sets it scores
        trained = document_sha256(args.pages_datasets, {pair.document for pair in train_pairs})
        trained = sorted({*trained, *(pair.source_sha256 for pair in train_pairs if pair.source_sha256)})
        save(run, args, {**record, "results": {"pairs": counts, "training_documents": trained, **results}})
    if run.accelerator.is_main_process:
        print(summary(results, Path(args.output_dir) / "final"))
    # a process that exits with its process group alive can abort in teardown ("terminate called without an active
    # exception": seen once in four 2-process ZeRO-3 runs on the CPU)
    run.accelerator.end_training()


if __name__ == "__main__":
    run_cli(main)
