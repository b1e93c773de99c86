"""Output folders: refuse to clobber, and write atomically so a killed run never leaves one that looks whole."""

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import UsageError


def check_output_dir(path: str | Path, *, resume: bool = False, overwrite: bool = False, flag: str = "--output_dir") -> None:
    """Fail before any work if `path` can't be written, or holds earlier output and neither flag allows it."""
    path = Path(path)
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
        raise UsageError(f"{flag} {path}: cannot write to {existing} (permission denied); choose another {flag}.")


@contextmanager
def atomic_directory(final: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of `final`; on success it replaces `final` by a rename.

    On error the temporary folder is removed and `final` (if it existed) is left as it was.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
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


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write a file under a temporary name, then rename it into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def check_model_source(value: str | None, flag: str) -> None:
    """A model is a local HF model folder, or a hub id (`org/name`) on machines that reach a hub."""
    if not value:
        raise UsageError(f"{flag} is not set; give a model folder (e.g. a `final/` of an earlier stage) or a hub id.")
    path = Path(value)
    if path.exists():
        if not (path / "config.json").is_file():
            raise UsageError(f"{flag} {path} has no config.json: it is not a Hugging Face model folder.")
        return
    looks_like_hub_id = value.count("/") == 1 and not value.startswith((".", "/")) and " " not in value
    if not looks_like_hub_id:
        raise UsageError(f"{flag} {value} does not exist; give a model folder or a hub id like Qwen/Qwen2.5-VL-3B-Instruct.")


def check_input_paths(values: list[str], flag: str) -> None:
    missing = [value for value in values if not Path(value).exists()]
    if missing:
        raise UsageError(f"{flag}: {', '.join(missing)} not found; check the path (relative paths start at the current folder).")
