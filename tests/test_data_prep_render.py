import hashlib
import json

import datasets
import jiwer
import pymupdf
import pytest

import data_prep.cli as data_prep_cli
from bench.render_cer import no_space, sample_document
from common.errors import run_cli
from common.recipe import load_recipe
from data_prep.pages import PageSettings, build_pages_dataset
from data_prep.render import choose_style, parse_blocks, render_documents

from .conftest import REPO


def test_markdown_renders_to_a_multipage_pdf_with_bookmarks_and_page_numbers(tmp_path, capsys):
    source = REPO / "samples/udhr/km.md"
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    run_cli(data_prep_cli.main, ["render", "--lang", "km", "--input", str(source), "--output", str(tmp_path / "pdf")])
    assert "1 PDFs, 0 inputs skipped" in capsys.readouterr().out

    document = pymupdf.open(tmp_path / "pdf" / "km.pdf")
    assert document.page_count >= 3
    outline = document.get_toc()
    assert outline[0][:2] == [1, "សេចក្ដីប្រកាសជាសកលស្ដីពីសិទ្ធិមនុស្ស"]
    assert [level for level, _, _ in outline].count(2) == 31  # the preamble and 30 articles
    assert [page for _, _, page in outline] == sorted(page for _, _, page in outline)
    for number, page in enumerate(document, start=1):
        assert page.get_text().split()[-1] == str(number) or page.get_text().split()[0] == str(number)
        assert all(block[2] <= page.rect.width + 0.5 for block in page.get_text("blocks"))  # nothing overflows
    manifest = json.loads((tmp_path / "pdf" / "render_manifest.json").read_text())
    assert manifest["documents"][0]["sha256"] == digest == hashlib.sha256(source.read_bytes()).hexdigest()
    assert manifest["documents"][0]["style"]["font"] in load_recipe(REPO / "recipes/km.yaml")["data_prep"]["fonts"]


def test_plain_text_paragraphs_and_a_short_first_line_as_title():
    blocks = parse_blocks("A short title\n\nFirst paragraph\nwrapped here.\n\nSecond one.\n")
    assert blocks == [("h1", "A short title"), ("p", "First paragraph wrapped here."), ("p", "Second one.")]
    assert parse_blocks("# T\n\n- a\n- b\n\n## H\n\ntext") == [
        ("h1", "T"),
        ("li", "a"),
        ("li", "b"),
        ("h2", "H"),
        ("p", "text"),
    ]


def test_styles_vary_by_document_and_are_deterministic_for_a_seed():
    fonts = ["Noto Serif Thai", "Noto Sans Thai", "Noto Looped Thai"]
    styles = {choose_style(fonts, 42, f"doc{i}") for i in range(30)}
    assert len({style.font for style in styles}) == 3 and len({style.columns for style in styles}) == 2
    assert choose_style(fonts, 42, "doc1") == choose_style(fonts, 42, "doc1") != choose_style(fonts, 43, "doc1")


def test_empty_input_is_skipped_with_a_reason(tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "ok.txt").write_text("Title\n\nSome text.")
    manifest = render_documents(
        [str(tmp_path)], str(tmp_path / "out"), lang="en", fonts=["Noto Serif"], seed=0, workers=2
    )
    assert [d["pdf"] for d in manifest["documents"]] == ["ok.pdf"]
    assert manifest["skipped"][0]["reason"] == "no text"


