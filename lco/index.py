"""A searchable index of pages: FAISS vectors (full, truncated and re-normalised, int8 or binary; searched exactly,
or approximately through IVF, IVF-PQ or HNSW for large indexes) beside a page
store (one JSON line per page: document, page, source, language, text, the document's sha256; the page image
and a thumbnail as files named by row). Written by stages.index, read by stages.search and stages.serve.

    <index>/index.faiss    vectors, row i = page i
    <index>/pages.jsonl    {"row", "doc_id", "page", "source", "lang", "text", "sha256"} per line
    <index>/images/<row>.png, <index>/thumbs/<row>.jpg
    <index>/run_record.json   the model, its fingerprint and the settings; written last
"""

import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.errors import UsageError
from common.run_record import RUN_RECORD, read_run_record

INDEX_FILE = "index.faiss"
PAGES_FILE = "pages.jsonl"
QUANTIZATIONS = ("none", "int8", "binary")
ANN_TYPES = ("auto", "exact", "ivf", "hnsw")
# pages up to which `auto` searches exactly: an exact search of 100k x 2048 float32 (0.8 GB) took 30 ms a query in
# a batch of 1000 and 0.8 s alone on this shared 2-core machine at load ~7 (bench/results/ann_cpu2.md), about what a
# person notices; IVF answered in 1-4 ms there. 200k is a choice between the two, `--exact_limit` moves it
EXACT_SEARCH_LIMIT = 200_000
TRAINING_PER_LIST = 256  # k-means sample per IVF list: faiss's own cap (max_points_per_centroid)
HNSW_NEIGHBOURS = 32  # links per node (M): memory 2 x 32 x 4 bytes a vector on top of the codes
RECALL_QUERIES = 1000  # the index's own vectors searched at build time to measure recall@10 against exact search
THUMBNAIL_SIDE = 320  # pixels; a results grid shows a few across


def image_file(row: int) -> str:
    return f"images/{row:07d}.png"


def thumbnail_file(row: int) -> str:
    return f"thumbs/{row:07d}.jpg"


def fit_vectors(embeddings: np.ndarray, dim: int) -> np.ndarray:
    """The first `dim` components of each embedding, re-normalised to unit length (a Matryoshka prefix), as
    contiguous float32; `dim` 0 keeps them whole."""
    vectors = np.asarray(embeddings, dtype=np.float32)[:, : dim or None]
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.ascontiguousarray(vectors / np.maximum(norms, 1e-12))


def new_faiss_index(
    vectors: np.ndarray,
    quantize: str,
    ann: str = "exact",
    nprobe: int = 16,
    ef_search: int = 64,
    seed: int = 0,
    training_per_list: int = TRAINING_PER_LIST,
):
    """An empty index for vectors like `vectors`: inner product on float32 (`none`) or on 8-bit codes (`int8`: 1 byte
    a component, each coded uniformly between its smallest and largest value in `vectors`; documents added later
    keep that coding, a value outside it clipped), or Hamming distance on sign bits (`binary`).

    `ann` `exact` compares a query with every vector; `ivf` with the vectors of the `nprobe` k-means lists (of
    ~4 sqrt(n), trained on at most `training_per_list` vectors a list sampled from `vectors`) nearest to it;
    `hnsw` walks a neighbour graph (`ef_search` candidates). Both keep the codes `quantize` says. Vectors added
    later go to the lists trained here (no retraining: the lists stay those of the first pages) or into the
    graph."""
    import faiss

    dim = vectors.shape[1]
    if quantize == "binary":
        return faiss.IndexBinaryFlat(dim)
    if ann == "exact" and quantize == "int8":
        # per-component ranges from the data: a fixed [-1, 1] left the tiny model's pages, whose scores differ
        # by thousandths, a few codes apart (bench/index_sizes.py: 0.70 of the float top 10 kept, against 1.00)
        index = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
        index.train(vectors)
        return index
    if ann == "exact":
        return faiss.IndexFlatIP(dim)
    lists = ivf_lists(len(vectors))
    codes = {"none": "Flat", "int8": "SQ8"}[quantize]
    factory = {
        "ivf": f"IVF{lists},{codes}",
        "hnsw": f"HNSW{HNSW_NEIGHBOURS}" + (",SQ8" if quantize == "int8" else ""),
    }[ann]
    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    sample = np.random.default_rng(seed).permutation(len(vectors))[: training_per_list * lists]
    index.train(vectors[np.sort(sample)])
    if ann == "hnsw":
        index.hnsw.efSearch = ef_search
    else:
        index.nprobe = nprobe  # saved with the index: search and serve read it back
    return index


def search_kind(ann: str, pages: int, quantize: str, exact_limit: int = EXACT_SEARCH_LIMIT) -> str:
    """The search a new index of `pages` pages gets: `ann`, or for `auto` exact up to `exact_limit` pages (and
    always for binary codes) and IVF beyond."""
    if ann != "auto":
        return ann
    return "exact" if pages <= exact_limit or quantize == "binary" else "ivf"


