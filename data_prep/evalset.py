"""Retrieval eval sets in the BEIR-with-images layout (DESIGN.md section 3).

    corpus.jsonl   {"_id", "image": "images/<id>.png", "text", "lang"}   every page of the pages datasets
    queries.jsonl  {"_id", "text", "lang"}
    qrels.tsv      query-id, corpus-id, score (with a header line)

Queries come from structure the documents carry:
- outline queries: each bookmark title of a PDF points at its page (a title that occurs in several
  documents is ambiguous and left out);
- parallel queries (SeaDoc's cross-lingual setting): a Markdown text in another language whose `## `
  sections are parallel to the documents' bookmarks at one level (as the UDHR's articles are); the
  first sentence of section N queries the page where bookmark N of each document starts.
A SeaDoc/ViDoRe parquet folder (configs corpus, query or queries, qrels) converts to the same layout.
"""

import hashlib
import json
import re
from collections import Counter
from pathlib import Path

from common.artifacts import atomic_directory
from common.errors import UsageError

from .pages import read_pages_manifest

QUERY_MAX_CHARS = 200
SENTENCE_END = re.compile(r"(?<=[.!?。])\s")


def markdown_sections(text: str) -> list[str]:
    """The bodies of the `## ` sections of a light-Markdown text, in order."""
    return [part.split("\n", 1)[1].strip() if "\n" in part else "" for part in re.split(r"^## ", text, flags=re.M)[1:]]


def first_sentence(text: str) -> str:
    paragraph = " ".join(text.split("\n\n")[0].lstrip("- ").split())
    sentence = SENTENCE_END.split(paragraph, maxsplit=1)[0]
    return sentence if len(sentence) <= QUERY_MAX_CHARS else sentence[:QUERY_MAX_CHARS].rsplit(" ", 1)[0]


