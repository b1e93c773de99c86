import hashlib
import io
import json
import math
import os
import re
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from common.errors import UsageError, run_cli
from data_prep.evalset import convert_parquet_evalset
from lco.retrieval import (
    EvalSet,
    bm25_rankings,
    load_evalset,
    random_rankings,
    read_trec_run,
    score,
    search,
    write_trec_run,
)
from stages.evaluate import EvaluateArguments, model_rankings
from stages.evaluate import main as evaluate

from .conftest import REPO

TINY = str(REPO / "recipes/tiny.yaml")
LANGS = ["th", "lo", "th", "lo", "th", "lo"]
TEXTS = ["ข้าว ราคา", "ເຂົ້າ ລາຄາ", "สิทธิ มนุษย์", "ສິດທິ ມະນຸດ", "การศึกษา", "ການສຶກສາ"]


def png(color) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), color).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def seadoc(tmp_path):
    """Six pages in two languages, three English queries each relevant to one page per language."""
    folder = tmp_path / "seadoc"
    tables = {
        "corpus": [
            {
                "corpus-id": f"p{i}",
                "image": {"bytes": png((40 * i, 90, 200 - 30 * i)), "path": None},
                "text": TEXTS[i],
                "language": LANGS[i],
            }
            for i in range(6)
        ],
        "queries": [{"query-id": f"q{j}", "query": f"question {j} ข้าว", "language": "en"} for j in range(3)],
        "qrels": [{"query-id": f"q{j}", "corpus-id": f"p{2 * j + k}", "score": 1} for j in range(3) for k in range(2)],
    }
    for name, rows in tables.items():
        (folder / name).mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist(rows), folder / name / "test-00000.parquet")
    return folder


def toy_evalset() -> EvalSet:
    pages = {f"d{i}": {"image": b"", "text": "", "lang": "xx"} for i in range(1, 6)}
    queries = {"q1": {"text": "a", "lang": "en"}, "q2": {"text": "b", "lang": "en"}}
    return EvalSet(pages, queries, {"q1": {"d1": 1}, "q2": {"d2": 1, "d3": 1}})


def test_metrics_equal_hand_computed_values():
    run = {"q1": {"d4": 0.9, "d1": 0.8, "d5": 0.1}, "q2": {"d2": 0.9, "d4": 0.8, "d3": 0.7}}
    metrics = score(run, toy_evalset())
    # q1: relevant at rank 2. q2: relevant at ranks 1 and 3
    ndcg10_q1 = 1 / math.log2(3)
    ndcg10_q2 = (1 + 1 / math.log2(4)) / (1 + 1 / math.log2(3))
    assert metrics["ndcg@10"] == pytest.approx((ndcg10_q1 + ndcg10_q2) / 2, abs=1e-4)
    assert metrics["ndcg@1"] == pytest.approx(0.5, abs=1e-4)
    assert metrics["recall@1"] == pytest.approx((0 + 0.5) / 2, abs=1e-4)
    assert metrics["recall@5"] == 1.0
    assert metrics["mrr@10"] == pytest.approx((0.5 + 1) / 2, abs=1e-4)
    assert metrics["map"] == pytest.approx((0.5 + (1 + 2 / 3) / 2) / 2, abs=1e-4)
    assert metrics["queries"] == 2


def test_a_query_the_run_does_not_rank_scores_zero():
    metrics = score({"q2": {"d2": 1.0, "d3": 0.5}}, toy_evalset())
    assert metrics["ndcg@10"] == pytest.approx(0.5, abs=1e-4) and metrics["recall@100"] == 0.5


def test_an_oracle_encoder_scores_one(seadoc):
    evalset = load_evalset(str(seadoc))
    page_ids, query_ids = list(evalset.pages), list(evalset.queries)
    pages = torch.eye(len(page_ids))
    queries = torch.stack([pages[[page_ids.index(p) for p in evalset.qrels[q]]].sum(0) for q in query_ids])
    metrics = score(search(queries, pages, page_ids, query_ids), evalset)
    assert metrics["ndcg@10"] == metrics["recall@10"] == metrics["mrr@10"] == metrics["map"] == 1.0
    faiss_run = search(queries, pages, page_ids, query_ids, use_faiss=True)
    assert score(faiss_run, evalset) == metrics