def ivf_lists(vectors: int) -> int:
    """IVF lists for `vectors` vectors: ~4 sqrt(n) (faiss's guideline), at most one list per 39 vectors, the fewest
    points per centroid faiss trains k-means on without a warning."""
    return max(1, min(round(4 * math.sqrt(vectors)), vectors // 39))


def index_kind(index) -> str:
    """`exact`, `ivf` or `hnsw`: how a FAISS index searches."""
    import faiss

    name = type(faiss.downcast_index(index) if isinstance(index, faiss.Index) else index).__name__
    if name.startswith("IndexHNSW"):
        return "hnsw"
    if name.startswith("IndexIVF"):
        return "ivf"
    return "exact"


def search_recall(index, vectors: np.ndarray, quantize: str, k: int = 10, seed: int = 0) -> float | None:
    """recall@k of `index` against exact inner-product search over `vectors` (the vectors it holds, float32), with
    up to RECALL_QUERIES of them as queries: the share of the exact top k that the index's top k keeps. None for
    an exact index. A query finds itself in both, so the figure is a little above that of new queries."""
    import faiss

    if index_kind(index) == "exact":
        return None
    queries = vectors[np.sort(np.random.default_rng(seed).permutation(len(vectors))[:RECALL_QUERIES])]
    k = min(k, len(vectors))
    _, exact = faiss.knn(queries, vectors, k, faiss.METRIC_INNER_PRODUCT)
    _, found = search_vectors(index, queries, k, quantize)
    kept = [len(set(a.tolist()) & set(b.tolist())) for a, b in zip(exact, found)]
    return round(sum(kept) / (k * len(queries)), 4)


def stored_vectors(index) -> np.ndarray:
    """The vectors `index` holds, decoded from its codes (exact for float32 storage; 8-bit codes decode to
    approximations of what was added)."""
    import faiss

    if index_kind(index) != "ivf":
        return index.reconstruct_n(0, index.ntotal)
    lists = faiss.extract_index_ivf(index)
    lists.make_direct_map()  # the lists are not in row order: a map from row to list, for this read only
    vectors = index.reconstruct_n(0, index.ntotal)
    lists.set_direct_map_type(faiss.DirectMap.NoMap)
    return vectors


def add_vectors(index, vectors: np.ndarray, quantize: str) -> None:
    index.add(np.packbits(vectors > 0, axis=1) if quantize == "binary" else vectors)


def search_vectors(index, queries: np.ndarray, k: int, quantize: str) -> tuple[np.ndarray, np.ndarray]:
    """(scores, rows) of the top `k` pages per query, best first. Binary scores are 1 - 2 * Hamming / dim, the
    cosine of the two sign vectors, so that every quantisation gives scores on one scale."""
    k = min(k, index.ntotal)
    if quantize == "binary":
        distances, rows = index.search(np.packbits(queries > 0, axis=1), k)
        return 1.0 - 2.0 * distances.astype(np.float32) / index.d, rows
    return index.search(queries, k)


def index_bytes(index, quantize: str) -> bytes:
    import faiss

    serialize = faiss.serialize_index_binary if quantize == "binary" else faiss.serialize_index
    return serialize(index).tobytes()


def read_faiss_index(path: Path, quantize: str):
    import faiss

    data = np.frombuffer(path.read_bytes(), dtype=np.uint8)
    return faiss.deserialize_index_binary(data) if quantize == "binary" else faiss.deserialize_index(data)


def thumbnail_jpeg(png: bytes) -> bytes:
    from PIL import Image

    with Image.open(io.BytesIO(png)) as image:
        image = image.convert("RGB")
        image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
        out = io.BytesIO()
        image.save(out, format="JPEG", quality=85)
    return out.getvalue()


@dataclass
class PageIndex:
    """A finished index, loaded: its folder, run record, FAISS index and pages."""

    folder: Path
    record: dict
    faiss_index: object
    pages: list[dict]

    @property
    def settings(self) -> dict:
        return self.record["config"]["index"]

    def search(self, query_vectors: np.ndarray, k: int, lang: str | None = None) -> list[list[tuple[float, dict]]]:
        """Per query, up to `k` (score, page) best first; with `lang`, among that language's pages only (the
        exact search then ranks every page, and the filter keeps the first `k` of the language)."""
        quantize = self.settings["quantize"]
        vectors = fit_vectors(query_vectors, self.settings["dim"])
        depth = len(self.pages) if lang else k
        scores, rows = search_vectors(self.faiss_index, vectors, depth, quantize)
        results = []
        for row_scores, row_ids in zip(scores, rows):
            found = [(float(s), self.pages[r]) for s, r in zip(row_scores, row_ids) if r >= 0]
            results.append([hit for hit in found if lang is None or hit[1]["lang"] == lang][:k])
        return results


def load_index(folder: str | Path, flag: str = "--index") -> PageIndex:
    """A finished index (its run record is written last: a folder without one was cut short), or a UsageError."""
    folder = Path(folder)
    if not (folder / RUN_RECORD).is_file() or not (folder / INDEX_FILE).is_file():
        raise UsageError(
            f"{flag} {folder} is not a finished index (no {RUN_RECORD} or {INDEX_FILE}); "
            "build one with `python -m stages.index`."
        )
    record = read_run_record(folder, expected_stage="index")
    pages = [json.loads(line) for line in (folder / PAGES_FILE).read_text(encoding="utf-8").splitlines()]
    faiss_index = read_faiss_index(folder / INDEX_FILE, record["config"]["index"]["quantize"])
    if faiss_index.ntotal != len(pages):
        raise UsageError(f"{flag} {folder}: {INDEX_FILE} holds {faiss_index.ntotal} vectors for {len(pages)} pages.")
    return PageIndex(folder, record, faiss_index, pages)


def snippet(text: str, limit: int = 160) -> str:
    """The page text on one line, cut at `limit` characters."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"
