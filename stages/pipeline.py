"""The whole pipeline on one recipe, stage after stage; on `recipes/tiny.yaml` it is the embedded default.

    python -m stages.pipeline --config recipes/tiny.yaml [--languages th km] [--rebuild]

Sample texts are rendered to PDFs, read back into pages datasets (each language with its own recipe,
recipes/<lang>.yaml) and turned into a cross-lingual eval set; then the model stages follow. A step
whose output is already complete is reused (the base model only if its run record shows the same
settings and corpus); `--rebuild` redoes everything.
"""

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from data_prep.__main__ import main as data_prep_main

from .base_model import BaseModelArguments
from .base_model import main as build_base_model
from .errors import UsageError, run_cli
from .pretrain import CPU_DEFAULTS, PretrainArguments
from .pretrain import main as pretrain_main
from .recipe import parse_stage_arguments
from .run_record import RUN_RECORD, read_run_record, sha256_file

# stage -> the issue that builds it; until then the pipeline says so instead of pretending
NOT_BUILT = {"stages.contrast": 5, "stages.evaluate": 6}


@dataclass
class PipelineArguments:
    languages: list[str] = field(
        default_factory=lambda: ["th", "lo", "km", "my", "vi", "id"],
        metadata={"help": "Sample languages to prepare, each with recipes/<lang>.yaml."},
    )
    samples: str = field(default="samples/udhr", metadata={"help": "Folder of <lang>.md sample texts."})
    parallel_source: str = field(
        default="samples/udhr/en.md", metadata={"help": "Text whose sections query the samples' pages."}
    )
    data_dir: str = field(default="checkpoints/tiny", metadata={"help": "Where the prepared data goes."})
    rebuild: bool = field(default=False, metadata={"help": "Rebuild every step, even those already done."})


def main(argv: list[str] | None = None) -> None:
    from trl import SFTConfig

    recipe_args, pipeline_args = parse_stage_arguments("pipeline", (PipelineArguments,), argv)
    if recipe_args.config is None:
        raise UsageError("give a recipe: python -m stages.pipeline --config recipes/tiny.yaml")
    started = time.monotonic()
    recipe = ["--config", recipe_args.config, "--seed", str(recipe_args.seed)]

    # --overwrite: the pipeline itself decides below whether the existing folder is reused or rebuilt
    _, base_args = parse_stage_arguments("base_model", (BaseModelArguments,), [*recipe, "--overwrite"])
    print(f"[1/5] base model -> {base_args.output_dir}")
    if not pipeline_args.rebuild and _is_up_to_date(base_args):
        print("      up to date (same settings as its run record); reusing it")
    else:
        build_base_model([*recipe, "--overwrite"])

    print(f"[2/5] data_prep: render, pages and evalset for {', '.join(pipeline_args.languages)} -> {pipeline_args.data_dir}")
    prepared = prepare_data(recipe_args.seed, pipeline_args)

    # pretrain on exactly the pages prepared above
    pretrain_argv = [*recipe, "--datasets", *prepared, "--overwrite"]
    _, _, training = parse_stage_arguments(
        "pretrain", (PretrainArguments, SFTConfig), pretrain_argv, machine_defaults=CPU_DEFAULTS
    )
    final = Path(training.output_dir) / "final"
    print(f"[3/5] stages.pretrain -> {final}")
    if not pipeline_args.rebuild and (final / RUN_RECORD).is_file():
        print(f"      {final}: complete; reusing it")
    else:
        pretrain_main(pretrain_argv)

    for step, (stage, issue) in enumerate(NOT_BUILT.items(), start=4):
        print(f"[{step}/5] {stage}: not built yet (issue #{issue}); skipped")

    print(f"pipeline: ran 3 of 5 steps in {time.monotonic() - started:.0f}s; {len(NOT_BUILT)} stages are not built yet.")


def prepare_data(seed: int, args: PipelineArguments) -> list[str]:
    """Render, read back and build the eval set for the sample languages; return the pages datasets."""
    root = Path(args.data_dir)

    def step(argv: list[str], output: Path, done_file: str) -> None:
        if not args.rebuild and (output / done_file).is_file():
            print(f"      {output}: complete; reusing it")
        else:
            data_prep_main([*argv, "--output", str(output), "--overwrite", "--seed", str(seed)])

    for lang in args.languages:
        text = Path(args.samples) / f"{lang}.md"
        step(["render", "--lang", lang, "--input", str(text)], root / "pdfs" / lang, "render_manifest.json")
        step(["pages", "--lang", lang, "--input", str(root / "pdfs" / lang)], root / "pages" / lang, "manifest.json")
    pages = [str(root / "pages" / lang) for lang in args.languages]
    step(
        ["evalset", "--lang", "en", "--pages", *pages, "--parallel_source", args.parallel_source],
        root / "evalset", "evalset.json",
    )
    return pages


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
