"""PDFs to a pages dataset: one row per page with its image and its text (text layer, or OCR).

Each document is parsed in a child process of its own, with a memory limit and a time limit per page: a
PDF that hangs MuPDF, crashes it or makes it allocate without bound is skipped with the reason, and costs
the run nothing else. Its rows are kept in a work folder beside the output (`.<output>.work/`), so
`--resume` skips the documents already done. The dataset and its manifest are assembled from the work
folder under a temporary name and renamed into place at the end: a killed run never leaves a dataset that
looks complete. `engine="ray"` (data_prep/pages_ray.py) runs the same child process per document as Ray tasks,
across the machines of a Ray cluster, into the same work folder and the same dataset.
"""

import hashlib
import json
import logging
import math
import multiprocessing
import os
import resource
import shutil
import signal
import sys
import time
import types
import unicodedata
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager, nullcontext
from dataclasses import asdict, dataclass, fields
from multiprocessing.connection import wait
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from common.artifacts import atomic_directory, naming_full_disk, prepare_work_folder, write_text_atomic
from common.errors import RunFailed, UsageError
from common.run_record import sha256_file

from .settings import DataPrepSettings
from .text_quality import parse_ranges, text_layer_problem

logger = logging.getLogger(__name__)

# one parquet file per document in the work folder; `image` is laid out as a `datasets.Image` column
ROW_SCHEMA = pa.schema(
    [
        ("doc_id", pa.string()),
        ("page", pa.int32()),
        ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),  # PNG bytes
        ("text", pa.string()),
        ("text_source", pa.string()),
        ("lang", pa.string()),
        ("source", pa.string()),
    ]
)


class SkipThresholdExceeded(RunFailed):
    def __init__(self, n_skipped, n_inputs, skipped, max_skip_fraction):
        self.skipped = skipped
        super().__init__(
            f"{n_skipped} of {n_inputs} inputs could not be read (more than max_skip_fraction={max_skip_fraction}); "
            "no dataset written. First reasons: " + "; ".join(f"{s['path']}: {s['reason']}" for s in skipped[:3])
        )


@dataclass(frozen=True)
class PageSettings:
    lang: str
    dpi: int
    max_pixels: int
    ocr: str
    ocr_dpi: int
    tesseract_langs: str
    script_ranges: tuple[str, ...]

    @classmethod
    def from_recipe(cls, lang: str, settings: DataPrepSettings) -> "PageSettings":
        """The recipe's settings that decide a page's image and text (the rest say how the work is run)."""
        shared = {f.name: getattr(settings, f.name) for f in fields(cls) if f.name != "lang"}
        return cls(lang=lang, **shared | {"script_ranges": tuple(settings.script_ranges)})


def read_pages_manifest(folder: str | Path, flag: str) -> dict:
    """The manifest of a finished pages dataset; a clear error for anything else."""
    manifest = Path(folder) / "manifest.json"
    if not manifest.is_file():
        raise UsageError(
            f"{flag} {folder} has no manifest.json: it is not a finished pages dataset; "
            "write one with `python -m data_prep pages`."
        )
    return json.loads(manifest.read_text(encoding="utf-8"))


def document_hashes(folder: str | Path, flag: str) -> dict[str, str]:
    """doc_id -> sha256 of the PDF, for every document of a finished pages dataset."""
    return {
        entry["doc_id"]: entry["sha256"] for entry in read_pages_manifest(folder, flag)["inputs"] if "doc_id" in entry
    }


def find_pdfs(inputs: list[str]) -> list[Path]:
    """Files as given, and every *.pdf under the given folders (recursively), in a stable order."""
    found: dict[Path, None] = {}
    for entry in map(Path, inputs):
        if entry.is_dir():
            for path in sorted(p for p in entry.rglob("*") if p.is_file() and p.suffix.lower() == ".pdf"):
                found[path] = None
        else:
            found[entry] = None
    return list(found)


