"""Whether a pretraining step fits the device without activation checkpointing, and if not, the fewest layers to
checkpoint: the recompute costs ~1/3 of a step wherever it is on, so it should be on only where memory needs it.

The peak of a step is estimated as

    training state + tokens x layers x (activations per token per layer) + the LM head's tile

- training state: the weights; for each trained parameter its gradient and AdamW's two moments, in the parameter's
  dtype (the Trainer's optimizer); under DeepSpeed, fp32 master weights and moments (12 bytes) and the gradient,
  divided among the processes at the ZeRO stage that partitions each (1: optimizer, 2: and gradients, 3: and weights);
- activations per token per layer: what autograd keeps for backward in one decoder layer, measured by running a
  one-layer copy of the model's decoder (its sizes, dtype and attention; random weights) on the CPU. Measured,
  not written as a formula, because families differ (Gemma 3 keeps fp32 copies in its four norms: 1.7x Qwen2.5-VL's at
  the same sizes). A checkpointed layer keeps only its input (hidden size values); in backward one layer at a time
  is recomputed whole;
- the LM head's tile: TRL's SFTTrainer scores tokens through a fused LM head (`trl.trainer.utils.add_fused_lm_head`)
  that never holds the whole (tokens x vocabulary) logits, only a tile of up to 4096 tokens x 32768 vocabulary
  entries in fp32, and its gradient.

- eager attention: the (query x key) scores autograd keeps, heads x sequence^2 per layer and sequence (fp32 softmax
  output: 4 bytes each), measured with the activations by running the probe at two lengths (bytes(s) = a s + q s^2);
  zero with SDPA or flash attention, which keep no score matrix;
- a trained vision tower (`freeze_vision: false`): its blocks' activations for the micro-batch's patches, by the
  transformer-layer formula of Korthikanti et al. 2022 (34 x hidden bytes per token and layer at 16 bits, without
  score matrices), scaled to the tower's dtype; a frozen tower keeps none (its transient forward is in the margin);
- on a GPU, what is not yet allocated when the estimate is made: the rest of the CUDA context (kernels loaded lazily
  on first use, cuBLAS/cuDNN workspaces: CUDA_CONTEXT_BYTES, counted whole) and, with several processes, NCCL's
  buffers (NCCL_BYTES per process);
- DeepSpeed's buckets, read from its config: the gradient reduce bucket (two with `overlap_comm`, one filling while
  the other is reduced) and, under ZeRO-3, the prefetch bucket of gathered weights, in the weights' dtype ("auto"
  as Transformers fills it: hidden^2 and 0.9 hidden^2 elements; absent, DeepSpeed's defaults 5e8 and 5e7);
- the optimizer step's temporaries, when the activations are gone (so the peak is the larger of the two): under
  DeepSpeed the fp32 gradient partition handed to the optimizer (4 bytes per trained parameter / processes); the
  foreach AdamW (`optim: adamw_torch`) one copy of the trained parameters (sqrt of the second moment); the fused
  AdamW (the Trainer's default, `adamw_torch_fused`) none.

`tokens` is the micro-batch's worst case: per-device batch x max_length. The estimate is compared with the device's
free memory (torch.cuda.mem_get_info) plus what this process's allocator already holds (its weights are in the
estimate): other processes on the same GPU are not memory this run can have. The margin: the estimate must stay
under BUDGET = 0.85 of that, leaving 15% (12 GiB of 80 GiB) to the caching allocator's fragmentation (blocks are
split and rounded, so reserved memory runs ahead of allocated: commonly 5-10% of a training step's peak), to the
frozen tower's transient forward, and to the estimate's own error (the tower formula, DeepSpeed's gathered
parameters beyond the prefetch bucket). The estimate goes into the run record beside the measured peak, so every GPU
run checks it.
"""

import copy
import math
import os
import re
from dataclasses import asdict, dataclass

import torch

from .families import LANGUAGE_MODEL_LINEAR