def test_a_trec_run_file_scores_like_the_same_ranking_internally(seadoc, tmp_path):
    evalset = load_evalset(str(seadoc))
    internal = random_rankings(evalset, seed=3)
    write_trec_run(internal, tmp_path / "run.trec", "random")
    assert score(read_trec_run(str(tmp_path / "run.trec")), evalset) == score(internal, evalset)


def test_seadoc_and_beir_layouts_give_the_same_scores(seadoc, tmp_path):
    convert_parquet_evalset(str(seadoc), str(tmp_path / "beir"))
    parquet, beir = load_evalset(str(seadoc)), load_evalset(str(tmp_path / "beir"))
    assert parquet.qrels == beir.qrels and parquet.queries == beir.queries
    for name in ("all", "th", "lo"):
        assert score(bm25_rankings(parquet.tasks()[name]), parquet.tasks()[name]) == score(
            bm25_rankings(beir.tasks()[name]), beir.tasks()[name]
        )


def test_per_language_tasks_search_each_languages_pages_only(seadoc):
    tasks = load_evalset(str(seadoc)).tasks()
    assert set(tasks) == {"all", "th", "lo"}
    assert set(tasks["th"].pages) == {"p0", "p2", "p4"} and tasks["th"].qrels["q1"] == {"p2": 1}


def test_bm25_finds_the_page_sharing_the_query_words(seadoc):
    evalset = load_evalset(str(seadoc))
    assert next(iter(bm25_rankings(evalset)["q0"])) == "p0"  # "ข้าว" is only on p0 among the Thai pages


def test_scores_do_not_depend_on_the_batch_size(tiny_model, seadoc, tmp_path):
    evalset = load_evalset(str(seadoc))
    tasks = evalset.tasks()
    runs = []
    for batch_size in (1, 4):
        args = EvaluateArguments(
            batch_size=batch_size, cache_dir=str(tmp_path / f"cache{batch_size}"), image_max_side=64
        )
        runs.append(model_rankings(str(tiny_model[2]), evalset, tasks, args)[0])
    for name, task in tasks.items():
        assert score(runs[0][name], task) == score(runs[1][name], task)
        for query_id in task.queries:
            assert list(runs[0][name][query_id]) == list(runs[1][name][query_id])
            assert list(runs[0][name][query_id].values()) == pytest.approx(
                list(runs[1][name][query_id].values()), abs=1e-5
            )


def test_bad_eval_folders_list_their_problems(tmp_path):
    folder = tmp_path / "eval"
    folder.mkdir()
    (folder / "corpus.jsonl").write_text(
        "".join(json.dumps({"_id": f"p{i}", "image": f"images/p{i}.png"}) + "\n" for i in range(3)), encoding="utf-8"
    )
    (folder / "queries.jsonl").write_text(json.dumps({"_id": "q1", "text": " "}) + "\n", encoding="utf-8")
    (folder / "qrels.tsv").write_text("query-id\tcorpus-id\tscore\nq1\tp9\t1\nq7\tp0\t1\n", encoding="utf-8")
    with pytest.raises(UsageError) as error:
        load_evalset(str(folder))
    message = str(error.value)
    assert "3 pages without an image file (p0, p1, p2)" in message
    assert "1 empty queries (q1)" in message
    assert "1 unknown query ids (q7)" in message and "1 unknown page ids (p9)" in message


