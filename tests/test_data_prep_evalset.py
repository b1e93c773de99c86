import json

import pyarrow as pa
import pyarrow.parquet as pq
import pymupdf
import pytest

from common.errors import UsageError
from data_prep.evalset import build_evalset, convert_parquet_evalset, first_sentence, markdown_sections
from data_prep.pages import PageSettings, build_pages_dataset

ENGLISH = """# Declaration

## Article 1

All human beings are born free and equal in dignity and rights. They are endowed with reason.

## Article 2

- Everyone has the right to life, liberty and security of person.

## Article 3

No one shall be held in slavery or servitude.
"""
KHMER_ARTICLES = ["មនុស្សទាំងអស់ កើតមកមានសេរីភាព", "មនុស្សគ្រប់រូប មានសិទ្ធិរស់រានមានជីវិត", "គ្មានជនណាម្នាក់ ត្រូវគេប្រកាន់យកធ្វើជាខ្ញុំ"]


def outlined_pdf(path, articles, title, heading="ប្រការ {}"):
    """One article per page, with bookmarks: the title (level 1) and each article (level 2)."""
    document = pymupdf.open()
    toc = [[1, title, 1]]
    for number, text in enumerate(articles, start=1):
        page = document.new_page(width=300, height=200)
        page.insert_htmlbox(
            page.rect + (10, 10, -10, -10),
            f"<h2>{heading.format(number)}</h2><p style='font-family: Noto Sans Khmer'>{text}</p>",
        )
        toc.append([2, heading.format(number), number])
    document.set_toc(toc)
    document.save(path)
    return path


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    folder = tmp_path_factory.mktemp("evalset")
    pdfs = [
        outlined_pdf(folder / "a.pdf", KHMER_ARTICLES, "សេចក្ដីប្រកាស ក"),
        outlined_pdf(folder / "b.pdf", KHMER_ARTICLES[::-1], "សេចក្ដីប្រកាស ខ"),
        outlined_pdf(folder / "short.pdf", KHMER_ARTICLES[:2], "ឯកសារខ្លី"),
    ]
    settings = PageSettings("km", 72, 100_000, "never", 144, "khm+eng", ("1780-17FF",))
    build_pages_dataset(
        [str(p) for p in pdfs], str(folder / "pages"), settings, workers=1, resume=False, max_skip_fraction=0.0
    )
    return folder / "pages"


def read_beir(folder):
    corpus = [json.loads(line) for line in (folder / "corpus.jsonl").read_text().splitlines()]
    queries = [json.loads(line) for line in (folder / "queries.jsonl").read_text().splitlines()]
    lines = (folder / "qrels.tsv").read_text().splitlines()
    assert lines[0] == "query-id\tcorpus-id\tscore"
    return corpus, queries, [line.split("\t") for line in lines[1:]]


def test_parallel_queries_point_at_the_page_of_each_article(pages, tmp_path):
    source = tmp_path / "en.md"
    source.write_text(ENGLISH)
    summary = build_evalset(
        [str(pages)], str(tmp_path / "eval"), parallel_source=str(source), parallel_lang="en", outline_level=2
    )
    corpus, queries, qrels = read_beir(tmp_path / "eval")

    assert len(corpus) == 8 and all((tmp_path / "eval" / row["image"]).read_bytes()[:4] == b"\x89PNG" for row in corpus)
    assert [q["text"] for q in queries] == [
        "All human beings are born free and equal in dignity and rights.",
        "Everyone has the right to life, liberty and security of person.",
        "No one shall be held in slavery or servitude.",
    ]
    assert all(q["lang"] == "en" for q in queries)
    judged = {}
    for query_id, corpus_id, score in qrels:
        doc_id, page = corpus_id.rsplit("-p", 1)
        judged.setdefault(query_id, set()).add((doc_id.split("-")[0], int(page)))
        assert score == "1"
    # article N starts on page N of a.pdf and b.pdf; short.pdf has 2 articles for 3 sections: not matched
    assert judged == {f"q{n}": {("a", n), ("b", n)} for n in (1, 2, 3)}
    assert [u["outline_entries"] for u in summary["unmatched_documents"]] == [2]
    assert {row["_id"] for row in corpus} >= {c for _, c, _ in qrels}


