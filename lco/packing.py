"""Padding-free batches for pretraining: a micro-batch's examples packed into one row, each attending to itself only.

TRL 1.16 refuses `padding_free` for vision datasets, so this packs the output of its
`DataCollatorForVisionLanguageModeling` (tokenised, images processed, completion-only labels): the real tokens of the
padded batch in one row, no attention mask, position ids that restart at each example. From position ids that
restart, transformers 5.24 builds a block-diagonal causal mask (sdpa, eager: `masking_utils.
find_packed_sequence_indices`) and flash-attention takes its varlen path. The Qwen families rotate queries and keys by
multimodal positions (time, height, width for image tokens); those are the model's own `get_rope_index`, computed per
example, under a row of text positions that the mask is built from: a (4, 1, tokens) tensor, the layout their forward
takes for packed sequences.
"""

import torch
from trl import SFTTrainer

from .families import check_packs

# the collator's outputs with one value per token, (batch, length) like its attention mask
PER_TOKEN = ("input_ids", "labels", "mm_token_type_ids", "token_type_ids")


def rope_index(model):
    """A function of a padded batch giving the model's multimodal positions of its tokens, (3, batch, length) and
    counted from 0 in each example."""
    check_packs(model.config.model_type)
    if model.config.model_type == "qwen2_5_omni_thinker":
        return lambda batch: model.get_rope_index(
            batch["input_ids"], batch.get("image_grid_thw"), None, batch["attention_mask"]
        )[0]
    return lambda batch: model.model.get_rope_index(
        batch["input_ids"],
        batch["mm_token_type_ids"],
        image_grid_thw=batch.get("image_grid_thw"),
        attention_mask=batch["attention_mask"],
    )[0]


def pack(batch: dict, rope_index=None) -> dict:
    """`batch` (a padded collator output) as one row of its examples' real tokens, with position ids restarting at
    each example; each example's first label is ignored, as it would be predicted from the example before. With
    `rope_index` (the Qwen families) the position ids are (4, 1, tokens), else one per token, (1, tokens)."""
    mask = batch["attention_mask"].bool()  # (batch, length)
    lengths = mask.sum(-1).tolist()
    others = {key: value for key, value in batch.items() if key != "attention_mask" and key not in PER_TOKEN}
    if any(torch.is_tensor(value) and value.shape == mask.shape for value in others.values()):
        raise ValueError(f"a per-token input not known to pack, among {sorted(batch)}")
    packed = dict(others)
    for key in PER_TOKEN:
        if key in batch:
            packed[key] = batch[key][mask].unsqueeze(0)  # (1, tokens), example after example
    starts = torch.tensor([0, *lengths[:-1]]).cumsum(0)
    packed["labels"][0, starts] = -100
    text = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)  # (1, tokens)
    if rope_index is None:
        packed["position_ids"] = text
        return packed
    mrope = rope_index(batch)[:, mask]  # (3, tokens)
    packed["position_ids"] = torch.cat([text, mrope.to(text.dtype)]).unsqueeze(1)  # (4, 1, tokens)
    return packed


class PackedCollator:
    """`collator`'s batches, packed (`pack`)."""

    def __init__(self, collator, model):
        self.collator, self.rope_index = collator, rope_index(model)

    def __call__(self, examples: list[dict]) -> dict:
        return pack(self.collator(examples), self.rope_index)


class PackingSFTTrainer(SFTTrainer):
    """SFTTrainer whose batches are packed (`PackedCollator` around the collator it builds) when its
    `args.padding_free` is set, which SFTTrainer itself refuses for vision datasets."""

    def __init__(self, model, args, *rest, **kwargs):
        self.packs = args.padding_free
        args.padding_free = False  # the packing is ours, not TRL's (set again once TRL has checked it)
        try:
            super().__init__(model, args, *rest, **kwargs)
        finally:
            args.padding_free = self.packs
        if self.packs:
            self.data_collator = PackedCollator(self.data_collator, model)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self.packs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # SFTTrainer counts a batch without attention mask as position_ids.size(1) tokens: 1 for (4, 1, tokens)
        counted = self._total_train_tokens
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self.model.training:
            tokens = torch.tensor(inputs["input_ids"].numel(), device=inputs["input_ids"].device)
            self._total_train_tokens = (
                counted + self.accelerator.gather_for_metrics(tokens).sum().item() // self._tp_size
            )
            self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
        return result
