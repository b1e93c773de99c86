"""Visual-document retrieval evaluation (text query -> page image), SeaDoc/ViDoRe style.

    python -m stages.evaluate --config recipes/km.yaml --model checkpoints/km/contrast/final --data checkpoints/km/evalset

The scoring is issue #6; this entry point already parses and validates everything.
"""

from dataclasses import dataclass, field
from pathlib import Path

from .artifacts import check_model_source
from .errors import UsageError, exit_not_built, run_cli
from .recipe import parse_stage_arguments

BEIR_FILES = ("corpus.jsonl", "queries.jsonl", "qrels.tsv")


@dataclass
class EvaluateArguments:
    query_instruction: str = field(default="", metadata={"help": "Prefix added to every query."})
    batch_size: int = 16


@dataclass
class EvaluateInputs:
    model: list[str] = field(default_factory=list, metadata={"help": "Model folders to compare."})
    data: str | None = field(default=None, metadata={"help": "Eval folder: BEIR-with-images or SeaDoc/ViDoRe parquet."})
    output: str | None = field(default=None, metadata={"help": "JSON file for every metric and setting."})
    run: str | None = field(default=None, metadata={"help": "A TREC run file to score as well."})

    def validate(self) -> None:
        if not self.model and not self.run:
            raise UsageError("nothing to score: give --model DIR [DIR ...] and/or --run FILE.")
        for model in self.model:
            check_model_source(model, "--model")
        if self.data is None:
            raise UsageError("--data is not set; give an eval folder written by `python -m data_prep evalset`.")
        data = Path(self.data)
        has_beir = all((data / name).is_file() for name in BEIR_FILES)
        has_parquet = data.is_dir() and any(data.rglob("*.parquet"))
        if not (has_beir or has_parquet):
            raise UsageError(
                f"--data {data} holds neither {', '.join(BEIR_FILES)} nor SeaDoc/ViDoRe parquet files; "
                "build one with `python -m data_prep evalset`."
            )
        if self.run and not Path(self.run).is_file():
            raise UsageError(f"--run {self.run} not found.")
        if self.output and Path(self.output).exists():
            raise UsageError(f"--output {self.output} already exists; choose another file or remove it.")


def main(argv: list[str] | None = None) -> None:
    parse_stage_arguments("evaluate", (EvaluateArguments,), argv, cli_only_types=(EvaluateInputs,))
    exit_not_built("stages.evaluate (retrieval evaluation)", issue=6)


if __name__ == "__main__":
    run_cli(main)
