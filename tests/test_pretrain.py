import os
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

from common.errors import run_cli
from common.run_record import read_run_record, verify_chain
from lco.pretrain_data import (
    COMPLETION_SUFFIX_TOKENS,
    CONTINUATION_INSTRUCTION,
    INSTRUCTIONS,
    MIN_COMPLETION_TOKENS,
    continuation_example,
    held_out_documents,
    page_example,
    smallest_max_length,
)
from stages.pretrain import freeze
from stages.pretrain import main as pretrain

from .conftest import DEEPSPEED_ENV, REPO, thai_pages_dataset

THAI = (REPO / "samples/udhr/th.md").read_text(encoding="utf-8").split("\n\n")


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    """A small Thai pages dataset: 4 documents of 2 pages each, text layer."""
    return thai_pages_dataset(tmp_path_factory.mktemp("pages"), documents=4, chars=160)


@pytest.fixture
def base(recorded_base):
    return recorded_base


def pretrain_argv(base, pages, output, *extra):
    return [
        "--config",
        str(REPO / "recipes/tiny.yaml"),
        "--lang",
        "th",
        "--model_name_or_path",
        str(base),
        "--datasets",
        str(pages),
        "--output_dir",
        str(output),
        "--max_length",
        "200",
        "--max_pixels",
        "40000",
        "--eval_fraction",
        "0.25",
        "--cer_pages",
        "1",
        "--eval_strategy",
        "no",
        "--logging_steps",
        "1",
        "--per_device_train_batch_size",
        "2",
        "--learning_rate",
        "5.0e-3",
        "--warmup_steps",
        "0",
        *extra,
    ]


def test_examples_fit_max_length_keep_every_image_token_and_mask_the_prompt(tiny_model):
    processor = tiny_model[1]
    row = {"doc_id": "d", "page": 1, "image": Image.new("RGB", (2000, 2800), "white"), "text": "ก" * 3000}
    example = page_example(row, processor, max_length=300, max_pixels=1_000_000, seed=0)
    assert example["truncated"] and 0 < example["image_tokens"] <= 300 - 32  # scaled down to leave room for text

    collator = DataCollatorForVisionLanguageModeling(processor=processor, completion_only_loss=True)
    batch = collator([dict(example)])
    image_token = tiny_model[0].config.image_token_id
    assert int((batch["input_ids"] == image_token).sum()) == example["image_tokens"]
    assert batch["input_ids"].shape[1] <= 300
    labels, ids = batch["labels"][0], batch["input_ids"][0]
    assert (labels[ids == image_token] == -100).all()
    first_answer = int((labels != -100).nonzero()[0])
    assert (labels[:first_answer] == -100).all() and (labels[first_answer:] == ids[first_answer:]).all()
    answer = processor.decode(ids[first_answer:])
    assert answer.startswith(example["completion"][0]["content"][0]["text"][:20])


def test_a_frozen_vision_tower_is_skipped_by_the_backward_and_the_gradients_stay_the_same(tiny_model):
    from transformers import AutoModelForImageTextToText

    processor, folder = tiny_model[1], tiny_model[2]
    row = {"doc_id": "d", "page": 1, "image": Image.new("RGB", (300, 400), "gray"), "text": "ก" * 80}
    example = page_example(row, processor, max_length=200, max_pixels=40_000, seed=0)
    batch = DataCollatorForVisionLanguageModeling(processor=processor, completion_only_loss=True)([example])

    def loss_gradients_and_vision_backwards(frozen_by_freeze: bool):
        model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32)
        if frozen_by_freeze:
            freeze(model.model.visual)
        else:
            model.model.visual.requires_grad_(False)
        model.activation_checkpointing_enable()  # as the Trainer does: hooks every input embedding
        model.train()
        backwards = []
        model.model.visual.blocks[0].register_full_backward_hook(lambda *_: backwards.append(1))
        loss = model(**batch).loss
        loss.backward()
        return loss, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}, len(backwards)

    loss, gradients, vision_backwards = loss_gradients_and_vision_backwards(frozen_by_freeze=True)
    plain_loss, plain_gradients, plain_vision_backwards = loss_gradients_and_vision_backwards(frozen_by_freeze=False)
    assert plain_vision_backwards > 0 and vision_backwards == 0
    assert torch.equal(loss, plain_loss)
    assert gradients.keys() == plain_gradients.keys() and not any("visual" in name for name in gradients)
    for name, gradient in gradients.items():
        torch.testing.assert_close(gradient, plain_gradients[name], rtol=1e-5, atol=1e-7, msg=name)


