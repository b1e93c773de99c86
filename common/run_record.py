"""Run records: `run_record.json` beside every stage's final artifact, chaining each run to its parent.

A record says what made the artifact (stage, argv, resolved config, git commit, package versions,
device, seed), from which inputs (sha256 of their manifests), and from which parent run (its folder
and the sha256 of its record, so a parent changed after the fact is noticed).
"""

import hashlib
import json
import os
import platform
import subprocess
import sys
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from .artifacts import write_text_atomic
from .errors import UsageError

RUN_RECORD = "run_record.json"
PACKAGES = (
    "torch",
    "torchvision",
    "transformers",
    "trl",
    "peft",
    "deepspeed",
    "datasets",
    "accelerate",
    "tokenizers",
    "pymupdf",
    "pytesseract",
)
REQUIRED_KEYS = ("stage", "created", "argv", "config", "git", "packages", "device", "seed", "inputs", "parent")
PROJECT_ROOT = Path(__file__).resolve().parents[1]


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_fingerprint(model: str | Path) -> str:
    """sha256 over a model folder's config and weight files (content, not dates)."""
    digest = hashlib.sha256()
    for path in sorted(Path(model).glob("*.safetensors")) + [Path(model) / "config.json"]:
        digest.update(path.name.encode() + sha256_file(path).encode())
    return digest.hexdigest()[:16]


def parent_run(model: str | Path) -> str | None:
    """`model` as a parent run when a stage of this project wrote it (it has a run record); a plain model has none."""
    return str(model) if (Path(model) / RUN_RECORD).is_file() else None


def stage_record(stage: str, recipe_args, settings: dict[str, Any], inputs: list[str | Path]) -> dict[str, Any]:
    """The run record's fields that every training stage fills alike (`write_run_record(**record)` takes them):
    the recipe's top level and its section as written, the stage's resolved settings, the recipe file among the
    inputs."""
    from .recipe import recipe_section

    return dict(
        stage=stage,
        config={"recipe": vars(recipe_args), "recipe_section": recipe_section(recipe_args.config, stage), **settings},
        seed=recipe_args.seed,
        inputs=[*([recipe_args.config] if recipe_args.config else []), *inputs],
    )


def write_run_record(
    folder: str | Path,
    *,
    stage: str,
    config: dict[str, Any],
    seed: int,
    inputs: list[str | Path] = (),
    parent: str | Path | None = None,
    results: dict[str, Any] | None = None,
    name: str = RUN_RECORD,
) -> dict[str, Any]:
    """Write `folder/run_record.json` (or `folder/<name>`) and return it. `inputs` are files (manifests) to hash."""
    record = {
        "stage": stage,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "argv": ["python", *sys.orig_argv[1:]],
        "config": config,
        "git": git_state(),
        "packages": package_versions(),
        "device": device_description(),
        "seed": seed,
        "inputs": {str(path): sha256_file(path) for path in inputs},
        "parent": _parent_entry(parent) if parent is not None else None,
        "results": results or {},
    }
    write_text_atomic(Path(folder) / name, json.dumps(record, indent=2, ensure_ascii=False, default=str) + "\n")
    return record


def read_run_record(folder: str | Path, expected_stage: str | tuple[str, ...] | None = None) -> dict[str, Any]:
    """Read and check a run record; the error names the folder and the command that writes one."""
    folder = Path(folder)
    path = folder / RUN_RECORD
    if not path.is_file():
        raise UsageError(
            f"{folder} has no {RUN_RECORD}: it was not written by a completed stage of this project "
            "(a killed run leaves none); point at the `final/` folder of a finished run."
        )
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UsageError(f"{path} is not valid JSON ({error}); rerun the stage that wrote it.") from None
    missing = [key for key in REQUIRED_KEYS if key not in record]
    if missing:
        raise UsageError(f"{path} lacks {', '.join(missing)}; rerun the stage that wrote it.")
    expected = (expected_stage,) if isinstance(expected_stage, str) else expected_stage
    if expected and record["stage"] not in expected:
        raise UsageError(
            f"{folder} was written by stage `{record['stage']}`, expected {' or '.join(expected)}; "
            "check the path you gave."
        )
    return record


