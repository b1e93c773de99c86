"""What differs between the backbone families the stages run, in one table: the modules that read images (which
pretraining freezes around a pretrained tower), where LoRA goes, and how a page's visual tokens are counted.

A family is known by its config's `model_type`, so a recipe's `model_name_or_path` naming a real checkpoint of
any family here is all a user changes."""

from dataclasses import dataclass

from common.errors import UsageError

# the language model's attention and MLP projections; never the vision tower's (its blocks are not under
# `language_model`), so LoRA leaves the tower and the projector as they are
LANGUAGE_MODEL_LINEAR = r".*language_model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj"


@dataclass(frozen=True)
class Family:
    towers: tuple[str, ...]  # submodules of the model's `.model` that turn images into language-model inputs
    lora_targets: str
    # True: the image is resized to one square and always costs `processor.image_seq_length` tokens (Gemma 3's
    # SigLIP); False: native resolution, one token per merged patch (the Qwen families)
    fixed_image_tokens: bool


FAMILIES = {
    "qwen2_vl": Family(("visual",), LANGUAGE_MODEL_LINEAR, fixed_image_tokens=False),
    "qwen2_5_vl": Family(("visual",), LANGUAGE_MODEL_LINEAR, fixed_image_tokens=False),
    "qwen3_vl": Family(("visual",), LANGUAGE_MODEL_LINEAR, fixed_image_tokens=False),
    "gemma3": Family(("vision_tower", "multi_modal_projector"), LANGUAGE_MODEL_LINEAR, fixed_image_tokens=True),
}


def family_of(config) -> Family:
    """The family of a model `config` (a transformers config); a `UsageError` naming the supported ones."""
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise UsageError(
            f"model type {model_type!r} is not a supported backbone; supported: {', '.join(FAMILIES)} "
            "(a checkpoint of one of them, e.g. Qwen/Qwen2.5-VL-3B-Instruct or google/gemma-3-4b-it)."
        )
    return FAMILIES[model_type]


def towers(model) -> list:
    """The image-reading modules of a loaded (not yet peft-wrapped) model."""
    return [getattr(model.model, name) for name in family_of(model.config).towers]
