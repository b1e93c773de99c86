import hashlib
import re
import unicodedata
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForImageTextToText, AutoProcessor

from common.errors import UsageError
from common.recipe import parse_stage_arguments
from stages.base_model import QWEN_SPECIAL_TOKENS, BaseModelArguments, build_tiny_base_model, trl_chat_template

from .conftest import KHMER, REPO, THAI, tiny_args

SAMPLES = sorted((REPO / "samples" / "udhr").glob("*.md"))
NEW_TOKENS = 6


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

    # min = max: the stop tokens are masked until then, so a random model cannot end early and the count is exact
    settings = dict(min_new_tokens=NEW_TOKENS, max_new_tokens=NEW_TOKENS, do_sample=False)
    generated = loaded.generate(**inputs, **settings)
    prompt_length = inputs["input_ids"].shape[1]
    assert generated.shape == (1, prompt_length + NEW_TOKENS)
    assert torch.equal(generated[0, :prompt_length], inputs["input_ids"][0])
    # greedy: the first new token is the forward pass's best next token once the saved stop tokens are masked
    stop_ids = loaded.generation_config.eos_token_id
    assert sorted(stop_ids) == sorted(loaded_processor.tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"]))
    next_logits = logits[0, -1].clone()
    next_logits[stop_ids] = float("-inf")
    assert generated[0, prompt_length] == next_logits.argmax()
    # the saved folder generates exactly what the model it was saved from does
    assert torch.equal(generated, model.generate(**page_inputs(processor, thai_khmer_page), **settings))


def test_qwen2_vl_family_builds_and_runs(tmp_path, thai_khmer_page):
    model, processor = build_tiny_base_model(tiny_args(family="qwen2_vl"), seed=0)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    loaded_processor = AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded).__name__ == "Qwen2VLForConditionalGeneration"
    assert type(loaded_processor).__name__ == "Qwen2VLProcessor"
    inputs = page_inputs(loaded_processor, thai_khmer_page)
    assert int((inputs["input_ids"] == loaded.config.image_token_id).sum()) == int(inputs["image_grid_thw"].prod()) // 4
    with torch.no_grad():
        logits = loaded(**inputs).logits
        reference = model.eval()(**page_inputs(processor, thai_khmer_page)).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], len(loaded_processor.tokenizer))
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits, reference)


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
    special_ids = set(tokenizer.convert_tokens_to_ids(list(QWEN_SPECIAL_TOKENS)))
    for text in (THAI, KHMER, "ພາສາລາວ 😀 ∑ Ω"):
        ids = tokenizer(text)["input_ids"]
        assert tokenizer.decode(ids) == text
        # byte-level: text outside the corpus (the emoji, the symbols) becomes byte tokens, never an unknown token
        assert not special_ids & set(ids)
    decomposed = unicodedata.normalize("NFD", "Tiếng Việt")
    composed = unicodedata.normalize("NFC", decomposed)
    assert decomposed != composed
    # the normaliser runs before the BPE: both spellings are the same tokens, decoded as the composed one
    assert tokenizer(decomposed)["input_ids"] == tokenizer(composed)["input_ids"]
    assert tokenizer.decode(tokenizer(decomposed)["input_ids"]) == composed