def run_is_up_to_date(
    folder: str | Path,
    stage: str,
    recipe: str | None,
    seed: int,
    settings,
    inputs: list[str | Path],
    parent: str | Path,
) -> bool:
    """Whether the finished run in `folder` had the same recipe section, seed, stage settings (a dataclass),
    input files and parent run: then running the stage again would redo the same work."""
    from dataclasses import asdict

    from .recipe import recipe_section

    try:
        record = read_run_record(folder, expected_stage=stage)
    except UsageError:
        return False
    parent_record = Path(parent) / RUN_RECORD
    as_stored = json.loads(json.dumps({"section": recipe_section(recipe, stage), "settings": asdict(settings)}))
    recorded_inputs = {path: digest for path, digest in record["inputs"].items() if path != recipe}
    return (
        recorded_inputs == {str(path): sha256_file(path) for path in inputs}
        and record["seed"] == seed
        and record["config"].get("recipe_section") == as_stored["section"]
        and record["config"][stage] == as_stored["settings"]
        and (record["parent"] or {}).get("record_sha256")
        == (sha256_file(parent_record) if parent_record.is_file() else None)
    )


def verify_chain(folder: str | Path) -> list[dict[str, Any]]:
    """Walk from a run to its root, checking each parent's record is the one the child saw.

    Returns the records, child first.
    """
    chain = [read_run_record(folder)]
    while (parent := chain[-1]["parent"]) is not None:
        record_path = Path(parent["path"]) / RUN_RECORD
        record = read_run_record(parent["path"])
        if sha256_file(record_path) != parent["record_sha256"]:
            raise UsageError(
                f"{record_path} changed after a child run used it (sha256 differs from the child's record); "
                "the child's artifact no longer matches its parent: rerun the child stage."
            )
        chain.append(record)
    return chain


def chain_records(folder: str | Path) -> list[dict[str, Any]]:
    """The run records of a model and of its ancestors, child first, as far as they exist (none for a plain
    checkpoint)."""
    records = []
    while folder is not None and (Path(folder) / RUN_RECORD).is_file():
        records.append(read_run_record(folder))
        folder = (records[-1]["parent"] or {}).get("path")
    return records


def chain_training_documents(folder: str | Path) -> set[str] | None:
    """The sha256 of every document a model and its ancestors were trained on, from their run records' results
    (`training_documents`); None for a model without a run record (a plain checkpoint: not known)."""
    records = chain_records(folder)
    if not records:
        return None
    return {sha for record in records for sha in record.get("results", {}).get("training_documents", [])}


def chain_unsourced_pairs(folder: str | Path) -> int | None:
    """How many training pairs of a model and its ancestors named no source document (`--train_files` lines
    without `source`), so that no eval set's documents could be checked against them; None without a run record."""
    records = chain_records(folder)
    if not records:
        return None
    return sum(record.get("results", {}).get("pairs", {}).get("unsourced_pairs", 0) for record in records)


def _parent_entry(parent: str | Path) -> dict[str, str]:
    record = read_run_record(parent)
    return {
        "path": str(Path(parent).resolve()),
        "stage": record["stage"],
        "record_sha256": sha256_file(Path(parent) / RUN_RECORD),
    }


def git_state() -> dict[str, Any]:
    """The project's commit and whether the work tree differs from it (`unknown` outside a git checkout)."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True, timeout=30
        ).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown", "dirty": None}


def package_versions() -> dict[str, str | None]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def device_description() -> dict[str, Any]:
    import torch

    device = {"platform": platform.platform(), "cpu_count": os.cpu_count()}
    if torch.cuda.is_available():
        device["cuda"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return device