def test_evaluate_command_writes_json_table_report_and_reuses_embeddings(tiny_model, seadoc, tmp_path, capsys):
    argv = [
        "--config",
        TINY,
        "--model",
        str(tiny_model[2]),
        "--data",
        str(seadoc),
        "--cache_dir",
        str(tmp_path / "cache"),
        "--image_max_side",
        "64",
    ]
    evaluate([*argv, "--output", str(tmp_path / "results.json"), "--report", str(tmp_path / "report")])
    out = capsys.readouterr().out
    assert "| system | nDCG@5 | nDCG@10 |" in out and "| random |" in out and "| bm25 (page text) |" in out
    results = json.loads((tmp_path / "results.json").read_text())
    model_result = results["results"][str(tiny_model[2])]
    assert set(model_result) == {"all", "lo", "th"} and model_result["all"]["queries"] == 3
    html = (tmp_path / "report" / "index.html").read_text()
    assert html.count('<div class="query') == 3 and html.count("<figure") == 15

    evaluate(argv)
    assert "embeddings from the cache" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        run_cli(evaluate, [*argv, "--output", str(tmp_path / "results.json")])
    assert "already exists" in capsys.readouterr().err


def test_report_gives_page_ids_that_sanitise_alike_their_own_thumbnails(tmp_path):
    """`a/b` and `a_b` both become `a_b` as file names; each must still show its own page."""
    from lco.report import write_report

    def png(colour: str) -> bytes:
        buffer = io.BytesIO()
        Image.new("RGB", (40, 40), colour).save(buffer, format="PNG")
        return buffer.getvalue()

    pages = {
        "a/b": {"image": png("red"), "text": "", "lang": "en"},
        "a_b": {"image": png("blue"), "text": "", "lang": "en"},
    }
    evalset = EvalSet(pages, {"q": {"text": "query", "lang": "en"}}, {"q": {"a/b": 1}})
    write_report(str(tmp_path / "report"), evalset, {"model": {"q": {"a/b": 0.9, "a_b": 0.5}}}, queries=1, seed=0)

    html = (tmp_path / "report" / "index.html").read_text()
    sources = re.findall(r'<img src="pages/([^"]+)" alt="([^"]+)"', html)
    colours = {
        alt: Image.open(tmp_path / "report" / "pages" / name).convert("RGB").getpixel((5, 5)) for name, alt in sources
    }
    assert colours["a/b"][0] > 200 and colours["a/b"][2] < 50  # red
    assert colours["a_b"][2] > 200 and colours["a_b"][0] < 50  # blue


def test_evaluate_writes_a_run_record_beside_its_results(tiny_model, seadoc, tmp_path):
    output = tmp_path / "results.json"
    evaluate(["--config", TINY, "--model", str(tiny_model[2]), "--data", str(seadoc), "--output", str(output)]
             + ["--cache_dir", str(tmp_path / "cache"), "--image_max_side", "64"])  # fmt: skip

    record = json.loads((tmp_path / "results.run_record.json").read_text())
    assert record["stage"] == "evaluate" and record["git"]["commit"] and record["packages"]["torch"]
    assert record["argv"][0] == "python" and record["seed"] == 42
    assert set(record["inputs"]) == {TINY, *map(str, seadoc.rglob("*.parquet"))}  # the parquet configs
    assert record["results"]["results_sha256"] == hashlib.sha256(output.read_bytes()).hexdigest()
    model = record["results"]["models"][str(tiny_model[2])]
    assert model["fingerprint"] == json.loads(output.read_text())["models"][str(tiny_model[2])]["fingerprint"]


