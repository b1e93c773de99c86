"""bench/gpu_kit.py (issue 28): the wheel list against the lock and the GPU image, tests/test_gpu.py collected with
only the packages the device machine has or the kit carries, the report's table, and the whole kit on the CPU."""

import json
import subprocess
import sys

import pytest

from bench.gpu_kit import (
    CARRIED,
    CASES,
    GPU_IMAGE,
    blocked_modules,
    lock_versions,
    markdown,
    normalise,
    write_gpu_image,
)

from .conftest import REPO


def test_the_kit_carries_lock_versions_of_packages_the_gpu_image_lacks_or_has_in_another_version():
    pins = lock_versions()
    for name, reason in CARRIED.items():
        assert normalise(name) in pins, f"{name} is not in requirements.lock"
        # a package the image has is carried only for its version
        assert normalise(name) not in GPU_IMAGE or "version" in reason or "5.17" in reason, name
    carried_modules = {"transformers", "trl", "peft", "datasets", "deepspeed", "pydantic", "langcodes", "jiwer"}
    assert not carried_modules & set(blocked_modules())
    assert {"pymupdf", "faiss", "mteb", "pytesseract"} <= set(blocked_modules())


def test_the_gpu_tests_collect_with_only_what_the_gpu_image_has_and_the_kit_carries(tmp_path):
    image = write_gpu_image(tmp_path / "gpu_image")
    command = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu", "tests/test_gpu.py"]
    done = subprocess.run(
        [*command, "-p", "no:cacheprovider"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": f"{image}:{REPO}", "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "4 tests collected" in done.stdout
    blocked = subprocess.run(
        [sys.executable, "-c", "import pymupdf"], capture_output=True, text=True, env={"PYTHONPATH": str(image)}
    )
    assert "ModuleNotFoundError" in blocked.stderr  # the stand-in for the GPU image blocks what it lacks


def test_the_table_has_a_row_per_part_case_and_ratio_and_names_failures():
    report = {
        "created": "2026-12-07T04:00:00+0000",
        "dry_run": False,
        "device": {"name": "NVIDIA H100 80GB HBM3", "memory": "81559 MiB", "driver": "580", "gpu": True},
        "versions": {
            "python": "3.12.3",
            "torch": "2.11.0",
            "differ_from_lock": {"torch": {"lock": "2.14.1", "installed": "2.11.0"}},
        },
        "budget_s": 420,
        "wall_time_s": 400.0,
        "parts": {
            "gpu_tests": {
                "passed": 3,
                "failed": 1,
                "errors": 0,
                "skipped": 0,
                "failures": ["test_x"],
                "case_wall_s": 30,
            },
            "stages_bench": {
                "cases": {
                    "matmul_peak": {"tflops_per_second": 700.0},
                    "pretrain_ours": {"tokens_per_second": 5000.0, "flops_per_token": 2.8e10, "checkpointing": {}},
                    "pretrain_ours_ckpt_all": {"tokens_per_second": 4000.0, "flops_per_token": 2.8e10},
                    "contrast_plain": {"error": "exit 1 after 3s", "log_tail": ["OutOfMemoryError"]},
                },
                "ratios": {"contrast_cached_over_plain_time_per_pair": 1.2},
            },
            "family_gemma3": {
                "parameters": 4_000_000_000,
                "tokens_per_second": 3000.0,
                "checkpointing": {"setting": "auto", "every_n_layers": 2, "estimated_peak_gib": 60.0},
                "measured_peak_gib": 50.0,
                "estimate_over_measured": 1.2,
            },
            "zero3_contrast": {"error": "exit 1 after 20s", "log_tail": ["ValueError: no config"]},
        },
    }
    table = markdown(report)
    assert "NVIDIA H100 80GB HBM3" in table and "2026-12-07" in table and "torch 2.14.1 -> 2.11.0" in table
    assert "| gpu_tests | failed | 3 passed, 1 failed (test_x) |" in table
    assert "MFU 20.0%" in table and "pretrain_ours_over_ckpt_all_tokens_per_s |  | 1.25" in table
    assert "| stages_bench/contrast_plain | error | exit 1 after 3s: OutOfMemoryError |" in table
    assert "checkpointing auto: every 2 layers; estimate 60.0 GiB" in table
    assert "measured peak 50.0 GiB, estimate / measured 1.200" in table
    assert "| zero3_contrast | error | exit 1 after 20s: ValueError: no config |" in table


@pytest.mark.slow
def test_the_dry_run_runs_every_part_on_the_cpu(tmp_path):
    """The whole kit at tiny sizes (~6 minutes on 2 busy cores): every part in kit.json and kit.md; the parts that
    need no DeepSpeed engine ran through; the GPU tests were collected and skipped."""
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "bench.gpu_kit", "run", "--dry_run", "--out", str(out)], cwd=REPO, timeout=1800
    )
    assert done.returncode == 0
    report = json.loads((out / "kit.json").read_text())
    assert list(report["parts"]) == list(CASES)
    table = (out / "kit.md").read_text()
    for name in CASES:
        assert f"| {name} |" in table
    assert report["parts"]["gpu_tests"]["skipped"] == 4
    for name, figures in report["parts"].items():
        assert "error" not in figures, (name, figures)
    assert "deepspeed-zero2" in table and "deepspeed-zero3" in table  # the live engines, on the CPU too
    for case, figures in report["parts"]["stages_bench"]["cases"].items():
        assert "error" not in figures, (case, figures)
    for family in ("qwen2_5_vl", "qwen3_vl", "gemma3", "qwen2_5_omni"):
        assert report["parts"][f"family_{family}"]["checkpointing"]["setting"] == "auto"
    assert {"bench.json", "bench.log", "kit.json", "kit.md", "kit.log"} <= {path.name for path in out.iterdir()}
