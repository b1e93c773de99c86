"""What the commands print (common/output.py): their own progress and results once, the libraries' chatter only
with --verbose, and under torchrun a refusal said once. Each run is a command line, as a user types it."""

import os
import subprocess
import sys
import warnings

import pytest

from .conftest import REPO, thai_pages_dataset
from .test_contrast import contrast_argv
from .test_evaluate import TINY, seadoc  # noqa: F401 (a fixture)

# what the libraries print at every run of `make demo` (issue 31): bm25s's debug line at each BM25 index, the bars of
# every weights load and save and of datasets' steps, a deprecation inside peft and trl, and DeepSpeed's "Setting
# accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it" where there is no GPU
NOISE = (
    "we were unable to detect it",
    "Building index from tokens",
    "Loading weights",
    "Writing model shards",
    "is_gradient_checkpointing",
    "Generating train split",
    "Saving the dataset",
)


def run(module: str, *argv, processes: int = 1) -> subprocess.CompletedProcess:
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", str(processes)] if processes > 1 else []
    return subprocess.run(
        [sys.executable, *launcher, "-m", module, *map(str, argv)],
        capture_output=True, text=True, timeout=600, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip


def noise_in(output: str) -> list[str]:
    return [line for line in NOISE if line in output]


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    return thai_pages_dataset(tmp_path_factory.mktemp("pages"), documents=4, chars=220)


@pytest.fixture(scope="module")
def refined(recorded_base, pages, tmp_path_factory):
    """A 1-step contrast run of the tiny model (its `final/`) and what it printed."""
    output = tmp_path_factory.mktemp("contrast") / "run"
    result = run("stages.contrast", *contrast_argv(recorded_base, pages, output, "--max_steps", "1"))
    assert result.returncode == 0, result.stderr[-3000:]
    return output / "final", result.stdout + result.stderr


def test_a_training_run_prints_its_own_lines_once_and_no_library_chatter(refined):
    _, output = refined
    assert noise_in(output) == []
    # the stage's own progress and results, each once
    assert output.count("contrast: engine single-process") == 1 and output.count("contrast: 1 steps in") == 1


def test_evaluate_prints_its_tables_and_with_verbose_what_the_libraries_say(refined, seadoc, tmp_path):  # noqa: F811
    argv = ["--config", TINY, "--model", refined[0], "--data", seadoc, "--batch_size", "2"]
    quiet = run("stages.evaluate", *argv, "--output", tmp_path / "quiet.json", "--cache_dir", tmp_path / "quiet")
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    output = quiet.stdout + quiet.stderr
    assert noise_in(output) == [] and "Warning" not in output
    assert output.count("| system | nDCG@5") == 1 and output.count("evaluate: 3 queries, 6 pages") == 1

    verbose = run("stages.evaluate", *argv, "--output", tmp_path / "v.json", "--cache_dir", tmp_path / "v", "--verbose")
    assert verbose.returncode == 0, verbose.stderr[-3000:]
    output = verbose.stdout + verbose.stderr
    assert {"Building index from tokens", "Loading weights"} <= set(noise_in(output))
    assert output.count("| system | nDCG@5") == 1


def test_under_torchrun_a_refusal_is_said_once_and_every_process_fails(tmp_path):
    result = run("stages.evaluate", "--config", TINY, "--data", tmp_path, "--batch_size", "-1", processes=2)
    output = result.stdout + result.stderr
    assert output.count("--batch_size must be in") == 1, output[-3000:]
    # torchrun lists the processes that failed: rank 0 exited with 2, rank 1 with 2 or stopped by torchrun
    # once rank 0 had failed (it waits for that)
    assert result.returncode != 0 and "rank      : 1 (local_rank: 1)" in output and "exitcode  : 2" in output


def test_the_pretrain_flags_parse_without_a_warning_about_a_library_default(pages, tiny_model):
    from trl import SFTConfig

    from common.recipe import parse_stage_arguments
    from stages.pretrain import CPU_DEFAULTS, PretrainArguments

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        argv = ["--config", TINY, "--datasets", str(pages), "--model_name_or_path", str(tiny_model[2])]
        parse_stage_arguments("pretrain", (PretrainArguments, SFTConfig), argv, machine_defaults=CPU_DEFAULTS)
    assert [str(warning.message) for warning in caught if "checkpointing" in str(warning.message)] == []