def render_page(page, dpi: int, max_pixels: int | None):
    """The page as an RGB pixmap at `dpi`, scaled down (aspect kept) to at most `max_pixels` pixels."""
    import pymupdf

    zoom = dpi / 72
    width, height = page.rect.width * zoom, page.rect.height * zoom
    if max_pixels is not None and width * height > max_pixels:
        # 0.999: pixmap sizes round up, so aim just under the budget
        zoom *= math.sqrt(max_pixels / (width * height)) * 0.999
    return page.get_pixmap(matrix=pymupdf.Matrix(zoom, zoom), colorspace=pymupdf.csRGB, alpha=False)


def clean_text(text: str) -> str:
    """NFC, no trailing spaces, at most one blank line; line breaks (reading order) are kept."""
    lines = [" ".join(line.split()) for line in unicodedata.normalize("NFC", text).splitlines()]
    cleaned, blank = [], False
    for line in lines:
        if line or not blank:
            cleaned.append(line)
        blank = not line
    return "\n".join(cleaned).strip()


def ocr_pixmap(pixmap, tesseract_langs: str) -> str:
    import pytesseract
    from PIL import Image

    image = Image.frombytes("RGB", (pixmap.width, pixmap.height), pixmap.samples)
    return pytesseract.image_to_string(image, lang=tesseract_langs)


def process_document(
    path: Path, settings: PageSettings, on_page: Callable[[], None] = lambda: None
) -> tuple[list[dict], dict]:
    """Rows for every page of one PDF, and its manifest entry (with `reason` when it was skipped).
    `on_page` is called as each page is done. Untrusted input: call it through `_run`, which isolates it."""
    import pymupdf

    entry = _entry(path)
    try:
        document = pymupdf.open(path, filetype="pdf")
    except pymupdf.EmptyFileError:
        return [], entry | {"reason": "empty file (0 bytes)"}
    except (pymupdf.FileDataError, RuntimeError, ValueError) as error:
        return [], entry | {"reason": f"not a readable PDF ({error})"}
    with document:
        if document.needs_pass:
            return [], entry | {"reason": "password-protected (encrypted); decrypt it first"}
        if document.page_count == 0:
            return [], entry | {"reason": "the PDF has no pages"}
        ranges = parse_ranges(list(settings.script_ranges))
        rows = []
        try:
            for number, page in enumerate(document, start=1):
                pixmap = render_page(page, settings.dpi, settings.max_pixels)
                text, source = clean_text(page.get_text()), "layer"
                problem = None if settings.ocr == "always" else text_layer_problem(text, ranges)
                if settings.ocr == "always" or (settings.ocr == "auto" and problem):
                    # Tesseract reads its own rendering, uncapped: each script's model reads best at
                    # its own glyph size (recipe `ocr_dpi`), unrelated to the model's pixel budget
                    full = render_page(page, settings.ocr_dpi, None)
                    text, source = clean_text(ocr_pixmap(full, settings.tesseract_langs)), "ocr"
                # MuPDF's PNG encoder: ~30% faster than PIL's default, and the largest cost of this path
                rows.append(
                    dict(
                        doc_id=entry["doc_id"],
                        page=number,
                        image={"bytes": pixmap.tobytes("png"), "path": None},
                        text=text,
                        text_source=source,
                        lang=settings.lang,
                        source=str(path),
                    )
                )
                on_page()
        except Exception as error:  # a broken page object: the document is skipped, the run goes on
            # MuPDF reports a failed allocation as FzErrorSystem "malloc (N bytes) failed"
            if isinstance(error, MemoryError) or "malloc" in str(error):
                raise MemoryError(str(error)) from error  # the child reports it with its memory limit
            return [], entry | {"reason": f"page {len(rows) + 1} failed: {type(error).__name__}: {error}"}
        # the outline (bookmarks: level, title, page) carries structure that eval-set queries come from
        try:
            toc = document.get_toc(simple=True)
        except Exception:  # a damaged outline costs the queries it would give, not the pages
            toc = []
        outline = [[level, clean_text(title), page] for level, title, page in toc]
    sources = [row["text_source"] for row in rows]
    return rows, entry | {"pages": len(rows), "ocr_pages": sources.count("ocr"), "outline": outline}


