"""LoRA on the language model's linear layers (vision tower and merger untouched), and its merge."""

from pathlib import Path

from .families import family_of


def lora_config(model_config, r: int, alpha: int, dropout: float):
    """LoRA on the linear layers the model's family names (`lco.families`)."""
    from peft import LoraConfig

    targets = family_of(model_config).lora_targets
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type="CAUSAL_LM")


def save_merged(base_model: str, adapter: Path, folder: Path) -> None:
    """Merge the saved `adapter` into freshly loaded base weights in their own dtype (never into
    dequantised weights that are then thrown away) and save the result to `folder`. Called on one process after
    training: a ZeRO-3 config still registered would make the load partition the weights, a collective that waits
    for the other processes forever, so it is unregistered first."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    base = AutoModelForImageTextToText.from_pretrained(base_model, dtype="auto")
    PeftModel.from_pretrained(base, adapter).merge_and_unload().save_pretrained(folder)
