"""Errors a person can act on: bad input (exit 2), a run that breaks a recipe limit (exit 1), a full disk, a
model folder that brings code; each reported as one line by `run_cli`."""

import errno
import sys
import time
from collections.abc import Callable

from .output import main_process

# a full disk and an exhausted quota are the same to the person running a stage: no room for the output
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# the same in words, where a library drops the errno: pyarrow, datasets' own free-space check, and the Rust
# writers (safetensors' SafetensorError, tokenizers' plain Exception) that quote the OS
DISK_FULL_WORDS = ("No space left on device", "Disk quota exceeded", "Not enough disk space")
# how long a process other than rank 0, refused as every process is, waits for rank 0 to say it before it exits
QUIET_RANK_WAIT_S = 30


class UsageError(Exception):
    """Bad input from the user (a recipe, a flag, a path): reported as one line, exit code 2."""


class ProcessUsageError(UsageError):
    """Bad input that only this process of a torchrun may meet (its LOCAL_RANK against its node's GPUs): said by
    every process that meets it, where another `UsageError`, the same in every process, is said by rank 0 alone."""


class RunFailed(Exception):
    """The run went through its inputs but the outcome breaks a limit the recipe sets (too many unreadable
    inputs, say): reported as one line, exit code 1, and nothing written that looks complete."""


def run_cli(main: Callable[[list[str] | None], None], argv: list[str] | None = None) -> None:
    """Run a stage's `main`, turning a `UsageError` into a one-line message and exit code 2 (a `RunFailed`: 1).

    A full disk (anywhere in the exception's chain, in whatever type the writing library raises) and transformers'
    refusal to run a model folder's own code are reported the same way: the person can act on both, and a
    traceback would only hide the one line that says what to do.

    Under torchrun every process checks the same flags and meets the same refusal: rank 0 alone says it, and every
    process exits with its code. A full disk (each node has its own) and a `ProcessUsageError` are said by every
    process that meets them."""
    code, said_once = 2, True
    try:
        main(argv)
    except ProcessUsageError as error:
        message, said_once = str(error), False
    except UsageError as error:
        message = str(error)
    except RunFailed as error:
        message, code = str(error), 1
    except Exception as error:
        message = _message_for(error)
        if message is None:
            raise
        said_once = disk_full_error(error) is None
    else:
        return
    if said_once and not main_process():
        # torchrun stops every process once one has failed: rank 0, which says it, is given the time to (this wait
        # ends as soon as rank 0 has exited)
        time.sleep(QUIET_RANK_WAIT_S)
        sys.exit(code)
    # exit outside the `except` blocks: the SystemExit then holds no reference to the error, whose frames may
    # keep files open (a pyarrow writer on a full disk keeps its deleted file, and the disk space, until freed)
    _exit_with(message, code)


def _message_for(error: Exception) -> str | None:
    full = disk_full_error(error)
    if full is not None:
        return no_space_message(getattr(full, "filename", None), full)
    if _is_remote_code_refusal(error):
        first_line = str(error).strip().splitlines()[0]
        return (
            f"{first_line} This project runs no code that a model folder brings (`auto_map` in its config files); "
            "use a model folder without `auto_map` (e.g. a `final/` written by this project's stages)."
        )
    return None


def disk_full_error(error: BaseException) -> BaseException | None:
    """The error in `error`'s chain of causes that says the disk (or quota) is full, if there is one."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if getattr(error, "errno", None) in DISK_FULL_ERRNOS or any(words in str(error) for words in DISK_FULL_WORDS):
            return error
        error = error.__cause__ or error.__context__
    return None


def no_space_message(path, error: BaseException | None = None) -> str:
    """What to say when a write found the disk full: the path when known, else the library's own words."""
    where = f" writing {path}" if path else f" ({error})" if error is not None else ""
    return f"no space left on device{where}; free space on that disk or write the output to another one."


def _is_remote_code_refusal(error: BaseException) -> bool:
    # transformers' words when a model folder maps a class to its own code and trust_remote_code is not True
    return isinstance(error, ValueError) and "trust_remote_code=True" in str(error)


def _exit_with(message: str, code: int) -> None:
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    prog = f"python -m {spec.name.removesuffix('.__main__')}" if spec else "error"
    print(f"{prog}: error: {' '.join(message.split())}", file=sys.stderr)
    sys.exit(code)
