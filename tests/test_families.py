"""Every backbone family of lco/families.py through every stage, on its tiny model."""

import json
import typing

import pytest
import torch
import yaml
from PIL import Image
from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

from common.errors import UsageError, run_cli
from common.run_record import read_run_record, verify_chain
from data_prep.cli import main as data_prep
from data_prep.speech import speak_evalset
from lco.embedder import Embedder, EmbeddingModel, Item, load_audio, model_inputs
from lco.families import FAMILIES, check_packs, family_of, towers
from lco.lora import lora_config
from lco.memory import layer_activation_bytes
from lco.packing import pack
from lco.pretrain_data import page_example
from stages import base_model, contrast, evaluate, export, pretrain

from .conftest import KHMER, REPO, THAI, thai_pages_dataset
from .test_packing import assert_same_training, examples, loss_and_gradients, packed_equals_padded, padded_batch

TEXTS = ["hello", THAI, f"{KHMER} {THAI}"]


@pytest.fixture(scope="module", params=typing.get_args(base_model.BaseModelArguments.__annotations__["family"]))
def family(request, tmp_path_factory):
    """(family name, the folder of its tiny model, written by stages.base_model)."""
    folder = tmp_path_factory.mktemp(request.param) / "base"
    recipe = str(REPO / "recipes/tiny.yaml")
    base_model.main(["--config", recipe, "--family", request.param, "--output_dir", str(folder)])
    return request.param, folder


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    return thai_pages_dataset(tmp_path_factory.mktemp("pages"), documents=4, chars=160, bookmarks=True)


def load(folder):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    torch.manual_seed(0)
    return AutoModelForImageTextToText.from_pretrained(folder), AutoProcessor.from_pretrained(folder)


def test_the_family_is_known_by_its_config_and_an_unknown_one_is_named(family):
    name, folder = family
    model, _ = load(folder)
    assert family_of(model.config) is FAMILIES[model.config.model_type] and model.config.model_type.startswith(name)
    assert all(isinstance(tower, torch.nn.Module) for tower in towers(model))
    with pytest.raises(UsageError, match="model type 'llama' is not a supported backbone; supported: qwen2_vl"):
        family_of(type("Config", (), {"model_type": "llama"})())
    with pytest.raises(UsageError, match="whole Qwen2.5-Omni checkpoint .* save it as a folder of its own"):
        family_of(type("Config", (), {"model_type": "qwen2_5_omni"})())


def test_left_padded_pooling_equals_the_unpadded_embedding(family, thai_khmer_page):
    model, processor = load(family[1])
    model = EmbeddingModel(model).eval()
    items = [Item(TEXTS[0]), Item(image=thai_khmer_page), Item(TEXTS[2], thai_khmer_page), Item(TEXTS[1])]
    with torch.no_grad():
        batched = model(**model_inputs(processor, items, 64, 224))
        alone = torch.cat([model(**model_inputs(processor, [item], 64, 224)) for item in items])
    torch.testing.assert_close(batched, alone, rtol=1e-4, atol=1e-5)
    assert torch.allclose(batched.norm(dim=-1), torch.ones(len(items)))


def test_frozen_towers_are_outside_the_backward_and_the_language_model_gets_gradients(family):
    model, processor = load(family[1])
    row = {"doc_id": "d", "page": 1, "image": Image.new("RGB", (300, 400), "gray"), "text": "ก" * 80}
    example = page_example(row, processor, max_length=200, max_pixels=40_000, seed=0)
    batch = DataCollatorForVisionLanguageModeling(processor=processor, completion_only_loss=True)([example])
    image_token = getattr(model.config, "image_token_id", None) or model.config.image_token_index
    assert int((batch["input_ids"] == image_token).sum()) == example["image_tokens"] > 0
    for tower in towers(model):
        pretrain.freeze(tower)
    model.activation_checkpointing_enable()  # as the Trainer does: makes every input embedding require grad
    model.train()
    outputs = []
    for tower in towers(model):
        tower.register_forward_hook(lambda module, args, output: outputs.append(output))
    model(**batch).loss.backward()
    tensors = [t for output in outputs for t in (output.values() if isinstance(output, dict) else [output])]
    assert tensors and not any(t.requires_grad for t in tensors if isinstance(t, torch.Tensor))  # no backward there
    language = [p.grad for n, p in model.named_parameters() if "language_model.layers" in n]
    assert language and all(g is not None for g in language) and any(g.abs().sum() > 0 for g in language)