def test_outline_titles_become_queries_and_ambiguous_ones_are_left_out(pages, tmp_path):
    build_evalset([str(pages)], str(tmp_path / "eval"), parallel_source=None, parallel_lang="en", outline_level=2)
    _, queries, qrels = read_beir(tmp_path / "eval")
    # "ប្រការ 1" occurs in all three documents: ambiguous; the three titles are unique
    assert sorted(q["text"] for q in queries) == sorted(["សេចក្ដីប្រកាស ក", "សេចក្ដីប្រកាស ខ", "ឯកសារខ្លី"])
    assert all(corpus_id.endswith("-p1") for _, corpus_id, _ in qrels)


def test_pages_without_outline_give_a_clear_error(tmp_path):
    document = pymupdf.open()
    document.new_page().insert_text((50, 50), "No bookmarks in this document, only some text on a page.")
    document.save(tmp_path / "plain.pdf")
    settings = PageSettings("en", 72, 100_000, "never", 144, "eng", ("0041-005A", "0061-007A"))
    build_pages_dataset(
        [str(tmp_path / "plain.pdf")], str(tmp_path / "pages"), settings, workers=1, resume=False, max_skip_fraction=0.0
    )
    with pytest.raises(UsageError, match="no queries: the documents have no usable outline"):
        build_evalset(
            [str(tmp_path / "pages")], str(tmp_path / "eval"), parallel_source=None, parallel_lang="en", outline_level=2
        )
    assert not (tmp_path / "eval").exists()


def test_markdown_sections_and_first_sentence():
    assert markdown_sections(ENGLISH)[1] == "- Everyone has the right to life, liberty and security of person."
    assert first_sentence("A first one. A second one.") == "A first one."
    assert len(first_sentence("word " * 100)) <= 200


def write_parquet(folder, name, rows):
    (folder / name).mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), folder / name / "test-00000.parquet")


def test_seadoc_parquet_folder_converts_to_the_beir_layout(tmp_path):
    png = b"\x89PNG\r\n\x1a\n" + b"0" * 10
    write_parquet(
        tmp_path / "seadoc", "corpus", [{"corpus-id": 7, "image": {"bytes": png, "path": None}, "language": "lo"}]
    )
    write_parquet(
        tmp_path / "seadoc", "query", [{"query-id": "q1", "query": "Where is the rice report?", "language": "en"}]
    )
    write_parquet(tmp_path / "seadoc", "qrels", [{"query-id": "q1", "corpus-id": 7, "score": 1}])
    assert convert_parquet_evalset(str(tmp_path / "seadoc"), str(tmp_path / "eval")) == {
        "pages": 1,
        "queries": 1,
        "qrels": 1,
    }
    corpus, queries, qrels = read_beir(tmp_path / "eval")
    assert corpus == [{"_id": "7", "image": "images/7.png", "text": "", "lang": "lo"}]
    assert (tmp_path / "eval" / "images" / "7.png").read_bytes() == png
    assert queries == [{"_id": "q1", "text": "Where is the rice report?", "lang": "en"}] and qrels == [["q1", "7", "1"]]


def test_parquet_qrels_naming_unknown_pages_are_refused(tmp_path):
    write_parquet(tmp_path / "seadoc", "corpus", [{"corpus-id": 1, "image": {"bytes": b"x", "path": None}}])
    write_parquet(tmp_path / "seadoc", "queries", [{"query-id": "q1", "query": "x"}])
    write_parquet(tmp_path / "seadoc", "qrels", [{"query-id": "q1", "corpus-id": 2, "score": 1}])
    with pytest.raises(UsageError, match="qrels name 1 unknown corpus ids"):
        convert_parquet_evalset(str(tmp_path / "seadoc"), str(tmp_path / "eval"))
    assert not (tmp_path / "eval").exists()


def test_an_evalset_lists_the_documents_it_covers_by_content(pages, tmp_path):
    from data_prep.evalset import evaluated_documents

    build_evalset([str(pages)], str(tmp_path / "eval"), parallel_source=None, parallel_lang="en", outline_level=2)
    manifest = json.loads((pages / "manifest.json").read_text())
    assert evaluated_documents(tmp_path / "eval", "--exclude_evalsets") == {
        entry["sha256"] for entry in manifest["inputs"]
    }
