"""Killed runs resume: each long command is SIGKILLed at seeded random moments and run again with
`--resume`. It must end as an uninterrupted run does (same dataset fingerprint, same losses, same scores),
and no kill may leave an artifact that a later stage accepts as complete. Every kill must land before the run
completes (a run that finished first proves nothing): a kill that comes too late is tried again earlier.

    .venv/bin/python -m pytest -m slow tests/test_kill_resume.py -s
"""

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
import torch

from common.errors import UsageError
from common.run_record import read_run_record
from data_prep.pages import read_pages_manifest

from .conftest import REPO, thai_pages_dataset

pytestmark = pytest.mark.slow
KILLS = 4  # kill points per command
# tries per kill point, each with the kill half as late as the last, until one lands before the run completes:
# a machine busier or idler than during the uninterrupted run moves where a moment falls in the run
TRIES = 4
TINY = str(REPO / "recipes/tiny.yaml")
Landed = TypeVar("Landed")


def run(argv: list[str], kill_after: float | None = None, kill_when: Callable[[], bool] | None = None) -> bool:
    """Run `python -m argv`; SIGKILL it (and its children) `kill_after` seconds after it starts, or after
    `kill_when()` turns true if given. True if the SIGKILL ended it, False if it had exited successfully first."""
    process = subprocess.Popen(
        [sys.executable, "-m", *argv],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    while kill_when is not None and process.poll() is None and not kill_when():
        time.sleep(0.01)
    started = time.monotonic()
    try:
        _, err = process.communicate(
            timeout=None if kill_after is None else max(0.0, started + kill_after - time.monotonic())
        )
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):  # it may have exited since: then the kill did not land
            os.killpg(process.pid, signal.SIGKILL)
        _, err = process.communicate()
    if process.returncode == -signal.SIGKILL:
        return True
    assert process.returncode == 0, err.decode()[-3000:]
    return False


def kill_before_completion(attempt: Callable[[int, float], Landed | None], moment: float) -> tuple[Landed, int]:
    """`attempt(number, moment)` runs a command, kills it `moment` seconds in, and returns what the test needs
    of a kill that landed before the run completed, else None. Tried up to TRIES times, each time with the
    kill half as late; the landed result and the try it took, or the test fails."""
    for number in range(TRIES):
        landed = attempt(number, moment)
        if landed is not None:
            return landed, number + 1
        moment /= 2
    pytest.fail(f"{TRIES} kills, the last {2 * moment:.2f}s in, all came after the run completed")


def timed(argv: list[str]) -> float:
    started = time.monotonic()
    run(argv)
    return time.monotonic() - started


def kill_points(seed: int, duration: float) -> list[float]:
    """Seeded moments spread over an uninterrupted run's duration (start-up included)."""
    rng = random.Random(seed)
    return sorted(rng.uniform(0.2, 0.95) * duration for _ in range(KILLS))


def training_kill_points(seed: int, checkpoint_steps: list[int], step_seconds: float) -> list[tuple[int | None, float]]:
    """(checkpoint step, delay): kill a seeded moment after that checkpoint is finished (during a later step
    or the saving of the next checkpoint), the first of them so; last, with None, during start-up."""
    rng = random.Random(seed)
    after_checkpoints = [
        (step, rng.uniform(0.0, 3.0) * step_seconds) for step in sorted(rng.sample(checkpoint_steps, KILLS - 1))
    ]
    return after_checkpoints + [(None, rng.uniform(1.0, 5.0))]


def step_of(checkpoint_name: str) -> int:
    return int(checkpoint_name.rsplit("-", 1)[1])


def report(command: str, outcomes: list[str]) -> None:
    print(f"\n{command}: {len(outcomes)} kills -> " + "; ".join(outcomes))


def model_is_complete(folder: Path, stage: str) -> bool:
    """What a later stage checks before it uses a model folder."""
    try:
        read_run_record(folder, expected_stage=stage)
    except UsageError:
        assert not folder.exists(), f"{folder} exists without a run record"
        return False
    return True


@pytest.fixture(scope="module")
def pdfs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pdfs")
    thai_pages_dataset(folder, documents=12, chars=300, bookmarks=True)
    return folder