# trl.kernels.chunked_logprob's tile: TOKEN_CHUNK_SIZE tokens x _CHUNKED_LOGPROB_CHUNK_SIZE vocabulary entries
HEAD_TILE = (4096, 32768)
# checkpoint every n-th layer, from none to all: the first whose estimate fits is chosen
EVERY_N_LAYERS = (0, 4, 3, 2, 1)
BUDGET = 0.85
# the CUDA context's part that loads after the estimate (lazy kernel modules, library workspaces): 0.3-0.6 GiB is
# what a PyTorch training process's context commonly takes on recent GPUs; counted whole, as if none were loaded yet
CUDA_CONTEXT_BYTES = 512 * 2**20
# NCCL's buffers per process: NCCL_BUFFSIZE (4 MiB) per channel and peer for each of its protocols, with up to 32
# channels on NVLink: some hundreds of MiB, up to 1 GiB with a second communicator (DeepSpeed's)
NCCL_BYTES = 2**30
# Korthikanti et al. 2022, Table 2: bytes kept per token and layer of a transformer, per hidden unit, at 16 bits,
# without the attention score matrices (flash attention)
TRANSFORMER_LAYER_BYTES_PER_HIDDEN = 34


@dataclass(frozen=True)
class MemoryEstimate:
    state_bytes: int
    layers: int
    hidden_bytes: int  # one token's input to a layer: what a checkpointed layer keeps
    layer_bytes: int  # what one layer keeps per token without checkpointing (score matrices apart)
    head_bytes: int  # the fused LM head's tile of logits and its gradient
    tokens: int
    sequence: int = 0  # tokens per sequence (0: all `tokens` in one)
    attention_bytes: int = 0  # eager attention: kept per layer and (query, key) pair of a sequence
    tower_bytes: int = 0  # a trained vision tower's activations for the micro-batch
    context_bytes: int = 0  # the CUDA context still to load
    nccl_bytes: int = 0
    bucket_bytes: int = 0  # DeepSpeed's reduce (and ZeRO-3 prefetch) buckets
    optimizer_bytes: int = 0  # the optimizer step's temporaries

    def peak(self, every_n_layers: int) -> int:
        """Bytes at the peak of a step with every `every_n_layers`-th layer checkpointed (0: none)."""
        checkpointed = math.ceil(self.layers / every_n_layers) if every_n_layers else 0
        # per token: the layer's activations and its row of the score matrix (as long as the sequence)
        layer = self.layer_bytes + self.attention_bytes * (self.sequence or self.tokens)
        kept = (self.layers - checkpointed) * layer + checkpointed * self.hidden_bytes
        recompute = layer if checkpointed else 0
        activations = self.tokens * (kept + recompute) + self.head_bytes + self.tower_bytes
        resident = self.state_bytes + self.context_bytes + self.nccl_bytes + self.bucket_bytes
        return resident + max(activations, self.optimizer_bytes)  # the step runs once the activations are freed


def choose_every_n_layers(estimate: MemoryEstimate, device_bytes: int, budget: float = BUDGET) -> int:
    """The fewest checkpointed layers whose estimated peak fits `budget` of `device_bytes`: 0 (none), 4, 3, 2 or 1
    (every layer); 1 when nothing fits, which is the least memory checkpointing can give."""
    for every_n_layers in EVERY_N_LAYERS:
        if estimate.peak(every_n_layers) <= budget * device_bytes:
            return every_n_layers
    return 1


