"""The paper's analyses (DESIGN.md section 2) on this project's own runs.

    python -m stages.analyze scaling --config recipes/tiny.yaml
    python -m stages.analyze diagnostics --config recipes/tiny.yaml

`scaling`, the generation-representation scaling law: the base model (step 0) and every saved checkpoint
of a pretrain run are refined with the recipe's `contrast` section and seed, and evaluated on one eval
set. The held-out CER and eval loss in each checkpoint's run record are set against the refined model's
nDCG@10, with Spearman's rank correlation. A recipe asks for N pretraining lengths with the pretrain
section's `save_steps` = `eval_steps` = max_steps / N. Refined models whose run record shows the same
settings, data and parent are reused.

`diagnostics`: for models given as name=folder and pages (image + text), the last-token states of both
modalities at every layer; anisotropy within each modality and image-text alignment (mutual k-NN,
linear CKA) between them, one line per model.

Both write a table (Markdown), a JSON, a PNG and a run record under `<output_dir>/scaling/` or
`<output_dir>/diagnostics/`.
"""

import json
import os
import random
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

from common.artifacts import check_input_paths, finished_checkpoints, write_text_atomic
from common.errors import UsageError, run_cli
from common.output import set_up_output
from common.recipe import parse_stage_arguments
from common.run_record import RUN_RECORD, read_run_record, run_is_up_to_date, write_run_record
from lco.significance import ALPHA

COMMANDS = ("scaling", "diagnostics")


@dataclass
class AnalyzeArguments:
    # the values each numeric field can take (common.recipe.check_ranges, before anything loads)
    RANGES: ClassVar[dict[str, str]] = {
        "max_pages": "[3, inf)",
        "knn": "[1, inf)",
        "batch_size": "[1, inf)",
        "max_text_tokens": "[1, inf)",
        "image_max_side": "[1, inf)",
    }

    output_dir: str | None = field(default=None, metadata={"help": "Folder for scaling/ and diagnostics/."})
    pretrain_run: str | None = field(
        default=None, metadata={"help": "scaling: a finished stages.pretrain output_dir (checkpoint-* and final/)."}
    )
    evalset: str | None = field(
        default=None, metadata={"help": "scaling: the eval set every refined model is scored on."}
    )
    models: list[str] = field(
        default_factory=list, metadata={"help": "diagnostics: models as name=folder, e.g. base=checkpoints/tiny/base."}
    )
    pages: list[str] = field(
        default_factory=list,
        metadata={"help": "diagnostics: pages datasets whose (page image, page text) pairs are embedded."},
    )
    max_pages: int = field(default=128, metadata={"help": "diagnostics: pages drawn (seeded) from --pages."})
    knn: int = field(default=10, metadata={"help": "diagnostics: neighbours compared by the mutual k-NN alignment."})
    batch_size: int = field(default=8, metadata={"help": "Inputs encoded at once; the results do not depend on it."})
    max_text_tokens: int = field(default=650, metadata={"help": "Texts are cut to this many tokens before encoding."})
    image_max_side: int = field(default=700, metadata={"help": "Images are thumbnailed to fit this square, in pixels."})
    rebuild: bool = field(
        default=False, metadata={"help": "scaling: refine every checkpoint again, even those already done."}
    )

    def validate(self) -> None:
        if self.output_dir is None:
            raise UsageError("--output_dir is not set (recipe `analyze.output_dir` or the flag).")


@dataclass(frozen=True)
class Point:
    """One pretraining length: the model after `step` steps and its generation quality on held-out pages."""

    step: int
    model: str
    cer: float
    eval_loss: float


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        raise UsageError(
            f"give a command first: python -m stages.analyze {{{','.join(COMMANDS)}}} ... (--help after it)."
        )
    command, rest = argv[0], argv[1:]
    recipe_args, args = parse_stage_arguments(
        "analyze", (AnalyzeArguments,), rest, prog=f"python -m stages.analyze {command}"
    )
    set_up_output(recipe_args.verbose)
    if command == "scaling":
        scaling(recipe_args, args)
    else:
        diagnostics(recipe_args, args)


