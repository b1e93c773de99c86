import pymupdf

from bench.toy_pages import CELL_PT, write_documents


def test_toy_pages_read_back_as_one_word_with_one_cell_a_glyph(tmp_path):
    """The text layer reads a toy page as its 5 letters written twice with no spaces (spaced, letter k would be token
    2k of the transcription but visual token k; twice, so that a text continuation can be learned), each page
    bookmarked with its text (the eval set's queries)."""
    write_documents(tmp_path, documents=2, pages=3, length=5, seed=0)
    for path in sorted(tmp_path.glob("*.pdf")):
        with pymupdf.open(path) as pdf:
            titles = [title for _, title, _ in pdf.get_toc()]
            texts = [page.get_text().strip() for page in pdf]
            assert titles == texts
            assert all(len(text) == 10 and text.isalpha() and text[:5] == text[5:] for text in texts)
            assert (pdf[0].rect.width, pdf[0].rect.height) == (10 * CELL_PT, CELL_PT)


def test_toy_pages_are_the_same_bytes_for_the_same_seed(tmp_path):
    """A document's id is its file's hash (`data_prep pages`), and the held-out documents are drawn from the ids: a PDF
    stamped with the time or a random id gives `make toy` other held-out pages, so another model, each run."""
    for run in ("a", "b"):
        write_documents(tmp_path / run, documents=2, pages=3, length=5, seed=0)
    paths = sorted((tmp_path / "a").glob("*.pdf"))
    assert len(paths) == 2
    for path in paths:
        assert path.read_bytes() == (tmp_path / "b" / path.name).read_bytes(), path.name