def layer_activation_bytes(model, tokens: int = 32) -> int:
    """Bytes autograd keeps per token in one of `model`'s decoder layers, by running a one-layer copy of its decoder
    (same sizes, dtype and attention implementation) on `tokens` random embeddings on the CPU."""
    decoder = model.get_decoder()
    config = copy.deepcopy(decoder.config)
    config.num_hidden_layers = 1
    config.vocab_size = 8
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:1]
    dtype = next(decoder.parameters()).dtype
    with torch.device("meta"):
        probe = type(decoder)(config)
    probe = probe.to_empty(device="cpu").to(dtype)
    for parameter in probe.parameters():
        torch.nn.init.normal_(parameter, std=0.02)  # finite values; the sizes are what is measured
    probe.train()
    layer = probe.layers[0]
    weights = {p.untyped_storage().data_ptr() for p in probe.parameters()}
    kept, inside = {}, [False]

    def pack(tensor):
        storage = tensor.untyped_storage()
        if inside[0] and storage.data_ptr() not in weights:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    layer.register_forward_pre_hook(lambda *_: inside.__setitem__(0, True))
    layer.register_forward_hook(lambda *_: inside.__setitem__(0, False))
    embeddings = torch.randn(1, tokens, config.hidden_size, dtype=dtype, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        probe(inputs_embeds=embeddings)
    return math.ceil(sum(kept.values()) / tokens)


def numel(parameter) -> int:
    return getattr(parameter, "ds_numel", parameter.numel())  # a ZeRO-3 partitioned parameter is empty here


def lora_parameters(model, r: int) -> int:
    """LoRA's trained parameters on the layers `lco.lora` targets: r x (inputs + outputs) per linear layer."""
    pattern = re.compile(LANGUAGE_MODEL_LINEAR)
    return sum(
        r * (module.in_features + module.out_features)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and pattern.fullmatch(name)
    )


def training_state_bytes(model, lora_r: int | None, zero_stage: int | None, world_size: int) -> int:
    """Weights, gradients and AdamW moments for `model` as it will train: frozen parameters only as weights; with
    `lora_r`, only LoRA's parameters train (in the weights' dtype)."""
    weights = sum(numel(p) * p.element_size() for p in model.parameters())
    dtype_bytes = next(model.parameters()).element_size()
    trained = lora_parameters(model, lora_r) if lora_r else sum(numel(p) for p in model.parameters() if p.requires_grad)
    if lora_r:
        weights += trained * dtype_bytes
    if zero_stage is None:
        return weights + trained * 3 * dtype_bytes  # gradient + two moments, in the parameter's dtype
    gradients, optimizer = trained * dtype_bytes, trained * 12  # fp32 master weights and moments
    if zero_stage >= 1:
        optimizer //= world_size
    if zero_stage >= 2:
        gradients //= world_size
    if zero_stage >= 3:
        weights //= world_size
    return weights + gradients + optimizer


def attention_and_layer_bytes(model, tokens: int = 32) -> tuple[int, int]:
    """(bytes a decoder layer keeps per token apart from score matrices, bytes per (query, key) pair): the probe run
    at `tokens` and twice as many, bytes(s) = a s + q s^2 solved for a and q (q is 0 without eager attention)."""
    short, long = layer_activation_bytes(model, tokens) * tokens, layer_activation_bytes(model, 2 * tokens) * 2 * tokens
    pair = max(0, round((long / (2 * tokens) - short / tokens) / tokens))
    return math.ceil(short / tokens) - pair * tokens, pair


def trained_parameters(model, lora_r: int | None) -> int:
    return lora_parameters(model, lora_r) if lora_r else sum(numel(p) for p in model.parameters() if p.requires_grad)


def zero_bucket_bytes(config: dict | str | None, hidden_size: int, dtype_bytes: int) -> int:
    """Bytes of DeepSpeed's communication buckets under `config` (a JSON file or its content): the gradient reduce
    bucket, doubled with `overlap_comm` (on by default at ZeRO-3), and ZeRO-3's prefetch bucket. Sizes are in
    elements; "auto" is what Transformers fills in from the hidden size."""
    import json
    from pathlib import Path

    if not config:
        return 0
    if isinstance(config, str):
        config = json.loads(Path(config).read_text(encoding="utf-8"))
    zero = config.get("zero_optimization", {})
    stage = zero.get("stage", 0)
    if not stage:
        return 0

    def elements(key: str, auto: int, default: float) -> int:
        value = zero.get(key, default)
        return auto if value == "auto" else int(float(value))

    reduce = elements("reduce_bucket_size", hidden_size**2, 5e8) * (2 if zero.get("overlap_comm", stage == 3) else 1)
    prefetch = elements("stage3_prefetch_bucket_size", int(0.9 * hidden_size**2), 5e7) if stage == 3 else 0
    return (reduce + prefetch) * dtype_bytes


def optimizer_step_bytes(trained: int, dtype_bytes: int, zero_stage: int | None, world_size: int, optim: str) -> int:
    """Temporaries of the optimizer step: DeepSpeed's fp32 gradient partition, the foreach AdamW's square root of
    the second moments (a copy of the trained parameters), nothing for the fused AdamW."""
    if zero_stage:
        return 4 * trained // world_size
    return 0 if "fused" in str(optim).lower() else trained * dtype_bytes


def tower_activation_bytes(model, pages: int, max_pixels: int, page_tokens: int) -> int:
    """A trained vision tower's activations for `pages` images at the `max_pixels` budget, each within
    `page_tokens` visual tokens: patches x blocks x TRANSFORMER_LAYER_BYTES_PER_HIDDEN x its hidden size, at the
    tower's dtype (the formula's 16 bits scaled); 0 for a frozen tower or a model without one. Patches per image: a
    fixed grid where the tower takes one image size (Gemma 3's SigLIP), else the budget over a patch's pixels, at
    most `spatial_merge_size`^2 per visual token (the Qwen families)."""
    vision = getattr(model.config, "vision_config", None)
    tower = [p for name, p in model.named_parameters() if "visual" in name or "vision_tower" in name]
    if vision is None or not any(p.requires_grad for p in tower):
        return 0
    blocks = getattr(vision, "depth", None) or vision.num_hidden_layers
    if getattr(vision, "image_size", None):
        patches = (vision.image_size // vision.patch_size) ** 2
    else:
        patches = min(max_pixels // vision.patch_size**2, page_tokens * getattr(vision, "spatial_merge_size", 1) ** 2)
    dtype_bytes = tower[0].element_size()
    return pages * patches * blocks * TRANSFORMER_LAYER_BYTES_PER_HIDDEN * vision.hidden_size * dtype_bytes // 2


def estimate_memory(
    model,
    tokens: int,
    lora_r: int | None,
    zero_stage: int | None,
    world_size: int,
    *,
    sequence: int = 0,
    max_pixels: int = 0,
    deepspeed: dict | str | None = None,
    optim: str = "adamw_torch_fused",
    on_gpu: bool | None = None,
) -> MemoryEstimate:
    """The estimate for micro-batches of `tokens` in sequences of `sequence` (0: one), pages at `max_pixels`, under
    the DeepSpeed config `deepspeed` and the Trainer's `optim`; `on_gpu` (default: whether CUDA is there) adds the
    CUDA context and, with several processes, NCCL's buffers."""
    text_config = model.config.get_text_config()
    dtype_bytes = next(model.parameters()).element_size()
    on_gpu = torch.cuda.is_available() if on_gpu is None else on_gpu
    layer_bytes, attention_bytes = attention_and_layer_bytes(model)
    trained = trained_parameters(model, lora_r)
    return MemoryEstimate(
        state_bytes=training_state_bytes(model, lora_r, zero_stage, world_size),
        layers=text_config.num_hidden_layers,
        hidden_bytes=text_config.hidden_size * dtype_bytes,
        layer_bytes=layer_bytes,
        head_bytes=min(tokens, HEAD_TILE[0]) * min(text_config.vocab_size, HEAD_TILE[1]) * 4 * 2,
        tokens=tokens,
        sequence=sequence,
        attention_bytes=attention_bytes,
        tower_bytes=tower_activation_bytes(model, tokens // (sequence or tokens), max_pixels, sequence or tokens)
        if max_pixels
        else 0,
        context_bytes=CUDA_CONTEXT_BYTES if on_gpu else 0,
        nccl_bytes=NCCL_BYTES if on_gpu and world_size > 1 else 0,
        bucket_bytes=zero_bucket_bytes(deepspeed, text_config.hidden_size, dtype_bytes),
        optimizer_bytes=optimizer_step_bytes(trained, dtype_bytes, zero_stage, world_size, optim),
    )


def device_memory_bytes() -> int:
    """The memory the training step can have: on a GPU, what is free plus what this process's allocator already
    holds (the weights loaded so far, which the estimate counts); on a CPU, this machine's RAM."""
    if torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info()
        return free + torch.cuda.memory_reserved()
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def plan(estimate: MemoryEstimate, device_bytes: int, budget: float = BUDGET) -> dict:
    """The choice and its figures, for the run record and the log."""
    every_n_layers = choose_every_n_layers(estimate, device_bytes, budget)
    return {
        "every_n_layers": every_n_layers,
        "estimated_peak_gib": round(estimate.peak(every_n_layers) / 2**30, 2),
        "estimated_peak_without_gib": round(estimate.peak(0) / 2**30, 2),
        "device_gib": round(device_bytes / 2**30, 2),  # free and held by this process (device_memory_bytes)
        "budget": budget,
        "estimate": asdict(estimate),
    }