def test_killed_pages_runs_resume_to_the_same_dataset(pdfs, tmp_path):
    command = ["data_prep", "pages", "--lang", "th", "--input", str(pdfs), "--workers", "2"]
    duration = timed([*command, "--output", str(tmp_path / "straight")])
    expected = read_pages_manifest(tmp_path / "straight", "--output")["fingerprint"]
    outcomes = []
    for case, moment in enumerate(kill_points(1, duration)):

        def attempt(number: int, moment: float) -> Path | None:
            output = tmp_path / f"killed{case}-{number}"
            killed = run([*command, "--output", str(output)], kill_after=moment)
            # the dataset folder appears, by a rename, only when it is whole
            if (output / "manifest.json").exists():
                assert read_pages_manifest(output, "--output")["fingerprint"] == expected
                return None
            assert not output.exists()
            return output if killed else None

        output, tries = kill_before_completion(attempt, moment)
        run([*command, "--output", str(output), "--resume"])
        assert read_pages_manifest(output, "--output")["fingerprint"] == expected
        outcomes.append(f"{moment:.1f}s: killed before completion (try {tries}), resumed identical")
    report("data_prep pages", outcomes)


def test_killed_render_runs_resume_to_the_same_pdfs(tmp_path):
    command = [
        "data_prep",
        "render",
        "--lang",
        "en",
        "--input",
        *map(str, sorted((REPO / "samples/udhr").glob("*.md"))),
    ]
    duration = timed([*command, "--output", str(tmp_path / "straight")])
    expected = json.loads((tmp_path / "straight" / "render_manifest.json").read_text())["documents"]
    outcomes = []
    for case, moment in enumerate(kill_points(5, duration)):

        def attempt(number: int, moment: float) -> Path | None:
            output = tmp_path / f"killed{case}-{number}"
            killed = run([*command, "--output", str(output)], kill_after=moment)
            # the output folder appears, by a rename, only when complete
            if (output / "render_manifest.json").is_file():
                return None
            assert not output.exists()
            return output if killed else None

        output, tries = kill_before_completion(attempt, moment)
        done = len(list(output.parent.glob(f".{output.name}.work/*.entry.json")))
        run([*command, "--output", str(output), "--resume"])
        assert json.loads((output / "render_manifest.json").read_text())["documents"] == expected
        for entry in expected:
            assert (output / entry["pdf"]).read_bytes() == (tmp_path / "straight" / entry["pdf"]).read_bytes()
        outcomes.append(
            f"{moment:.1f}s: killed (try {tries}) with {done} of {len(expected)} rendered, resumed identical"
        )
    report("data_prep render", outcomes)


@pytest.fixture(scope="module")
def pages(pdfs):
    return pdfs / "pages"


@pytest.fixture(scope="module")
def base(recorded_base):
    return recorded_base


def pretrain_command(base, pages, output) -> list[str]:
    return [
        "stages.pretrain",
        "--config",
        TINY,
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
        "--per_device_train_batch_size",
        "2",
        "--learning_rate",
        "5.0e-3",
        "--warmup_steps",
        "0",
        "--max_steps",
        "24",
        "--eval_strategy",
        "steps",
        "--eval_steps",
        "4",
        "--save_steps",
        "4",
        "--logging_steps",
        "1",
    ]


def resume_or_restart(command: list[str], output: Path, has_checkpoint: bool) -> str:
    """What a user does after a kill: continue from a finished checkpoint, else start over."""
    if has_checkpoint:
        run([*command, "--resume"])
        return "resumed"
    run([*command, "--overwrite"])
    return "restarted (no finished checkpoint yet)"


def contrast_command(base, pages, output) -> list[str]:
    return [
        "stages.contrast",
        "--config",
        TINY,
        "--lang",
        "th",
        "--model_name_or_path",
        str(base),
        "--pages_datasets",
        str(pages),
        "--output_dir",
        str(output),
        "--passage_chars",
        "40",
        "--contrastive_batch_size",
        "8",
        "--mini_batch_size",
        "4",
        "--eval_fraction",
        "0.3",
        "--image_max_side",
        "200",
        "--max_text_tokens",
        "48",
        "--max_steps",
        "16",
        "--save_steps",
        "3",
        "--eval_steps",
        "3",
        "--logging_steps",
        "1",
        "--learning_rate",
        "1.0e-2",
    ]


# stage -> its command, the file a finished checkpoint has last, the steps it saves at, the kill points' seed,
# the relative tolerance on the losses
TRAINING = {
    "pretrain": (pretrain_command, "run_record.json", [4, 8, 12, 16, 20], 2, 1e-4),
    "contrast": (contrast_command, "progress.json", [3, 6, 9, 12, 15], 3, 1e-5),
}


