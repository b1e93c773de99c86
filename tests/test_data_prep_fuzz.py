"""Untrusted PDFs can't hurt the run: mutated PDFs (fuzzing), and documents whose parsing hangs, crashes its
process or exhausts its memory. Each costs only itself: it is listed in `skipped` with a reason, the others
come through.

This module is imported by the pages run's child processes too (they unpickle `faulty_process_document`):
keep its imports light.
"""

import multiprocessing
import os
import re
import signal
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pymupdf
import pytest

import data_prep.pages as pages_module
from data_prep.pages import PageSettings, build_pages_dataset

# tiny renders: the fuzz is about parsing, not pixels
SETTINGS = PageSettings(
    lang="en",
    dpi=36,
    max_pixels=20_000,
    ocr="never",
    ocr_dpi=72,
    tesseract_langs="eng",
    script_ranges=("0041-005A", "0061-007A"),
)
REAL_PROCESS_DOCUMENT = pages_module.process_document


def source_pdfs() -> list[bytes]:
    """One small valid PDF with a text layer, an image, links and an outline, saved the ways real files
    come: plain, compressed, with object streams (an xref stream instead of an xref table)."""
    document = pymupdf.open()
    for number in range(1, 4):
        page = document.new_page(width=200, height=150)
        page.insert_text((15, 30), f"Page {number}: all human beings are born free", fontsize=8)
        page.insert_text((15, 45), "and equal in dignity and rights.", fontsize=8)
        page.insert_link({"kind": pymupdf.LINK_GOTO, "from": pymupdf.Rect(15, 20, 100, 32), "page": 0})
    pixmap = pymupdf.Pixmap(pymupdf.csRGB, pymupdf.IRect(0, 0, 16, 16), False)
    pixmap.set_rect(pixmap.irect, (200, 40, 40))
    document[0].insert_image(pymupdf.Rect(140, 80, 180, 120), pixmap=pixmap)
    document.set_toc([[1, "Freedom", 1], [2, "Dignity", 2], [1, "Rights", 3]])
    return [
        document.tobytes(),
        document.tobytes(garbage=3, deflate=True),
        document.tobytes(garbage=3, deflate=True, use_objstms=True),
    ]


def flip_bytes(data: bytes, rng) -> bytes:
    mutated = bytearray(data)
    for position in rng.integers(0, len(data), size=rng.integers(1, 33)):
        mutated[position] = rng.integers(0, 256)
    return bytes(mutated)


def truncate(data: bytes, rng) -> bytes:
    return data[: rng.integers(0, len(data))]


def damage_xref(data: bytes, rng) -> bytes:
    """The cross-reference table (or stream) and the pointer to it: what readers trust to find objects."""
    pointer = re.compile(rb"startxref\s+(\d+)").search(data, max(0, data.rfind(b"startxref")))
    if pointer and rng.random() < 0.5:  # startxref pointing anywhere, or nowhere
        offset = rng.choice([0, -1, len(data) * 10, rng.integers(0, len(data))])
        return data[: pointer.start(1)] + str(offset).encode() + data[pointer.end(1) :]
    xref = max(data.rfind(b"xref\n"), data.rfind(b"/XRef"))
    if xref < 0:  # an earlier mutation took it away
        return flip_bytes(data, rng)
    mutated = bytearray(data)
    for position in rng.integers(xref, min(len(data), xref + 400), size=rng.integers(1, 9)):
        mutated[position] = rng.choice(list(b"0123456789 fn\n"))
    return bytes(mutated)


def damage_stream_length(data: bytes, rng) -> bytes:
    lengths = list(re.finditer(rb"/Length (\d+)", data))
    if not lengths:
        return flip_bytes(data, rng)
    match = lengths[rng.integers(len(lengths))]
    wrong = rng.choice([0, int(match.group(1)) + rng.integers(-50, 51), 2**31 + 7, 10**12])
    return data[: match.start(1)] + str(wrong).encode() + data[match.end(1) :]


def damage_objects(data: bytes, rng) -> bytes:
    """Renumber an object, drop a span of bytes, or repeat one: what broken writers and transfers do."""
    headers = list(re.finditer(rb"(\d+) 0 obj", data))
    kind = rng.integers(3)
    if kind == 0 and headers:
        match = headers[rng.integers(len(headers))]
        return data[: match.start(1)] + str(rng.integers(0, 10**6)).encode() + data[match.end(1) :]
    start = rng.integers(0, len(data))
    end = min(len(data), start + rng.integers(1, 2000))
    return data[:start] + data[end:] if kind == 1 else data[:end] + data[start:]


MUTATIONS = [flip_bytes, truncate, damage_xref, damage_stream_length, damage_objects]


def fuzz_folder(folder: Path, cases: int, seed: int) -> Path:
    """`cases` PDFs, each a source PDF after 1 to 3 mutations."""
    rng = np.random.default_rng(seed)
    sources = source_pdfs()
    folder.mkdir()
    for case in range(cases):
        data = sources[case % len(sources)]
        for _ in range(rng.integers(1, 4)):
            if data:  # truncation may leave nothing to mutate: an empty file is a case too
                data = MUTATIONS[rng.integers(len(MUTATIONS))](data, rng)
        (folder / f"case{case:04d}.pdf").write_bytes(data)
    return folder


REASONS = (
    "timed out",
    "worker died",
    "out of memory",
    "not a readable PDF",
    "empty file",
    "the PDF has no pages",
    "password-protected",
    "page",
)


def category(reason: str) -> str:
    return next((prefix for prefix in REASONS if reason.startswith(prefix)), reason.split(":")[0])