def test_short_pages_are_not_cut_and_instructions_are_seeded(tiny_model):
    processor = tiny_model[1]
    row = {"doc_id": "d", "page": 3, "image": Image.new("RGB", (300, 300), "white"), "text": "สวัสดี"}
    first = page_example(row, processor, max_length=1024, max_pixels=200_704, seed=1)
    assert not first["truncated"] and first["completion"][0]["content"][0]["text"] == "สวัสดี"
    assert first["prompt"] == page_example(row, processor, max_length=1024, max_pixels=200_704, seed=1)["prompt"]
    prompts = {
        page_example(row | {"page": p}, processor, max_length=1024, max_pixels=200_704, seed=1)["prompt"][0]["content"][
            1
        ]["text"]
        for p in range(20)
    }
    assert len(prompts) > 1


def test_text_only_continuation_fits_and_continues_the_page(tiny_model):
    processor = tiny_model[1]
    text = THAI[5]
    example = continuation_example({"doc_id": "d", "page": 1, "text": text}, processor, max_length=4096)
    prompt = example["prompt"][0]["content"][0]["text"]
    assert example["images"] == [] and prompt.startswith(CONTINUATION_INSTRUCTION)
    assert prompt.removeprefix(CONTINUATION_INSTRUCTION) + example["completion"][0]["content"][0]["text"] == text
    assert not example["truncated"]

    short = continuation_example({"doc_id": "d", "page": 1, "text": text * 20}, processor, max_length=128)
    batch = DataCollatorForVisionLanguageModeling(processor=processor, completion_only_loss=True)([short])
    assert short["truncated"] and batch["input_ids"].shape[1] <= 128


def test_held_out_split_is_by_document():
    doc_ids = [f"doc{i // 3}" for i in range(30)]
    held = held_out_documents(doc_ids, 0.2, seed=0)
    assert len(held) == 2 and held == held_out_documents(doc_ids, 0.2, seed=0)
    assert held_out_documents(doc_ids, 0.0, seed=0) == set()


def weights(folder):
    return load_file(folder / "model.safetensors")


def test_full_training_lowers_the_loss_moves_trainable_weights_only_and_chains_records(base, pages, tmp_path, capsys):
    inputs_before = {path: path.stat().st_mtime_ns for path in pages.iterdir()}
    # a frozen tower (the real recipes'; the tiny one trains its random tower) must not move
    argv = pretrain_argv(base, pages, tmp_path / "run", "--max_steps", "12", "--save_steps", "100")
    pretrain([*argv, "--freeze_vision", "true"])
    assert {path: path.stat().st_mtime_ns for path in pages.iterdir()} == inputs_before  # no cache files added
    final = tmp_path / "run" / "final"
    record = read_run_record(final, expected_stage="pretrain")
    losses = [entry["loss"] for entry in record["results"]["loss_history"]]
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3])
    assert [e["step"] for e in record["results"]["generation_quality"]] == [0, 12]
    for entry in record["results"]["generation_quality"]:  # what each CER measurement cost (--cer_pages 1)
        cost = entry["transcription"]
        assert cost["pages"] == cost["batches"] == 1 and cost["left_out"] == 0 and cost["tokens"] > 0
        assert 0 < cost["seconds"] < 300
    assert [r["stage"] for r in verify_chain(final)] == ["pretrain", "base_model"]
    throughput = record["results"]["throughput"]
    assert throughput["timed_steps"] == 11 and throughput["tokens_per_second"] > 0

    before, after = weights(base), weights(final)
    for name, tensor in before.items():
        moved = not torch.equal(tensor, after[name])
        assert moved == ("visual" not in name), name
    assert "held-out CER" in capsys.readouterr().out


def test_full_fine_tuning_in_bf16_keeps_fp32_master_weights_that_a_small_step_moves(base, pages, tmp_path):
    """bf16 autocast over fp32 weights: AdamW's first step moves each weight by the learning rate (lr * g / |g|),
    1e-5 here, which bf16 weights of ~0.02 (a step of 2^-8 of the weight, ~1e-4) would round away."""
    argv = pretrain_argv(base, pages, tmp_path / "run", "--max_steps", "1", "--eval_fraction", "0")
    pretrain([*argv, "--bf16", "true", "--learning_rate", "1.0e-5", "--weight_decay", "0.0", "--tuning", "full"])
    name = "model.layers.0.self_attn.q_proj.weight"
    before, after = weights(base)[name], weights(tmp_path / "run" / "final")[name]
    moved = (after.float() - before).abs()
    assert moved.median().item() == pytest.approx(1e-5, rel=0.05)
    assert after.dtype == before.dtype == torch.float32  # final/ keeps the base model's dtype
    engine = read_run_record(tmp_path / "run" / "final")["results"]["engine"]
    assert engine == {"engine": "single-process", "master_weights": "fp32", "compute": "bf16"}


