"""The benchmark's report: a JSON document of every case's figures and the ratios the issue's targets are about,
and the table printed at the end."""

import json
import sys
import time
from pathlib import Path

from common.run_record import package_versions


def new_report(scale: dict, tiny: bool, dry_run: bool) -> dict:
    return {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "tiny": tiny,
        "dry_run": dry_run,
        "command": " ".join(sys.argv),
        "versions": package_versions(),
        "scale": scale,
        "setup": {},
        "cases": {},
        "ratios": {},
    }


def add_case(report: dict, name: str, figures: dict) -> None:
    report["cases"][name] = figures
    if name == "matmul_peak":
        report["device"] = figures.get("device")
    report["ratios"] = ratios(report["cases"])


def write_report(report: dict, path: Path) -> None:
    """Written whole under a temporary name, then renamed: a run cut short leaves the figures so far."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.rename(path)


def ratios(cases: dict) -> dict:
    """MFU of each pretraining case, our stages' rates over their baselines', and whether the stage's contrastive
    batch fit in memory."""

    def get(case, key):
        return cases.get(case, {}).get(key)

    def quotient(numerator, denominator):
        return round(numerator / denominator, 3) if numerator and denominator else None

    peak = get("matmul_peak", "tflops_per_second")
    found = {}
    pretrain_cases = [name for name in cases if name.startswith("pretrain_")]
    for name in pretrain_cases:
        rate, flops = get(name, "tokens_per_second"), get(name, "flops_per_token")
        if rate and flops and peak:
            found[f"{name}_mfu"] = round(rate * flops / 1e12 / peak, 4)
    for name in pretrain_cases:
        if name != "pretrain_plain":
            found[f"{name}_tokens_per_s_over_plain"] = quotient(
                get(name, "tokens_per_second"), get("pretrain_plain", "tokens_per_second")
            )
    found.update(loss_curve_gaps(cases))
    # time per pair is 1 / pairs per second
    found["contrast_cached_over_plain_time_per_pair"] = quotient(
        get("contrast_plain", "pairs_per_second"), get("contrast_cached", "pairs_per_second")
    )
    found["contrast_stage_over_accum_time_per_pair"] = quotient(
        get("contrast_accum", "pairs_per_second"), get("contrast_stage", "pairs_per_second")
    )
    found["contrast_cached_reencode_all_over_plain_time_per_pair"] = quotient(
        get("contrast_plain", "pairs_per_second"), get("contrast_cached_reencode_all", "pairs_per_second")
    )
    for items in ("pages", "queries"):
        found[f"evaluate_sorted_workers_over_evaluate_{items}_per_s"] = quotient(
            get("evaluate_sorted_workers", f"{items}_per_second"), get("evaluate", f"{items}_per_second")
        )
    if "contrast_stage" in cases:  # None: it failed for another reason than memory (the time budget, say)
        stage = cases["contrast_stage"]
        out_of_memory = any("OutOfMemoryError" in line for line in stage.get("log_tail", []))
        found["contrast_stage_batch_fits"] = True if "error" not in stage else False if out_of_memory else None
    return {key: value for key, value in found.items() if value is not None or key == "contrast_stage_batch_fits"}


def table(report: dict) -> str:
    rows = [("case", "batch", "throughput", "step s", "peak GPU GiB", "peak host GiB", "MFU")]
    for name, figures in report["cases"].items():
        if "error" in figures:
            rows.append((name, "", figures["error"], "", "", "", ""))
            continue
        rates = ("tokens_per_second", "pairs_per_second", "pages_per_second", "tflops_per_second")
        rate = next((f"{figures[k]:g} {k.removesuffix('_per_second')}/s" for k in rates if k in figures), "")
        if "queries_per_second" in figures:
            rate += f", {figures['queries_per_second']:g} queries/s"
        mfu = report["ratios"].get(f"{name}_mfu")
        rows.append(
            (
                name,
                str(figures.get("batch", "")),
                rate,
                str(figures.get("step_seconds_median", "")),
                str(figures.get("peak_gpu_memory_gib", "")),
                str(figures.get("peak_host_memory_gib", "")),
                f"{100 * mfu:.2f}%" if mfu is not None else "",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in rows]
    return "\n".join(lines + [f"{key}: {value}" for key, value in report["ratios"].items()])


def loss_curve_gaps(cases: dict) -> dict:
    """The largest relative gap between a padding-free case's loss curve and pretrain_ours' (the same examples in the
    same order: the same curve, numerical noise apart)."""
    reference = cases.get("pretrain_ours", {}).get("loss_curve")
    found = {}
    for name in ("pretrain_packed",):
        curve = cases.get(name, {}).get("loss_curve")
        if reference and curve and len(curve) == len(reference):
            gap = max(abs(a - b) / abs(b) for a, b in zip(curve, reference))
            found[f"{name}_loss_curve_max_rel_gap"] = round(gap, 5)
    return found
