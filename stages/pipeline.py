"""The whole pipeline on one recipe, stage after stage; on `recipes/tiny.yaml` it is the embedded default.

    python -m stages.pipeline --config recipes/tiny.yaml [--languages th km] [--rebuild]

Each sample text is split at its sections: the last `eval_sections` are rendered to PDFs, read back into
pages datasets (each language with its own recipe, recipes/<lang>.yaml) and turned into a cross-lingual
eval set, whose documents every training stage excludes; no stage trains on that text. The rest is cut
into several documents for training, so that the held-out pages of pretraining (whole documents, never
trained on) are in languages the model trains on. Then pretraining, contrastive refinement of the pretrained
model and of the base model (the no-pretraining baseline), and evaluation of all of them. A step whose
output is complete and whose run record shows the same settings, data and parent run is reused;
`--rebuild` redoes everything.
"""

import bisect
import itertools
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

from common.artifacts import write_text_atomic
from common.errors import UsageError, run_cli
from common.output import set_up_output
from common.recipe import parse_stage_arguments
from common.run_record import read_run_record, run_is_up_to_date, sha256_file
from data_prep.cli import main as data_prep_main

from .base_model import BaseModelArguments
from .base_model import main as build_base_model
from .contrast import ContrastArguments
from .contrast import main as contrast_main
from .evaluate import main as evaluate_main
from .pretrain import CPU_DEFAULTS, PretrainArguments
from .pretrain import main as pretrain_main


@dataclass
class PipelineArguments:
    # the values each numeric field can take (common.recipe.check_ranges, before anything loads)
    RANGES: ClassVar[dict[str, str]] = {
        "eval_sections": "[1, inf)",
        "pretrain_documents": "[1, inf)",
    }

    languages: list[str] = field(
        default_factory=lambda: ["th", "lo", "km", "my", "vi", "id"],
        metadata={"help": "Sample languages to prepare, each with recipes/<lang>.yaml."},
    )
    samples: str = field(default="samples/udhr", metadata={"help": "Folder of <lang>.md sample texts."})
    parallel_source: str = field(
        default="samples/udhr/en.md", metadata={"help": "Text whose sections query the samples' pages."}
    )
    data_dir: str = field(default="checkpoints/tiny", metadata={"help": "Where the prepared data goes."})
    eval_sections: int = field(
        default=10,
        metadata={"help": "Last `## ` sections of each sample that only the eval set holds: no stage trains on them."},
    )
    pretrain_documents: int = field(
        default=4, metadata={"help": "Documents each sample is cut into (at `## ` sections) for pretraining."}
    )
    rebuild: bool = field(default=False, metadata={"help": "Rebuild every step, even those already done."})


def main(argv: list[str] | None = None) -> None:
    recipe_args, args = parse_stage_arguments("pipeline", (PipelineArguments,), argv)
    if recipe_args.config is None:
        raise UsageError("give a recipe: python -m stages.pipeline --config recipes/tiny.yaml")
    started = time.monotonic()
    set_up_output(recipe_args.verbose)
    verbose = ["--verbose"] if recipe_args.verbose else []
    recipe = ["--config", recipe_args.config, "--seed", str(recipe_args.seed), *verbose]

    base = base_model_step(recipe, args.rebuild)
    print(f"[2/5] data_prep: render, pages and evalset for {', '.join(args.languages)} -> {args.data_dir}")
    pages = prepare_data(recipe_args.seed, args, verbose)
    evalset = str(Path(args.data_dir) / "evalset")
    # the eval set's documents are kept out of every training stage
    pretrained = pretrain_step(recipe_args, recipe, [*pages, "--exclude_evalsets", evalset], base, args.rebuild)
    # contrastive refinement of that model, and of the base model as the no-pretraining baseline
    # (the comparison the method is about), with the same recipe, seed and pairs
    refined = [
        contrast_step(recipe_args, recipe, [*pages, "--exclude_evalsets", evalset], parent, suffix, label, args.rebuild)
        for label, parent, suffix in (("4a", str(pretrained), ""), ("4b", base, "-only"))
    ]
    evaluation = evaluate_step(recipe, [base, str(pretrained), *map(str, refined)], evalset, Path(args.data_dir))
    print(
        f"pipeline: done in {time.monotonic() - started:.0f}s; results in {evaluation}/results.json, report in "
        f"{evaluation}/report/index.html"
    )
    print(
        f"pipeline: the paper's analyses of these runs: python -m stages.analyze {{scaling,diagnostics}} --config "
        f"{recipe_args.config}"
    )
    print_search_commands(refined, [str(Path(args.data_dir) / "pages" / lang) for lang in args.languages], evalset)