def test_the_one_layer_probe_measures_what_a_layer_of_the_model_keeps_for_backward(family):
    from transformers.modeling_layers import GradientCheckpointingLayer

    model, _ = load(family[1])
    model.train()
    layer = [m for n, m in model.named_modules() if isinstance(m, GradientCheckpointingLayer) and "language" in n][-1]
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept, inside = {}, [False]

    def pack(tensor):
        if inside[0] and tensor.untyped_storage().data_ptr() not in weights:
            kept[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    layer.register_forward_pre_hook(lambda *_: inside.__setitem__(0, True))
    layer.register_forward_hook(lambda *_: inside.__setitem__(0, False))
    tokens = torch.randint(10, 200, (1, 32))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(input_ids=tokens, labels=tokens)
    assert layer_activation_bytes(model, tokens=32) == pytest.approx(sum(kept.values()) / 32, rel=0.02)


def test_a_family_packs_padding_free_batches_exactly_or_is_refused(family):
    model, processor = load(family[1])
    if family_of(model.config).packs:
        packed_equals_padded(model, processor)
        return
    with pytest.raises(UsageError, match=f"--padding_free true: {model.config.model_type} models do not train"):
        check_packs(model.config.model_type)
    # why (lco/families.py): packed, a text-only example after a page is masked wrongly. Pages alone pack exactly
    # (measured: loss equal, gradients within 5e-7); a page and a text continuation differ (loss by 4e-4
    # relative, the q_norm gradients by 12% of their largest entry)
    rows = examples(processor)
    pages = padded_batch(processor, rows[:2])
    assert_same_training(loss_and_gradients(model, dict(pages)), loss_and_gradients(model, pack(pages)))
    page_and_text = padded_batch(processor, [examples(processor)[0], rows[2]])  # the collator rewrites its rows
    padded_loss, padded_grads = loss_and_gradients(model, dict(page_and_text))
    packed_loss, packed_grads = loss_and_gradients(model, pack(page_and_text))
    assert abs(packed_loss - padded_loss) > 1e-4 * padded_loss
    worst = max(float((packed_grads[n] - g).abs().max() / g.abs().max()) for n, g in padded_grads.items() if g.any())
    assert worst > 0.01


def test_lora_sits_on_the_language_model_only_and_the_merged_model_embeds_like_the_adapter(family):
    from peft import get_peft_model

    base, processor = load(family[1])
    model = EmbeddingModel(get_peft_model(base, lora_config(base.config, 4, 8, 0.0))).eval()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and ".language_model.layers." in n for n in trainable)
    with torch.no_grad():  # LoRA B starts at zero; move it so the adapters matter
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.1)
        inputs = model_inputs(processor, [Item(text) for text in TEXTS], 64, 224)
        adapted = model(**inputs)
        merged = EmbeddingModel(model.model.merge_and_unload()).eval()(**inputs)
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-5)


def test_every_stage_runs_on_the_family_and_the_export_embeds_like_the_embedder(family, pages, tmp_path, capsys):
    name, folder = family
    recipe = ["--config", str(REPO / "recipes/tiny.yaml"), "--lang", "th"]
    pretrain.main(
        [
            *recipe,
            *("--model_name_or_path", str(folder), "--datasets", str(pages), "--output_dir", str(tmp_path / "pre")),
            *("--max_length", "200", "--max_pixels", "40000", "--eval_fraction", "0.25", "--cer_pages", "1"),
            *("--eval_strategy", "no", "--max_steps", "2", "--freeze_vision", "true"),
        ]
    )
    contrast.main(
        [
            *recipe,
            *("--model_name_or_path", str(tmp_path / "pre/final"), "--pages_datasets", str(pages)),
            *("--output_dir", str(tmp_path / "contrast"), "--passage_chars", "40", "--contrastive_batch_size", "8"),
            *("--mini_batch_size", "4", "--eval_fraction", "0.3", "--eval_steps", "0", "--image_max_side", "200"),
            *("--max_text_tokens", "48", "--max_steps", "2"),
        ]
    )
    final = tmp_path / "contrast/final"
    assert [r["stage"] for r in verify_chain(final)] == ["contrast", "pretrain", "base_model"]
    run_cli(data_prep, ["evalset", "--lang", "th", "--pages", str(pages), "--output", str(tmp_path / "evalset")])
    evaluate.main(
        [*recipe, "--model", str(final), "--data", str(tmp_path / "evalset"), "--output", str(tmp_path / "e.json")]
    )
    assert f"| {final} |" in capsys.readouterr().out
    run_cli(export.main, ["--model", str(final), "--output", str(tmp_path / "st")])
    assert read_run_record(tmp_path / "st")["stage"] == "export"

    from sentence_transformers import SentenceTransformer

    exported = SentenceTransformer(str(tmp_path / "st"), device="cpu")
    embedder = Embedder(str(final), device="cpu")
    page = Image.new("RGB", (180, 260), "white")
    torch.testing.assert_close(
        exported.encode(TEXTS, convert_to_tensor=True), embedder.encode_texts(TEXTS), atol=1e-5, rtol=0
    )
    torch.testing.assert_close(
        exported.encode([page], convert_to_tensor=True), embedder.encode_images([page]), atol=1e-5, rtol=0
    )