def test_evaluate_reports_intervals_and_paired_tests_in_json_table_and_report(tiny_model, seadoc, tmp_path, capsys):
    write_trec_run(random_rankings(load_evalset(str(seadoc)), seed=7), tmp_path / "other.trec", "other")
    output = tmp_path / "results.json"
    evaluate(["--config", TINY, "--model", str(tiny_model[2]), "--data", str(seadoc), "--output", str(output)]
             + ["--run", str(tmp_path / "other.trec"), "--report", str(tmp_path / "report")]
             + ["--cache_dir", str(tmp_path / "cache"), "--image_max_side", "64"])  # fmt: skip
    out = capsys.readouterr().out

    results = json.loads(output.read_text())
    model, run = str(tiny_model[2]), "run other.trec"
    for system in (model, run, "bm25 (page text)", "random"):
        low, high = results["intervals"][system]["all"]["ndcg@10"]
        assert low <= results["results"][system]["all"]["ndcg@10"] <= high
        assert set(results["intervals"][system]) == {"all", "th", "lo"}
    # the two contenders each against random and BM25, then against each other: one Holm family of five
    pairs = [(c["system"], c["baseline"]) for c in results["comparisons"]]
    bm25 = "bm25 (page text)"
    assert pairs == [(run, "random"), (model, "random"), (run, bm25), (model, bm25), (run, model)]
    for comparison in results["comparisons"]:
        assert 0 < comparison["p_value"] <= comparison["p_holm"] <= 1
        a, b = (results["results"][name]["all"]["ndcg@10"] for name in (comparison["system"], comparison["baseline"]))
        assert comparison["difference"] == pytest.approx(a - b, abs=1e-3)
    low, high = results["intervals"]["random"]["all"]["ndcg@10"]
    assert f"| {results['results']['random']['all']['ndcg@10']:.3f} [{low:.3f}, {high:.3f}] |" in out
    assert "| system | against | nDCG@10 difference | p | p (Holm) |" in out and f"| {run} | {model} |" in out
    html = (tmp_path / "report" / "index.html").read_text()
    assert "<th>p (Holm)</th>" in html and html.count("<tr") == 1 + 4 + 1 + 5  # headers, 4 systems, 5 tests


def test_pages_are_decoded_batch_by_batch_not_all_before_encoding(tiny_model, seadoc, tmp_path, monkeypatch):
    """Memory must not grow with the corpus: when the first batch is encoded, only its pages have been decoded."""
    from lco.embedder import EmbeddingModel
    from lco.retrieval import EvalSet

    evalset = load_evalset(str(seadoc))
    opened, opened_at_forward = [], []
    open_image, forward = EvalSet.open_image, EmbeddingModel.forward
    monkeypatch.setattr(EvalSet, "open_image", lambda self, pid: opened.append(pid) or open_image(self, pid))
    monkeypatch.setattr(
        EmbeddingModel, "forward", lambda self, **kw: opened_at_forward.append(len(opened)) or forward(self, **kw)
    )
    args = EvaluateArguments(batch_size=2, cache_dir=str(tmp_path / "cache"), image_max_side=64)
    model_rankings(str(tiny_model[2]), evalset, evalset.tasks(), args)
    assert len(evalset.pages) > 2 and opened_at_forward[0] == 2


def test_a_model_trained_on_evaluated_documents_is_warned_about_and_recorded(tiny_model, tmp_path, capsys):
    import shutil

    from common.run_record import write_run_record
    from data_prep.evalset import build_evalset

    from .conftest import thai_pages_dataset

    pages = thai_pages_dataset(tmp_path, documents=2, chars=120, bookmarks=True)
    build_evalset([str(pages)], str(tmp_path / "eval"), parallel_source=None, parallel_lang="en", outline_level=1)
    trained_on = json.loads((pages / "manifest.json").read_text())["inputs"][0]["sha256"]
    models = {}
    for name, documents, unsourced in (("clean", ["0" * 64], 0), ("leaky", [trained_on], 0), ("unsourced", [], 5)):
        models[name] = tmp_path / name
        shutil.copytree(tiny_model[2], models[name])
        results = {"training_documents": documents, "pairs": {"unsourced_pairs": unsourced}}
        write_run_record(models[name], stage="contrast", config={}, seed=0, results=results)
    output = tmp_path / "results.json"
    evaluate(["--config", TINY, "--model", *map(str, models.values()), "--data", str(tmp_path / "eval"),
              "--output", str(output), "--cache_dir", str(tmp_path / "cache"), "--image_max_side", "64"])  # fmt: skip
    out = capsys.readouterr().out
    assert f"WARNING: {models['leaky']} was trained on 1 of the 2 documents" in out and "clean was trained" not in out
    assert f"{models['unsourced']} was trained on 5 pairs that name no source document" in out
    assert out.count("name no source document") == 1
    results = json.loads(output.read_text())
    assert results["trained_on_evaluated_documents"] == {
        str(folder): int(name == "leaky") for name, folder in models.items()
    }
    assert results["unchecked_training_pairs"] == {
        str(folder): 5 * (name == "unsourced") for name, folder in models.items()
    }


