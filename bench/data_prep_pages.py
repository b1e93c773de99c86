"""Pages per second of `data_prep pages` on this machine, against its parts run alone.

    python bench/data_prep_pages.py --layer-pages 200 --ocr-pages 40

Makes Khmer PDFs (insert_htmlbox, Noto Sans Khmer; 4 pages each), then times, for 1 and 2 workers:
(a) render + text layer (`--ocr never`) against rendering alone and rendering + PNG encoding, and (b) render + OCR
(`--ocr always`) against Tesseract alone on the same rendered images. Prints a table and ratios.
"""

import argparse
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pymupdf

from data_prep.pages import PageSettings, build_pages_dataset, limit_ocr_threads, ocr_pixmap, render_page

REPO = Path(__file__).resolve().parents[1]
PAGES_PER_DOCUMENT = 4


def make_pdfs(folder: Path, n_pages: int) -> list[Path]:
    paragraphs = [p for p in (REPO / "samples/udhr/km.md").read_text(encoding="utf-8").split("\n\n") if len(p) > 200]
    paths = []
    for doc in range(n_pages // PAGES_PER_DOCUMENT):
        document = pymupdf.open()
        for number in range(PAGES_PER_DOCUMENT):
            page = document.new_page()  # A4-ish 595x842 pt
            text = paragraphs[(doc * PAGES_PER_DOCUMENT + number) % len(paragraphs)]
            page.insert_htmlbox(page.rect + (50, 50, -50, -50), f"<p style='font-family: Noto Sans Khmer'>{text}</p>")
        paths.append(folder / f"doc{doc:03d}.pdf")
        document.save(paths[-1])
    return paths


def render_only(path: Path, settings: PageSettings) -> list:
    with pymupdf.open(path) as document:
        return [render_page(page, settings.dpi, settings.max_pixels) for page in document]


def render_count(path: Path, settings: PageSettings) -> int:
    return len(render_only(path, settings))  # the pixmaps stay in the worker


def render_png_only(path: Path, settings: PageSettings) -> int:
    return sum(len(pixmap.tobytes("png")) for pixmap in render_only(path, settings))


def ocr_only(path: Path, settings: PageSettings) -> int:
    with pymupdf.open(path) as document:
        pixmaps = [render_page(page, settings.ocr_dpi, None) for page in document]
    for pixmap in pixmaps:
        ocr_pixmap(pixmap, settings.tesseract_langs)
    return 0


def timed(function, *args, **kwargs) -> float:
    started = time.perf_counter()
    function(*args, **kwargs)
    return time.perf_counter() - started


def pool_map(function, paths, settings, workers):
    with ProcessPoolExecutor(workers, initializer=limit_ocr_threads) as pool:
        list(pool.map(function, paths, [settings] * len(paths)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layer-pages", type=int, default=200)
    parser.add_argument("--ocr-pages", type=int, default=40)
    parser.add_argument("--dpi", type=int, default=144)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "layer").mkdir()
        (tmp / "ocr").mkdir()
        layer_pdfs = make_pdfs(tmp / "layer", args.layer_pages)
        ocr_pdfs = make_pdfs(tmp / "ocr", args.ocr_pages)
        rows = []
        for mode, pdfs, baseline_name, baseline in (
            ("never", layer_pdfs, "render alone", render_count),
            ("never", layer_pdfs, "render + PNG alone", render_png_only),
            ("always", ocr_pdfs, "render + tesseract alone", ocr_only),
        ):
            settings = PageSettings("km", args.dpi, 1_003_520, mode, args.dpi, "khm+eng", ("1780-17FF", "19E0-19FF"))
            n_pages = len(pdfs) * PAGES_PER_DOCUMENT
            for workers in (1, 2):
                if workers == 1:
                    base_s = timed(lambda: [baseline(p, settings) for p in pdfs])
                else:
                    base_s = timed(pool_map, baseline, pdfs, settings, workers)
                ours_s = timed(
                    build_pages_dataset,
                    [str(tmp / ("layer" if mode == "never" else "ocr"))],
                    str(tmp / f"out-{mode}-{workers}"),
                    settings,
                    workers=workers,
                    resume=False,
                    max_skip_fraction=0.0,
                )
                rows.append(
                    (
                        f"render + {'text layer' if mode == 'never' else 'OCR'}",
                        workers,
                        n_pages,
                        n_pages / ours_s,
                        baseline_name,
                        n_pages / base_s,
                        ours_s / base_s,
                    )
                )
    print(
        f"\n{'path':<22} {'workers':>7} {'pages':>6} {'pages/s':>8}   {'baseline':<26} {'pages/s':>8} "
        f"{'time ratio':>10}"
    )
    for name, workers, pages, ours, base_name, base, ratio in rows:
        print(f"{name:<22} {workers:>7} {pages:>6} {ours:>8.2f}   {base_name:<26} {base:>8.2f} {ratio:>10.2f}")


if __name__ == "__main__":
    main()
