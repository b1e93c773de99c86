"""What a command prints: its own progress and results, once (rank 0 of a torchrun), and what a library says only
when it matters; `--verbose` shows the rest. Every command's `main` calls `set_up_output` once it has parsed its
flags."""

import logging
import os
import sys
import warnings
from contextlib import contextmanager

# raised by peft and trl reading the model's `is_gradient_checkpointing` (renamed in transformers 5) at every LoRA
# wrap: nothing in this project's code or the user's settings can change it
UNACTIONABLE = r"`is_gradient_checkpointing` is deprecated"
# the --verbose flag's help, the same on every command
VERBOSE_HELP = (
    "Also show what the libraries say in passing: their progress bars (loading and saving weights, datasets' steps), "
    "their debug lines and warnings about their own internals, and every process's under torchrun."
)
# this project's packages, whose loggers say the commands' own progress at INFO ("__main__": a module run with -m)
OWN_PACKAGES = ("common", "data_prep", "lco", "stages", "bench", "__main__")
# one handler for every command of a process (the pipeline runs several), set up by the first
HANDLER = logging.StreamHandler(sys.stderr)
HANDLER.setFormatter(logging.Formatter("%(message)s"))


def main_process() -> bool:
    """Whether this process speaks for the run: rank 0 of a torchrun (read from the environment the launchers
    set, so it is known before any process group exists), or the only process."""
    return int(os.environ.get("RANK", "0")) == 0


def set_up_output(verbose: bool = False) -> None:
    """Logging to stderr as bare messages: this project's at INFO on rank 0 and WARNING on the other ranks, the
    libraries' at WARNING (their INFO too with `verbose`); and, unless `verbose`, the libraries' chatter off: their
    progress bars for steps the command reports itself (loading and saving weights, datasets' splits and shards),
    their debug and info lines (bm25s's "Building index from tokens", faiss's "Loading faiss with AVX2 support"),
    and warnings the user can do nothing about (DeepSpeed's choice of its CPU accelerator where there is no GPU)."""
    import datasets
    import torch
    import transformers

    # bm25s sets its own logger to DEBUG when imported ("Building index from tokens" at every index): the handler's
    # level drops such records, whatever level a library gives its logger
    HANDLER.setLevel(logging.DEBUG if verbose else logging.INFO)
    root = logging.getLogger()
    if not root.handlers:  # as logging.basicConfig: a handler someone else set up (pytest's) stays alone
        root.addHandler(HANDLER)
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    for package in OWN_PACKAGES:
        logging.getLogger(package).setLevel(logging.INFO if main_process() else logging.WARNING)
    # the filter below, from an earlier command of this process (the pipeline runs several), is undone first
    warnings.filters[:] = [entry for entry in warnings.filters if entry[1] is None or entry[1].pattern != UNACTIONABLE]
    if verbose:
        transformers.utils.logging.enable_progress_bar()
        datasets.enable_progress_bars()
        transformers.utils.logging.set_verbosity_warning()  # the libraries' own defaults
        datasets.utils.logging.set_verbosity_warning()
        return
    transformers.utils.logging.disable_progress_bar()  # also huggingface_hub's
    datasets.disable_progress_bars()
    # the other ranks run the same code on the same settings: what a library warns of, rank 0 says once; their
    # errors still show
    level = logging.WARNING if main_process() else logging.ERROR
    transformers.utils.logging.set_verbosity(level)
    datasets.utils.logging.set_verbosity(level)
    if not main_process():
        warnings.simplefilter("ignore")
    warnings.filterwarnings("ignore", message=UNACTIONABLE, category=FutureWarning)
    # without CUDA, DeepSpeed (imported by transformers and accelerate) chooses its CPU accelerator and warns at
    # every command that it "was unable to detect" a GPU; naming its own choice leaves it nothing to warn of. A GPU
    # that torch cannot reach is still reported, by torch, when it is asked here.
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


@contextmanager
def dataset_progress():
    """datasets' progress bars on inside (a command's own long `map`, with its `desc`), on rank 0 only."""
    import datasets

    shown = datasets.is_progress_bar_enabled()
    if main_process():
        datasets.enable_progress_bars()
    try:
        yield
    finally:
        if not shown:
            datasets.disable_progress_bars()