def build_evalset(
    pages_folders: list[str], output: str, *, parallel_source: str | None, parallel_lang: str, outline_level: int
) -> dict:
    """Write the eval set to `output` (atomically) and return its summary."""
    import datasets

    manifests = {folder: read_pages_manifest(folder, "--pages") for folder in pages_folders}
    documents = [entry for manifest in manifests.values() for entry in manifest["inputs"]]
    if parallel_source:
        queries, qrels, unmatched = _parallel_queries(documents, Path(parallel_source), parallel_lang, outline_level)
    else:
        queries, qrels, unmatched = _outline_queries(documents, {m["lang"] for m in manifests.values()})
    if not queries:
        raise UsageError(
            "no queries: the documents have no usable outline (bookmarks)"
            + (f" at level {outline_level} matching the sections of {parallel_source}" if parallel_source else "")
            + "; render them with `python -m data_prep render` or give PDFs with bookmarks."
        )

    with atomic_directory(output) as tmp:
        (tmp / "images").mkdir()
        with open(tmp / "corpus.jsonl", "w", encoding="utf-8") as corpus:
            for folder in pages_folders:
                dataset = datasets.load_from_disk(folder).cast_column("image", datasets.Image(decode=False))
                for row in dataset:
                    corpus_id = page_id(row["doc_id"], row["page"])
                    (tmp / "images" / f"{corpus_id}.png").write_bytes(row["image"]["bytes"])
                    record = {
                        "_id": corpus_id,
                        "image": f"images/{corpus_id}.png",
                        "text": row["text"],
                        "lang": row["lang"],
                    }
                    corpus.write(json.dumps(record, ensure_ascii=False) + "\n")
        write_queries_and_qrels(tmp, queries, qrels)
        summary = {
            "pages": sum(m["counts"]["pages"] for m in manifests.values()),
            "queries": len(queries),
            "qrels": len(qrels),
            "unmatched_documents": unmatched,
            # the documents the eval set covers, by content: training stages keep them out (--exclude_evalsets)
            "documents": [{"doc_id": doc["doc_id"], "sha256": doc["sha256"]} for doc in documents],
            "source": {"pages": pages_folders, "parallel_source": parallel_source, "outline_level": outline_level},
        }
        (tmp / "evalset.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return summary


def evaluated_documents(folder: str | Path, flag: str) -> set[str]:
    """The sha256 of every document an eval set written by `build_evalset` covers."""
    summary = Path(folder) / "evalset.json"
    if not summary.is_file():
        raise UsageError(
            f"{flag} {folder} has no evalset.json: it is not an eval set written by `python -m data_prep evalset`."
        )
    documents = json.loads(summary.read_text(encoding="utf-8")).get("documents")
    if documents is None:
        raise UsageError(
            f"{flag} {folder} does not list its documents (a converted parquet set, or one written before they were "
            "recorded); rebuild it with `python -m data_prep evalset --pages ...`."
        )
    return {doc["sha256"] for doc in documents}


def page_id(doc_id: str, page: int) -> str:
    return f"{doc_id}-p{page}"


def _outline_queries(documents: list[dict], langs: set[str]):
    titles = Counter(title for doc in documents for _, title, _ in doc["outline"] if title)
    queries, qrels = [], []
    lang = langs.pop() if len(langs) == 1 else "multi"
    for doc in documents:
        for level, title, page in doc["outline"]:
            if title and titles[title] == 1 and page >= 1:
                query_id = f"q{len(queries) + 1}"
                queries.append({"_id": query_id, "text": title, "lang": lang})
                qrels.append((query_id, page_id(doc["doc_id"], page), 1))
    return queries, qrels, []


def _parallel_queries(documents: list[dict], source: Path, lang: str, level: int):
    sections = markdown_sections(source.read_text(encoding="utf-8"))
    queries = [{"_id": f"q{i + 1}", "text": first_sentence(body), "lang": lang} for i, body in enumerate(sections)]
    qrels, unmatched = [], []
    for doc in documents:
        entries = [(title, page) for entry_level, title, page in doc["outline"] if entry_level == level]
        if len(entries) != len(sections):
            unmatched.append({"doc_id": doc["doc_id"], "outline_entries": len(entries), "sections": len(sections)})
            continue
        qrels.extend((query["_id"], page_id(doc["doc_id"], page), 1) for query, (_, page) in zip(queries, entries))
    used = {query_id for query_id, _, _ in qrels}
    return [query for query in queries if query["_id"] in used and query["text"]], qrels, unmatched


def write_queries_and_qrels(folder: Path, queries: list[dict], qrels: list[tuple]) -> None:
    kept = {query["_id"] for query in queries}
    with open(folder / "queries.jsonl", "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(query, ensure_ascii=False) + "\n" for query in queries)
    with open(folder / "qrels.tsv", "w", encoding="utf-8") as handle:
        handle.write("query-id\tcorpus-id\tscore\n")
        handle.writelines(f"{q}\t{c}\t{s}\n" for q, c, s in qrels if q in kept)


def read_parquet_evalset(source: str) -> tuple[list[dict], list[dict], list[tuple[str, str, int]]]:
    """(corpus rows {_id, image bytes, text, lang}, queries {_id, text, lang}, qrels) of a local
    SeaDoc/ViDoRe parquet folder (configs corpus, query or queries, qrels)."""
    import pyarrow.parquet as pq

    folder = Path(source)

    def table(*names: str):
        for name in names:
            files = sorted(folder.glob(f"{name}/*.parquet")) + sorted(folder.glob(f"{name}*.parquet"))
            if files:
                return [row for path in files for row in pq.read_table(path).to_pylist()]
        raise UsageError(f"{folder}: no {' or '.join(names)} parquet files (expected {names[0]}/*.parquet).")

    corpus = [
        {
            "_id": str(_first(row, "corpus-id", "_id", "id", "docid")),
            "image": (row.get("image") or {}).get("bytes"),
            "text": row.get("text") or "",
            "lang": row.get("language") or row.get("lang") or "",
        }
        for row in table("corpus")
    ]
    queries = [
        {
            "_id": str(_first(row, "query-id", "_id", "id", "query_id")),
            "text": _first(row, "query", "text"),
            "lang": row.get("language") or row.get("lang") or "",
        }
        for row in table("query", "queries")
    ]
    qrels = [
        (str(_first(r, "query-id", "query_id")), str(_first(r, "corpus-id", "corpus_id")), int(r.get("score", 1)))
        for r in table("qrels")
    ]
    return corpus, queries, qrels


def convert_parquet_evalset(source: str, output: str) -> dict:
    """A local SeaDoc/ViDoRe parquet folder to the BEIR-with-images layout."""
    corpus, queries, qrels = read_parquet_evalset(source)
    ids = {row["_id"] for row in corpus}
    unknown = [corpus_id for _, corpus_id, _ in qrels if corpus_id not in ids]
    if unknown:
        raise UsageError(f"--parquet {source}: qrels name {len(unknown)} unknown corpus ids, e.g. {unknown[:3]}.")
    without_image = [row["_id"] for row in corpus if not isinstance(row["image"], bytes)]
    if without_image:
        raise UsageError(
            f"--parquet {source}: {len(without_image)} corpus rows have no image bytes, e.g. {without_image[:3]}; "
            "the corpus needs an `image` column of {bytes, path} structs with the bytes set (SeaDoc's layout)."
        )
    with atomic_directory(output) as tmp:
        (tmp / "images").mkdir()
        with open(tmp / "corpus.jsonl", "w", encoding="utf-8") as handle:
            for row in corpus:
                name = _image_name(row["_id"], row["image"])
                (tmp / name).write_bytes(row["image"])
                handle.write(json.dumps({**row, "image": name}, ensure_ascii=False) + "\n")
        write_queries_and_qrels(tmp, queries, qrels)
    return {"pages": len(corpus), "queries": len(queries), "qrels": len(qrels)}


def _image_name(corpus_id: str, data: bytes) -> str:
    """`images/<id>.<suffix>` with the id made safe as a file name (ids come from elsewhere: `../x`, `a/b`); an
    id that had to change gets a hash of itself, so that `a/b` and `a_b` never share (and overwrite) a file."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", corpus_id)[:100]
    if safe != corpus_id:
        safe = f"{safe}-{hashlib.sha256(corpus_id.encode()).hexdigest()[:12]}"
    return f"images/{safe}.{_image_suffix(data)}"


def _image_suffix(data: bytes) -> str:
    return "jpg" if data[:2] == b"\xff\xd8" else "png" if data[:4] == b"\x89PNG" else "img"


def _first(row: dict, *keys: str):
    for key in keys:
        if key in row and row[key] is not None:
            return row[key]
    raise UsageError(f"a parquet row has none of the columns {', '.join(keys)} (it has {', '.join(row)}).")