def print_search_commands(models: list[Path], pages: list[str], evalset: str) -> None:
    """How to search the eval set's pages with each refined model (a query of the eval set as the example)."""
    import json
    import shlex

    query = json.loads(Path(evalset, "queries.jsonl").read_text(encoding="utf-8").splitlines()[0])["text"]
    print("pipeline: search the eval set's pages with a model it built:")
    for model in models:
        index = model.parent.with_name(f"{model.parent.name}-index")
        print(f"  python -m stages.index --model {model} --input {' '.join(pages)} --output {index}")
        print(f"  python -m stages.search --index {index} {shlex.quote(query)}")
        print(f"  python -m stages.serve --index {index}")


def base_model_step(recipe: list[str], rebuild: bool) -> str:
    """[1/5] The base model's folder, built unless an up-to-date one is there."""
    # --overwrite: the pipeline itself decides here whether the existing folder is reused or rebuilt
    _, base_args = parse_stage_arguments("base_model", (BaseModelArguments,), [*recipe, "--overwrite"])
    print(f"[1/5] base model -> {base_args.output_dir}")
    if not rebuild and _is_up_to_date(base_args):
        print("      up to date (same settings as its run record); reusing it")
    else:
        build_base_model([*recipe, "--overwrite"])
    return base_args.output_dir


def pretrain_step(recipe_args, recipe: list[str], data: list[str], base: str, rebuild: bool) -> Path:
    """[3/5] `final/` of pretraining `base` on `data` (pages datasets, then flags), reused when up to date."""
    from trl import SFTConfig

    argv = [*recipe, "--model_name_or_path", base, "--datasets", *data, "--overwrite"]
    _, args, training = parse_stage_arguments(
        "pretrain", (PretrainArguments, SFTConfig), argv, machine_defaults=CPU_DEFAULTS
    )
    pretrained = Path(training.output_dir) / "final"
    print(f"[3/5] stages.pretrain -> {pretrained}")
    inputs = [
        *(Path(path) / "manifest.json" for path in args.datasets),
        *(Path(path) / "evalset.json" for path in args.exclude_evalsets),
    ]
    if not rebuild and run_is_up_to_date(
        pretrained, "pretrain", recipe_args.config, recipe_args.seed, args, inputs, base
    ):
        print(f"      {pretrained}: complete, same settings and data; reusing it")
    else:
        pretrain_main(argv)
    return pretrained


def contrast_step(recipe_args, recipe, data: list[str], parent: str, suffix: str, label: str, rebuild: bool) -> Path:
    """[4/5] `final/` of the contrastive refinement of `parent` (into the recipe's output_dir + `suffix`)."""
    argv = [*recipe, "--model_name_or_path", parent, "--pages_datasets", *data, "--overwrite"]
    _, args = parse_stage_arguments("contrast", (ContrastArguments,), argv)
    argv += ["--output_dir", args.output_dir + suffix]
    _, args = parse_stage_arguments("contrast", (ContrastArguments,), argv)
    final = Path(args.output_dir) / "final"
    print(f"[{label}/5] stages.contrast of {parent} -> {final}")
    config, seed = recipe_args.config, recipe_args.seed
    if not rebuild and run_is_up_to_date(final, "contrast", config, seed, args, args.input_files(), parent):
        print(f"      {final}: complete, same settings and data; reusing it")
    else:
        contrast_main(argv)
    return final


def evaluate_step(recipe: list[str], models: list[str], evalset: str, data_dir: Path) -> Path:
    """[5/5] The models side by side with the baselines on the eval set, in `data_dir/evaluation`."""
    evaluation = data_dir / "evaluation"
    print(f"[5/5] stages.evaluate -> {evaluation}")
    if evaluation.exists():
        shutil.rmtree(evaluation)  # the pipeline's own output; embeddings stay cached, so re-scoring is quick
    output = ["--output", str(evaluation / "results.json"), "--report", str(evaluation / "report")]
    evaluate_main([*recipe, "--model", *models, "--data", evalset, *output])
    return evaluation