@pytest.fixture(scope="module")
def omni(tmp_path_factory):
    folder = tmp_path_factory.mktemp("omni") / "base"
    base_model.main(
        ["--config", str(REPO / "recipes/tiny.yaml"), "--family", "qwen2_5_omni", "--output_dir", str(folder)]
    )
    return folder


def sine(path, hz: float, rate: int, seconds: float) -> None:
    import numpy as np
    import soundfile

    soundfile.write(path, 0.3 * np.sin(2 * np.pi * hz * np.arange(int(rate * seconds)) / rate), rate)


def test_batched_transcriptions_equal_one_page_at_a_time(family, pages):
    """The held-out CER's left-padded batches give each page the greedy transcription it gets alone."""
    from lco.generation_eval import transcription_cer

    model, processor = load(family[1])
    args = pretrain.PretrainArguments(
        model_name_or_path=str(family[1]), datasets=[str(pages)], max_pixels=40000, eval_fraction=0.5
    )
    examples = pretrain.load_examples(args, processor, 200, 0)[1]
    alone = transcription_cer(model.eval(), processor, examples, batch_size=1)
    batched = transcription_cer(model, processor, examples, batch_size=len(examples))
    assert batched["batches"] == 1 and alone["batches"] == len(examples) == 4
    assert batched["hypotheses"] == alone["hypotheses"] and batched["cer"] == alone["cer"]


def test_audio_files_are_read_mono_at_the_feature_extractors_rate(tmp_path):
    import numpy as np

    sine(tmp_path / "a.wav", 440, 22050, 1.5)
    samples = load_audio(tmp_path / "a.wav")
    assert samples.dtype == np.float32 and samples.shape == (24000,)  # 1.5 s at 16 kHz
    spectrum = np.abs(np.fft.rfft(samples))
    assert np.argmax(spectrum) * 16000 / len(samples) == pytest.approx(440, abs=1)


def test_audio_and_video_embed_deterministically_and_independent_of_the_batch_size(omni, tmp_path, thai_khmer_page):
    for number, hz in enumerate((220, 440, 880)):
        sine(tmp_path / f"{number}.wav", hz, 16000, 0.5 + number / 2)
    frames = [thai_khmer_page, thai_khmer_page.rotate(3), Image.new("RGB", thai_khmer_page.size, "white")] * 2
    items = [
        Item(audio=load_audio(tmp_path / "0.wav")),
        Item(TEXTS[1]),
        Item(TEXTS[0], audio=load_audio(tmp_path / "1.wav")),
        Item(video=frames),
        Item(image=thai_khmer_page),
        Item(audio=load_audio(tmp_path / "2.wav")),
    ]
    embedder = Embedder(str(omni), device="cpu")
    together = embedder.encode(items, batch_size=6)
    torch.testing.assert_close(
        torch.cat([embedder.encode([item], batch_size=1) for item in items]), together, rtol=1e-4, atol=1e-5
    )
    assert torch.equal(embedder.encode(items, batch_size=6), together)
    assert torch.cdist(together, together).fill_diagonal_(1).min() > 1e-3  # six inputs, six embeddings


def test_spoken_queries_run_through_evaluate_and_a_model_that_cannot_hear_is_refused(
    omni, family, pages, tmp_path, capsys
):
    run_cli(data_prep, ["evalset", "--lang", "th", "--pages", str(pages), "--output", str(tmp_path / "evalset")])
    run_cli(
        data_prep,
        ["speak", "--lang", "th", "--evalset", str(tmp_path / "evalset"), "--output", str(tmp_path / "spoken")],
    )
    assert "4 queries spoken (4 in voice th)" in capsys.readouterr().out
    queries = [json.loads(line) for line in (tmp_path / "spoken/queries.jsonl").read_text().splitlines()]
    written = [json.loads(line) for line in (tmp_path / "evalset/queries.jsonl").read_text().splitlines()]
    assert [q["transcript"] for q in queries] == [q["text"] for q in written] and not any(q["text"] for q in queries)
    assert all((tmp_path / "spoken" / q["audio"]).stat().st_size > 1000 for q in queries)

    recipe = ["--config", str(REPO / "recipes/tiny.yaml"), "--lang", "th", "--data", str(tmp_path / "spoken")]
    evaluate.main([*recipe, "--model", str(omni), "--output", str(tmp_path / "results.json")])
    out = capsys.readouterr().out
    assert "bm25 (page text) left out" in out and f"| {omni} |" in out
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    assert results[str(omni)]["all"]["queries"] == 4
    if family[0] != "qwen2_5_omni":
        with pytest.raises(SystemExit) as exit_info:
            run_cli(evaluate.main, [*recipe, "--model", str(family[1]), "--output", str(tmp_path / "e2.json")])
        assert exit_info.value.code == 2
        assert "cannot read audio (it reads text, image); give an omnimodal model" in capsys.readouterr().err


