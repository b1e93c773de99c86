"""Pages per second of `data_prep pages` with the local engine and with Ray (1 and 2 workers), and a projection
for a million PDFs on N machines from the measured per-page costs of the text-layer and OCR paths.

    python bench/data_prep_ray.py --layer-docs 8 --scanned-docs 4 --repeats 3 --pages-per-pdf 20 --scanned-share 0.5 \
        --cores 32

Makes Vietnamese PDFs of 4 A4 pages (insert_htmlbox, Noto Serif; their text layer passes the check) and scanned
copies of them (each page an image only, 200 dpi, so OCR runs: Tesseract vie+eng at the recipe's 144 dpi), then
times, on the same inputs, with recipes/vi.yaml's settings (`ocr auto`):
(a) each path alone: `process_document` in this process on the text-layer PDFs, then on the scanned ones: the
    per-page work (core-seconds) of the text layer and of OCR;
(b) the mix (text-layer and scanned PDFs interleaved): the local engine with 1 and 2 workers, Ray (a local Ray of
    1 and 2 CPUs) with 1 and 2 workers; Ray's start-up is timed apart and left out of its pages/s. An engine's cost
    per document = (its time at 1 worker - the page work of (a)) / documents, its per-run costs (assembling the
    dataset) included. The fingerprints of all runs are checked equal. Each timing is the best of `--repeats`
    (interleaved), since the machine is shared.
The projection: core-seconds per PDF = pages x (share scanned x OCR work + rest x text-layer work) + the Ray
engine's cost per document, divided over N machines x C cores, scaling linearly (what 2 workers against 1 shows
here, no more), at this machine's per-core speed. The driver receives every page's PNG: its MB/s is printed.
"""

import argparse
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import datasets
import pymupdf

from data_prep.pages import PageSettings, build_pages_dataset, limit_ocr_threads, process_document

REPO = Path(__file__).resolve().parents[1]
PAGES_PER_DOCUMENT = 4
SETTINGS = PageSettings(
    "vi", 144, 1_003_520, "auto", 144, "vie+eng", ("0041-005A", "0061-007A", "00C0-024F", "0300-036F", "1E00-1EFF")
)


def make_pdfs(folder: Path, n_layer: int, n_scanned: int) -> tuple[list[Path], list[Path]]:
    paragraphs = [p for p in (REPO / "samples/udhr/vi.md").read_text(encoding="utf-8").split("\n\n") if len(p) > 200]
    layer, scanned = [], []
    for doc in range(max(n_layer, n_scanned)):
        document = pymupdf.open()
        for number in range(PAGES_PER_DOCUMENT):
            page = document.new_page()  # A4-ish 595x842 pt
            text = "\n\n".join(paragraphs[(doc * PAGES_PER_DOCUMENT + number + k) % len(paragraphs)] for k in range(3))
            page.insert_htmlbox(page.rect + (50, 50, -50, -50), f"<p style='font-family: Noto Serif'>{text}</p>")
        if doc < n_layer:
            layer.append(folder / f"layer{doc:03d}.pdf")
            document.save(layer[-1])
        if doc < n_scanned:
            scan = pymupdf.open()
            for page in document:
                new = scan.new_page(width=page.rect.width, height=page.rect.height)
                new.insert_image(new.rect, pixmap=page.get_pixmap(dpi=200))
            scanned.append(folder / f"scan{doc:03d}.pdf")
            scan.save(scanned[-1])
    return layer, scanned


def timed_build(inputs: list[Path], output: Path, workers: int, engine: str = "local") -> tuple[float, dict]:
    started = time.perf_counter()
    manifest = build_pages_dataset(
        [str(p) for p in inputs], str(output), SETTINGS, workers=workers, resume=False, max_skip_fraction=0.0,
        engine=engine,
    )  # fmt: skip
    return time.perf_counter() - started, manifest


