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

import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from .artifacts import (
    atomic_directory, check_input_paths, check_model_source, check_output_dir, finished_checkpoints, write_text_atomic,
)
from .errors import UsageError, run_cli
from .pretrain import deepspeed_stage
from .recipe import parse_stage_arguments, recipe_section
from .run_record import RUN_RECORD, read_run_record, write_run_record

logger = logging.getLogger(__name__)
PROGRESS = "progress.json"  # in a checkpoint: where training was, and the curves so far


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
    max_steps: int = field(default=0, metadata={"help": "Optimizer steps; 0 = num_train_epochs over the pairs."})
    warmup_steps: int = 100
    max_text_tokens: int = 650
    image_max_side: int = field(default=700, metadata={"help": "Images are thumbnailed to fit this square, in pixels."})
    passage_chars: int = field(default=400, metadata={"help": "Length of the passages cut from page text for pairs."})
    eval_fraction: float = field(default=0.05, metadata={"help": "Share of documents whose pairs are held out."})
    eval_steps: int = field(default=0, metadata={"help": "Held-out accuracy every N steps (0: at start and end only)."})
    logging_steps: int = 10
    save_steps: int = field(
        default=0,
        metadata={"help": "Save a checkpoint to continue from (LoRA, optimizer, scheduler, RNG) every N steps; 0: none."},
    )
    mine_hard_negatives: bool = field(
        default=False,
        metadata={"help": "Before training, give each pair as hard negative the positive of another document that the "
                  "starting model finds most similar to its anchor."},
    )
    homogeneous_batches: bool = field(
        default=False, metadata={"help": "Each step all text or all multimodal (needed under ZeRO-3)."}
    )
    deepspeed: str | None = field(default=None, metadata={"help": "DeepSpeed JSON, e.g. recipes/deepspeed/zero2.json."})
    bf16: bool = field(default=True, metadata={"help": "bf16 weights and compute on a GPU (the CPU always uses fp32)."})
    resume: bool = field(default=False, metadata={"help": "Continue from the last checkpoint in --output_dir."})
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
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if self.contrastive_batch_size % world_size:
            raise UsageError(
                f"--contrastive_batch_size {self.contrastive_batch_size} does not split evenly over {world_size} processes."
            )
        if not 0.0 <= self.eval_fraction < 1.0:
            raise UsageError(f"--eval_fraction must be in [0, 1), got {self.eval_fraction}.")
        if self.deepspeed and not Path(self.deepspeed).is_file():
            raise UsageError(f"--deepspeed {self.deepspeed} not found; see recipes/deepspeed/.")
        if self.deepspeed and deepspeed_stage(self.deepspeed) == 3 and 0 < self.multimodal_fraction < 1 and not self.homogeneous_batches:
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
        return [*self.train_files, *(str(Path(path) / "manifest.json") for path in self.pages_datasets)]


def last_checkpoint(output_dir: str) -> Path | None:
    """The newest checkpoint whose progress file was written (the last thing a checkpoint gets)."""
    finished = finished_checkpoints(output_dir, PROGRESS)
    return finished[-1] if finished else None


def announce_base(model: str, lang: str) -> str | None:
    """The base model's run record, if it has one: checked against the recipe's language and announced."""
    if not (Path(model) / RUN_RECORD).is_file():
        print(f"contrast: base {model} has no run record (a plain VLM: the no-CPT baseline)")
        return None
    record = read_run_record(model)
    base_lang = record["config"].get("recipe", {}).get("lang")
    if lang != "multi" and base_lang not in (lang, "multi", None):
        raise UsageError(f"--model_name_or_path {model} was trained for `{base_lang}` but this recipe is for `{lang}`.")
    history = record.get("results", {}).get("generation_quality") or []
    cer = f", held-out CER {history[0]['cer']} -> {history[-1]['cer']}" if history else ""
    print(f"contrast: base {model}: a {record['stage']} run of {record['created']} for `{base_lang}`{cer}")
    return model