def test_contrast_trains_the_omni_model_on_audio_pairs(omni, tmp_path):
    lines = []
    for number in range(8):
        sine(tmp_path / f"{number}.wav", 200 + 90 * number, 16000, 0.5)
        pair = {"anchor": {"text": "", "audio_path": f"{number}.wav"}, "positive": {"text": THAI[number * 4 :][:20]}}
        lines.append(json.dumps(pair, ensure_ascii=False))
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    recipe = yaml.safe_load((REPO / "recipes/tiny.yaml").read_text(encoding="utf-8"))
    recipe["contrast"]["pages_datasets"] = []  # the JSONL pairs only
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    contrast.main(
        [
            *("--config", str(tmp_path / "recipe.yaml"), "--lang", "th", "--model_name_or_path", str(omni)),
            *("--train_files", str(tmp_path / "pairs.jsonl"), "--output_dir", str(tmp_path / "run")),
            *("--contrastive_batch_size", "4", "--mini_batch_size", "2", "--eval_fraction", "0", "--eval_steps", "0"),
            *("--max_steps", "2", "--max_text_tokens", "48"),
        ]
    )
    record = read_run_record(tmp_path / "run/final", expected_stage="contrast")
    assert record["results"]["pairs"]["train_multimodal"] == 8 and len(record["results"]["loss_history"]) == 2


def test_a_corpus_of_audio_and_video_is_scored_and_reported(omni, tmp_path, thai_khmer_page, capsys):
    data = tmp_path / "evalset"
    (data / "audio").mkdir(parents=True)
    (data / "clip").mkdir()
    for number in range(3):
        sine(data / "audio" / f"{number}.wav", 300 + 200 * number, 16000, 0.5)
    for number in range(2):
        thai_khmer_page.rotate(number).save(data / "clip" / f"{number}.png")
    corpus = [{"_id": f"a{n}", "audio": f"audio/{n}.wav", "text": ""} for n in range(3)]
    corpus.append({"_id": "v", "video": "clip", "text": ""})
    (data / "corpus.jsonl").write_text("".join(json.dumps(row) + "\n" for row in corpus))
    queries = [{"_id": "q1", "text": "a low tone"}, {"_id": "q2", "text": THAI[:30]}]
    (data / "queries.jsonl").write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in queries))
    (data / "qrels.tsv").write_text("query-id\tcorpus-id\tscore\nq1\ta0\t1\nq2\tv\t1\n")
    argv = ["--config", str(REPO / "recipes/tiny.yaml"), "--lang", "th", "--data", str(data), "--model", str(omni)]
    evaluate.main([*argv, "--output", str(tmp_path / "results.json"), "--report", str(tmp_path / "report")])
    assert "evaluate: 2 queries, 4 pages, 2 judgements" in capsys.readouterr().out
    assert json.loads((tmp_path / "results.json").read_text())["results"][str(omni)]["all"]["queries"] == 2
    assert len(list((tmp_path / "report").rglob("*.jpg"))) == 4  # the clip's first frame, grey squares for audio

    (data / "corpus.jsonl").write_text(json.dumps({"_id": "a0", "audio": "../outside.wav"}) + "\n")
    with pytest.raises(UsageError, match="audio or video paths outside the eval folder"):
        evaluate.main([*argv, "--output", str(tmp_path / "again.json")])


@pytest.mark.parametrize(
    "lines, refusal",
    [
        ('{"_id": "q1", "text": "សួស្តី", "lang": "km"}\n', "espeak-ng has no voice for language `km`"),
        ('{"_id": "q1", "text": "hello", "lang": "en"}\n[1, 2]\n', "queries.jsonl line 2 is not a JSON object"),
    ],
    ids=["a language without a voice", "a line that is not an object"],
)
def test_speak_names_what_it_cannot_read_and_writes_nothing(lines, refusal, tmp_path):
    evalset = tmp_path / "evalset"
    evalset.mkdir()
    (evalset / "queries.jsonl").write_text(lines, encoding="utf-8")
    with pytest.raises(UsageError, match=refusal):
        speak_evalset(str(evalset), str(tmp_path / "out"), None, 150)
    assert not (tmp_path / "out").exists()