def test_a_bf16_base_model_trained_with_fp32_master_weights_is_saved_in_bf16(base, pages, tmp_path):
    from transformers import AutoModelForImageTextToText

    bf16_base = tmp_path / "bf16-base"
    shutil.copytree(base, bf16_base)
    AutoModelForImageTextToText.from_pretrained(base, dtype=torch.bfloat16).save_pretrained(bf16_base)
    argv = pretrain_argv(bf16_base, pages, tmp_path / "run", "--max_steps", "1", "--eval_fraction", "0")
    pretrain([*argv, "--bf16", "true", "--tuning", "full"])
    assert {tensor.dtype for tensor in weights(tmp_path / "run" / "final").values()} == {torch.bfloat16}
    engine = read_run_record(tmp_path / "run" / "final")["results"]["engine"]
    assert engine["master_weights"] == "fp32" and engine["compute"] == "bf16"


def test_an_unfrozen_vision_tower_is_trained(base, pages, tmp_path):
    pretrain(pretrain_argv(base, pages, tmp_path / "run", "--max_steps", "2", "--freeze_vision", "false"))
    before, after = weights(base), weights(tmp_path / "run" / "final")
    assert all(not torch.equal(tensor, after[name]) for name, tensor in before.items() if "visual.blocks" in name)


def test_text_only_share_mixes_into_training(base, pages, tmp_path, capsys):
    pretrain(pretrain_argv(base, pages, tmp_path / "run", "--max_steps", "4", "--text_only_fraction", "0.5"))
    record = read_run_record(tmp_path / "run" / "final")
    counts = record["results"]["examples"]
    assert counts["text_only"] == counts["train_pages"] == 6 and counts["held_out_pages"] == 2
    assert all(e["loss"] > 0 for e in record["results"]["loss_history"])


def test_text_only_share_is_refused_under_zero3(base, pages, tmp_path):
    zero3 = ["--text_only_fraction", "0.2", "--deepspeed", str(REPO / "recipes/deepspeed/zero3.json")]
    # a process of its own: DeepSpeed is set up (environment, process group) before the arguments are checked
    result = subprocess.run(
        [sys.executable, "-m", "stages.pretrain", *pretrain_argv(base, pages, tmp_path / "run", *zero3)],
        capture_output=True, text=True, timeout=300, cwd=REPO, env={**os.environ, **DEEPSPEED_ENV},
    )  # fmt: skip
    assert result.returncode == 2 and "ranks whose batch has no image" in result.stderr