def scaling(recipe_args, args: AnalyzeArguments) -> None:
    from .contrast import ContrastArguments
    from .contrast import main as contrast_main
    from .evaluate import main as evaluate_main
    from .evaluate import record_path

    if recipe_args.config is None:
        raise UsageError("scaling refines with a recipe's contrast section: give --config recipes/<recipe>.yaml.")
    if not args.pretrain_run or not args.evalset:
        raise UsageError(
            "scaling needs --pretrain_run (a stages.pretrain output_dir) and --evalset (an eval set folder)."
        )
    check_input_paths([args.pretrain_run, args.evalset], "--pretrain_run/--evalset")
    points = pretraining_points(Path(args.pretrain_run))
    folder = Path(args.output_dir) / "scaling"
    print(
        f"analyze scaling: {len(points)} pretraining lengths (steps {', '.join(str(p.step) for p in points)}) -> "
        f"{folder}"
    )

    recipe = ["--config", recipe_args.config, "--seed", str(recipe_args.seed)]
    refined = []
    for number, point in enumerate(points, start=1):
        contrast_argv = [
            *recipe,
            "--model_name_or_path",
            point.model,
            "--output_dir",
            str(folder / f"step-{point.step}"),
            "--overwrite",
        ]
        _, contrast_args = parse_stage_arguments("contrast", (ContrastArguments,), contrast_argv)
        final = Path(contrast_args.output_dir) / "final"
        print(f"[{number}/{len(points)}] stages.contrast of {point.model} (pretraining step {point.step}) -> {final}")
        if not args.rebuild and run_is_up_to_date(
            final,
            "contrast",
            recipe_args.config,
            recipe_args.seed,
            contrast_args,
            contrast_args.input_files(),
            point.model,
        ):
            print(f"      {final}: complete, same settings and data; reusing it")
        else:
            contrast_main(contrast_argv)
        refined.append(str(final))

    evaluation = folder / "evaluation.json"
    # this command's own output; the embeddings stay cached, so re-scoring is quick
    for path in (evaluation, record_path(evaluation)):
        path.unlink(missing_ok=True)
    evaluate_main([*recipe, "--model", *refined, "--data", args.evalset, "--output", str(evaluation)])
    evaluated = json.loads(evaluation.read_text(encoding="utf-8"))
    results = evaluated["results"]
    rows = [
        {
            **asdict(point),
            "refined": model,
            **{metric: results[model]["all"][metric] for metric in ("ndcg@10", "recall@10", "mrr@10")},
            "ndcg@10_interval": evaluated["intervals"][model]["all"]["ndcg@10"],  # 95%, bootstrap over queries
            "held_out_accuracy": [
                entry["in_batch_accuracy"] for entry in read_run_record(model)["results"]["held_out_accuracy"]
            ],
        }
        for point, model in zip(points, refined)
    ]
    baselines = {name: results[name]["all"]["ndcg@10"] for name in ("bm25 (page text)", "random")}
    correlations = {
        quality: spearman([row[quality] for row in rows], [row["ndcg@10"] for row in rows])
        for quality in ("cer", "eval_loss")
    }
    summary = {
        "pretrain_run": args.pretrain_run,
        "evalset": args.evalset,
        "seed": recipe_args.seed,
        "points": rows,
        "baselines_ndcg@10": baselines,
        "spearman_with_ndcg@10": correlations,
    }
    table = scaling_table(rows, baselines, correlations)
    write_text_atomic(folder / "scaling.md", table + "\n")
    save_figure(scaling_figure(rows, baselines, correlations), folder / "scaling.png")
    write_text_atomic(folder / "scaling.json", json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    write_run_record(
        folder,
        stage="analyze",
        config={"recipe": vars(recipe_args), "analyze": asdict(args), "command": "scaling"},
        seed=recipe_args.seed,
        inputs=[Path(model) / RUN_RECORD for model in refined] + [evaluation],
        parent=Path(args.pretrain_run) / "final",
        results={"spearman_with_ndcg@10": correlations},
    )
    print(table)
    print(f"analyze scaling: table, plot and JSON in {folder}/scaling.{{md,png,json}}")


def pretraining_points(run: Path) -> list[Point]:
    """The base model (step 0), every checkpoint with a run record, and final/, each with the held-out
    CER and eval loss measured at its step."""
    record = read_run_record(run / "final", expected_stage="pretrain")
    quality = {entry["step"]: entry for entry in record["results"]["generation_quality"]}
    models = {0: record["config"]["pretrain"]["model_name_or_path"], record["results"]["steps"]: str(run / "final")}
    for checkpoint in finished_checkpoints(run, RUN_RECORD):
        models.setdefault(int(checkpoint.name.removeprefix("checkpoint-")), str(checkpoint))
    if record["config"]["pretrain"]["tuning"] == "lora":
        raise UsageError(
            f"{run} was pretrained with LoRA, whose checkpoints hold adapters, not models; the scaling analysis "
            "refines each checkpoint, so pretrain with `tuning: full`."
        )
    points = [
        Point(step, models[step], quality[step]["cer"], quality[step]["eval_loss"])
        for step in sorted(models)
        if step in quality
    ]
    if len(points) < 3:
        raise UsageError(
            f"{run} has {len(points)} checkpoints with a held-out CER (steps {sorted(set(models) & set(quality))}); "
            "the scaling analysis needs at least 3: set the recipe's pretrain `save_steps` equal to `eval_steps` "
            "(e.g. max_steps / 4), keep `eval_fraction` above 0, and pretrain again."
        )
    return points


def spearman(x: list[float], y: list[float]) -> dict:
    """Spearman's rho, its p-value and its 95% interval: Fisher's z with the variance of a rank correlation's z,
    1.06 / (n - 3) (Fieller, Hartley and Pearson, Biometrika 1957); None with fewer than 4 points or at |rho| = 1,
    where z is infinite and the interval would claim a certainty that 4 or 5 checkpoints cannot give."""
    import math

    from scipy.stats import norm, spearmanr

    if len(set(x)) < 2 or len(set(y)) < 2:  # a rank correlation with a constant is undefined
        return {"rho": None, "p_value": None, "interval": None, "points": len(x)}
    result = spearmanr(x, y)
    rho, n = float(result.statistic), len(x)
    interval = None
    if n >= 4 and abs(rho) < 1:
        half = norm.ppf(1 - ALPHA / 2) * math.sqrt(1.06 / (n - 3))
        interval = [round(math.tanh(math.atanh(rho) + sign * half), 4) for sign in (-1, 1)]
    return {"rho": round(rho, 4), "p_value": round(float(result.pvalue), 4), "interval": interval, "points": n}


def scaling_table(rows: list[dict], baselines: dict, correlations: dict) -> str:
    lines = [
        "| pretraining steps | held-out CER | eval loss | nDCG@10 [95% interval] | Recall@10 | MRR@10 | contrast: "
        "held-out in-batch accuracy, start -> end |",
        "|---|---|---|---|---|---|---|",
        *(
            f"| {r['step']} | {r['cer']:.3f} | {r['eval_loss']:.3f} | {r['ndcg@10']:.3f}{_interval(r)} | "
            f"{r['recall@10']:.3f} | {r['mrr@10']:.3f} | {r['held_out_accuracy'][0]} -> {r['held_out_accuracy'][-1]} |"
            for r in rows
        ),
        "",
        "Baselines, nDCG@10: " + ", ".join(f"{name} {value:.3f}" for name, value in baselines.items()),
    ]
    for quality, label in (("cer", "held-out CER"), ("eval_loss", "eval loss")):
        found = correlations[quality]
        value = (
            "undefined (constant input)"
            if found["rho"] is None
            else f"{found['rho']:+.3f} (p = {found['p_value']:.3f}; 95% interval "
            f"{'undefined' if found['interval'] is None else '[{:+.2f}, {:+.2f}]'.format(*found['interval'])})"
        )
        lines.append(f"Spearman rank correlation of {label} with nDCG@10 over {found['points']} points: {value}")
    lines.append("(the scaling law predicts a negative one: lower CER and loss, better retrieval after refinement)")
    return "\n".join(lines)


def _interval(row: dict) -> str:
    found = row["ndcg@10_interval"]
    return f" [{found[0]:.3f}, {found[1]:.3f}]" if found else ""


def scaling_figure(rows: list[dict], baselines: dict, correlations: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True, constrained_layout=True)
    for axis, quality, label in zip(axes, ("cer", "eval_loss"), ("held-out CER", "held-out eval loss")):
        x, y = [row[quality] for row in rows], [row["ndcg@10"] for row in rows]
        # error bars: each point's 95% bootstrap interval over queries (none under two queries)
        bounds = [row["ndcg@10_interval"] or [row["ndcg@10"]] * 2 for row in rows]
        # max(0, ...): matplotlib refuses a negative bar, which 4-decimal rounding could make of a bound at the mean
        below = [max(0.0, v - low) for v, (low, _) in zip(y, bounds)]
        above = [max(0.0, high - v) for v, (_, high) in zip(y, bounds)]
        axis.errorbar(x, y, yerr=[below, above], fmt="o", color="tab:blue", capsize=3)
        for row in rows:
            axis.annotate(
                f"step {row['step']}",
                (row[quality], row["ndcg@10"]),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=8,
            )
        for (name, value), style in zip(baselines.items(), ("--", ":")):
            axis.axhline(value, color="gray", linestyle=style, label=name)
        rho = correlations[quality]["rho"]
        axis.set_title(f"Spearman rho = {rho:+.2f}" if rho is not None else "Spearman rho undefined")
        axis.set_xlabel(f"{label} after pretraining (lower = better generation)")
    axes[0].set_ylabel("nDCG@10 after contrastive refinement\n(bars: 95% interval over queries)")
    axes[0].legend(loc="best", fontsize=8)
    return figure


def diagnostics(recipe_args, args: AnalyzeArguments) -> None:
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from lco.embedder import Item
    from lco.representation import anisotropy, layer_states, linear_cka, mutual_knn

    models = named_models(args.models)
    if not args.pages:
        raise UsageError("diagnostics needs --pages: pages datasets written by `python -m data_prep pages`.")
    check_input_paths(args.pages, "--pages")
    rows = sample_pages(args.pages, args.max_pages, recipe_args.seed)
    k = min(args.knn, len(rows) - 1)
    folder = Path(args.output_dir) / "diagnostics"
    print(f"analyze diagnostics: {len(models)} models, {len(rows)} pages, mutual {k}-NN -> {folder}")

    device = "cuda" if torch.cuda.is_available() else "cpu"
    images = [Item(image=row["image"]) for row in rows]
    texts = [Item(text=row["text"]) for row in rows]
    settings = dict(
        batch_size=args.batch_size, max_text_tokens=args.max_text_tokens, image_max_side=args.image_max_side
    )
    per_model = {}
    for name, path in models.items():
        model = AutoModelForImageTextToText.from_pretrained(path).to(device).eval()
        processor = AutoProcessor.from_pretrained(path)
        image_states = layer_states(model, processor, images, **settings)
        text_states = layer_states(model, processor, texts, **settings)
        per_model[name] = {
            "path": path,
            "layers": [
                {
                    "layer": layer,
                    "anisotropy_image": round(anisotropy(i), 4),
                    "anisotropy_text": round(anisotropy(t), 4),
                    "mutual_knn": round(mutual_knn(i, t, k), 4),
                    "cka": round(linear_cka(i, t), 4),
                }
                # from layer 1: at layer 0 the last position holds the same prompt token's embedding for every item
                for layer, (i, t) in enumerate(zip(image_states[1:], text_states[1:]), start=1)
            ],
        }
        del model

    chance = round(k / (len(rows) - 1), 4)  # the mutual k-NN of unrelated representations
    summary = {
        "pages": args.pages,
        "page_count": len(rows),
        "knn": k,
        "mutual_knn_chance": chance,
        "seed": recipe_args.seed,
        "models": per_model,
    }
    table = diagnostics_table(per_model)
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomic(folder / "diagnostics.md", table + "\n")
    save_figure(diagnostics_figure(per_model, k, chance), folder / "diagnostics.png")
    write_text_atomic(folder / "diagnostics.json", json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    write_run_record(
        folder,
        stage="analyze",
        config={"recipe": vars(recipe_args), "analyze": asdict(args), "command": "diagnostics"},
        seed=recipe_args.seed,
        inputs=[Path(path) / RUN_RECORD for path in models.values() if (Path(path) / RUN_RECORD).is_file()]
        + [Path(path) / "manifest.json" for path in args.pages],
    )
    print(table)
    print(f"(mutual {k}-NN of unrelated representations: {chance})")
    print(f"analyze diagnostics: table, plot and JSON in {folder}/diagnostics.{{md,png,json}}")


def named_models(values: list[str]) -> dict[str, str]:
    """`name=folder` pairs (a bare folder is named after itself), each a model folder."""
    if not values:
        raise UsageError("diagnostics needs --models name=folder [name=folder ...], e.g. base=checkpoints/tiny/base.")
    models = {}
    for value in values:
        name, _, path = value.partition("=") if "=" in value else (value, "", value)
        if name in models:
            raise UsageError(f"--models names `{name}` twice; give each model its own name.")
        if not (Path(path) / "config.json").is_file():
            raise UsageError(f"--models {value}: {path} is not a model folder (no config.json); give name=folder.")
        models[name] = path
    return models


def sample_pages(datasets_paths: list[str], count: int, seed: int) -> list[dict]:
    """Up to `count` pages with text, drawn with `seed` from the pages datasets (in their order if fewer)."""
    import datasets

    from data_prep.pages import read_pages_manifest

    for path in datasets_paths:
        read_pages_manifest(path, "--pages")
    pages = datasets.concatenate_datasets([datasets.load_from_disk(path) for path in datasets_paths])
    with_text = [index for index, text in enumerate(pages["text"]) if text.strip()]
    if len(with_text) < 3:
        raise UsageError(f"--pages hold {len(with_text)} pages with text; the diagnostics need at least 3.")
    chosen = sorted(random.Random(seed).sample(with_text, count)) if len(with_text) > count else with_text
    return [pages[index] for index in chosen]


def diagnostics_table(per_model: dict) -> str:
    lines = [
        "| model | layer | anisotropy (images) | anisotropy (texts) | mutual k-NN | linear CKA |",
        "|---|---|---|---|---|---|",
    ]
    for name, result in per_model.items():
        for row in result["layers"]:
            lines.append(
                f"| {name} | {row['layer']} | {row['anisotropy_image']:.3f} | {row['anisotropy_text']:.3f} | "
                f"{row['mutual_knn']:.3f} | {row['cka']:.3f} |"
            )
    return "\n".join(lines)


def diagnostics_figure(per_model: dict, k: int, chance: float):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    panels = (
        ("anisotropy_image", "anisotropy of page images\n(mean pairwise cosine)"),
        ("anisotropy_text", "anisotropy of page texts\n(mean pairwise cosine)"),
        ("mutual_knn", f"image-text alignment\n(mutual {k}-NN)"),
        ("cka", "image-text alignment\n(linear CKA)"),
    )
    figure, axes = plt.subplots(1, len(panels), figsize=(16, 3.8), constrained_layout=True)
    for axis, (key, title) in zip(axes, panels):
        for name, result in per_model.items():
            axis.plot(
                [row["layer"] for row in result["layers"]],
                [row[key] for row in result["layers"]],
                marker="o",
                label=name,
            )
        if key == "mutual_knn":
            axis.axhline(chance, color="gray", linestyle=":", label="chance")
            axis.legend(handles=axis.get_lines()[-1:], fontsize=8)
        axis.set_title(title, fontsize=10)
        axis.set_xlabel("layer")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].legend(fontsize=8)
    return figure


def save_figure(figure, path: Path) -> None:
    """Save a PNG under a temporary name, then rename it into place."""
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    figure.savefig(tmp, dpi=120)
    plt.close(figure)
    os.replace(tmp, path)


if __name__ == "__main__":
    run_cli(main)