def run_fuzz(tmp_path: Path, cases: int, seed: int, workers: int, read_at_least: float = 0.4) -> None:
    folder = fuzz_folder(tmp_path / "fuzz", cases, seed)
    started = time.monotonic()
    # a run that crashed would raise here, one that hung would never return (a parse is stopped after 30 s)
    manifest = build_pages_dataset(
        [str(folder)],
        str(tmp_path / "pages"),
        SETTINGS,
        workers=workers,
        resume=False,
        max_skip_fraction=1.0,
        page_timeout_s=30,
    )
    elapsed = time.monotonic() - started
    inputs, skipped = manifest["inputs"], manifest["skipped"]
    assert len(inputs) + len(skipped) == cases
    assert {Path(entry["path"]).name for entry in inputs + skipped} == {p.name for p in folder.iterdir()}
    assert all(isinstance(s["reason"], str) and s["reason"].strip() for s in skipped)
    assert all(entry["pages"] > 0 for entry in inputs)
    assert manifest["counts"]["pages"] == sum(entry["pages"] for entry in inputs)
    # MuPDF repairs most damage (12 of 20 read at seed 1): a reader that refused every PDF would pass the rest
    assert len(inputs) >= read_at_least * cases
    reasons = Counter(category(s["reason"]) for s in skipped)
    print(
        f"\nfuzz: {cases} cases (seed {seed}, {workers} workers): {len(inputs)} yielded pages "
        f"({manifest['counts']['pages']} pages), {len(skipped)} skipped {dict(reasons.most_common())}; "
        f"run crashed 0, run hung 0; {elapsed:.1f} s"
    )


def test_a_run_where_no_pdf_is_readable_fails_in_one_line_and_writes_nothing(tmp_path):
    from common.errors import RunFailed

    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "empty.pdf").write_bytes(b"")
    (folder / "text.pdf").write_bytes(b"not a pdf at all")
    with pytest.raises(RunFailed, match=r"none of the 2 inputs could be read; no dataset written\. .*empty\.pdf"):
        build_pages_dataset([str(folder)], str(tmp_path / "pages"), SETTINGS, workers=1, resume=False,
                            max_skip_fraction=1.0)  # fmt: skip
    assert not (tmp_path / "pages").exists()


def test_mutated_pdfs_yield_pages_or_a_reason(tmp_path):
    run_fuzz(tmp_path, cases=20, seed=1, workers=1)


@pytest.mark.slow
def test_500_mutated_pdfs_yield_pages_or_a_reason(tmp_path):
    run_fuzz(tmp_path, cases=500, seed=0, workers=2)


def faulty_process_document(path, settings, on_page):
    """process_document, except for the documents named for a fault. Runs in the child, as the real one does
    (the run passes the child whatever `pages_module.process_document` is in the parent)."""
    if path.stem == "hangs":
        time.sleep(3600)
    elif path.stem == "segfaults":
        os.kill(os.getpid(), signal.SIGSEGV)
    elif path.stem == "exits":
        os._exit(3)
    elif path.stem == "hogs":
        # 2 GB, past the 1024 MB limit. calloc'd: without the limit it takes no real memory, and succeeds
        bytes(2 * 2**30)
    return REAL_PROCESS_DOCUMENT(path, settings, on_page)


def test_a_document_that_hangs_crashes_or_exhausts_memory_costs_only_itself(tmp_path, monkeypatch):
    folder = tmp_path / "pdfs"
    folder.mkdir()
    source = source_pdfs()[1]
    for name in ("hangs", "segfaults", "exits", "hogs", "fine", "also-fine"):
        (folder / f"{name}.pdf").write_bytes(source)
    # a real PDF that needs too much: a 14400 pt page at 90 dpi is an 18000 x 18000 pixmap, 972 MB (just under
    # what MuPDF refuses outright as "Overly large image"; without the limit it renders, in ~10 s)
    poster = pymupdf.open()
    poster.new_page(width=14400, height=14400).insert_text((100, 100), "A poster page, far too large.", fontsize=48)
    poster.save(folder / "poster.pdf")
    monkeypatch.setattr(pages_module, "process_document", faulty_process_document)

    started = time.monotonic()
    manifest = build_pages_dataset(
        [str(folder)],
        str(tmp_path / "pages"),
        PageSettings("en", 90, 10**9, "never", 72, "eng", ("0041-007A",)),
        workers=2,
        resume=False,
        max_skip_fraction=1.0,
        page_timeout_s=5,
        document_memory_mb=1024,
    )
    elapsed = time.monotonic() - started

    reasons = {Path(s["path"]).stem: s["reason"] for s in manifest["skipped"]}
    assert set(reasons) == {"hangs", "segfaults", "exits", "hogs", "poster"}
    assert reasons["hangs"] == "timed out after 5 s (page_timeout_s) with 0 pages done"
    assert reasons["segfaults"] == "worker died (signal 11, SIGSEGV)"
    assert reasons["exits"] == "worker died (exit code 3)"
    assert reasons["hogs"] == "out of memory (limit 1024 MB)"
    assert reasons["poster"].startswith("out of memory (limit 1024 MB): ") and "malloc" in reasons["poster"]
    assert sorted(Path(entry["path"]).stem for entry in manifest["inputs"]) == ["also-fine", "fine"]
    assert manifest["counts"]["pages"] == 6
    assert elapsed < 60  # the hang cost its 5 s, not its hour
    assert multiprocessing.active_children() == []  # the hung child was killed, not left behind
