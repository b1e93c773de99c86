"""stages.index and stages.search on the tiny model: the scores stages.evaluate gives, --add equal to indexing
everything at once, refusal of another model or settings, quantised and truncated vectors, resume after a kill."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from common.errors import UsageError
from common.recipe import parse_stage_arguments
from lco.index import (
    PAGES_FILE,
    fit_vectors,
    index_bytes,
    index_kind,
    load_index,
    new_faiss_index,
    read_faiss_index,
    search_recall,
    search_vectors,
)
from stages.evaluate import EvaluateArguments, model_rankings
from stages.index import main as index
from stages.search import main as search

from .conftest import REPO, thai_pages_dataset

TINY = str(REPO / "recipes/tiny.yaml")


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """Two pages datasets of other documents (2 and 3 two-page PDFs), the first with bookmarks for an eval set."""
    first, second = tmp_path_factory.mktemp("first"), tmp_path_factory.mktemp("second")
    return thai_pages_dataset(first, 2, 300, bookmarks=True), thai_pages_dataset(second, 3, 200)


def build(model, inputs, output, *flags):
    index(["--model", str(model), "--config", TINY, "--input", *map(str, inputs), "--output", str(output), *flags])


def vectors_of(folder):
    loaded = load_index(folder)
    return loaded.faiss_index.reconstruct_n(0, loaded.faiss_index.ntotal), loaded.pages


def test_search_gives_the_scores_of_stages_evaluate(tiny_model, datasets, tmp_path, capsys):
    from data_prep.cli import main as data_prep
    from lco.retrieval import load_evalset

    model = tiny_model[2]
    data_prep(["evalset", "--lang", "th", "--pages", str(datasets[0]), "--output", str(tmp_path / "evalset")])
    evalset = load_evalset(str(tmp_path / "evalset"))
    _, args = parse_stage_arguments("evaluate", (EvaluateArguments,), ["--config", TINY])
    args.cache_dir = str(tmp_path / "cache")
    runs, _ = model_rankings(str(model), evalset, evalset.tasks(), args)
    build(model, [datasets[0]], tmp_path / "index")
    capsys.readouterr()
    for query_id, query in evalset.queries.items():
        search(["--index", str(tmp_path / "index"), query["text"], "--k", "100", "--json"])
        found = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        scores = {f"{hit['doc_id']}-p{hit['page']}": hit["score"] for hit in found}
        expected = runs["all"][query_id]
        assert scores.keys() == expected.keys() and len(scores) == len(evalset.pages)
        for page_id, score in expected.items():
            assert scores[page_id] == pytest.approx(score, abs=1e-5)
        assert [hit["rank"] for hit in found] == list(range(1, len(found) + 1))
        assert [hit["score"] for hit in found] == sorted((hit["score"] for hit in found), reverse=True)


def test_add_equals_indexing_everything_at_once_and_skips_indexed_documents(tiny_model, datasets, tmp_path, capsys):
    model = tiny_model[2]
    build(model, datasets, tmp_path / "once")
    build(model, [datasets[0]], tmp_path / "added")
    build(model, [datasets[0], datasets[1]], tmp_path / "added", "--add")  # the first dataset's documents: skipped
    assert "index: 6 pages added (3 documents), 10 in all" in capsys.readouterr().out
    once, added = vectors_of(tmp_path / "once"), vectors_of(tmp_path / "added")
    assert once[1] == added[1] and len(once[1]) == 10
    np.testing.assert_allclose(once[0], added[0], atol=1e-6)
    build(model, [datasets[1]], tmp_path / "added", "--add")
    assert "nothing new to index" in capsys.readouterr().out
    assert vectors_of(tmp_path / "added")[1] == once[1]
    pages = [json.loads(line) for line in (tmp_path / "added" / PAGES_FILE).read_text(encoding="utf-8").splitlines()]
    assert all((tmp_path / "added" / "thumbs" / f"{page['row']:07d}.jpg").is_file() for page in pages)


def test_an_index_refuses_another_model_or_settings(tiny_model, recorded_base, datasets, tmp_path):
    build(tiny_model[2], [datasets[0]], tmp_path / "index")
    before = (tmp_path / "index" / "run_record.json").read_bytes()
    with pytest.raises(UsageError, match="another model or settings \\(model_fingerprint"):
        build(recorded_base, [datasets[1]], tmp_path / "index", "--add")
    with pytest.raises(UsageError, match="dim 0 here, 32 now"):
        build(tiny_model[2], [datasets[1]], tmp_path / "index", "--add", "--dim", "32")
    with pytest.raises(UsageError, match="already exists; pass --add"):
        build(tiny_model[2], [datasets[1]], tmp_path / "index")
    assert (tmp_path / "index" / "run_record.json").read_bytes() == before


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--quantize", "float16"], "--quantize must be one of"),
        (["--dim", "100000"], "--dim 100000"),
        (["--quantize", "binary", "--dim", "12"], "multiple of 8"),
        (["--ann", "ivfpq"], "--ann must be one of"),
        (["--ann", "hnsw", "--quantize", "binary"], "binary codes are searched exactly"),
        (["--ann", "ivf", "--nprobe", "0"], "--nprobe must be at least 1"),
    ],
)
def test_bad_flags_are_refused_before_any_work(tiny_model, datasets, tmp_path, flags, message):
    with pytest.raises(UsageError, match=message):
        build(tiny_model[2], [datasets[0]], tmp_path / "index", *flags)
    assert not (tmp_path / "index").exists()


def test_truncated_and_quantised_vectors(tiny_model, datasets, tmp_path):
    build(tiny_model[2], [datasets[0]], tmp_path / "full")
    full, _ = vectors_of(tmp_path / "full")
    build(tiny_model[2], [datasets[0]], tmp_path / "small", "--dim", "16", "--quantize", "int8")
    small = load_index(tmp_path / "small")
    expected = fit_vectors(full, 16)
    np.testing.assert_allclose(np.linalg.norm(expected, axis=1), 1.0, rtol=1e-5)
    # 8-bit codes spread over each component's range: within half a step (range / 255 / 2) of the float value
    step = (expected.max(axis=0) - expected.min(axis=0)) / 255
    error = np.abs(small.faiss_index.reconstruct_n(0, len(small.pages)) - expected)
    assert (error <= step / 2 + 1e-6).all()
    build(tiny_model[2], [datasets[0]], tmp_path / "binary", "--dim", "16", "--quantize", "binary")
    binary = load_index(tmp_path / "binary")
    assert binary.record["results"]["index_bytes_per_page"] < small.record["results"]["index_bytes_per_page"]


def test_binary_scores_are_the_cosine_of_sign_vectors():
    vectors = fit_vectors(np.array([[1.0, -2, 3, -4, 5, -6, 7, -8], [1, 1, 1, 1, 1, 1, 1, 1]]), 0)
    index = new_faiss_index(vectors, "binary")
    index.add(np.packbits(vectors > 0, axis=1))
    scores, rows = search_vectors(index, vectors[:1], 2, "binary")
    signs = np.sign(vectors)
    assert rows.tolist() == [[0, 1]]
    np.testing.assert_allclose(scores[0], signs @ signs[0] / 8)


@pytest.mark.slow
def test_resume_after_a_kill_equals_an_uninterrupted_run(tiny_model, datasets, tmp_path):
    from .test_kill_resume import run

    argv = ["stages.index", "--model", str(tiny_model[2]), "--config", TINY, "--input", *map(str, datasets)]
    argv += ["--chunk_pages", "2"]
    assert not run([*argv, "--output", str(tmp_path / "whole")])  # exited 0
    work = tmp_path / ".killed.work"
    killed = run(
        [*argv, "--output", str(tmp_path / "killed")],
        kill_after=0,  # as soon as two chunks are saved
        kill_when=lambda: len(list(work.glob("chunk-*.npy"))) >= 2,
    )
    assert killed
    assert not (tmp_path / "killed").exists()  # nothing that looks like an index
    with pytest.raises(UsageError, match="not a finished index"):
        load_index(tmp_path / "killed")
    resumed = subprocess.run(
        [sys.executable, "-m", *argv, "--output", str(tmp_path / "killed"), "--resume"], cwd=REPO, capture_output=True
    )
    code, out, err = resumed.returncode, resumed.stdout.decode(), resumed.stderr.decode()
    assert code == 0, err[-2000:]
    assert "resuming:" in out and "of 10 pages already encoded" in out
    whole, resumed = vectors_of(tmp_path / "whole"), vectors_of(tmp_path / "killed")
    assert whole[1] == resumed[1]
    np.testing.assert_allclose(whole[0], resumed[0], atol=1e-6)
    assert not work.exists()
    shutil.rmtree(tmp_path / "killed")


def test_two_processes_encode_shares_and_index_as_one(tiny_model, datasets, tmp_path):
    """torchrun with 2 processes: each encodes half of every chunk (chunks of 4, 4 and 2 pages), rank 0 alone saves
    the chunks, writes the index and prints; the vectors and the search results equal a 1-process run's."""

    def run(processes: int, name: str) -> str:
        launcher = ["-m", "torch.distributed.run", "--nproc_per_node", str(processes)] if processes > 1 else []
        argv = ["--model", str(tiny_model[2]), "--config", TINY, "--input", *map(str, datasets)]
        argv += ["--output", str(tmp_path / name), "--chunk_pages", "4", "--batch_size", "2"]
        result = subprocess.run(
            [sys.executable, *launcher, "-m", "stages.index", *argv],
            capture_output=True, text=True, timeout=600, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stdout

    one, two = run(1, "one"), run(2, "two")
    assert two.count("pages added") == one.count("pages added") == 1  # rank 0 alone prints
    single, sharded = vectors_of(tmp_path / "one"), vectors_of(tmp_path / "two")
    assert single[1] == sharded[1] and len(single[1]) == 10
    np.testing.assert_allclose(sharded[0], single[0], atol=1e-6)
    queries = single[0][[0, 5]]
    assert [[hit[1]["row"] for hit in hits] for hits in load_index(tmp_path / "two").search(queries, 5)] == [
        [hit[1]["row"] for hit in hits] for hits in load_index(tmp_path / "one").search(queries, 5)
    ]
    assert not list(tmp_path.glob(".*"))  # no work or temporary folder left by either process


def test_pdfs_are_read_with_the_recipes_settings_and_known_by_content(tiny_model, datasets, tmp_path, capsys):
    pdfs = datasets[0].parent  # the PDFs the first pages dataset was made from
    build(tiny_model[2], [pdfs], tmp_path / "index", "--lang", "th")
    built = load_index(tmp_path / "index")
    dataset_pages = vectors_of_pages(datasets[0])
    assert [(page["doc_id"], page["page"], page["lang"]) for page in built.pages] == dataset_pages
    assert built.record["config"]["recipe"]["config"] == TINY
    capsys.readouterr()
    build(tiny_model[2], [datasets[0]], tmp_path / "index", "--add", "--lang", "th")
    assert "nothing new to index" in capsys.readouterr().out
    assert not list(tmp_path.glob(".index.*"))  # no work or temporary folder left


def vectors_of_pages(folder):
    import datasets as hf

    rows = hf.load_from_disk(str(folder)).select_columns(["doc_id", "page", "lang"])
    return [(row["doc_id"], row["page"], row["lang"]) for row in rows]


def test_the_recipe_comes_from_the_models_run_record(recorded_base, datasets, tmp_path):
    index(["--model", str(recorded_base), "--input", str(datasets[0]), "--output", str(tmp_path / "index")])
    assert load_index(tmp_path / "index").record["config"]["recipe"]["config"] == TINY


def test_overwrite_replaces_the_index_once_the_new_one_is_complete(tiny_model, datasets, tmp_path):
    build(tiny_model[2], [datasets[0]], tmp_path / "index")
    build(tiny_model[2], [datasets[1]], tmp_path / "index", "--overwrite", "--quantize", "binary")
    replaced = load_index(tmp_path / "index")
    assert replaced.settings["quantize"] == "binary" and len(replaced.pages) == 6
    assert {page["source"] for page in replaced.pages} <= {str(path) for path in datasets[1].parent.glob("*.pdf")}


def clustered(count: int, dim: int = 64, seed: int = 0) -> np.ndarray:
    """Unit vectors around 50 centres: clustered as page embeddings are (uniform noise has no neighbours to find)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((50, dim), dtype=np.float32)
    vectors = centres[rng.integers(50, size=count)] + 0.5 * rng.standard_normal((count, dim), dtype=np.float32)
    return fit_vectors(vectors, 0)


@pytest.mark.parametrize("ann, quantize", [("ivf", "none"), ("ivf", "int8"), ("hnsw", "none"), ("hnsw", "int8")])
def test_approximate_indexes_find_the_exact_top_10_and_survive_a_round_trip(ann, quantize, tmp_path):
    vectors = clustered(5000)
    index = new_faiss_index(vectors, quantize, ann, nprobe=8, ef_search=64)
    index.add(vectors)
    assert index_kind(index) == ann
    # 128 lists (5000 // 39), 8 searched; measured 1.0, 0.985, 1.0, 0.973 here: the bound leaves room for other BLAS
    assert search_recall(index, vectors, quantize) >= 0.9
    assert search_recall(new_faiss_index(vectors, quantize), vectors, quantize) is None  # exact: nothing lost
    (tmp_path / "index.faiss").write_bytes(index_bytes(index, quantize))
    loaded = read_faiss_index(tmp_path / "index.faiss", quantize)
    queries = clustered(20, seed=1)
    np.testing.assert_array_equal(search_vectors(loaded, queries, 10, quantize)[1], index.search(queries, 10)[1])


def test_an_ivf_index_is_built_searched_and_added_to(tiny_model, datasets, tmp_path, capsys):
    """--ann auto past --exact_limit builds IVF lists, search and serve read it, --add goes into the trained lists;
    on the tiny index (10 pages, one list) every search is exact, so it ranks as the exact index."""
    model = tiny_model[2]
    build(model, datasets, tmp_path / "exact")
    build(model, [datasets[0]], tmp_path / "ivf", "--exact_limit", "3", "--nprobe", "4")
    build(model, [datasets[1]], tmp_path / "ivf", "--add", "--exact_limit", "3", "--nprobe", "4")
    out = capsys.readouterr().out
    assert "index: exact search\n" in out and "ivf search (nprobe 4): recall@10 1.0 against exact search" in out
    exact, ivf = load_index(tmp_path / "exact"), load_index(tmp_path / "ivf")
    assert index_kind(ivf.faiss_index) == "ivf" and ivf.record["results"]["search"] == "ivf"
    assert ivf.record["results"]["recall_at_10"] == 1.0 and exact.record["results"]["recall_at_10"] is None
    assert ivf.faiss_index.nprobe == 4 and ivf.pages == exact.pages
    search(["--index", str(tmp_path / "ivf"), "สิทธิ", "--k", "5", "--json"])
    found = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    search(["--index", str(tmp_path / "exact"), "สิทธิ", "--k", "5", "--json"])
    expected = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(hit["doc_id"], hit["page"]) for hit in found] == [(hit["doc_id"], hit["page"]) for hit in expected]
    for hit, want in zip(found, expected):
        assert hit["score"] == pytest.approx(want["score"], abs=1e-5)
    from fastapi.testclient import TestClient

    from stages.serve import create_app

    served = TestClient(create_app(ivf)).get("/search", params={"q": "สิทธิ", "k": 5}).json()["results"]
    assert [(hit["doc_id"], hit["page"]) for hit in served] == [(hit["doc_id"], hit["page"]) for hit in expected]
