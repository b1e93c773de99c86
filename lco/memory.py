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

`tokens` is the micro-batch's worst case: per-device batch x max_length. The choice keeps the estimate under
`budget` of the device's memory, leaving the rest to the allocator's fragmentation, the CUDA context and the frozen
tower's transient forward. The estimate goes into the run record beside the measured peak, so every GPU run checks it.
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


@dataclass(frozen=True)
class MemoryEstimate:
    state_bytes: int
    layers: int
    hidden_bytes: int  # one token's input to a layer: what a checkpointed layer keeps
    layer_bytes: int  # what one layer keeps per token without checkpointing
    head_bytes: int  # the fused LM head's tile of logits and its gradient
    tokens: int

    def peak(self, every_n_layers: int) -> int:
        """Bytes at the peak of a step with every `every_n_layers`-th layer checkpointed (0: none)."""
        checkpointed = math.ceil(self.layers / every_n_layers) if every_n_layers else 0
        kept = (self.layers - checkpointed) * self.layer_bytes + checkpointed * self.hidden_bytes
        recompute = self.layer_bytes if checkpointed else 0
        return self.state_bytes + self.tokens * (kept + recompute) + self.head_bytes


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


def estimate_memory(model, tokens: int, lora_r: int | None, zero_stage: int | None, world_size: int) -> MemoryEstimate:
    text_config = model.config.get_text_config()
    dtype_bytes = next(model.parameters()).element_size()
    return MemoryEstimate(
        state_bytes=training_state_bytes(model, lora_r, zero_stage, world_size),
        layers=text_config.num_hidden_layers,
        hidden_bytes=text_config.hidden_size * dtype_bytes,
        layer_bytes=layer_activation_bytes(model),
        head_bytes=min(tokens, HEAD_TILE[0]) * min(text_config.vocab_size, HEAD_TILE[1]) * 4 * 2,
        tokens=tokens,
    )


def device_memory_bytes() -> int:
    """The training device's memory: the current GPU's, or this machine's RAM on a CPU."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def plan(estimate: MemoryEstimate, device_bytes: int, budget: float = BUDGET) -> dict:
    """The choice and its figures, for the run record and the log."""
    every_n_layers = choose_every_n_layers(estimate, device_bytes, budget)
    return {
        "every_n_layers": every_n_layers,
        "estimated_peak_gib": round(estimate.peak(every_n_layers) / 2**30, 2),
        "estimated_peak_without_gib": round(estimate.peak(0) / 2**30, 2),
        "device_gib": round(device_bytes / 2**30, 2),
        "budget": budget,
        "estimate": asdict(estimate),
    }