def limit_ocr_threads() -> None:
    # one Tesseract thread per process: its OpenMP threads made OCR 4x slower on a 2-core machine
    # (bench/data_prep_pages.py: 0.43 vs 1.7 pages/s); parallelism comes from the workers instead.
    # An OMP_THREAD_LIMIT the user set is kept.
    os.environ.setdefault("OMP_THREAD_LIMIT", "1")


def build_pages_dataset(
    inputs: list[str],
    output: str,
    settings: PageSettings,
    *,
    workers: int,
    resume: bool,
    max_skip_fraction: float,
    page_timeout_s: float = DataPrepSettings.page_timeout_s,
    document_memory_mb: int = DataPrepSettings.document_memory_mb,
    engine: str = "local",
    address: str | None = None,
) -> dict:
    """Process every PDF and write the dataset + manifest.json to `output`. Returns the manifest.

    `workers` documents at a time, each in a child process limited to `document_memory_mb` of address space
    and stopped when it finishes no page in `page_timeout_s`; such a document is skipped with the reason.
    `engine="ray"`: the documents are Ray tasks, on the cluster at `address` (else on a local Ray of `workers`
    CPUs), and `inputs` may be fsspec URLs."""
    started = time.monotonic()
    output_dir = Path(output)
    if engine == "ray":
        from . import pages_ray

        paths = pages_ray.find_inputs(inputs)
        session = pages_ray.ray_session(address, workers)
    else:
        paths, session = find_pdfs(inputs), nullcontext(_run)
    if not paths:
        raise UsageError(f"--input {' '.join(inputs)}: no PDF files found (folders are searched for *.pdf).")
    work = output_dir.with_name(f".{output_dir.name}.work")
    prepare_work_folder(work, asdict(settings), resume)

    done = {}
    for path in paths:
        marker = work / f"{_key(path)}.json"
        if marker.is_file():
            done[path] = json.loads(marker.read_text(encoding="utf-8"))
    todo = [path for path in paths if path not in done]
    if done:
        logger.info("resuming: %d of %d documents already done", len(done), len(paths))

    # no page total: counting pages means parsing the PDFs, which only the children do
    # (pyarrow and datasets report a full disk without a path: name the output)
    with (
        naming_full_disk(output_dir),
        session as run,
        tqdm(unit="page", desc="pages") as bar,
        closing(run(todo, settings, workers, page_timeout_s, document_memory_mb, on_page=bar.update)) as results,
    ):
        for finished, (path, rows, entry) in enumerate(results, start=1):
            if len(rows):  # row dicts from a child here, or the table a Ray task made of them
                table = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(rows, schema=ROW_SCHEMA)
                pq.write_table(table, work / f"{_key(path)}.parquet")
            write_text_atomic(work / f"{_key(path)}.json", json.dumps(entry, ensure_ascii=False))
            done[path] = entry
            bar.set_postfix_str(f"{finished}/{len(todo)} documents", refresh=False)

    entries = [done[path] for path in paths]
    with naming_full_disk(output_dir):
        manifest = _assemble(work, output_dir, paths, entries, settings, max_skip_fraction, time.monotonic() - started)
    shutil.rmtree(work)
    return manifest