def load_pairs(args: ContrastArguments, seed: int):
    """(train pairs, held-out pairs); held-out pairs come from whole documents never trained on."""
    from .contrast_data import mix, pages_pairs, read_jsonl_pairs
    from .pretrain_data import held_out_documents

    given = [pair for path in args.train_files for pair in read_jsonl_pairs(path)]
    text_pairs = [pair for pair in given if pair.kind == "text"]
    image_pairs = [pair for pair in given if pair.kind == "multimodal"]
    for folder in args.pages_datasets:
        built_text, built_images = pages_pairs(folder, args.passage_chars, seed)
        text_pairs += built_text
        image_pairs += built_images
    pairs = mix(text_pairs, image_pairs, args.multimodal_fraction, seed)
    held_out = held_out_documents([pair.document for pair in pairs], args.eval_fraction, seed)
    train = [pair for pair in pairs if pair.document not in held_out]
    evaluation = [pair for pair in pairs if pair.document in held_out]
    with_negative = sum(pair.negative is not None for pair in train)
    if 0 < with_negative < len(train):
        print(f"contrast: only {with_negative} of {len(train)} training pairs have a hard negative; negatives are not used")
        train = [replace(pair, negative=None) for pair in train]
    if len(train) < args.contrastive_batch_size:
        raise UsageError(
            f"{len(train)} training pairs are fewer than --contrastive_batch_size {args.contrastive_batch_size}; "
            "lower it or give more data."
        )
    counts = {
        "train_pairs": len(train), "train_text": sum(p.kind == "text" for p in train),
        "train_multimodal": sum(p.kind == "multimodal" for p in train),
        "train_with_negative": sum(p.negative is not None for p in train),
        "held_out_pairs": len(evaluation), "held_out_documents": len(held_out),
    }
    logger.info("pairs: %s", counts)
    return train, evaluation, counts