def test_qwen_special_tokens_template_and_config_agree(tiny_model):
    model, processor, _ = tiny_model
    tokenizer = processor.tokenizer
    special_ids = [tokenizer.convert_tokens_to_ids(token) for token in QWEN_SPECIAL_TOKENS]
    assert len(set(special_ids)) == len(QWEN_SPECIAL_TOKENS)
    for token, token_id in zip(QWEN_SPECIAL_TOKENS, special_ids, strict=True):
        assert tokenizer(token, add_special_tokens=False)["input_ids"] == [token_id]
        assert tokenizer.decode([token_id]) == token
    ids = dict(zip(QWEN_SPECIAL_TOKENS, special_ids, strict=True))
    assert model.config.image_token_id == ids["<|image_pad|>"]
    assert model.config.video_token_id == ids["<|video_pad|>"]
    assert model.config.vision_start_token_id == ids["<|vision_start|>"]
    assert model.config.vision_end_token_id == ids["<|vision_end|>"]
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert model.config.text_config.eos_token_id == tokenizer.eos_token_id == ids["<|im_end|>"]
    assert model.config.text_config.pad_token_id == tokenizer.pad_token_id == ids["<|endoftext|>"]
    assert processor.chat_template == trl_chat_template("qwen2_5_vl")

    def chat(messages, **kwargs):
        return processor.apply_chat_template(messages, tokenize=False, **kwargs)

    def turn(role, *content):
        return {"role": role, "content": list(content)}

    hi, page = {"type": "text", "text": "hi"}, {"type": "text", "text": "Transcribe the page."}
    # Qwen2.5-VL's own format: its default system turn, images as vision_start/image_pad/vision_end
    assert chat([turn("user", hi)]) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
    )
    assert chat([turn("user", {"type": "image"}, page)], add_generation_prompt=True) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>Transcribe the page.<|im_end|>\n<|im_start|>assistant\n"
    )
    system, answer = {"type": "text", "text": "S"}, {"type": "text", "text": "ok"}
    assert chat([turn("system", system), turn("user", hi), turn("assistant", answer)]) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nok<|im_end|>\n"
    )


def _fingerprints(model, processor) -> tuple[str, str]:
    """(tokenizer, weights) hashes."""
    weights = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        weights.update(name.encode() + tensor.numpy().tobytes())
    return hashlib.sha256(processor.tokenizer.backend_tokenizer.to_str().encode()).hexdigest(), weights.hexdigest()


def test_build_is_deterministic_for_a_seed():
    first_tokenizer, first = _fingerprints(*build_tiny_base_model(tiny_args(), seed=3))
    again_tokenizer, again = _fingerprints(*build_tiny_base_model(tiny_args(), seed=3))
    other_tokenizer, other = _fingerprints(*build_tiny_base_model(tiny_args(), seed=4))
    assert first == again != other
    # the tokenizer is trained from the corpus alone: the seed draws only the weights
    assert first_tokenizer == again_tokenizer == other_tokenizer


def test_recipe_sets_size_and_shape(tmp_path):
    sizes = {
        "vocab_size": 1000,
        "hidden_size": 96,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 160,
        "vision_hidden_size": 48,
        "vision_num_heads": 3,
        "rope_theta": 10.0,
    }
    recipe = tmp_path / "recipe.yaml"
    corpus = [str(REPO / "samples" / "udhr")]
    recipe.write_text(yaml.safe_dump({"lang": "multi", "base_model": {"tokenizer_corpus": corpus, **sizes}}))
    _, args = parse_stage_arguments(
        "base_model", (BaseModelArguments,), ["--config", str(recipe), "--output_dir", str(tmp_path / "out")]
    )
    assert {name: getattr(args, name) for name in sizes} == sizes
    model, processor = build_tiny_base_model(args, seed=0)
    text = model.config.text_config
    assert len(processor.tokenizer) == text.vocab_size == 1000
    assert (text.hidden_size, text.num_hidden_layers, text.intermediate_size) == (96, 3, 160)
    layers = model.model.language_model.layers
    assert len(layers) == 3
    head_dim = 96 // 4
    assert layers[0].self_attn.q_proj.weight.shape == (4 * head_dim, 96)
    assert layers[0].self_attn.k_proj.weight.shape == (2 * head_dim, 96)
    assert layers[0].mlp.gate_proj.weight.shape == (160, 96)
    assert model.model.language_model.embed_tokens.weight.shape == model.lm_head.weight.shape == (1000, 96)
    # the multimodal rotary embedding's temporal/height/width sections cover half of each head
    assert sum(text.rope_parameters["mrope_section"]) == head_dim // 2
    assert text.rope_parameters["rope_theta"] == 10.0
    rotary = model.model.language_model.rotary_emb
    # the weights use it, not only the config
    assert rotary.inv_freq[1].item() == pytest.approx(10.0 ** (-2 / head_dim))
    assert model.config.vision_config.hidden_size == 48
    assert model.config.vision_config.out_hidden_size == 96  # the merger feeds the language model's width


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
    with pytest.raises(UsageError, match=re.escape(f"{tmp_path / 'corpus'} holds no .md or .txt files")):
        args.validate()
    assert not Path(tmp_path / "out").exists()  # refused before any work
