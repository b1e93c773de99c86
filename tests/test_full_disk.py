"""A full disk (issue 9): output on a small tmpfs, filled to leave a chosen amount free.

Each write either completes or stops with one line naming the path and "no space left on device" (exit code 2,
no traceback), and leaves nothing that looks complete: no final folder, manifest.json, run_record.json or
results JSON, and no temporary files. Mounting needs root (as the tests run here and in CI); elsewhere they skip.
"""

import json
import os
import shutil
from collections import Counter
from pathlib import Path

import pymupdf
import pytest

import data_prep.cli as data_prep_cli
from common.artifacts import atomic_directory, write_text_atomic
from common.errors import UsageError, disk_full_error
from common.run_record import RUN_RECORD, write_run_record
from data_prep.pages import read_pages_manifest
from stages import base_model, evaluate

from .conftest import REPO
from .test_untrusted_inputs import assert_one_line_error, beir_folder, run

KB = 1024
PAGES_FLAGS = ["--lang", "th", "--ocr", "never", "--dpi", "72", "--max_pixels", "50000", "--workers", "1"]


@pytest.fixture
def small_disk(tmpfs):
    """mount(size) -> a fresh tmpfs of `size` under tmp_path (conftest's `tmpfs`)."""
    return tmpfs


def fill(disk: Path, free: int) -> None:
    """Size the filler file so that `free` bytes are left on `disk`."""
    filler = disk / "filler"
    filler.unlink(missing_ok=True)
    stat = os.statvfs(disk)
    filler.write_bytes(b"\0" * max(0, stat.f_bavail * stat.f_frsize - free))


def leave_free(disk: Path, free: int) -> None:
    """Empty `disk`, then fill it so that `free` bytes are left."""
    for path in disk.iterdir():
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    fill(disk, free)


def temporaries(disk: Path) -> list[str]:
    """What atomic writes leave while they are under way: `.NAME.tmp-PID` files and folders, `.NAME.old-PID`."""
    return [str(path) for path in disk.rglob("*") if ".tmp-" in path.name or ".old-" in path.name]


# --- the two atomic writers ---------------------------------------------------------------------------


def test_write_text_atomic_on_a_full_disk_keeps_the_earlier_file(small_disk):
    disk = small_disk()
    leave_free(disk, 64 * KB)
    target = disk / "results.json"
    write_text_atomic(target, "earlier, complete\n")
    fill(disk, 4 * KB)
    with pytest.raises(OSError) as error:
        write_text_atomic(target, "x" * (64 * KB))
    assert error.value.filename == str(target) and "No space left on device" in str(error.value)
    assert target.read_text() == "earlier, complete\n" and temporaries(disk) == []


def test_atomic_directory_on_a_full_disk_keeps_the_earlier_folder(small_disk):
    disk = small_disk()
    leave_free(disk, 256 * KB)
    final = disk / "final"
    with atomic_directory(final) as tmp:
        (tmp / "weights.bin").write_bytes(b"old" * 10)
    fill(disk, 8 * KB)
    with pytest.raises(OSError) as error, atomic_directory(final) as tmp:
        (tmp / "weights.bin").write_bytes(b"new" * (32 * KB))
    assert error.value.filename == str(final)
    assert (final / "weights.bin").read_bytes() == b"old" * 10 and temporaries(disk) == []


def test_a_run_record_that_does_not_fit_leaves_no_final_folder(small_disk, capsys):
    """The last write of a stage's final folder, its run record, fails: the folder never appears."""
    disk = small_disk()
    leave_free(disk, 64 * KB)

    def main(argv):
        with atomic_directory(disk / "final") as tmp:
            (tmp / "model.safetensors").write_bytes(b"w" * (16 * KB))
            fill(disk, 0)  # the run record finds the disk full
            write_run_record(tmp, stage="test", config={}, seed=0)

    code, err = run(main, [], capsys)
    assert_one_line_error(code, err)
    assert f"no space left on device writing {disk / 'final'};" in err
    assert not (disk / "final").exists() and not list(disk.rglob(RUN_RECORD)) and temporaries(disk) == []