def test_pages_are_embedded_at_the_pixel_budget_the_model_was_pretrained_at(tiny_model, tmp_path, monkeypatch):
    """Not at a 700-px thumbnail that can hide what pretraining at a larger budget taught."""
    import shutil

    from common.run_record import write_run_record
    from lco.embedder import EmbeddingModel

    folder = tmp_path / "eval"
    (folder / "images").mkdir(parents=True)
    Image.new("RGB", (800, 1000), "white").save(folder / "images" / "p0.png")
    (folder / "corpus.jsonl").write_text(json.dumps({"_id": "p0", "image": "images/p0.png", "text": "x", "lang": "th"}))
    (folder / "queries.jsonl").write_text(json.dumps({"_id": "q0", "text": "x", "lang": "en"}))
    (folder / "qrels.tsv").write_text("query-id\tcorpus-id\tscore\nq0\tp0\t1\n")
    pretrained = tmp_path / "pretrained"  # a model whose run-record chain says it was pretrained at 150,000 pixels
    shutil.copytree(tiny_model[2], pretrained)
    write_run_record(pretrained, stage="pretrain", config={"pretrain": {"max_pixels": 150_000}}, seed=0)

    pixels = []
    forward = EmbeddingModel.forward

    def recording_forward(self, **inputs):
        if "image_grid_thw" in inputs:  # patches of 14 x 14 pixels
            pixels.append(int(inputs["image_grid_thw"].prod(dim=1).sum()) * 14 * 14)
        return forward(self, **inputs)

    monkeypatch.setattr(EmbeddingModel, "forward", recording_forward)
    evalset = load_evalset(str(folder))
    # a plain model gets Qwen2.5-VL's budget, which the tiny model's own processor caps at 200,704 (448 x 448)
    for model, budget, expected in ((pretrained, 150_000, 150_000), (tiny_model[2], 1003520, 200_704)):
        pixels.clear()
        results = model_rankings(str(model), evalset, evalset.tasks(), EvaluateArguments(cache_dir=str(tmp_path / "c")))
        assert 0.8 * expected <= pixels[0] <= expected and results[1]["max_pixels"] == budget


def test_two_processes_encode_shares_and_score_as_one(tiny_model, seadoc, tmp_path):
    """torchrun with 2 processes: each encodes half the pages and queries (3 and 1-2 here, uneven), rank 0 scores;
    the embeddings and every metric equal a 1-process run's."""

    def run(processes: int, name: str) -> dict:
        launcher = ["-m", "torch.distributed.run", "--nproc_per_node", str(processes)] if processes > 1 else []
        argv = ["--config", TINY, "--model", str(tiny_model[2]), "--data", str(seadoc), "--batch_size", "2"]
        argv += ["--output", str(tmp_path / f"{name}.json"), "--cache_dir", str(tmp_path / f"cache-{name}")]
        result = subprocess.run(
            [sys.executable, *launcher, "-m", "stages.evaluate", *argv],
            capture_output=True, text=True, timeout=600, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        return {"stdout": result.stdout, **json.loads((tmp_path / f"{name}.json").read_text())}

    one, two = run(1, "one"), run(2, "two")
    assert two["stdout"].count("| system |") == one["stdout"].count("| system |")  # rank 0 alone prints
    assert two["results"] == one["results"]  # rounded to 4 decimals, as written
    assert two["intervals"] == one["intervals"] and two["comparisons"] == one["comparisons"]
    assert one["comparisons"] and one["intervals"]
    cached = {name: sorted((tmp_path / f"cache-{name}").glob("*.pt")) for name in ("one", "two")}
    assert [path.name for path in cached["one"]] == [path.name for path in cached["two"]] and len(cached["one"]) == 2
    for a, b in zip(cached["one"], cached["two"]):
        torch.testing.assert_close(torch.load(b), torch.load(a), rtol=1e-5, atol=1e-6)
