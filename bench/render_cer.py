"""Render a short document per language, read it back with `data_prep pages` (OCR, and the text
layer), and measure the character error rate against the source text (whitespace ignored).
Saves page 1 of each as a PNG.

    python bench/render_cer.py --output bench/results/render
"""

import argparse
import tempfile
from pathlib import Path

import datasets
import jiwer

from common.recipe import load_recipe
from data_prep.pages import PageSettings, build_pages_dataset
from data_prep.render import parse_blocks, render_documents

REPO = Path(__file__).resolve().parents[1]
OCR_LANGS = ("th", "lo", "km", "my")
LAYER_LANGS = ("vi", "id")


def sample_document(lang: str, n_paragraphs: int = 3) -> str:
    """The title and the first paragraphs of the language's UDHR sample: short enough for one page."""
    blocks = parse_blocks((REPO / f"samples/udhr/{lang}.md").read_text(encoding="utf-8"))
    title = blocks[0][1]
    paragraphs = [text for kind, text in blocks if kind == "p"][:n_paragraphs]
    return f"# {title}\n\n" + "\n\n".join(paragraphs) + "\n"


def no_space(text: str) -> str:
    return "".join(text.split())


def measure(lang: str, folder: Path, png_folder: Path | None, ocr_dpis: list[int]) -> tuple[list[float], float, int]:
    """CERs of page 1 read back by OCR at each DPI and from the text layer, and the number of pages."""
    settings_section = load_recipe(REPO / f"recipes/{lang}.yaml")["data_prep"]
    source = folder / f"{lang}.md"
    source.write_text(sample_document(lang), encoding="utf-8")
    render_documents(
        [str(source)], str(folder / f"{lang}-pdf"), lang=lang, fonts=settings_section["fonts"][:1], seed=0, workers=1
    )
    reference = no_space("".join(text for _, text in parse_blocks(source.read_text(encoding="utf-8"))))
    cers = []
    for ocr, ocr_dpi in [*(("always", dpi) for dpi in ocr_dpis), ("never", 0)]:
        settings = PageSettings(
            lang=lang,
            dpi=settings_section["dpi"],
            max_pixels=settings_section["max_pixels"],
            ocr=ocr,
            ocr_dpi=ocr_dpi or settings_section["dpi"],
            tesseract_langs=settings_section["tesseract_langs"],
            script_ranges=tuple(settings_section["script_ranges"]),
        )
        out = folder / f"{lang}-pages-{ocr}-{ocr_dpi}"
        build_pages_dataset(
            [str(folder / f"{lang}-pdf")], str(out), settings, workers=1, resume=False, max_skip_fraction=0.0
        )
        pages = datasets.load_from_disk(str(out))
        # the page number Chromium prints at the foot of the page is not part of the source text
        text = pages[0]["text"].strip().removesuffix("1").removeprefix("1")
        cers.append(jiwer.cer(reference, no_space(text)))
    if png_folder:
        pages[0]["image"].save(png_folder / f"{lang}_page1.png")
    return cers[:-1], cers[-1], len(pages)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, help="Folder for the page PNGs.")
    parser.add_argument("--ocr-dpis", type=int, nargs="+", default=[96, 120, 144], help="OCR resolutions to compare.")
    args = parser.parse_args()
    if args.output:
        args.output.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        header = " ".join(f"{f'OCR@{dpi}dpi':>11}" for dpi in args.ocr_dpis)
        print(f"{'lang':<5} {'pages':>5} {header} {'text layer':>11}   (CER, whitespace ignored)")
        for lang in (*OCR_LANGS, *LAYER_LANGS):
            ocr_cers, layer_cer, n_pages = measure(lang, Path(tmp), args.output, args.ocr_dpis)
            print(f"{lang:<5} {n_pages:>5} " + " ".join(f"{cer:>11.4f}" for cer in ocr_cers) + f" {layer_cer:>11.4f}")


if __name__ == "__main__":
    main()