@pytest.mark.parametrize("stage", TRAINING)
def test_killed_training_resumes_with_the_losses_of_an_uninterrupted_run(stage, base, pages, tmp_path):
    make_command, marker, checkpoint_steps, seed, tolerance = TRAINING[stage]
    timed(make_command(base, pages, tmp_path / "straight"))
    straight = read_run_record(tmp_path / "straight" / "final")["results"]
    # contrast: a contrastive batch of 8
    step_seconds = (
        straight["throughput"]["seconds_per_step"] if stage == "pretrain" else 8 / straight["pairs_per_second"]
    )
    outcomes = []
    for case, (after, delay) in enumerate(training_kill_points(seed, checkpoint_steps, step_seconds)):

        def attempt(number: int, delay: float) -> tuple[Path, float] | None:
            output = tmp_path / f"killed{case}-{number}"
            command = make_command(base, pages, output)
            checkpoint_done = after and (output / f"checkpoint-{after}" / marker).exists
            killed = run(command, kill_after=delay, kill_when=checkpoint_done)
            if model_is_complete(output / "final", stage):
                return None
            if after:  # the kill came after that checkpoint was finished, as planned
                assert (output / f"checkpoint-{after}" / marker).is_file()
            return (output, delay) if killed else None

        (output, delay), tries = kill_before_completion(attempt, delay)
        command = make_command(base, pages, output)
        moment = f"{delay:.2f}s after " + (f"checkpoint-{after}" if after else "the start") + f" (try {tries})"
        finished = sorted((p.name for p in output.glob("checkpoint-*") if (p / marker).is_file()), key=step_of)
        how = resume_or_restart(command, output, bool(finished))
        resumed = read_run_record(output / "final", expected_stage=stage)["results"]
        # it continued from the newest finished checkpoint and trained only the steps after it
        start = step_of(finished[-1]) if finished else 0
        assert resumed["resumed_from"] == ({"checkpoint": finished[-1], "step": start} if finished else None)
        assert resumed["steps_this_run"] == straight["steps"] - start > 0
        assert [e["loss"] for e in resumed["loss_history"]] == pytest.approx(
            [e["loss"] for e in straight["loss_history"]], rel=tolerance
        )
        if stage == "pretrain":
            for quality in ("step", "eval_loss", "cer"):
                assert [e[quality] for e in resumed["generation_quality"]] == pytest.approx(
                    [e[quality] for e in straight["generation_quality"]], rel=1e-3
                ), quality
        else:
            assert resumed["held_out_accuracy"] == straight["held_out_accuracy"]
        assert_same_weights(output / "final", tmp_path / "straight" / "final")
        outcomes.append(f"{moment}: {finished[-1] if finished else 'no checkpoint'}, {how}, identical losses")
    report(f"stages.{stage}", outcomes)


def assert_same_weights(final: Path, expected: Path) -> None:
    from safetensors.torch import load_file

    (weights,) = final.glob("*.safetensors")
    reference = load_file(expected / weights.name)
    for name, tensor in load_file(weights).items():
        torch.testing.assert_close(tensor, reference[name], rtol=1e-4, atol=1e-5, msg=name)


def test_a_killed_evaluation_reuses_the_embeddings_it_finished(base, pages, tmp_path):
    evalset = tmp_path / "eval"
    run(
        [
            "data_prep",
            "evalset",
            "--lang",
            "th",
            "--pages",
            str(pages),
            "--output",
            str(evalset),
            "--outline_level",
            "1",
        ]
    )
    command = ["stages.evaluate", "--config", TINY, "--model", str(base), "--data", str(evalset)]
    duration = timed(
        [*command, "--output", str(tmp_path / "straight.json"), "--cache_dir", str(tmp_path / "straight-cache")]
    )
    expected = json.loads((tmp_path / "straight.json").read_text())["results"]
    outcomes = []
    # two kills at seeded moments, two right after the page embeddings are cached (while the queries are encoded,
    # or the scores computed: the queries of the tiny eval set take milliseconds, too short a window to aim at)
    for case, moment in enumerate(kill_points(4, duration)[:2] + [0.0, 0.2]):

        def attempt(number: int, moment: float) -> tuple[Path, Path] | None:
            output, cache = tmp_path / f"killed{case}-{number}.json", tmp_path / f"cache{case}-{number}"
            pages_cached = (lambda: any(cache.glob("*.pt"))) if case >= 2 else None
            killed = run(
                [*command, "--output", str(output), "--cache_dir", str(cache)],
                kill_after=moment,
                kill_when=pages_cached,
            )
            if output.exists():
                assert json.loads(output.read_text())["results"] == expected
                return None
            return (output, cache) if killed else None

        (output, cache), tries = kill_before_completion(attempt, moment)
        before = {path: path.stat().st_mtime_ns for path in cache.glob("*.pt")}
        output.unlink(missing_ok=True)
        run([*command, "--output", str(output), "--cache_dir", str(cache)])
        assert json.loads(output.read_text())["results"] == expected
        assert all(path.stat().st_mtime_ns == mtime for path, mtime in before.items())  # reused, not encoded again
        assert len(list(cache.glob("*.pt"))) == 2  # pages and queries
        outcomes.append(
            f"{moment:.1f}s: killed (try {tries}) with {len(before)} of 2 embedding sets cached, rerun identical"
        )
    report("stages.evaluate", outcomes)
