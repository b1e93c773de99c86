"""The 50-step loss curve of `stages.pretrain` with each of its efficiency settings against the stage's defaults, on
the tiny model: a setting that only changes speed or memory must leave the curve as it is (issue 22).

    .venv/bin/python bench/loss_curves.py --out bench/results/loss_curves_settings_cpu2.json

Builds the tiny base model and Thai pages (`data_prep render` and `pages` on the UDHR sample), then runs the stage
once per setting in a fresh process, with the same seed, data and steps, and writes every curve and each one's
largest absolute difference from the defaults' curve.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = "recipes/tiny.yaml"
# beside the defaults (checkpointing chosen by memory: none on the tiny model; batches collated on the main
# process on a CPU), each setting alone
SETTINGS = {
    "defaults": [],
    "checkpointing_all": ["--checkpointing", "all"],
    "checkpointing_every_2": ["--checkpointing", "every_2"],
    "padding_free": ["--padding_free", "true"],
    "collating_workers_2": ["--dataloader_num_workers", "2"],
}


def run(*args: str) -> None:
    subprocess.run([sys.executable, "-m", *args], cwd=REPO, check=True, stdout=subprocess.DEVNULL)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args(argv)

    started, load_before = time.monotonic(), os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="loss-curves-"))
    run("stages.base_model", "--config", RECIPE, "--output_dir", str(work / "base"))
    run("data_prep", "render", "--lang", "th", "--input", "samples/udhr/th.md", "--output", str(work / "pdfs"))
    run("data_prep", "pages", "--lang", "th", "--input", str(work / "pdfs"), "--output", str(work / "pages"))
    curves, seconds = {}, {}
    for name, flags in SETTINGS.items():
        output = work / name
        began = time.monotonic()
        run(
            "stages.pretrain",
            *("--config", RECIPE, "--lang", "th", "--model_name_or_path", str(work / "base")),
            *("--datasets", str(work / "pages"), "--output_dir", str(output), "--max_steps", str(args.steps)),
            *("--eval_fraction", "0", "--eval_strategy", "no", "--save_strategy", "no", "--logging_steps", "1"),
            *flags,
        )
        seconds[name] = round(time.monotonic() - began, 1)
        record = json.loads((output / "final" / "run_record.json").read_text(encoding="utf-8"))
        curves[name] = [entry["loss"] for entry in record["results"]["loss_history"]]
        print(f"{name}: {seconds[name]} s, last loss {curves[name][-1]:.4f}", flush=True)
    reference = curves["defaults"]
    result = {
        "command": " ".join(["bench/loss_curves.py", *(argv if argv is not None else sys.argv[1:])]),
        "recipe": RECIPE,
        "steps": args.steps,
        "settings": SETTINGS,
        "load_average_before_after": [load_before, os.getloadavg()],
        "seconds": seconds,
        "max_abs_difference_from_defaults": {
            name: max(abs(a - b) for a, b in zip(curve, reference)) for name, curve in curves.items()
        },
        "curves": curves,
        "wall_time_s": round(time.monotonic() - started, 1),
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result["max_abs_difference_from_defaults"]))


if __name__ == "__main__":
    main()
