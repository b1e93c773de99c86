"""Output folders: refuse to clobber, and write atomically so a killed run never leaves one that looks whole."""

import errno
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import DISK_FULL_ERRNOS, UsageError, disk_full_error


def check_output_dir(
    path: str | Path, *, resume: bool = False, overwrite: bool = False, flag: str = "--output_dir"
) -> None:
    """Fail before any work if `path` can't be written, or holds earlier output and neither flag allows it."""
    path = usable_path(path, flag)
    if resume and overwrite:
        raise UsageError("--resume and --overwrite contradict each other; pass one of them.")
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {path} exists and is not a folder; choose another {flag}.")
    if path.is_dir() and any(path.iterdir()) and not (resume or overwrite):
        raise UsageError(
            f"{flag} {path} already exists and is not empty; pass --resume to continue it, "
            f"--overwrite to replace it, or choose another {flag}."
        )
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise UsageError(f"{flag} {path}: {existing} is a file, not a folder; choose another {flag}.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(
            f"{flag} {path}: cannot write to {existing} (no write permission, or a read-only file system); "
            f"choose another {flag}."
        )


@contextmanager
def atomic_directory(final: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of `final`; on success it replaces `final` by a rename.

    On error the temporary folder is removed and `final` (if it existed) is left as it was; a full disk is
    reported as an OSError naming `final`.
    """
    final = Path(final)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    try:
        with naming_full_disk(final):
            final.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        # a rename cannot replace a non-empty folder: move the old one aside first, drop it last
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)


@contextmanager
def staged_output(path: str | Path, *, overwrite: bool, is_main: bool = True) -> Iterator[Path]:
    """The folder a run writes `path` into: `path` itself, except under `--overwrite` of an existing `path`, when it
    is a hidden sibling that replaces `path` once the run has finished. A run that fails or is killed before then
    leaves the earlier output as it was (a staging folder a kill leaves is cleared by the next `--overwrite`).

    With several processes, every one calls this (they all write into the same staging folder) and `is_main` does
    the file-system work: before the first collective operation of the run, and after its last (the final save's
    barrier), when no other process writes any more."""
    path = Path(path)
    if not (overwrite and path.exists()):
        yield path
        return
    staging = path.with_name(f".{path.name}.overwrite")
    if is_main:
        shutil.rmtree(staging, ignore_errors=True)
    try:
        yield staging
    except BaseException:
        if is_main:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    if is_main and staging.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        path.rename(old)
        staging.rename(path)
        shutil.rmtree(old)


def finished_checkpoints(output_dir: str | Path, marker: str) -> list[Path]:
    """The `checkpoint-<step>` folders of a training run that hold `marker`, the file a checkpoint gets last
    (one without it was cut short by a kill), in step order."""
    steps = {path: path.name.removeprefix("checkpoint-") for path in Path(output_dir).glob("checkpoint-*")}
    found = [path for path, step in steps.items() if step.isdigit() and (path / marker).is_file()]
    return sorted(found, key=lambda path: int(steps[path]))


def prepare_work_folder(work: Path, settings: dict, resume: bool) -> None:
    """The folder where an interrupted run's finished parts wait for `--resume`: kept when resuming with the
    same settings, else started afresh."""
    settings_file = work / "settings.json"
    wanted = json.dumps(settings, sort_keys=True)
    if resume and settings_file.is_file():
        if settings_file.read_text(encoding="utf-8") != wanted:
            raise UsageError(
                f"--resume: the interrupted run in {work} used other settings ({settings_file}); "
                "run again with the same settings, or without --resume to start over."
            )
        return
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    write_text_atomic(settings_file, wanted)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write a UTF-8 text file under a temporary name, then rename it into place."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write a file under a temporary name, then rename it into place; on error no temporary is left, and an
    earlier file at `path` is kept as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with naming_full_disk(path):
            tmp.write_bytes(data)
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def naming_full_disk(path: str | Path) -> Iterator[None]:
    """Report a full disk met in the block as an OSError that names `path`, which `run_cli` prints.

    The writers' own errors name a temporary file or nothing (pyarrow, safetensors, tokenizers), or are not
    OSErrors at all; `path` is what the person chose and can act on."""
    try:
        yield
    except BaseException as error:
        full = disk_full_error(error)
        if full is None:
            raise
        code = getattr(full, "errno", None)
        code = code if code in DISK_FULL_ERRNOS else errno.ENOSPC
        raise OSError(code, os.strerror(code), str(path)) from error


def usable_path(value: str | Path, flag: str) -> Path:
    """`value` as a Path, or a UsageError for a path no file system takes (a NUL byte, a name that is too long):
    pathlib reports a NUL as "does not exist", and a later mkdir or open would fail after hours of work."""
    shown = str(value) if len(str(value)) <= 80 else f"{str(value)[:77]}..."
    if "\0" in str(value):
        raise UsageError(f"{flag} {shown!r} holds a NUL byte, which no file name can; choose another {flag}.")
    path = Path(value)
    try:
        path.exists()
    except OSError as error:  # ENAMETOOLONG and the like; a missing path is no error here
        raise UsageError(f"{flag} {shown}: {error.strerror or error}; choose another {flag}.") from None
    return path


def check_model_source(value: str | None, flag: str, *, trust_remote_code: bool = False) -> None:
    """A model is a local HF model folder, or a hub id (`org/name`) on machines that reach a hub.

    A folder whose config files map a class to code of its own (`auto_map`) is refused unless
    `trust_remote_code`: loading it would run that code, and a model folder is as untrusted as a PDF."""
    if not value:
        raise UsageError(f"{flag} is not set; give a model folder (e.g. a `final/` of an earlier stage) or a hub id.")
    path = usable_path(value, flag)
    if path.exists():
        if not (path / "config.json").is_file():
            raise UsageError(f"{flag} {path} has no config.json: it is not a Hugging Face model folder.")
        custom = custom_code(path)
        if custom and not trust_remote_code:
            raise UsageError(
                f"{flag} {path} brings code of its own that loading it would run ({'; '.join(custom)}); this project "
                "runs none: use a model folder without `auto_map` (e.g. a `final/` written by this project's stages)."
            )
        return
    looks_like_hub_id = value.count("/") == 1 and not value.startswith((".", "/")) and " " not in value
    if not looks_like_hub_id:
        raise UsageError(
            f"{flag} {value} does not exist; give a model folder or a hub id like Qwen/Qwen2.5-VL-3B-Instruct."
        )


def custom_code(folder: str | Path) -> list[str]:
    """`file: auto_map {...}` for each config file of a model folder that maps a class to the folder's own code.

    transformers reads `auto_map` from the model's config.json and from the processor's, tokenizer's and image
    processor's configs (processor_config.json, tokenizer_config.json, preprocessor_config.json, ...)."""
    found = []
    for config in sorted(Path(folder).glob("*config.json")):
        try:
            content = json.loads(config.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise UsageError(f"{config} is not a readable JSON file ({error}); the model folder is damaged.") from None
        # processor_config.json nests the image and video processors' configs, each may carry its own auto_map
        nested = [content, *(v for v in content.values() if isinstance(v, dict))] if isinstance(content, dict) else []
        maps = [entry["auto_map"] for entry in nested if entry.get("auto_map")]
        found += [f"{config.name}: auto_map {json.dumps(auto_map)[:200]}" for auto_map in maps]
    return found


def refuse_remote_code() -> None:
    """Make transformers refuse, rather than ask, to run a model folder's own code when `trust_remote_code` is unset.

    Left unset (as everywhere in this project), transformers asks on the terminal for 15 s whether to run the
    code an unknown `model_type` maps to in `auto_map`, and a `y` runs it; with the wait at 0 it raises a
    ValueError instead (which `run_cli` reports in one line). An explicit `trust_remote_code=True` still loads."""
    import transformers.dynamic_module_utils

    transformers.dynamic_module_utils.TIME_OUT_REMOTE_CODE = 0


def check_input_paths(values: list[str], flag: str) -> None:
    missing = [value for value in values if not usable_path(value, flag).exists()]
    if missing:
        raise UsageError(
            f"{flag}: {', '.join(missing)} not found; check the path (relative paths start at the current folder)."
        )