def prepare_data(seed: int, args: PipelineArguments, verbose: list[str]) -> list[str]:
    """Render, read back and build the eval set for the sample languages; return the pretraining pages datasets
    (`verbose`: the flag passed on, or nothing)."""
    root = Path(args.data_dir)

    def step(argv: list[str], output: Path, done_file: str) -> None:
        if not args.rebuild and (output / done_file).is_file():
            print(f"      {output}: complete; reusing it")
        else:
            data_prep_main([*argv, "--output", str(output), "--overwrite", "--seed", str(seed), *verbose])

    for lang in args.languages:
        train_text, eval_text = split_sample(Path(args.samples) / f"{lang}.md", root / "texts", args.eval_sections)
        # an article a page: each query's relevant pages are few among many (a random ranking scores low)
        eval_render = ["render", "--lang", lang, "--input", str(eval_text), "--section_pages", "true"]
        step(eval_render, root / "pdfs" / lang, "render_manifest.json")
        step(["pages", "--lang", lang, "--input", str(root / "pdfs" / lang)], root / "pages" / lang, "manifest.json")
        parts = write_parts(train_text, root / "pretrain-texts" / lang, args.pretrain_documents)
        step(
            ["render", "--lang", lang, "--input", *map(str, parts)],
            root / "pretrain-pdfs" / lang,
            "render_manifest.json",
        )
        step(
            ["pages", "--lang", lang, "--input", str(root / "pretrain-pdfs" / lang)],
            root / "pretrain-pages" / lang,
            "manifest.json",
        )
    pages = [str(root / "pages" / lang) for lang in args.languages]
    _, parallel_source = split_sample(Path(args.parallel_source), root / "texts", args.eval_sections)
    step(
        ["evalset", "--lang", "en", "--pages", *pages, "--parallel_source", str(parallel_source)],
        root / "evalset",
        "evalset.json",
    )
    return [str(root / "pretrain-pages" / lang) for lang in args.languages]


def split_sample(text_file: Path, folder: Path, eval_sections: int) -> tuple[Path, Path]:
    """(training text, eval text) of a Markdown sample: its title and all but the last `eval_sections` `## `
    sections, and its title and those last sections, written under `folder/train/` and `folder/eval/` (rewritten
    only when their content changes, so that the renders made from them stay reusable)."""
    head, *sections = re.split(r"^(?=## )", text_file.read_text(encoding="utf-8"), flags=re.M)
    if len(sections) <= eval_sections:
        raise UsageError(
            f"{text_file} has {len(sections)} `## ` sections; it cannot keep {eval_sections} for evaluation."
        )
    paths = (folder / "train" / text_file.name, folder / "eval" / text_file.name)
    contents = (head + "".join(sections[:-eval_sections]), head + "".join(sections[-eval_sections:]))
    for path, content in zip(paths, contents):
        write_if_changed(path, content)
    return paths


def write_parts(text_file: Path, folder: Path, count: int) -> list[Path]:
    """Cut a Markdown text at its `## ` sections into `count` documents of about equal length (rewritten
    only when their content changes, so that the renders made from them stay reusable)."""
    head, *sections = re.split(r"^(?=## )", text_file.read_text(encoding="utf-8"), flags=re.M)
    if len(sections) < count:
        raise UsageError(f"{text_file} has {len(sections)} `## ` sections; it cannot be cut into {count} documents.")
    ends = list(itertools.accumulate(map(len, sections)))
    cuts = [0]
    for k in range(1, count):
        wanted = bisect.bisect_left(ends, k * ends[-1] / count) + 1
        cuts.append(min(max(wanted, cuts[-1] + 1), len(sections) - (count - k)))  # no document left empty
    groups = [sections[start:end] for start, end in zip(cuts, [*cuts[1:], len(sections)])]
    folder.mkdir(parents=True, exist_ok=True)
    parts = []
    for number, group in enumerate(groups, start=1):
        path = folder / f"{text_file.stem}-part{number}.md"
        content = (head if number == 1 else "") + "".join(group)
        write_if_changed(path, content)
        parts.append(path)
    return parts


def write_if_changed(path: Path, content: str) -> None:
    """Write `path` only when its content changes, so that the renders made from it stay reusable."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.is_file() or path.read_text(encoding="utf-8") != content:
        write_text_atomic(path, content)


def _is_up_to_date(args: BaseModelArguments) -> bool:
    try:
        record = read_run_record(args.output_dir, expected_stage="base_model")
    except UsageError:
        return False
    wanted = {key: value for key, value in asdict(args).items() if key != "overwrite"}
    done = {key: value for key, value in record["config"]["base_model"].items() if key != "overwrite"}
    corpus = {str(path): sha256_file(path) for path in args.corpus_files()}
    return wanted == done and corpus == record["inputs"]


if __name__ == "__main__":
    run_cli(main)