# --- stages -------------------------------------------------------------------------------------------


def test_base_model_on_a_full_disk(small_disk, capsys):
    """The tiny base model's folder, written with room to spare, then with a share of its size free: the weights
    (safetensors raises its own error type), the tokenizer (tokenizers raises a bare Exception) or the run
    record find the disk full. Each run writes a whole folder or none, and says which one in one line."""
    disk = small_disk("32M")  # the model is about 14 MB
    argv = ["--config", str(REPO / "recipes/tiny.yaml"), "--output_dir", str(disk / "base")]
    leave_free(disk, 32 * 1024 * KB)
    base_model.main(argv)
    needed = sum(-(-path.stat().st_size // (4 * KB)) * 4 * KB for path in (disk / "base").iterdir())  # whole pages
    outcomes = Counter()
    for share in (0.0, 0.25, 0.5, 0.8, 0.9, 0.95, 0.99, 1.0):
        leave_free(disk, int(needed * share) // (4 * KB) * 4 * KB)
        code, err = run(base_model.main, argv, capsys)
        assert temporaries(disk) == []
        if code is None:
            assert (disk / "base" / RUN_RECORD).is_file()
            outcomes["complete folder"] += 1
            continue
        assert_one_line_error(code, err)
        assert f"no space left on device writing {disk / 'base'};" in err
        assert not (disk / "base").exists()
        outcomes["clear error naming the folder, nothing left"] += 1
    print(f"base_model on a full disk (8 amounts free): {dict(outcomes)}")
    assert outcomes["clear error naming the folder, nothing left"] >= 6


def test_evaluate_output_and_report_on_a_full_disk(small_disk, tmp_path, capsys):
    disk = small_disk()
    data = beir_folder(tmp_path / "eval", {f"p{i}": f"images/p{i}.png" for i in range(3)})
    argv = ["--config", str(REPO / "recipes/tiny.yaml"), "--data", str(data)]

    leave_free(disk, 0)
    code, err = run(evaluate.main, [*argv, "--output", str(disk / "results.json")], capsys)
    assert_one_line_error(code, err)
    assert f"no space left on device writing {disk / 'results.json'};" in err
    assert not (disk / "results.json").exists() and temporaries(disk) == []

    code, err = run(
        evaluate.main, [*argv, "--output", str(tmp_path / "results.json"), "--report", str(disk / "report")], capsys
    )
    assert_one_line_error(code, err)
    assert f"no space left on device writing {disk / 'report'};" in err
    assert not (disk / "report").exists() and temporaries(disk) == []
    assert json.loads((tmp_path / "results.json").read_text())["results"]  # written before, and whole


@pytest.fixture(scope="module")
def thai_pdfs(tmp_path_factory) -> Path:
    """Three two-page Thai PDFs with a text layer (as conftest's thai_pages_dataset makes, without the dataset)."""
    folder = tmp_path_factory.mktemp("pdfs")
    paragraphs = (REPO / "samples/udhr/th.md").read_text(encoding="utf-8").split("\n\n")
    for doc in range(3):
        document = pymupdf.open()
        for page_number in range(2):
            page = document.new_page(width=300, height=300)
            text = paragraphs[2 + doc * 2 + page_number][:300]
            page.insert_htmlbox(page.rect + (10, 10, -10, -10), f"<p style='font-family: Noto Sans Thai'>{text}</p>")
        document.save(folder / f"doc{doc}.pdf")
    return folder


@pytest.fixture(scope="module")
def reference_fingerprint(thai_pdfs, tmp_path_factory) -> str:
    """The pages dataset's fingerprint written with room to spare."""
    output = tmp_path_factory.mktemp("reference") / "pages"
    data_prep_cli.main(["pages", *PAGES_FLAGS, "--input", str(thai_pdfs), "--output", str(output)])
    return read_pages_manifest(output, "--pages")["fingerprint"]


def sweep_pages(disk: Path, pdfs: Path, capsys, step: int, reference: str) -> Counter:
    """`python -m data_prep pages` onto `disk` with 0, `step`, 2 `step`, ... bytes free, until two runs have
    finished: outcome counts."""
    output = disk / "out" / "pages"
    outcomes = Counter()
    for free in range(0, 2 * 1024 * KB, step):
        leave_free(disk, free)
        code, err = run(
            data_prep_cli.main, ["pages", *PAGES_FLAGS, "--input", str(pdfs), "--output", str(output)], capsys
        )
        assert temporaries(disk) == []
        if code is None:
            assert read_pages_manifest(output, "--pages")["fingerprint"] == reference
            outcomes["complete, same fingerprint"] += 1
            if outcomes["complete, same fingerprint"] == 2:
                break
            continue
        assert_one_line_error(code, err)
        assert "no space left on device" in err
        assert not output.exists(), f"{free} bytes free: a failed run left {output}"
        assert not list(disk.rglob("manifest.json"))
        # named: the final folder (atomic_directory) or a work file (write_text_atomic); unnamed: pyarrow's and
        # datasets' own writes into the work folder, which data_prep/pages.py makes without naming them
        if f"writing {output};" in err:
            outcomes["clear error naming the output folder"] += 1
        elif f"writing {disk}" in err:
            outcomes["clear error naming a work file"] += 1
        else:
            outcomes["clear error naming no path"] += 1
    return outcomes


def test_pages_dataset_on_a_full_disk(small_disk, thai_pdfs, reference_fingerprint, capsys):
    disk = small_disk()
    outcomes = sweep_pages(disk, thai_pdfs, capsys, 12 * KB, reference_fingerprint)
    print(f"data_prep pages on a full disk, every 12 KiB free: {dict(outcomes)}")
    assert outcomes["clear error naming the output folder"] >= 1 and outcomes["complete, same fingerprint"] == 2


def test_pages_resume_after_space_is_freed(small_disk, thai_pdfs, reference_fingerprint, capsys):
    """Documents done before the disk filled are kept in the work folder; --resume with room finishes the same
    dataset."""
    disk = small_disk()
    output = disk / "out" / "pages"
    leave_free(disk, 64 * KB)
    argv = ["pages", *PAGES_FLAGS, "--input", str(thai_pdfs), "--output", str(output)]
    code, err = run(data_prep_cli.main, argv, capsys)
    assert_one_line_error(code, err)
    assert not output.exists() and list((disk / "out" / ".pages.work").glob("*.json"))
    (disk / "filler").unlink()
    data_prep_cli.main([*argv, "--resume"])
    assert read_pages_manifest(output, "--pages")["fingerprint"] == reference_fingerprint


@pytest.mark.slow
def test_pages_dataset_on_a_full_disk_every_page(small_disk, thai_pdfs, reference_fingerprint, capsys):
    disk = small_disk()
    outcomes = sweep_pages(disk, thai_pdfs, capsys, 4 * KB, reference_fingerprint)
    print(f"data_prep pages on a full disk, every 4 KiB free: {dict(outcomes)}")
    assert outcomes["clear error naming the output folder"] >= 1 and outcomes["complete, same fingerprint"] == 2


def test_disk_full_words_of_other_libraries_are_recognised():
    """What run_cli reads as a full disk: the errno, or the words libraries that drop it use."""
    assert disk_full_error(OSError(28, "No space left on device")) is not None
    assert disk_full_error(Exception("No space left on device (os error 28)")) is not None  # tokenizers
    assert disk_full_error(OSError("Not enough disk space. Needed: 1 MB")) is not None  # datasets
    wrapped = RuntimeError("could not save")
    wrapped.__cause__ = OSError(28, "No space left on device")
    assert disk_full_error(wrapped) is wrapped.__cause__
    assert disk_full_error(OSError(13, "Permission denied")) is None and disk_full_error(UsageError("x")) is None