def read_back(lang, tmp_path, ocr):
    section = load_recipe(REPO / f"recipes/{lang}.yaml")["data_prep"]
    source = tmp_path / f"{lang}.md"
    source.write_text(sample_document(lang), encoding="utf-8")
    render_documents(
        [str(source)], str(tmp_path / f"{lang}-pdf"), lang=lang, fonts=section["fonts"][:1], seed=0, workers=1
    )
    settings = PageSettings(
        lang,
        section["dpi"],
        section["max_pixels"],
        ocr,
        section["ocr_dpi"],
        section["tesseract_langs"],
        tuple(section["script_ranges"]),
    )
    build_pages_dataset(
        [str(tmp_path / f"{lang}-pdf")],
        str(tmp_path / f"{lang}-pages"),
        settings,
        workers=1,
        resume=False,
        max_skip_fraction=0.0,
    )
    page = datasets.load_from_disk(str(tmp_path / f"{lang}-pages"))[0]
    reference = no_space("".join(text for _, text in parse_blocks(source.read_text(encoding="utf-8"))))
    return jiwer.cer(reference, no_space(page["text"].strip().removesuffix("1"))), page["text_source"]


@pytest.mark.parametrize("lang", ["th", "lo", "km", "my"])
def test_rendered_page_read_back_by_ocr(lang, tmp_path):
    cer, source = read_back(lang, tmp_path, ocr="always")
    assert source == "ocr" and cer < 0.10


@pytest.mark.parametrize("lang", ["th", "lo", "km", "my", "vi", "id"])
def test_rendered_page_read_back_in_auto_mode(lang, tmp_path):
    # Chromium's text layer is exact for Thai and Lao and passes the garble check; for Burmese it splits
    # marks onto lines of their own, the check catches that, and the page is OCR'd
    cer, source = read_back(lang, tmp_path, ocr="auto")
    assert source == ("ocr" if lang == "my" else "layer")
    assert cer < (0.02 if lang in ("th", "lo", "vi", "id") else 0.10)


def test_the_same_text_renders_to_the_same_bytes(tmp_path):
    (tmp_path / "doc.md").write_text("# Title\n\nSome text that is rendered twice.\n")
    for name in ("a", "b"):
        render_documents(
            [str(tmp_path / "doc.md")], str(tmp_path / name), lang="en", fonts=["Noto Serif"], seed=1, workers=1
        )
    assert (tmp_path / "a" / "doc.pdf").read_bytes() == (tmp_path / "b" / "doc.pdf").read_bytes()


def test_section_pages_start_every_section_on_a_page_of_its_own(tmp_path):
    text = tmp_path / "doc.md"
    text.write_text("# Title\n\n" + "".join(f"## Section {i}\n\nShort text {i}.\n\n" for i in range(1, 5)))
    for section_pages, folder in ((False, "flowing"), (True, "paged")):
        render_documents([str(text)], str(tmp_path / folder), lang="en", fonts=["Noto Sans"], seed=0, workers=1,
                         section_pages=section_pages)  # fmt: skip
    with (
        pymupdf.open(tmp_path / "flowing" / "doc.pdf") as flowing,
        pymupdf.open(tmp_path / "paged" / "doc.pdf") as paged,
    ):
        assert len(flowing) == 1
        assert [page for level, _, page in paged.get_toc() if level == 2] == [1, 2, 3, 4]


def test_right_to_left_text_is_laid_out_right_to_left(tmp_path):
    # Hebrew: lines start at the right margin and the first column is the right one (bench/languages.py found
    # Hebrew and Thaana laid out left to right, which Tesseract then read in the wrong order)
    paragraph = " ".join(["כל בני האדם נולדו בני חורין ושווים בערכם ובזכויותיהם."] * 6)
    (tmp_path / "he.md").write_text(f"# הכרזה\n\n{paragraph}\n", encoding="utf-8")
    render_documents(
        [str(tmp_path / "he.md")], str(tmp_path / "pdf"), lang="he", fonts=["Noto Sans Hebrew"], seed=0, workers=1
    )
    with pymupdf.open(tmp_path / "pdf" / "he.pdf") as document:
        page = document[0]
        lines = [line["bbox"] for block in page.get_text("dict")["blocks"] for line in block.get("lines", [])]
    *_, before, last, _page_number = sorted(lines, key=lambda bbox: bbox[1])
    # the paragraph's short last line starts at the right, as the full line above it does, and is ragged on the left
    assert abs(last[2] - before[2]) < 2 and last[0] - before[0] > 20
