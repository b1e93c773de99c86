"""The toy world's documents (issue 29): PDFs whose pages each hold one line, a string of random letters written
twice ("KFPBDKFPBD"), one glyph per 28-pt cell, each page bookmarked with its own text (the eval set's outline
queries: passage -> page).

    python -m bench.toy_pages --output checkpoints/toy/pdfs [--documents 200] [--pages 10] [--length 5]

Written twice so that a text-only continuation of a page's text (recipes/toy.yaml's `text_only_fraction`: the first
third given, the rest to write) can be learned: the model learns to read the text it is given, not only the page it
is shown. Without that, a text and the page showing it leave unrelated last states under the embedding prompts
(the model never read a text), and no text-only refinement carries over to pages (bench/results/toy_search_cpu2.md).

Random strings over 10 consonants (no words; the toy tokenizer splits them into single letters) so that no text-only
prior lowers the loss of a page's first copy below ln 10 a letter: a model's loss under that comes from reading the
page. Not digits: the
contrastive stage drops lines that are only a number (page numbers), which left it no pairs. At `data_prep pages
--dpi 72` one point is one pixel, so a glyph fills one merged visual token of the Qwen families (14-px patches
merged 2 x 2).
"""

import argparse
import random
from pathlib import Path

import pymupdf

from data_prep.render import save_pdf_reproducibly

CELL_PT, FONT_PT = 28, 26
ALPHABET = "BDFGJKPQVX"
FONT_FILE = "/usr/share/fonts/truetype/dejavu/DejaVuSansMono.ttf"  # Debian fonts-dejavu-core


def write_documents(output: Path, documents: int, pages: int, length: int, seed: int) -> None:
    rng = random.Random(seed)
    advance = pymupdf.Font(fontfile=FONT_FILE).text_length("0", fontsize=FONT_PT)
    output.mkdir(parents=True, exist_ok=True)
    for doc in range(documents):
        pdf = pymupdf.open()
        outline = []
        for number in range(1, pages + 1):
            text = "".join(rng.choice(ALPHABET) for _ in range(length)) * 2
            page = pdf.new_page(width=CELL_PT * len(text), height=CELL_PT)
            # the baseline puts the capitals' height (0.73 em) in the middle; glyphs stretched to fill their cells, so
            # that the text layer reads them as one word (spaced glyphs read "B D F G J": letter k would then be
            # token 2k of the transcription but visual token k, and the model learned no reading in 400 steps)
            point = pymupdf.Point(0, CELL_PT / 2 + 0.73 * FONT_PT / 2)
            stretch = pymupdf.Matrix(CELL_PT / advance, 1)
            page.insert_text(point, text, fontsize=FONT_PT, fontname="mono", fontfile=FONT_FILE, morph=(point, stretch))
            outline.append([1, text, number])
        pdf.set_toc(outline)
        pdf.subset_fonts()  # one small font per document, not the whole face
        # the held-out documents are drawn from the documents' ids: the same seed must give the same ids
        save_pdf_reproducibly(pdf, output / f"toy{doc:04d}.pdf")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True)
    parser.add_argument("--documents", type=int, default=200)
    parser.add_argument("--pages", type=int, default=10)
    parser.add_argument("--length", type=int, default=5, help="Random letters per page (written twice).")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    write_documents(Path(args.output), args.documents, args.pages, args.length, args.seed)


if __name__ == "__main__":
    main()
