import io
import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from data_prep.evalset import convert_parquet_evalset
from stages.errors import UsageError, run_cli
from stages.evaluate import EvaluateArguments, model_rankings
from stages.evaluate import main as evaluate
from stages.retrieval import EvalSet, bm25_rankings, load_evalset, random_rankings, read_trec_run, score, search, write_trec_run

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
        "corpus": [{"corpus-id": f"p{i}", "image": {"bytes": png((40 * i, 90, 200 - 30 * i)), "path": None},
                    "text": TEXTS[i], "language": LANGS[i]} for i in range(6)],
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
        assert score(bm25_rankings(parquet.tasks()[name]), parquet.tasks()[name]) == score(bm25_rankings(beir.tasks()[name]), beir.tasks()[name])


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
        args = EvaluateArguments(batch_size=batch_size, cache_dir=str(tmp_path / f"cache{batch_size}"), image_max_side=64)
        runs.append(model_rankings(str(tiny_model[2]), evalset, tasks, args)[0])
    for name, task in tasks.items():
        assert score(runs[0][name], task) == score(runs[1][name], task)
        for query_id in task.queries:
            assert list(runs[0][name][query_id]) == list(runs[1][name][query_id])
            assert list(runs[0][name][query_id].values()) == pytest.approx(list(runs[1][name][query_id].values()), abs=1e-5)


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
    argv = ["--config", TINY, "--model", str(tiny_model[2]), "--data", str(seadoc), "--cache_dir", str(tmp_path / "cache"),
            "--image_max_side", "64"]
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