def work_per_page(paths: list[Path], source: str) -> float:
    """Seconds a page of `process_document` alone, in this process: the work a core does, without the engines'
    costs per document (a child process, a Ray task) and per run (start-up, assembling the dataset)."""
    started, pages = time.perf_counter(), 0
    for path in paths:
        rows, _ = process_document(path, SETTINGS)
        assert {row["text_source"] for row in rows} == {source}
        pages += len(rows)
    return (time.perf_counter() - started) / pages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layer-docs", type=int, default=8)
    parser.add_argument("--scanned-docs", type=int, default=4)
    parser.add_argument("--pdfs", type=float, default=1e6, help="projection: PDFs in the archive")
    parser.add_argument("--pages-per-pdf", type=float, default=20.0, help="projection: mean pages per PDF")
    parser.add_argument("--scanned-share", type=float, default=0.5, help="projection: share of pages needing OCR")
    parser.add_argument("--cores", type=int, default=32, help="projection: cores per machine")
    parser.add_argument("--machines", type=int, nargs="+", default=[1, 10, 100])
    parser.add_argument("--repeats", type=int, default=3, help="each timing's best of this many")
    args = parser.parse_args()

    import ray

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "pdfs").mkdir()
        layer, scanned = make_pdfs(tmp / "pdfs", args.layer_docs, args.scanned_docs)
        mix = [path for pair in zip(layer, scanned) for path in pair] + layer[len(scanned) :] + scanned[len(layer) :]
        limit_ocr_threads()
        # the machine is shared: every measurement is repeated, interleaved, and the fastest kept
        layer_cost = ocr_cost = math.inf
        runs = {}
        for _ in range(args.repeats):
            layer_cost = min(layer_cost, work_per_page(layer, "layer"))
            ocr_cost = min(ocr_cost, work_per_page(scanned, "ocr"))
            for workers in (1, 2):
                local = (*timed_build(mix, tmp / f"local{workers}", workers), 0.0)
                started = time.perf_counter()
                ray.init(address="local", num_cpus=workers, include_dashboard=False)
                startup_s = time.perf_counter() - started
                on_ray = (*timed_build(mix, tmp / f"ray{workers}", workers, engine="ray"), startup_s)
                ray.shutdown()
                for key, run in ((("local", workers), local), (("ray", workers), on_ray)):
                    runs[key] = min(runs.get(key, run), run, key=lambda r: r[0])
        fingerprints = {manifest["fingerprint"] for _, manifest, _ in runs.values()}
        assert len(fingerprints) == 1, f"the engines disagree: {runs}"
        images = datasets.load_from_disk(str(tmp / "local1")).cast_column("image", datasets.Image(decode=False))
        png_bytes = statistics.mean(len(image["bytes"]) for image in images["image"])

    load = ", ".join(f"{value:.1f}" for value in (*load_before, *os.getloadavg()))
    print(f"{os.cpu_count()} CPUs; load average (1, 5, 15 min) before and after: {load}")
    counts = runs["local", 1][1]["counts"]
    pages, documents = counts["pages"], counts["documents"]
    print(f"inputs: {documents} PDFs of {PAGES_PER_DOCUMENT} pages, {len(layer)} text-layer, {len(scanned)} scanned")
    print(f"  ({counts['pages_layer']} text-layer pages, {counts['pages_ocr']} OCR pages); all runs: one fingerprint")
    print("\nper-page work (process_document alone, one process, each path on its own documents):")
    print(f"  text layer (render + PNG + text):  {layer_cost:.3f} s/page  ({1 / layer_cost:.1f} pages/s)")
    print(f"  OCR (render + PNG + Tesseract):    {ocr_cost:.3f} s/page  ({1 / ocr_cost:.2f} pages/s)")
    print(f"  mean PNG size: {png_bytes / 1e3:.0f} kB a page")
    print(f"\n{'engine':<7} {'workers':>7} {'pages':>6} {'time s':>7} {'pages/s':>8} {'start-up s':>10}")
    for (engine, workers), (seconds, _, startup_s) in runs.items():
        print(f"{engine:<7} {workers:>7} {pages:>6} {seconds:>7.1f} {pages / seconds:>8.2f} {startup_s:>10.1f}")
    for engine in ("local", "ray"):
        print(f"{engine}: 2 workers / 1 worker = {runs[engine, 1][0] / runs[engine, 2][0]:.2f}x faster")
    work_s = counts["pages_layer"] * layer_cost + counts["pages_ocr"] * ocr_cost
    overhead = {engine: (runs[engine, 1][0] - work_s) / documents for engine in ("local", "ray")}
    print(
        f"cost per document beyond the page work, 1 worker (the run's fixed costs included): "
        f"local {overhead['local']:+.3f} s, ray {overhead['ray']:+.3f} s "
        f"(Ray's own: {overhead['ray'] - overhead['local']:+.3f} s)"
    )

    per_pdf = args.pages_per_pdf * (args.scanned_share * ocr_cost + (1 - args.scanned_share) * layer_cost)
    per_pdf += max(overhead["ray"], 0.0)
    total_core_s = args.pdfs * per_pdf
    print(
        f"\nprojection: {args.pdfs:,.0f} PDFs x {args.pages_per_pdf:g} pages, {args.scanned_share:.0%} of pages "
        f"scanned (OCR), {args.cores} cores a machine, this machine's per-core speed, linear scaling"
    )
    print(f"  {per_pdf:.1f} core-s per PDF; {total_core_s / 3600:,.0f} core-hours in all")
    pages_total = args.pdfs * args.pages_per_pdf
    print(f"  output: {pages_total:,.0f} pages, ~{pages_total * png_bytes / 1e12:.1f} TB of PNG through the driver")
    print(f"{'machines':>9} {'cores':>6} {'hours':>8} {'days':>6} {'pages/s':>8} {'driver MB/s':>11}")
    for machines in args.machines:
        cores = machines * args.cores
        seconds = total_core_s / cores
        rate = pages_total / seconds
        print(
            f"{machines:>9} {cores:>6} {seconds / 3600:>8.1f} {seconds / 86400:>6.1f} {rate:>8.0f} "
            f"{rate * png_bytes / 1e6:>11.1f}"
        )


if __name__ == "__main__":
    main()
