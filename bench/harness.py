"""Runs benchmark cases one after the other, each in a process of its own, within a time budget.

A case is an entry of a registry module's `CASES` (name -> Case): a function of the run's context (a JSON dict:
settings, paths, the figures of the cases run before it) returning a dict of figures. Its process is forked from
this one, which imported the libraries already (on a CPU, where there is no CUDA state to lose), or a fresh
interpreter (on a GPU), so peak memory is the case's own; the figures come back through a JSON file:

    python -m bench.harness bench.cases matmul_peak WORK   # what a fresh interpreter runs, from the repository root
"""

import contextlib
import importlib
import json
import multiprocessing
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parents[1]
GIB = 2**30
MIN_LEFT_S = 20  # no case is started with less of the budget left: loading a model alone takes longer


class Case(NamedTuple):
    measure: Callable[[dict], dict]
    limit_s: float  # at most; the run's budget caps it too


def peak_memory() -> dict:
    """Peak GPU memory allocated by this process (if it used the GPU) and its peak resident host memory, in GiB."""
    import torch

    figures = {"peak_host_memory_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB, 2)}
    if torch.cuda.is_available():
        figures["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 2)
    return figures


def run_case(registry: str, name: str, work: Path) -> None:
    """Run case `name` of `registry` in this process; its figures and peak memory go to work/results/<name>.json."""
    case = importlib.import_module(registry).CASES[name]
    figures = {**case.measure(json.loads((work / "context.json").read_text())), **peak_memory()}
    (work / "results").mkdir(exist_ok=True)
    (work / "results" / f"{name}.json").write_text(json.dumps(figures, indent=2))


def _forked_case(registry: str, name: str, work: Path, log: Path) -> None:
    with open(log, "a") as handle:
        os.dup2(handle.fileno(), 1)
        os.dup2(handle.fileno(), 2)
    run_case(registry, name, work)
    sys.stdout.flush()
    sys.stderr.flush()


def launch(registry: str, name: str, work: Path, log: Path, timeout: float, fork: bool) -> dict:
    """Run a case in a process of its own, its output appended to `log`; its figures with its wall time, or
    {"error": ...} with the end of its log."""
    started, started_unix = time.monotonic(), round(time.time(), 1)  # the latter matches GPU utilisation samples
    with open(log, "a") as handle:
        handle.write(f"\n===== {name} =====\n")
        offset = handle.tell()
    if fork:
        process = multiprocessing.get_context("fork").Process(target=_forked_case, args=(registry, name, work, log))
        process.start()
        process.join(timeout)
        code = process.exitcode if not process.is_alive() else "timeout"
        if code == "timeout":
            process.kill()
            process.join()
    else:
        command = [sys.executable, "-m", "bench.harness", registry, name, str(work)]
        with open(log, "a") as handle:
            # a session of its own, killed whole at the limit: a case's children (data loader workers, a launcher's
            # ranks) would otherwise outlive it and hold the GPU memory the next case needs
            process = subprocess.Popen(
                command, stdout=handle, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True
            )
            try:
                code = process.wait(timeout)
            except subprocess.TimeoutExpired:
                code = "timeout"
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)  # after a clean exit too: workers left behind
            process.wait()
    seconds = round(time.monotonic() - started, 1)
    result = work / "results" / f"{name}.json"
    if code == 0 and result.is_file():
        return {**json.loads(result.read_text()), "case_wall_s": seconds, "case_started_unix": started_unix}
    with open(log, "rb") as handle:
        handle.seek(offset)
        tail = handle.read().decode(errors="replace").splitlines()[-15:]
    print(f"{name}: failed ({code}) after {seconds}s; end of its log:\n  " + "\n  ".join(tail), flush=True)
    return {"error": f"exit {code} after {seconds}s", "log_tail": tail}


def run_cases(
    registry: str,
    names: list[str],
    context: dict,
    work: Path,
    log: Path,
    deadline: float,
    fork: bool,
    limit_factor: float = 1.0,
) -> Iterator[tuple[str, dict]]:
    """(name, figures) of each case in turn. A case gets its registry limit times `limit_factor`, cut to the
    time left before `deadline` (time.monotonic()); with under MIN_LEFT_S left it is skipped (figures: an error).
    Each case's context holds its name under "case" and the figures of the cases before it under "earlier"."""
    cases = importlib.import_module(registry).CASES
    earlier = {}
    for name in names:
        left = deadline - time.monotonic()
        if left < MIN_LEFT_S:
            earlier[name] = {"error": "skipped: out of the time budget"}
        else:
            (work / "context.json").write_text(json.dumps({**context, "case": name, "earlier": earlier}))
            earlier[name] = launch(registry, name, work, log, min(cases[name].limit_s * limit_factor, left), fork)
        yield name, earlier[name]


def main() -> None:
    registry, name, work = sys.argv[1:]
    run_case(registry, name, Path(work))


if __name__ == "__main__":
    main()
