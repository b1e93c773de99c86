"""bench/stages_bench.py (issue 8): its FLOP count against a closed form, the fresh-interpreter launcher a GPU
run uses, the --tiny smoke run end to end, and (slow) the GPU run's data against the stage's batch. Structure and
sanity only, never speed."""

import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from bench import cases, harness, meters
from common.recipe import load_recipe
from lco.contrast_data import batches
from stages.contrast import load_pairs
from stages.pretrain import PretrainArguments

REPO = Path(__file__).resolve().parents[1]


def test_flop_count_matches_the_closed_form(tiny_model, thai_khmer_page):
    model, processor, _ = tiny_model
    inputs = dict(processor.tokenizer(["hello world " * 20], return_tensors="pt"))
    tokens = inputs["input_ids"].shape[1]
    total, vision = meters.example_flops(model, inputs)
    text = model.config.text_config
    linear = sum(
        module.weight.numel()
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name.startswith(("model.language_model", "lm_head"))
    )
    # 2 FLOPs per weight and token, and per layer QK^T and AV: 2 x 2 x tokens^2 x (heads x head_dim)
    assert text.num_attention_heads * (text.hidden_size // text.num_attention_heads) == text.hidden_size
    assert (total, vision) == (2 * tokens * linear + text.num_hidden_layers * 4 * tokens**2 * text.hidden_size, 0)

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hello"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = dict(processor(text=[prompt], images=[thai_khmer_page], return_tensors="pt"))
    total, vision = meters.example_flops(model, inputs)
    assert 0 < vision < total


def test_flop_count_of_grouped_query_attention():
    """Qwen2.5-VL's 16 query heads share 2 key/value heads; on a GPU the attention kernel gets them unrepeated."""

    class Attention(torch.nn.Module):
        def forward(self, query, key, value):
            return torch.nn.functional.scaled_dot_product_attention(query, key, value, enable_gqa=True)

    batch, heads, kv_heads, length, head_dim = 2, 8, 2, 16, 4
    query = torch.randn(batch, heads, length, head_dim)
    key, value = (torch.randn(batch, kv_heads, length, head_dim) for _ in range(2))
    total, vision = meters.example_flops(Attention(), {"query": query, "key": key, "value": value})
    assert (total, vision) == (2 * 2 * batch * heads * length * length * head_dim, 0)


def test_a_case_runs_in_a_fresh_interpreter(tmp_path):
    """The launcher of GPU runs (the --tiny run forks instead)."""
    (tmp_path / "context.json").write_text(json.dumps({"scale": asdict(cases.TINY)}))
    figures = harness.launch("bench.cases", "matmul_peak", tmp_path, tmp_path / "log", timeout=120, fork=False)
    assert figures["tflops_per_second"] > 0 and figures["peak_host_memory_gib"] > 0, figures
    assert figures["case_wall_s"] > 0, figures


def test_tiny_run_reports_every_case(tmp_path):
    """About 35 s on an idle 2-core CPU (a minute when other jobs share it): in the default run, as CI's smoke test."""
    out = tmp_path / "tiny.json"
    run = subprocess.run(
        [sys.executable, "bench/stages_bench.py", "--tiny", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["tiny"] and report["device"].startswith("cpu") and report["versions"]["torch"]
    assert set(report["setup"]) == {"base_model", "pages"} and set(report["cases"]) == set(cases.MEASURED)
    measured = report["cases"]
    assert not [name for name, figures in measured.items() if "error" in figures], measured
    rates = {
        "matmul_peak": ["tflops_per_second"],
        "pretrain_ours": ["samples_per_second", "tokens_per_second", "flops_per_token", "peak_host_memory_gib"],
        "pretrain_plain": ["samples_per_second", "tokens_per_second", "flops_per_token", "peak_host_memory_gib"],
        "evaluate": ["pages_per_second", "queries_per_second", "peak_host_memory_gib"],
        "contrast_stage": ["pairs_per_second", "peak_host_memory_gib"],
        "contrast_plain": ["pairs_per_second", "step_seconds_median"],
        "contrast_cached": ["pairs_per_second", "step_seconds_median"],
        "contrast_accum": ["pairs_per_second", "step_seconds_median"],
        "evaluate_sorted_workers": ["pages_per_second", "queries_per_second", "pages_tokens", "queries_tokens"],
        "contrast_cached_reencode_all": ["pairs_per_second", "step_seconds_median"],
    }
    for name, keys in rates.items():
        assert all(measured[name][key] > 0 for key in keys), (name, measured[name])
    for name in ("pretrain_ours", *cases.PRETRAIN_VARIANTS):
        assert measured[name]["timed_steps"] == cases.TINY.timed_steps, (name, measured[name])
        assert measured[name]["stage_throughput"]["tokens_per_second"] > 0, (name, measured[name])
    # the same first examples; the plain trainer trains the vision tower (3x its forward, not 1x), the stage only
    # where its recipe says so (the tiny recipe does: its tower is random)
    frozen = load_recipe(REPO / cases.TINY.recipe)["pretrain"].get("freeze_vision", PretrainArguments.freeze_vision)
    plain, ours = measured["pretrain_plain"]["flops_per_token"], measured["pretrain_ours"]["flops_per_token"]
    assert plain > ours if frozen else plain == ours, (plain, ours)
    assert measured["contrast_cached"]["batch"] == measured["contrast_plain"]["batch"]
    assert measured["contrast_cached_reencode_all"]["batch"] == measured["contrast_plain"]["batch"]
    encoder = measured["evaluate_sorted_workers"]
    for items in ("pages", "queries"):
        assert 0 <= encoder[f"{items}_padded_tokens_sorted"] <= encoder[f"{items}_padded_tokens_given_order"], encoder
    ratios = report["ratios"]
    for key in ("pretrain_ours_mfu", "pretrain_plain_mfu"):
        assert 0 < ratios[key] < 1, ratios
    for key in (
        "pretrain_ours_tokens_per_s_over_plain",
        "contrast_cached_over_plain_time_per_pair",
        "contrast_stage_over_accum_time_per_pair",
    ):
        assert ratios[key] > 0, ratios
    assert ratios["contrast_stage_batch_fits"] is True
    # padding-free batches train as padded ones (float32 on the CPU: the same curve)
    assert measured["pretrain_packed"]["timed_steps"] == cases.TINY.timed_steps, measured["pretrain_packed"]
    assert ratios["pretrain_packed_loss_curve_max_rel_gap"] < 1e-4, ratios
    assert all(name in run.stdout for name in cases.MEASURED)  # the printed table
    assert out.with_suffix(".log").is_file()


@pytest.mark.slow
def test_the_gpu_runs_pages_make_a_contrastive_batch_of_1024(tmp_path, monkeypatch):
    """The stage batches no two pairs cut from one passage or page, so the synthetic pages must hold enough distinct
    passages for one batch of 1024 (the dry run's pages are the GPU run's)."""
    monkeypatch.chdir(REPO)
    scale = cases.DRY_RUN
    ctx = {
        "scale": asdict(scale),
        "work": str(tmp_path),
        "recipe": cases.write_recipe(scale.recipe, tmp_path),
        "base": str(tmp_path / "base"),
        "pages": [str(tmp_path / f"pages-{number}") for number in range(scale.pages_datasets)],
        "queries": str(tmp_path / "queries.json"),
        "case": "contrast_stage",
    }
    cases.build_base_model(ctx)
    cases.write_pages(ctx)
    recipe_args, args = cases.contrast_arguments(ctx, scale.contrast_batch, scale.contrast_steps)
    pairs, _, _ = load_pairs(args, recipe_args.seed)
    assert batches(pairs, scale.contrast_batch, homogeneous=False, seed=recipe_args.seed)