@dataclass
class _Child:
    path: Path
    process: multiprocessing.process.BaseProcess
    receiver: multiprocessing.connection.Connection
    pages: int = 0

    def stop(self) -> int:
        """Kill the child (if still running) with its process group, its Tesseract included; its exit code."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:  # gone already, or not yet in a group of its own
            self.process.kill()
        self.process.join()
        exitcode = self.process.exitcode
        self.process.close()
        self.receiver.close()
        return exitcode


def _run(
    paths: list[Path],
    settings: PageSettings,
    workers: int,
    page_timeout_s: float,
    memory_mb: int,
    on_page: Callable[[], None],
):
    """(path, rows, manifest entry) for each document as it is done.

    A child sends None as each page is done, then its rows and entry. One that dies first (killed by its own
    timer, a crash, the kernel) gets no rows and a `reason` from here instead."""
    # forkserver: each child is forked from one small process that imported MuPDF once (~10 ms a document),
    # not from this one with its threads and its memory
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__, "pymupdf"])
    waiting, running = list(reversed(paths)), {}
    try:
        while waiting or running:
            while waiting and len(running) < workers:
                path = waiting.pop()
                receiver, sender = context.Pipe(duplex=False)
                # process_document is looked up here, in the parent: a test's stand-in reaches the child
                args = (process_document, path, settings, page_timeout_s, memory_mb, sender)
                process = context.Process(target=_parse_in_child, args=args, daemon=True)
                with _main_module_hidden():
                    process.start()
                sender.close()  # the child holds the only writer: if it dies, recv() below fails
                running[receiver] = _Child(path, process, receiver)
            for receiver in wait(list(running)):
                child = running[receiver]
                try:
                    message = receiver.recv()
                except (EOFError, OSError):  # it died, perhaps partway through a message
                    reason = _death(running.pop(receiver).stop(), page_timeout_s, child.pages)
                    yield child.path, [], _entry(child.path) | {"reason": reason}
                    continue
                if message is None:
                    child.pages += 1
                    on_page()
                    continue
                running.pop(receiver).stop()
                yield child.path, *message
    finally:  # interrupted: the children go with the run
        for child in running.values():
            child.stop()


@contextmanager
def _main_module_hidden() -> Iterator[None]:
    """multiprocessing runs the parent's `__main__` again in every child it starts, unless there is none to run:
    under `python -m stages.index` (torch, transformers) or in a Ray worker (Ray's worker script) that was seconds
    of imports per document. A child needs only this module (preloaded) and the modules of its arguments."""
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


def _parse_in_child(target, path: Path, settings: PageSettings, page_timeout_s: float, memory_mb: int, sender) -> None:
    # a group of its own: Ctrl-C reaches only the parent, which stops the children; a kill reaches its Tesseract
    os.setpgrp()
    limit_ocr_threads()
    resource.setrlimit(resource.RLIMIT_AS, (memory_mb * 2**20, memory_mb * 2**20))
    # the time limit is a timer here, not a deadline in the parent: SIGALRM's default action ends the
    # process even inside MuPDF's C code, and even after the parent is gone
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    signal.setitimer(signal.ITIMER_REAL, page_timeout_s)

    def page_done() -> None:
        signal.setitimer(signal.ITIMER_REAL, page_timeout_s)
        sender.send(None)

    try:
        result = target(path, settings, page_done)
        signal.setitimer(signal.ITIMER_REAL, 0)  # parsing is over; the parent may take its time to read
        sender.send(result)  # pickling the rows can run out of memory too
        return
    except MemoryError as error:
        reason = f"out of memory (limit {memory_mb} MB)" + (f": {error}" if str(error) else "")
    except Exception as error:  # a hostile file found a path process_document does not catch
        reason = f"{type(error).__name__}: {error}"
    # sent after the except block: the frames that held the memory went with the exception
    sender.send(([], _entry(path) | {"reason": reason}))


def _death(exitcode: int, page_timeout_s: float, pages: int) -> str:
    if exitcode == -signal.SIGALRM:
        return f"timed out after {page_timeout_s:g} s (page_timeout_s) with {pages} pages done"
    if exitcode >= 0:
        return f"worker died (exit code {exitcode})"
    name = signal.Signals(-exitcode).name
    # nothing here sends SIGKILL to a child that is still parsing: the kernel's out-of-memory killer does
    return f"worker died (signal {-exitcode}, {name})" + (": out of memory?" if name == "SIGKILL" else "")


def _entry(path: Path) -> dict:
    sha256 = sha256_file(path)
    return {"path": str(path), "sha256": sha256, "doc_id": f"{path.stem}-{sha256[:12]}"}


def _assemble(work, output_dir, paths, entries, settings, max_skip_fraction, elapsed) -> dict:
    import datasets

    seen: dict[str, str] = {}
    for entry in entries:
        if "reason" not in entry and entry["doc_id"] in seen:
            entry["reason"] = f"duplicate of {seen[entry['doc_id']]} (same content)"
        seen.setdefault(entry["doc_id"], entry["path"])
    skipped = [{"path": e["path"], "reason": e["reason"]} for e in entries if "reason" in e]
    if len(skipped) > max_skip_fraction * len(entries):
        raise SkipThresholdExceeded(len(skipped), len(entries), skipped, max_skip_fraction)

    kept = [(path, entry) for path, entry in zip(paths, entries) if "reason" not in entry]
    if not kept:  # max_skip_fraction 1.0 allows it, but a dataset of no pages is no use to any stage
        raise RunFailed(
            f"none of the {len(entries)} inputs could be read; no dataset written. First reasons: "
            + "; ".join(f"{s['path']}: {s['reason']}" for s in skipped[:3])
        )
    files = [work / f"{_key(path)}.parquet" for path, _ in kept]
    features = datasets.Features(
        doc_id=datasets.Value("string"),
        page=datasets.Value("int32"),
        image=datasets.Image(),
        text=datasets.Value("string"),
        text_source=datasets.Value("string"),
        lang=datasets.Value("string"),
        source=datasets.Value("string"),
    )
    # streamed from the per-document files into a memory-mapped table: corpora larger than memory work
    loaded = datasets.Dataset.from_parquet([str(f) for f in files], features=features, cache_dir=str(work / "cache"))
    fingerprint = _fingerprint(files, settings)
    dataset = datasets.Dataset(loaded.data, info=datasets.DatasetInfo(features=features), fingerprint=fingerprint)
    sources = dataset.data.column("text_source").to_pylist()

    manifest = {
        "lang": settings.lang,
        "settings": asdict(settings),
        "tools": _tool_versions(),
        "fingerprint": fingerprint,
        "inputs": [entry for _, entry in kept],
        "skipped": skipped,
        "counts": {
            "inputs": len(entries),
            "documents": len(kept),
            "skipped": len(skipped),
            "pages": len(dataset),
            "pages_layer": sources.count("layer"),
            "pages_ocr": sources.count("ocr"),
        },
        "elapsed_s": round(elapsed, 1),
    }
    with atomic_directory(output_dir) as tmp:
        dataset.save_to_disk(str(tmp))
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return manifest


def _fingerprint(files: list[Path], settings: PageSettings) -> str:
    """Content hash: the same inputs and settings give the same fingerprint, whatever the worker count."""
    digest = hashlib.sha256(json.dumps(asdict(settings), sort_keys=True).encode())
    for path in files:
        table = pq.read_table(path)
        for row in table.select(["doc_id", "page", "text", "text_source"]).to_pylist():
            digest.update(json.dumps(row, ensure_ascii=False).encode())
        for image in table.column("image").combine_chunks().field("bytes").to_pylist():
            digest.update(hashlib.sha256(image).digest())
    return digest.hexdigest()[:16]


def _key(path: Path | str) -> str:
    name = str(path.resolve()) if isinstance(path, Path) else path  # a URL (engine ray) names itself
    return hashlib.sha256(name.encode()).hexdigest()[:16]


def _tool_versions() -> dict:
    import pymupdf
    import pytesseract

    try:
        tesseract = str(pytesseract.get_tesseract_version())
    except pytesseract.TesseractNotFoundError:
        tesseract = None
    return {"pymupdf": pymupdf.VersionBind, "tesseract": tesseract, "pytesseract": pytesseract.__version__}
