"""What the benchmark's cases measure with: timed calls, step rates, the Trainer's step times and model FLOPs.
Imports torch and transformers: a module for the case processes (and the parent they are forked from)."""

import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count
from transformers import TrainerCallback

FORWARD_KEYS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")
# the fused attention kernels torch.utils.flop_counter sees: CPU's is not in its table at all
ATTENTION_KERNELS = (
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
)


def device_sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(function, *args) -> float:
    """Seconds `function(*args)` takes, the GPU work it queued included."""
    device_sync()
    started = time.perf_counter()
    function(*args)
    device_sync()
    return time.perf_counter() - started


def step_figures(seconds: list[float], items_per_step: int, unit: str) -> dict:
    return {
        "timed_steps": len(seconds),
        "step_seconds_median": round(statistics.median(seconds), 4),
        f"{unit}_per_second": round(items_per_step * len(seconds) / sum(seconds), 3),
    }


def is_out_of_memory(error: RuntimeError) -> bool:
    """torch.OutOfMemoryError, or cuBLAS failing to allocate its workspace."""
    return isinstance(error, torch.OutOfMemoryError) or "ALLOC_FAILED" in str(error)


def example_flops(model, inputs: dict) -> tuple[int, int]:
    """(all, vision tower's) FLOPs of one forward pass on `inputs`, counted by torch.utils.flop_counter."""

    # grouped-query attention (Qwen2.5-VL's 16 query heads share 2 key/value heads): the counter's formula wants
    # as many key/value heads as query heads
    def attention(query, key, value, *args, out_shape=None, **kwargs):
        return sdpa_flop_count(query, (*key[:1], query[1], *key[2:]), (*value[:1], query[1], *value[2:]))

    mapping = {getattr(torch.ops.aten, kernel): attention for kernel in ATTENTION_KERNELS}
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        model(**inputs)
    counts = counter.get_flop_counts()  # module path -> {op: flops}; "Global" holds everything
    vision = sum(sum(ops.values()) for name, ops in counts.items() if name.endswith(".visual"))
    return sum(counts["Global"].values()), vision


def training_flops_per_token(model, dataset, collate, n_examples: int) -> float:
    """Model FLOPs of a training step per non-padding token, over the first `n_examples` examples, each
    collated alone (padding is not model work): 3x forward for trained parts, 1x for a frozen vision tower,
    which needs no backward."""
    vision_trained = any(p.requires_grad for name, p in model.named_parameters() if ".visual." in name)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    flops = tokens = 0
    for i in range(min(n_examples, len(dataset))):
        batch = collate([dataset[i]])
        inputs = {key: batch[key].to(device) for key in FORWARD_KEYS if key in batch}
        total, vision = example_flops(model, inputs)
        flops += 3 * (total - vision) + (3 if vision_trained else 1) * vision
        # a packed batch (lco/packing.py) has no padding, nor an attention mask
        tokens += int(inputs["attention_mask"].sum()) if "attention_mask" in inputs else inputs["input_ids"].numel()
    model.train(was_training)
    return flops / tokens


class StepMeter(TrainerCallback):
    """End-to-end step times after `warmup` steps (data loading included: the Trainer collates a batch before
    on_step_begin), tokens per step, and the model FLOPs per token, counted at train end. Needs
    `include_num_input_tokens_seen` on."""

    def __init__(self, warmup: int, flop_examples: int):
        self.warmup, self.flop_examples = warmup, flop_examples
        self.step_started, self.tokens_before = 0.0, 0
        self.ends, self.compute, self.tokens = [], [], []
        self.figures = {}

    def on_step_begin(self, args, state, control, **kwargs):
        self.step_started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        device_sync()
        self.ends.append(time.perf_counter())
        self.compute.append(self.ends[-1] - self.step_started)
        self.tokens.append(state.num_input_tokens_seen - self.tokens_before)
        self.tokens_before = state.num_input_tokens_seen

    def on_train_end(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        warmup = self.warmup
        intervals = [b - a for a, b in zip(self.ends[warmup - 1 : -1], self.ends[warmup:])]
        samples = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
        self.figures = {
            **step_figures(intervals, samples, "samples"),
            "tokens_per_second": round(sum(self.tokens[warmup:]) / sum(intervals), 1),
            "tokens_per_step_mean": round(statistics.mean(self.tokens[warmup:]), 1),
            # share of the step spent between on_step_begin and on_step_end (the rest: fetching and collating)
            "compute_share": round(sum(self.compute[warmup:]) / sum(intervals), 3),
            "gradient_checkpointing": bool(args.gradient_checkpointing),
            "flops_per_token": training_flops_per_token(
                model, train_dataloader.dataset, train_dataloader.collate_fn, self.flop_examples
            ),
        }
