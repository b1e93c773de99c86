"""The pretraining optimisations must keep the loss curve: 50 steps of stages.pretrain on the embedded default
(recipes/tiny.yaml, its pages from `make demo`), each variant against the unoptimised path, on a CPU.

    .venv/bin/python bench/loss_curves.py --out bench/results/loss_curves_cpu2.json

Variants, each a run of its own in a fresh process:
- before: the vision tower frozen by requires_grad alone (stages.pretrain before freeze()), checkpointing on:
  the reference;
- freeze: stages.pretrain.freeze (the tower runs without autograd), checkpointing on;
- freeze_no_ckpt: the same without activation checkpointing;
- freeze_ckpt_every2: checkpointing every other layer.
Each run logs the loss at every step; the JSON holds the curves and each variant's largest difference from
the reference.
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STEPS = 50
VARIANTS = {
    "before": ["--gradient_checkpointing", "true"],
    "freeze": ["--gradient_checkpointing", "true"],
    "freeze_no_ckpt": ["--gradient_checkpointing", "false"],
    "freeze_ckpt_every2": ["--gradient_checkpointing", "true", "--gradient_checkpointing_kwargs", '{"every_n_layers": 2}'],
}


def run_variant(name: str, output_dir: str) -> None:
    import stages.pretrain

    if name == "before":
        stages.pretrain.freeze = lambda module: module.requires_grad_(False)
    stages.pretrain.main([
        "--config", "recipes/tiny.yaml", "--output_dir", output_dir, "--max_steps", str(STEPS),
        "--logging_steps", "1", "--eval_strategy", "no", "--save_strategy", "no", "--cer_pages", "0",
        "--eval_fraction", "0.0", "--disable_tqdm", "true", *VARIANTS[name],
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="JSON file for the curves.")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # internal: run one variant in this process
    parser.add_argument("--output_dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        run_variant(args.variant, args.output_dir)
        return

    curves = {}
    with tempfile.TemporaryDirectory() as work:
        for name in VARIANTS:
            output_dir = Path(work) / name
            subprocess.run([sys.executable, __file__, "--out", args.out, "--variant", name, "--output_dir", str(output_dir)],
                           cwd=REPO, check=True, stdout=subprocess.DEVNULL)
            record = json.loads((output_dir / "final" / "run_record.json").read_text())
            curves[name] = [entry["loss"] for entry in record["results"]["loss_history"]]
    reference = curves["before"]
    report = {
        "steps": STEPS, "recipe": "recipes/tiny.yaml", "curves": curves,
        "max_abs_difference_from_before": {
            name: max(abs(a - b) for a, b in zip(curve, reference)) for name, curve in curves.items() if name != "before"
        },
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    for name, curve in curves.items():
        print(f"{name:20s} loss at steps 1/10/25/50: {curve[0]:.4f} {curve[9]:.4f} {curve[24]:.4f} {curve[-1]:.4f}")
    print(json.dumps(report["max_abs_difference_from_before"], indent=2))


if __name__ == "__main__":
    main()