def test_lora_final_is_merged_reloads_in_a_fresh_process_and_generates(base, pages, tmp_path):
    pretrain(
        pretrain_argv(
            base, pages, tmp_path / "run", "--max_steps", "3", "--tuning", "lora", "--lora_r", "4", "--lora_alpha", "8"
        )
    )
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()
    final = tmp_path / "run" / "final"
    after, before = weights(final), weights(base)
    assert set(after) == set(before)  # merged: plain weights, no lora_ tensors
    assert not torch.equal(
        after["model.layers.0.self_attn.q_proj.weight"], before["model.layers.0.self_attn.q_proj.weight"]
    )
    script = f"""
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
model = AutoModelForImageTextToText.from_pretrained({str(final)!r})
processor = AutoProcessor.from_pretrained({str(final)!r})
messages = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "Transcribe the page."}}]}}]
text = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(text=[text], images=[Image.new("RGB", (200, 200), "white")], return_tensors="pt")
generated = model.generate(**inputs, min_new_tokens=4, max_new_tokens=4, do_sample=False)
print(generated.shape[1] == inputs["input_ids"].shape[1] + 4)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.stdout.strip().endswith("True"), result.stderr[-2000:]


def test_resume_after_a_kill_gives_the_losses_of_an_uninterrupted_run(base, pages, tmp_path):
    argv = pretrain_argv(
        base,
        pages,
        tmp_path / "run",
        "--max_steps",
        "4",
        "--save_steps",
        "2",
        "--eval_strategy",
        "steps",
        "--eval_steps",
        "2",
    )
    pretrain(argv)
    straight = read_run_record(tmp_path / "run" / "final")["results"]
    straight_weights = load_file(tmp_path / "run" / "final" / "model.safetensors")
    checkpoint = read_run_record(tmp_path / "run" / "checkpoint-2", expected_stage="pretrain")
    assert checkpoint["results"] == {"steps": 2, "generation_quality": straight["generation_quality"][:2]}
    assert [r["stage"] for r in verify_chain(tmp_path / "run" / "checkpoint-2")] == ["pretrain", "base_model"]
    # what a kill after the step-2 checkpoint leaves behind
    for leftover in ("checkpoint-4", "final"):
        shutil.rmtree(tmp_path / "run" / leftover)
    pretrain([*argv, "--resume"])
    resumed = read_run_record(tmp_path / "run" / "final")["results"]
    # steps 1-2 come back from the checkpoint's state, steps 3-4 are trained again
    assert [e["step"] for e in resumed["loss_history"]] == [e["step"] for e in straight["loss_history"]] == [1, 2, 3, 4]
    assert [e["loss"] for e in resumed["loss_history"]] == pytest.approx(
        [e["loss"] for e in straight["loss_history"]], rel=1e-4
    )
    assert [e["step"] for e in resumed["generation_quality"]] == [0, 2, 4]
    for quality in ("eval_loss", "cer"):
        assert [e[quality] for e in resumed["generation_quality"]] == pytest.approx(
            [e[quality] for e in straight["generation_quality"]], rel=1e-3
        )
    # it continued from the checkpoint: two steps trained here, not four again (a restart gives the same losses)
    assert (straight["resumed_from"], straight["steps_this_run"]) == (None, 4)
    assert (resumed["resumed_from"], resumed["steps_this_run"]) == ({"checkpoint": "checkpoint-2", "step": 2}, 2)
    for name, tensor in load_file(tmp_path / "run" / "final" / "model.safetensors").items():
        torch.testing.assert_close(tensor, straight_weights[name], rtol=1e-4, atol=1e-5, msg=name)


def run_pretrain(processes: int, base, pages, output, *extra) -> subprocess.CompletedProcess:
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", str(processes)] if processes > 1 else []
    argv = pretrain_argv(base, pages, output, "--eval_fraction", "0", *extra)
    result = subprocess.run(
        [sys.executable, *launcher, "-m", "stages.pretrain", *argv],
        capture_output=True, text=True, timeout=900, cwd=REPO, env={**os.environ, **DEEPSPEED_ENV},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def assert_deepspeed_trained_as_the_plain_run(result, output, reference, stage: int) -> None:
    """The live engine was DeepSpeed's at `stage` (ZeRO-3: parameters partitioned), not a silent fallback, and it
    trained as the plain run did: the same learning rates and losses, the same final weights."""
    record = read_run_record(output / "final", expected_stage="pretrain")["results"]
    engine = record["engine"]
    assert engine["engine"] == f"deepspeed-zero{stage}", engine
    assert f"pretrain: engine deepspeed-zero{stage}, fp32 master weights" in result.stdout
    if stage == 3:
        assert 0 < engine["partitioned_parameters"] <= engine["parameters"], engine
    plain = read_run_record(reference / "final")["results"]["loss_history"]
    assert [e["learning_rate"] for e in record["loss_history"]] == [e["learning_rate"] for e in plain]
    assert [e["loss"] for e in record["loss_history"]] == pytest.approx([e["loss"] for e in plain], abs=1e-4)
    after, expected = weights(output / "final"), weights(reference / "final")
    assert after.keys() == expected.keys()
    # Adam divides by each gradient's running size, so float-level differences in the sums (another order over
    # processes) move a weight whose gradient is near 0 by up to a step: 2.3e-4 seen after 3 steps of lr 5e-3
    for name, tensor in expected.items():
        torch.testing.assert_close(after[name], tensor, rtol=1e-3, atol=5e-4, msg=name)


def test_zero3_in_one_process_runs_deepspeeds_engine_and_trains_as_the_plain_run(base, pages, tmp_path):
    schedule = ["--max_steps", "2"]
    run_pretrain(1, base, pages, tmp_path / "plain", *schedule)
    zero3 = ["--deepspeed", str(REPO / "recipes/deepspeed/zero3.json")]
    result = run_pretrain(1, base, pages, tmp_path / "zero3", *schedule, *zero3)
    assert_deepspeed_trained_as_the_plain_run(result, tmp_path / "zero3", tmp_path / "plain", stage=3)


@pytest.fixture(scope="module")
def accumulated_reference(recorded_base, pages, tmp_path_factory):
    """One process at the global batch of 2 processes x 1 page: 1 page x 2 accumulation steps; 3 steps = the epoch
    (6 training pages), so that no process pads a short last batch."""
    output = tmp_path_factory.mktemp("plain") / "run"
    run_pretrain(1, recorded_base, pages, output, "--max_steps", "3", "--per_device_train_batch_size", "1",
                 "--gradient_accumulation_steps", "2")  # fmt: skip
    return output


@pytest.mark.slow
@pytest.mark.parametrize(("processes", "stage"), [(1, 2), (2, 2), (2, 3)])
def test_deepspeed_runs_its_engine_trains_as_the_plain_run_and_its_final_reloads(
    processes, stage, base, pages, accumulated_reference, tmp_path
):
    batch = ["--per_device_train_batch_size", "1", "--gradient_accumulation_steps", str(3 - processes)]
    zero = ["--deepspeed", str(REPO / f"recipes/deepspeed/zero{stage}.json")]
    result = run_pretrain(processes, base, pages, tmp_path / "run", "--max_steps", "3", *batch, *zero)
    assert_deepspeed_trained_as_the_plain_run(result, tmp_path / "run", accumulated_reference, stage)
    record = read_run_record(tmp_path / "run" / "final", expected_stage="pretrain")
    assert record["config"]["sft"]["deepspeed"].endswith(f"zero{stage}.json")
    load = "import sys; from transformers import AutoModelForImageTextToText as M; M.from_pretrained(sys.argv[1])"
    subprocess.run([sys.executable, "-c", load, tmp_path / "run" / "final"], check=True, timeout=300)  # a fresh process


def test_overwrite_replaces_an_earlier_run(base, pages, tmp_path):
    (tmp_path / "run" / "checkpoint-99").mkdir(parents=True)
    pretrain(pretrain_argv(base, pages, tmp_path / "run", "--max_steps", "1", "--cer_pages", "0", "--overwrite"))
    assert not (tmp_path / "run" / "checkpoint-99").exists()
    assert (tmp_path / "run" / "final" / "run_record.json").is_file()


def test_overwrite_keeps_the_earlier_run_when_the_new_one_fails(base, pages, tmp_path):
    earlier = tmp_path / "run" / "final"
    earlier.mkdir(parents=True)
    (earlier / "run_record.json").write_text('{"earlier": true}')
    weightless = tmp_path / "weightless"  # passes the argument checks, fails once the weights are loaded
    weightless.mkdir()
    shutil.copy(base / "config.json", weightless / "config.json")
    with pytest.raises(OSError):
        pretrain(pretrain_argv(weightless, pages, tmp_path / "run", "--max_steps", "1", "--overwrite"))
    assert (earlier / "run_record.json").read_text() == '{"earlier": true}'
    assert sorted(path.name for path in tmp_path.iterdir()) == ["run", "weightless"]  # no half-written output


def test_cer_pages_are_drawn_across_held_out_documents_seeded():
    from lco.generation_eval import sample_across_documents

    doc_ids = ["a"] * 10 + ["b"] * 10 + ["c"] * 10  # dataset order: one document after another
    chosen = sample_across_documents(doc_ids, 6, seed=0)
    assert sorted(doc_ids[i] for i in chosen) == ["a", "a", "b", "b", "c", "c"]
    assert chosen == sample_across_documents(doc_ids, 6, seed=0) and len(set(chosen)) == 6
    assert {tuple(sample_across_documents(doc_ids, 6, seed)) for seed in range(5)} != {tuple(chosen)}
    assert sorted(sample_across_documents(doc_ids, 99, seed=0)) == list(range(30))


def test_transcription_budget_covers_references_longer_than_any_fixed_cap(tiny_model, monkeypatch):
    from lco.generation_eval import transcription_cer

    model, processor, _ = tiny_model
    reference = " ".join(["มนุษย์"] * 1500)
    reference_tokens = len(processor.tokenizer(reference)["input_ids"])
    example = {
        "prompt": [{"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": "Read."}]}],
        "completion": [{"role": "assistant", "content": [{"type": "text", "text": reference}]}],
        "images": [Image.new("RGB", (56, 56), "white")],
    }
    budgets = []

    def generate(input_ids, max_new_tokens, **kwargs):
        budgets.append(max_new_tokens)
        return input_ids

    monkeypatch.setattr(model, "generate", lambda **kwargs: generate(**kwargs))
    transcription_cer(model, processor, [example])
    assert reference_tokens > 1024 and budgets[0] >= reference_tokens


def test_documents_of_an_excluded_evalset_are_not_trained_on_and_are_recorded(base, tmp_path):
    import json

    from data_prep.evalset import build_evalset
    from data_prep.pages import PageSettings, build_pages_dataset
    from lco.pretrain_data import document_sha256

    pages = thai_pages_dataset(tmp_path, documents=4, chars=160, bookmarks=True)
    (tmp_path / "copy").mkdir()
    shutil.copy(tmp_path / "doc0.pdf", tmp_path / "copy" / "renamed.pdf")  # the same content under another name
    settings = PageSettings("th", 72, 50_000, "never", 144, "tha", ("0E00-0E7F",))
    build_pages_dataset([str(tmp_path / "copy")], str(tmp_path / "eval-pages"), settings, workers=1, resume=False,
                        max_skip_fraction=0.0)  # fmt: skip
    build_evalset([str(tmp_path / "eval-pages")], str(tmp_path / "eval"), parallel_source=None, parallel_lang="en",
                  outline_level=1)  # fmt: skip
    argv = pretrain_argv(base, pages, tmp_path / "run", "--max_steps", "1", "--cer_pages", "0", "--eval_fraction", "0")
    pretrain([*argv, "--exclude_evalsets", str(tmp_path / "eval")])

    results = read_run_record(tmp_path / "run" / "final")["results"]
    manifest = json.loads((pages / "manifest.json").read_text())
    doc_ids = {entry["doc_id"].split("-")[0]: entry["doc_id"] for entry in manifest["inputs"]}
    assert results["examples"]["excluded_documents"] == 1 and results["examples"]["excluded_pages"] == 2
    assert results["training_documents"] == document_sha256([str(pages)], [doc_ids[f"doc{i}"] for i in (1, 2, 3)])


def test_batches_collated_in_worker_processes_train_as_on_the_main_process_and_the_wait_is_reported(
    base, pages, tmp_path
):
    results = {}
    for workers in (0, 2):
        argv = pretrain_argv(base, pages, tmp_path / str(workers), "--max_steps", "3", "--eval_fraction", "0")
        pretrain([*argv, "--dataloader_num_workers", str(workers)])
        results[workers] = read_run_record(tmp_path / str(workers) / "final")["results"]
    losses = {workers: [entry["loss"] for entry in result["loss_history"]] for workers, result in results.items()}
    assert losses[2] == losses[0]  # the same batches: the sampler stays on the main process
    for result in results.values():
        assert 0 < result["throughput"]["waiting_for_batches_share"] < 1


@pytest.mark.parametrize("max_length", [64, 96])  # math domain error at 64, ZeroDivisionError at 96 (224 x 56)
def test_a_max_length_that_leaves_no_room_for_the_page_is_refused_naming_the_smallest_that_fits(
    max_length, tiny_model, base, pages, tmp_path, capsys
):
    processor = tiny_model[1]
    smallest = smallest_max_length(processor)
    # the longest instruction's prompt (64 tokens with the tiny tokenizer), the fewest image tokens a page
    # costs (the processor's 3136-pixel minimum = 4 merged 28-px patches) and room for text
    assert smallest == 64 + COMPLETION_SUFFIX_TOKENS + 4 + MIN_COMPLETION_TOKENS
    for page in range(len(INSTRUCTIONS) * 4):  # every instruction, drawn by seed
        row = {"doc_id": "d", "page": page, "image": Image.new("RGB", (224, 56), "white"), "text": "abc " * 50}
        example = page_example(row, processor, max_length=smallest, max_pixels=200_704, seed=0)
        assert example["image_tokens"] >= 4 and example["truncated"]

    with pytest.raises(SystemExit) as exit_info:
        run_cli(pretrain, pretrain_argv(base, pages, tmp_path / "run", "--max_length", str(max_length)))
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"--max_length {max_length}" in error and f"at least {smallest}" in error
    assert not (tmp_path / "run").exists()