def deepspeed_plugin(path: str, mini_batch_size: int, accumulation: int, bf16: bool):
    """Accelerate's DeepSpeed plugin with the config's "auto" values filled in (no dataloader to infer them)."""
    from accelerate.utils import DeepSpeedPlugin

    config = json.loads(Path(path).read_text(encoding="utf-8"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    resolved = {
        "train_micro_batch_size_per_gpu": mini_batch_size,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": mini_batch_size * accumulation * world_size,
        "gradient_clipping": 1.0,
    }
    for key, value in resolved.items():
        if config.get(key, "auto") == "auto":
            config[key] = value
    for key, enabled in (("bf16", bf16), ("fp16", False)):
        if key in config and config[key].get("enabled") == "auto":
            config[key]["enabled"] = enabled
    zero = config.get("zero_optimization", {})
    if zero.get("reduce_bucket_size") == "auto":
        zero["reduce_bucket_size"] = 5e8
    return DeepSpeedPlugin(hf_ds_config=config, gradient_accumulation_steps=accumulation)


def embed(model, processor, sides, args: ContrastArguments):
    """Embeddings of pair sides (on the CPU), `mini_batch_size` at a time, without a graph."""
    from .embedder import encode_items

    return encode_items(model, processor, [side.item() for side in sides], batch_size=args.mini_batch_size,
                        max_text_tokens=args.max_text_tokens, image_max_side=args.image_max_side)


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
    highest for its anchor (other documents only, to keep true positives out)."""
    import torch

    names = {name: i for i, name in enumerate(dict.fromkeys(pair.document for pair in pairs))}
    if len(names) < 2:
        raise UsageError("--mine_hard_negatives needs pairs from at least two documents.")
    documents = torch.tensor([names[pair.document] for pair in pairs])
    anchors = embed(model, processor, [pair.anchor for pair in pairs], args)
    positives = embed(model, processor, [pair.positive for pair in pairs], args)
    chosen = []
    for start in range(0, len(pairs), 1024):  # a block of anchors at a time: the full score matrix is pairs x pairs
        scores = anchors[start : start + 1024] @ positives.T
        scores[documents[start : start + 1024, None] == documents[None, :]] = float("-inf")
        chosen += scores.argmax(dim=1).tolist()
    return [replace(pair, negative=pairs[j].positive) for pair, j in zip(pairs, chosen)]


def train(args: ContrastArguments, train_pairs, held_out, seed: int):
    """The training loop; returns (accelerator, trained model, processor, results)."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from peft import get_peft_model
    from transformers import AutoModelForImageTextToText, AutoProcessor, get_scheduler

    from .contrast_data import batches
    from .contrastive_loss import cached_contrastive_step
    from .embedder import EmbeddingModel, model_inputs
    from .lora import lora_config

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_batch = args.contrastive_batch_size // world_size
    on_gpu = torch.cuda.is_available()
    bf16 = args.bf16 and on_gpu
    set_seed(seed)  # before the LoRA initialisation
    base = AutoModelForImageTextToText.from_pretrained(args.model_name_or_path, dtype=torch.bfloat16 if bf16 else torch.float32)
    processor = AutoProcessor.from_pretrained(args.model_name_or_path)
    model = EmbeddingModel(get_peft_model(base, lora_config(args.lora_r, args.lora_alpha, args.lora_dropout)))
    if args.mine_hard_negatives:
        # every process mines the same negatives from the same pairs: no communication needed
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if on_gpu else "cpu"
        train_pairs = mine_hard_negatives(model.to(device), processor, train_pairs, args)
        logger.info("mined a hard negative for each of the %d training pairs", len(train_pairs))

    roles = ("anchor", "positive", "negative") if train_pairs[0].negative is not None else ("anchor", "positive")
    accumulation = len(roles) * math.ceil(local_batch / args.mini_batch_size)  # one backward per mini-batch
    plugin = deepspeed_plugin(args.deepspeed, args.mini_batch_size, accumulation, bf16) if args.deepspeed else None
    accelerator = Accelerator(
        cpu=not on_gpu, gradient_accumulation_steps=accumulation, deepspeed_plugin=plugin,
        mixed_precision="bf16" if bf16 else "no",
    )
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    steps_per_epoch = len(
        batches(train_pairs, args.contrastive_batch_size, homogeneous=args.homogeneous_batches, seed=seed)
    )
    if not steps_per_epoch:
        raise UsageError(
            f"no batch of {args.contrastive_batch_size} pairs from different sources can be made from the "
            f"{len(train_pairs)} training pairs (too many are cut from the same passages); "
            "lower --contrastive_batch_size or give more data."
        )
    total_steps = args.max_steps or math.ceil(args.num_train_epochs * steps_per_epoch)
    optimizer = torch.optim.AdamW(trainable, lr=args.learning_rate)
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=args.warmup_steps, num_training_steps=total_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    if accelerator.is_main_process:
        print(
            f"contrast: {total_steps} steps of {args.contrastive_batch_size} anchors ({local_batch} per process x "
            f"{world_size}), mini-batches of {args.mini_batch_size}; "
            f"{sum(p.numel() for p in trainable):,} trainable (LoRA) parameters"
        )

    def encode(inputs):
        return model(**inputs.to(accelerator.device))

    def backward(surrogate):
        with accelerator.accumulate(model):
            # both DeepSpeed and Accelerate divide by the accumulation steps; the cached gradients are already whole
            accelerator.backward(surrogate * accumulation)

    def evaluate(step: int) -> None:
        if accelerator.is_main_process:
            accuracy = held_out_accuracy(accelerator.unwrap_model(model), processor, held_out, args, seed)
            accuracy_history.append({"step": step, **(accuracy or {"in_batch_accuracy": None})})
            logger.info("held-out in-batch retrieval accuracy at step %d: %s", step, accuracy)
        accelerator.wait_for_everyone()

    def save_checkpoint() -> None:
        folder = Path(args.output_dir) / f"checkpoint-{step}"
        accelerator.save_state(str(folder))  # every process: DeepSpeed saves its own shards
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            progress = {"step": step, "epoch": epoch, "batches_done": batches_done, "loss_history": loss_history,
                        "accuracy_history": accuracy_history}
            write_text_atomic(folder / PROGRESS, json.dumps(progress) + "\n")
            for older in Path(args.output_dir).glob("checkpoint-*"):  # one checkpoint is enough to continue
                if older != folder:
                    shutil.rmtree(older)
        accelerator.wait_for_everyone()

    loss_history, accuracy_history, step_seconds = [], [], []
    started, step, epoch, batches_done = time.monotonic(), 0, 0, 0
    if args.resume:
        checkpoint = last_checkpoint(args.output_dir)
        accelerator.load_state(str(checkpoint))  # weights, optimizer, scheduler and the RNG states saved with them
        progress = json.loads((checkpoint / PROGRESS).read_text(encoding="utf-8"))
        step, epoch, batches_done = progress["step"], progress["epoch"], progress["batches_done"]
        loss_history, accuracy_history = progress["loss_history"], progress["accuracy_history"]
        logger.info("resuming from %s at step %d", checkpoint, step)
    else:
        evaluate(0)
    while step < total_steps:
        epoch_batches = batches(train_pairs, args.contrastive_batch_size, homogeneous=args.homogeneous_batches, seed=seed + epoch)
        for batch in epoch_batches[batches_done:]:
            if step == total_steps:
                break
            step_started = time.perf_counter()
            mine = batch[accelerator.process_index * local_batch : (accelerator.process_index + 1) * local_batch]
            chunks_by_role = [
                [
                    model_inputs(processor, [getattr(pair, role).item() for pair in mine[i : i + args.mini_batch_size]],
                                 args.max_text_tokens, args.image_max_side)
                    for i in range(0, len(mine), args.mini_batch_size)
                ]
                for role in roles
            ]
            loss, candidates = cached_contrastive_step(encode, chunks_by_role, backward, args.temperature)
            accelerator.clip_grad_norm_(trainable, 1.0)  # DeepSpeed clips by its config's gradient_clipping instead
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            step += 1
            if on_gpu:
                torch.cuda.synchronize()
            step_seconds.append(time.perf_counter() - step_started)
            loss = accelerator.reduce(torch.tensor(loss, device=accelerator.device), reduction="mean").item()
            loss_history.append({"step": step, "loss": round(loss, 4), "candidates": candidates, "lr": scheduler.get_last_lr()[0]})
            if accelerator.is_main_process and (step % args.logging_steps == 0 or step == 1):
                logger.info("step %d/%d: loss %.4f, %d candidates per anchor", step, total_steps, loss, candidates)
            batches_done += 1
            if args.eval_steps and step % args.eval_steps == 0 and step < total_steps:
                evaluate(step)
            if args.save_steps and step % args.save_steps == 0 and step < total_steps:
                save_checkpoint()  # after the evaluation: the RNG state saved is the one the next step starts from
        epoch, batches_done = epoch + 1, 0
    evaluate(step)
    results = {
        "steps": step, "wall_time_s": round(time.monotonic() - started, 1),
        "candidates_per_anchor": loss_history[-1]["candidates"], "mined_negatives": args.mine_hard_negatives,
        "loss_history": loss_history,
        "held_out_accuracy": accuracy_history,
        # over the steps after the first (warm-up), evaluation excluded
        "pairs_per_second": round(args.contrastive_batch_size * len(step_seconds[1:]) / sum(step_seconds[1:]), 2) if len(step_seconds) > 1 else None,
        "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if on_gpu else None,
    }
    return accelerator, model, processor, results


def save(accelerator, model, processor, args: ContrastArguments, record: dict) -> Path:
    """`adapter/` and `final/` (LoRA merged into the base weights in their own dtype; complete folder)."""
    from .lora import save_merged

    output_dir = Path(args.output_dir)
    final = output_dir / "final"
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        with atomic_directory(output_dir / "adapter") as tmp:
            accelerator.unwrap_model(model).model.save_pretrained(tmp)
        with atomic_directory(final) as tmp:
            save_merged(args.model_name_or_path, output_dir / "adapter", tmp)
            processor.save_pretrained(tmp)
            parent = args.model_name_or_path if (Path(args.model_name_or_path) / RUN_RECORD).is_file() else None
            write_run_record(tmp, parent=parent, **record)
    accelerator.wait_for_everyone()
    return final


def main(argv: list[str] | None = None) -> None:
    recipe_args, args = parse_stage_arguments("contrast", (ContrastArguments,), argv)
    logging.basicConfig(level=logging.INFO if int(os.environ.get("RANK", "0")) == 0 else logging.WARNING, format="%(message)s")
    announce_base(args.model_name_or_path, recipe_args.lang)
    if args.overwrite and Path(args.output_dir).exists() and int(os.environ.get("RANK", "0")) == 0:
        shutil.rmtree(args.output_dir)
    train_pairs, held_out, counts = load_pairs(args, recipe_args.seed)

    accelerator, model, processor, results = train(args, train_pairs, held_out, recipe_args.seed)

    record = dict(
        stage="contrast",
        config={"recipe": vars(recipe_args), "recipe_section": recipe_section(recipe_args.config, "contrast"), "contrast": asdict(args)},
        seed=recipe_args.seed,
        inputs=[*([recipe_args.config] if recipe_args.config else []), *args.input_files()],
        results={"pairs": counts, **results},
    )
    final = save(accelerator, model, processor, args, record)
    if accelerator.is_main_process:
        losses, accuracy = results["loss_history"], results["held_out_accuracy"]
        by_kind = "".join(
            f", {kind} {accuracy[0][f'{kind}_pairs']['accuracy']} -> {accuracy[-1][f'{kind}_pairs']['accuracy']}"
            for kind in ("text", "multimodal") if f"{kind}_pairs" in accuracy[0]
        )
        print(
            f"contrast: {results['steps']} steps in {results['wall_time_s']}s; loss {losses[0]['loss']:.3f} -> "
            f"{losses[-1]['loss']:.3f}; held-out in-batch accuracy {accuracy[0]['in_batch_accuracy']} -> "
            f"{accuracy[-1]['in_batch_accuracy']}{by_kind}; model in {final}"
        )
        print(f"contrast: {results['pairs_per_second']} pairs/s, peak GPU memory {results['peak_gpu_memory_gib']} GiB")


if __name__ == "__main__":
    run_cli(main)
