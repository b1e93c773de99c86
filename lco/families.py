"""What differs between the backbone families the stages run, in one table: the modules that read images, audio
and video (which pretraining freezes around a pretrained tower), and where LoRA goes. (How many tokens a page
costs, the processor knows: `lco.pretrain_data.image_tokens`.)

A family is known by its config's `model_type`, so a recipe's `model_name_or_path` naming a real checkpoint of
any family here is all a user changes."""

import json
from dataclasses import dataclass
from pathlib import Path

from common.errors import UsageError

# the language model's attention and MLP projections; never the vision tower's (its blocks are not under
# `language_model`), so LoRA leaves the tower and the projector as they are
LANGUAGE_MODEL_LINEAR = r".*language_model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj"


@dataclass(frozen=True)
class Family:
    towers: tuple[str, ...]  # submodules of the model's `.model` that turn images (or audio) into its inputs
    lora_targets: str
    reads: tuple[str, ...] = ("text", "image")  # the kinds of input it embeds
    packs: bool = True  # padding-free batches (lco/packing.py) train it exactly as padded ones do


FAMILIES = {
    "qwen2_vl": Family(("visual",), LANGUAGE_MODEL_LINEAR),
    "qwen2_5_vl": Family(("visual",), LANGUAGE_MODEL_LINEAR),
    "qwen3_vl": Family(("visual",), LANGUAGE_MODEL_LINEAR),
    # packed, its sliding-window layers' mask looks image blocks up by each example's positions in the whole packed
    # row (transformers 5.24, masking_utils: blockwise_overlay under remap_positions_for_packed_sequence): pages
    # alone pack exactly, but a text-only example after a page trains otherwise (tests/test_families.py)
    "gemma3": Family(("vision_tower", "multi_modal_projector"), LANGUAGE_MODEL_LINEAR, packs=False),
    # Qwen2.5-Omni's thinker: text, images, audio and video in, text out (its talker, which speaks, is not used)
    "qwen2_5_omni_thinker": Family(
        ("visual", "audio_tower"), LANGUAGE_MODEL_LINEAR, ("text", "image", "audio", "video")
    ),
}


def family_of(config) -> Family:
    """The family of a model `config` (a transformers config); a `UsageError` naming the supported ones."""
    return family_named(getattr(config, "model_type", None))


def family_named(model_type: str | None) -> Family:
    if model_type == "qwen2_5_omni":
        raise UsageError(
            "a whole Qwen2.5-Omni checkpoint (thinker and talker): the stages take its thinker, the part that reads "
            "and writes text; save it as a folder of its own with Qwen2_5OmniThinkerForConditionalGeneration."
            "from_pretrained(path).save_pretrained(folder), and the processor beside it, and give that folder."
        )
    if model_type not in FAMILIES:
        raise UsageError(
            f"model type {model_type!r} is not a supported backbone; supported: {', '.join(FAMILIES)} "
            "(a checkpoint of one of them, e.g. Qwen/Qwen2.5-VL-3B-Instruct or google/gemma-3-4b-it)."
        )
    return FAMILIES[model_type]


def model_type_in(model: str) -> str | None:
    """The `model_type` of a model folder's config.json; None for a hub id (checked when it loads)."""
    config = Path(model) / "config.json"
    if not config.is_file():
        return None
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as error:
        raise UsageError(f"{config} is not a JSON object ({error}); the model folder is damaged.") from None


def check_reads(model: str, kinds: set[str]) -> None:
    """Refuse a model folder of no supported family, or of one that cannot read every one of `kinds` of input,
    from its config.json alone (before its weights load; a hub id is checked when it loads)."""
    model_type = model_type_in(model)
    if model_type is None:
        return
    family = family_named(model_type)
    unread = sorted(kinds - set(family.reads))
    if unread:
        raise UsageError(
            f"{model} cannot read {' or '.join(unread)} (it reads {', '.join(family.reads)}); "
            "give an omnimodal model (the qwen2_5_omni family) for inputs with audio or video."
        )


def check_packs(model_type: str | None) -> None:
    """Refuse padding-free batches for a family that does not train on them as on padded ones."""
    if model_type is not None and not family_named(model_type).packs:
        raise UsageError(
            f"--padding_free true: {model_type} models do not train correctly on packed batches in transformers 5.24 "
            "(lco/families.py says why); set padding_free to false for this model."
        )


def towers(model) -> list:
    """The image-reading modules of a loaded (not yet peft-wrapped) model."""
    return [getattr(model.model, name) for name in family_of(model.config).towers]
