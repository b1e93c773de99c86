"""The whole pipeline on one recipe, stage after stage; on `recipes/tiny.yaml` it is the embedded default.

    python -m stages.pipeline --config recipes/tiny.yaml

Each step that is already done (its artifact exists with a run record written from the same
settings) is reused, so running it again costs only the steps that changed.
"""

import logging
import time
from dataclasses import asdict, dataclass, field

from .base_model import BaseModelArguments
from .base_model import main as build_base_model
from .errors import UsageError, run_cli
from .recipe import parse_stage_arguments
from .run_record import read_run_record, sha256_file

logger = logging.getLogger(__name__)

# stage -> the issue that builds it; until then the pipeline says so instead of pretending
NOT_BUILT = {
    "data_prep (`pages` is built; `render`, which turns the text samples into PDFs, and `evalset` are not)": 3,
    "stages.pretrain": 4,
    "stages.contrast": 5,
    "stages.evaluate": 6,
}


@dataclass
class PipelineArguments:
    rebuild: bool = field(default=False, metadata={"help": "Rebuild every step, even those already done."})


def main(argv: list[str] | None = None) -> None:
    recipe_args, pipeline_args = parse_stage_arguments("pipeline", (), argv, cli_only_types=(PipelineArguments,))
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

    for step, (stage, issue) in enumerate(NOT_BUILT.items(), start=2):
        print(f"[{step}/5] {stage}: not built yet (issue #{issue}); skipped")

    print(f"pipeline: ran 1 of 5 steps in {time.monotonic() - started:.0f}s; {len(NOT_BUILT)} stages are not built yet.")


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
