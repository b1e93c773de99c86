import hashlib
import unicodedata
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from stages.base_model import QWEN_SPECIAL_TOKENS, build_tiny_base_model, qwen_vl_chat_template
from stages.errors import UsageError

from .conftest import KHMER, REPO, THAI, tiny_args

SAMPLES = sorted((REPO / "samples" / "udhr").glob("*.md"))


def page_inputs(processor, image, prompt="Transcribe the page."):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    return processor(text=[text], images=[image], return_tensors="pt")


def test_save_load_round_trip_forward_and_generate(tiny_model, thai_khmer_page):
    model, processor, folder = tiny_model
    loaded = AutoModelForImageTextToText.from_pretrained(folder).eval()
    loaded_processor = AutoProcessor.from_pretrained(folder)
    assert type(loaded).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert type(loaded_processor).__name__ == "Qwen2_5_VLProcessor"

    inputs = page_inputs(loaded_processor, thai_khmer_page)
    n_image_tokens = int((inputs["input_ids"] == loaded.config.image_token_id).sum())
    # one visual token per 2x2 merged 14-px patch
    assert n_image_tokens == int(inputs["image_grid_thw"].prod()) // 4 > 0
    with torch.no_grad():
        logits = loaded(**inputs).logits
        reference = model.eval()(**page_inputs(processor, thai_khmer_page)).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], len(loaded_processor.tokenizer))
    torch.testing.assert_close(logits, reference)

    generated = loaded.generate(**inputs, max_new_tokens=6, do_sample=False)
    new_tokens = generated[0, inputs["input_ids"].shape[1] :]
    assert 1 <= len(new_tokens) <= 6
    assert isinstance(loaded_processor.decode(new_tokens), str)


def test_qwen2_vl_family_builds_and_runs(tmp_path, thai_khmer_page):
    model, processor = build_tiny_base_model(tiny_args(family="qwen2_vl"), seed=0)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path)
    assert type(loaded).__name__ == "Qwen2VLForConditionalGeneration"
    inputs = page_inputs(AutoProcessor.from_pretrained(tmp_path), thai_khmer_page)
    with torch.no_grad():
        assert torch.isfinite(loaded(**inputs).logits).all()


@pytest.mark.parametrize("path", SAMPLES, ids=lambda p: p.stem)
def test_tokenizer_round_trips_every_sample_language(tiny_model, path):
    tokenizer = tiny_model[1].tokenizer
    text = path.read_text(encoding="utf-8")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    # a trained BPE, not bytes: the UDHR takes far fewer tokens than UTF-8 bytes
    assert len(ids) < len(text.encode("utf-8")) / 2


def test_tokenizer_handles_unseen_text_and_normalises_to_nfc(tiny_model):
    tokenizer = tiny_model[1].tokenizer
    for text in (THAI, KHMER, "ພາສາລາວ 😀 ∑ Ω"):
        assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    decomposed = unicodedata.normalize("NFD", "Tiếng Việt")
    assert tokenizer.decode(tokenizer(decomposed)["input_ids"]) == unicodedata.normalize("NFC", decomposed)


def test_qwen_special_tokens_template_and_config_agree(tiny_model):
    model, processor, _ = tiny_model
    tokenizer = processor.tokenizer
    for token in QWEN_SPECIAL_TOKENS:
        assert tokenizer(token, add_special_tokens=False)["input_ids"] == [tokenizer.convert_tokens_to_ids(token)]
    assert model.config.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert model.config.vision_start_token_id == tokenizer.convert_tokens_to_ids("<|vision_start|>")
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert processor.chat_template == qwen_vl_chat_template()
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "hi"}]}], tokenize=False)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>user\nhi<|im_end|>\n")


def _fingerprint(model, processor) -> str:
    digest = hashlib.sha256(processor.tokenizer.backend_tokenizer.to_str().encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode() + tensor.numpy().tobytes())
    return digest.hexdigest()


def test_build_is_deterministic_for_a_seed():
    first = _fingerprint(*build_tiny_base_model(tiny_args(), seed=3))
    again = _fingerprint(*build_tiny_base_model(tiny_args(), seed=3))
    other = _fingerprint(*build_tiny_base_model(tiny_args(), seed=4))
    assert first == again != other


def test_recipe_sets_size_and_shape(tiny_model):
    model, _ = build_tiny_base_model(tiny_args(hidden_size=96, num_attention_heads=4, num_hidden_layers=3), seed=0)
    assert model.config.text_config.hidden_size == 96
    assert len(model.model.language_model.layers) == 3
    assert sum(p.numel() for p in model.parameters()) > sum(p.numel() for p in tiny_model[0].parameters())


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"hidden_size": 60}, "multiple of 8"),
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
        ({"tokenizer_corpus": ["no/such/folder"]}, "no/such/folder does not exist"),
        ({"vocab_size": 100}, "at least 270"),
    ],
)
def test_bad_sizes_are_reported(overrides, message, tmp_path):
    args = tiny_args(output_dir=str(tmp_path / "out"), **overrides)
    with pytest.raises(UsageError, match=message):
        args.validate()


def test_empty_corpus_folder_is_reported(tmp_path):
    (tmp_path / "corpus").mkdir()
    args = tiny_args(output_dir=str(tmp_path / "out"), tokenizer_corpus=[str(tmp_path / "corpus")])
    with pytest.raises(UsageError, match="holds no .md or .txt files"):
        args.validate()
    assert Path(tmp_path / "corpus").is_dir()
