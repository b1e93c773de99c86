"""Every stage against the baseline a user would otherwise run, side by side on one device (issue 8).

    .venv/bin/python bench/stages_bench.py --tiny --out /tmp/tiny.json     # CPU smoke run, ~1 min
    .venv/bin/python bench/stages_bench.py --dry_run --out /tmp/dry.json   # the GPU run's paths on a CPU
    python bench/stages_bench.py --out $OUT/bench.json                     # one GPU, Qwen2.5-VL-3B size
    bash bench/gpu_bench.sh $OUT                                            # a GPU session, wheels included

Builds a randomly initialised base model and a synthetic pages dataset, then runs each case of bench/cases.py
(where they are described) in a process of its own through bench/harness.py, so peak memory is per case, starting
none past --budget_s; writes the figures to --out as each case ends (bench/report.py), the cases' output beside it
(.log), and prints a table. With --tiny, cases are forked from this process once it has imported the libraries (a
CPU has no CUDA state to lose); on a GPU each case is a fresh interpreter.
"""

import argparse
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> None:
    from bench.cases import DRY_RUN, FULL, MEASURED, SETUP, TINY, write_recipe
    from bench.harness import run_cases
    from bench.report import add_case, new_report, table, write_report

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="JSON file for the results; the cases' output goes beside it.")
    parser.add_argument("--tiny", action="store_true", help="The tiny model and data on the CPU: a smoke run.")
    parser.add_argument(
        "--dry_run",
        action="store_true",
        help="The GPU run's recipe, data and batch sizes on the tiny model: its code paths, on a CPU.",
    )
    parser.add_argument(
        "--budget_s",
        type=float,
        default=None,
        help="Start no case after this many seconds (default 420; with --tiny 300).",
    )
    parser.add_argument(
        "--cases",
        nargs="+",
        choices=MEASURED,
        default=list(MEASURED),
        help="Cases to run, in this order (the set-up first; contrast_cached takes contrast_plain's batch).",
    )
    parser.add_argument(
        "--base", default=None, help="A base model folder to measure instead of building one (bench/gpu_kit.py's)."
    )
    parser.add_argument(
        "--plain_batches",
        nargs="+",
        type=int,
        default=None,
        help="contrast_plain's batch sizes to try, largest first (default: the scale's; 16 needs ~90 GiB at 3B).",
    )
    args = parser.parse_args(argv)

    base = str(Path(args.base).resolve()) if args.base else None  # before the chdir below
    out = Path(args.out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    log = out.with_suffix(".log")
    log.write_text("")
    os.chdir(REPO)  # recipes and samples are named relative to the repository
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    started = time.monotonic()
    deadline = started + (args.budget_s or (300.0 if args.tiny else 420.0))
    if args.tiny:
        # one thread: the tiny model's ops gain nothing from more, and on a busy 2-core CPU OpenMP threads that
        # wait for each other made a step 30x slower (also the thread count of the CPU matmul peak)
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        # imported once here, inherited by every forked case: each interpreter would pay ~7 s on a small CPU
        import peft  # noqa: F401
        import trl  # noqa: F401

        import bench.meters  # noqa: F401
        import stages.contrast  # noqa: F401
        import stages.pretrain  # noqa: F401
    scale = TINY if args.tiny else DRY_RUN if args.dry_run else FULL
    if args.plain_batches:
        scale = replace(scale, plain_batches=tuple(args.plain_batches))
    work = Path(tempfile.mkdtemp(prefix="stages-bench-"))
    context = {
        "scale": asdict(scale),
        "work": str(work),
        "recipe": write_recipe(scale.recipe, work),
        "base": base or str(work / "base"),
        "pages": [str(work / f"pages-{number}") for number in range(scale.pages_datasets)],
        "queries": str(work / "queries.json"),
    }
    report = new_report(asdict(scale), args.tiny, args.dry_run)

    def save() -> None:
        report["wall_time_s"] = round(time.monotonic() - started, 1)
        write_report(report, out)

    setup = [name for name in SETUP if not (base and name == "base_model")]
    chosen = [*setup, *dict.fromkeys(args.cases)]
    if base:
        report["setup"]["base_model"] = {"given": base}
    # a dry run's set-up and cases take a CPU longer than the GPU's limits
    runs = run_cases(
        "bench.cases", chosen, context, work, log, deadline, fork=args.tiny, limit_factor=10 if args.dry_run else 1
    )
    try:
        for name, figures in runs:
            if name in SETUP:
                report["setup"][name] = figures
                if "error" in figures:
                    save()
                    sys.exit(f"set-up step {name} failed; see {log}")
            else:
                add_case(report, name, figures)
                save()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(table(report))
    print(f"wrote {out} and {log} in {report['wall_time_s']}s")


if __name__ == "__main__":
    # run as a script, Python puts bench/ on sys.path, not the repository root that holds the bench package
    sys.path[0] = str(REPO)
    main()
