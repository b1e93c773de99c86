"""data_prep queries: each filter refuses what it should and keeps a good question; the outputs are an eval set
`stages.evaluate` scores and pairs `stages.contrast --train_files` trains on; resume equals an uninterrupted run;
bad input exits 2 before the generator is loaded."""

import importlib.util
import json
import shutil
import zlib

import datasets
import pytest

import lco.queries as queries
from common.errors import UsageError, run_cli
from common.run_record import read_run_record
from data_prep.cli import main as data_prep_main
from data_prep.evalset import evaluated_documents, page_id
from lco.contrast_data import read_jsonl_pairs
from lco.pretrain_data import evaluated_in
from lco.queries import (
    FILTERS,
    QueriesSettings,
    embedding_ranker,
    filter_candidates,
    run_queries,
    transformers_engine,
)
from lco.retrieval import load_evalset
from stages.contrast import main as contrast
from stages.evaluate import main as evaluate

from .conftest import REPO, thai_pages_dataset

TH = str(REPO / "recipes/th.yaml")
RANGES = {"en": ["0041-005A", "0061-007A"], "th": ["0E00-0E7F"]}
GENERATOR = {"path": "fake", "fingerprint": "fake"}


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    """3 Thai documents of 2 text-layer pages each (110 to 296 characters)."""
    return thai_pages_dataset(tmp_path_factory.mktemp("queries"), documents=3, chars=300)


@pytest.fixture(scope="module")
def page_texts(pages):
    rows = datasets.load_from_disk(str(pages)).select_columns(["doc_id", "page", "text"])
    return {page_id(row["doc_id"], row["page"]): row["text"] for row in rows}


def thai_question(text: str) -> str:
    """A question BM25 finds its page with, made of two short pieces of the page (no span of 40 characters)."""
    words = " ".join(text.split())
    middle = len(words) // 2
    return f"{words[:15]} {words[middle : middle + 15]} คืออะไร"


def candidate(text: str, lang: str, pid: str) -> dict:
    return {"text": text, "lang": lang, "page_id": pid}


def test_each_filter_refuses_its_case_and_a_good_question_is_kept(page_texts):
    (page, text), (other, other_text) = list(page_texts.items())[:2]
    good = thai_question(text)
    cases = {
        "good": candidate(good, "th", page),
        "good_english": candidate("Which rights does the declaration give every person at birth?", "en", page),
        "short": candidate("อะไร", "th", page),
        "wrong_script": candidate("What rights are everyone born with under the declaration?", "th", page),
        "thai_asked_in_english": candidate("สิทธิของมนุษย์ทุกคนที่เกิดมามีอะไรบ้าง", "en", page),
        "copied": candidate(text[:60], "th", page),
        "duplicate": candidate(f"  {good.replace(' ', '  ')} ?", "th", page),
        "near_duplicate": candidate(good + "บ้าง", "th", page),
        "not_retrieved": candidate(thai_question(other_text), "th", page),
    }
    settings = QueriesSettings(top_k=1)
    counts = filter_candidates(list(cases.values()), page_texts, RANGES, "th", settings)

    rejected = {name: c["rejected"] for name, c in cases.items()}
    assert rejected == {
        "good": None,
        "good_english": None,
        "short": "length",
        "wrong_script": "language",
        "thai_asked_in_english": "language",
        "copied": "copied",
        "duplicate": "duplicate",
        "near_duplicate": "near_duplicate",
        "not_retrieved": "consistency",
    }
    assert counts == {name: list(rejected.values()).count(name) for name in FILTERS}
    assert cases["good"]["checks"]["bm25_rank"] == 1
    # BM25 cannot judge an English question over Thai text: without an embedding model it is not checked
    assert "bm25_rank" not in cases["good_english"]["checks"]
    assert cases["not_retrieved"]["checks"]["bm25_rank"] is None


def test_the_embedding_model_checks_questions_in_every_language(page_texts):
    (page, _), (other, _) = list(page_texts.items())[:2]
    found = candidate("Which rights does the declaration give every person at birth?", "en", page)
    missed = candidate("Who must respect the dignity of every member of the human family?", "en", page)

    def embedding_top(questions, top_k):  # the model ranks `other` first for the second question
        return [[page, other][:top_k], [other, page][:top_k]]

    counts = filter_candidates([found, missed], page_texts, RANGES, "th", QueriesSettings(top_k=1), embedding_top)
    assert (found["rejected"], missed["rejected"]) == (None, "consistency")
    assert (found["checks"]["embedding_rank"], missed["checks"]["embedding_rank"]) == (1, None)
    assert counts["consistency"] == 1


def test_an_embedding_model_ranks_the_pages_for_the_consistency_check(pages, page_texts, tiny_model):
    from lco.embedder import Embedder

    dataset = datasets.load_from_disk(str(pages))
    questions = ["Which rights does everyone have?", "สิทธิมนุษยชนคืออะไร", "Who is free?"]
    top = embedding_ranker(str(tiny_model[2]), dataset)
    rankings = top(questions, len(page_texts))
    # the model's own scores, question by page: each ranking lists every page, best first
    embedder = Embedder(str(tiny_model[2]))
    scores = embedder.encode_texts(questions) @ embedder.encode_images(list(dataset["image"])).T
    column = {
        page_id(row["doc_id"], row["page"]): i for i, row in enumerate(dataset.select_columns(["doc_id", "page"]))
    }
    for ranking, row in zip(rankings, scores):
        assert sorted(ranking) == sorted(page_texts)
        ranked = row[[column[pid] for pid in ranking]]
        assert (ranked[:-1] >= ranked[1:] - 1e-6).all() and ranked[0] == pytest.approx(float(row.max()), abs=1e-6)
    assert top(questions[2:], 2) == [rankings[2][:2]]


def fake_engine(calls: list):
    """A generator that writes two questions per page from the context text of the prompt: a Thai one BM25
    retrieves its page with, and an English one unique to the page; and a copied sentence (refused)."""

    def generate(images, prompts, seed):
        calls.append(len(prompts))
        outputs = []
        for prompt in prompts:
            text = prompt.split("may contain errors):\n", 1)[1]
            if "questions in Thai" in prompt:
                outputs.append(f"1. {thai_question(text)}\n2. {' '.join(text.split())[:50]}")
            else:
                outputs.append(
                    f"- Which rights does article number {zlib.crc32(text.encode())} of the declaration list?"
                )
        return outputs

    return generate


def queries_settings(**overrides) -> QueriesSettings:
    settings = QueriesSettings(**{"per_page": 2, "batch_size": 3, "eval_fraction": 0.34, **overrides})
    settings.validate()
    return settings


def test_outputs_are_an_evalset_and_training_pairs_split_by_document(pages, page_texts, tmp_path):
    output, calls = tmp_path / "out", []
    manifest = run_queries(
        str(pages),
        str(output),
        queries_settings(),
        fake_engine(calls),
        languages=["en", "th"],
        ranges=RANGES,
        generator=GENERATOR,
        seed=0,
        resume=False,
    )
    counts = manifest["counts"]
    assert calls == [6, 6]  # batches of 3 pages, each page in both languages
    assert counts["candidates"] == 6 * 3 and counts["rejected"]["copied"] == 6
    assert counts["kept"] == 12 and counts["candidates"] == counts["kept"] + sum(counts["rejected"].values())

    evalset = load_evalset(str(output / "evalset"))
    eval_documents = set(manifest["split"]["eval_documents"])
    assert len(eval_documents) == 1
    assert {pid.rsplit("-p", 1)[0] for pid in evalset.pages} == eval_documents
    assert len(evalset.queries) == counts["eval_queries"] == 2 * 2
    assert all(evalset.qrels[qid] == {qid.rsplit("-", 2)[0]: 1} for qid in evalset.queries)
    written = [json.loads(line) for line in (output / "evalset/queries.jsonl").read_text().splitlines()]
    assert all(set(q["provenance"]) == {"generator", "prompt", "context_chars", "seed", "checks"} for q in written)
    assert all(q["provenance"]["prompt"].startswith("Write 2 questions in ") for q in written)
    # training leaves the eval documents out, by content
    assert evaluated_in([str(pages)], [str(output / "evalset")]).keys() == eval_documents
    assert len(evaluated_documents(output / "evalset", "--exclude_evalsets")) == 1

    pairs = read_jsonl_pairs(str(output / "train_pairs.jsonl"))
    assert len(pairs) == counts["train_pairs"] == 2 * 2 * 2 * 2  # documents, pages, questions, pairs per question
    assert sum(pair.kind == "multimodal" for pair in pairs) == 8
    train_pages = {pair.positive.image for pair in pairs if pair.positive.image}
    assert {page.rsplit("/", 1)[1].rsplit("-p", 1)[0] for page in train_pages}.isdisjoint(eval_documents)
    # every pair names the document it was cut from, by content, for training's --exclude_evalsets
    hashes = {entry["doc_id"]: entry["sha256"] for entry in json.loads((pages / "manifest.json").read_text())["inputs"]}
    for pair in pairs:
        page = (pair.positive.image or "").rsplit("/", 1)[-1].rsplit("-p", 1)[0]
        assert pair.source_sha256 in {sha for doc, sha in hashes.items() if doc not in eval_documents}
        assert not page or pair.source_sha256 == hashes[page]
    for pair in pairs:  # each passage is of the question's own page
        if pair.positive.image is None:
            assert any(pair.positive.text in " ".join(text.split()) for text in page_texts.values())
    candidates = [json.loads(line) for line in (output / "candidates.jsonl").read_text().splitlines()]
    assert len(candidates) == counts["candidates"]
    assert not (tmp_path / ".out.work").exists()


def tiny_settings(**overrides) -> QueriesSettings:
    return queries_settings(**{"max_new_tokens": 8, "batch_size": 2, **overrides})


def test_resume_gives_what_an_uninterrupted_run_gives(pages, tiny_model, tmp_path):
    # filters opened wide: the tiny model's noise must reach the eval set and the training pairs, to compare them
    settings = tiny_settings(min_chars=1, min_script_fraction=0.0, max_copied_chars=10_000, top_k=100)
    engine = transformers_engine(str(tiny_model[2]), settings)
    kwargs = dict(languages=["en", "th"], ranges=RANGES, generator=GENERATOR, seed=3)
    run_queries(str(pages), str(tmp_path / "whole"), settings, engine, resume=False, **kwargs)

    calls = []

    def interrupted(images, prompts, seed):
        calls.append(seed)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return engine(images, prompts, seed)

    with pytest.raises(KeyboardInterrupt):
        run_queries(str(pages), str(tmp_path / "resumed"), settings, interrupted, resume=False, **kwargs)
    assert not (tmp_path / "resumed").exists()
    assert len(list((tmp_path / ".resumed.work").glob("batch-*.json"))) == 2  # of 3
    with pytest.raises(UsageError, match="used other settings"):
        run_queries(str(pages), str(tmp_path / "resumed"), tiny_settings(per_page=1), engine, resume=True, **kwargs)

    calls.clear()
    counting = lambda images, prompts, seed: calls.append(seed) or engine(images, prompts, seed)  # noqa: E731
    run_queries(str(pages), str(tmp_path / "resumed"), settings, counting, resume=True, **kwargs)
    assert calls == [5]  # only the last batch (seeds: 3 + batch index)
    names = ["candidates.jsonl", "evalset/queries.jsonl", "evalset/corpus.jsonl", "evalset/qrels.tsv"]
    for name in [*names, "train_pairs.jsonl", "manifest.json"]:
        whole, resumed = (tmp_path / run / name for run in ("whole", "resumed"))
        assert whole.read_text().strip() and whole.read_text() == resumed.read_text() or name == "manifest.json", name
    # the manifests differ only in the time taken and the pages generated by this run (2 of 6 resumed)
    whole, resumed = (json.loads((tmp_path / run / "manifest.json").read_text()) for run in ("whole", "resumed"))
    assert whole["counts"].pop("pages_generated") == 6 and resumed["counts"].pop("pages_generated") == 2
    assert whole["counts"]["eval_queries"] > 0 and whole["counts"]["train_pairs"] > 0
    for manifest in (whole, resumed):
        del manifest["elapsed_s"], manifest["pages_per_s"]
    assert whole == resumed


def test_tiny_model_end_to_end_feeds_evaluate_and_contrast(pages, tiny_model, tmp_path, capsys):
    output = tmp_path / "queries"
    # the tiny model writes noise: with the filters opened wide its lines still go all the way through
    wide = ["--min_chars", "1", "--min_script_fraction", "0", "--max_copied_chars", "10000", "--top_k", "100"]
    argv = ["queries", "--config", TH, "--pages", str(pages), "--generator", str(tiny_model[2]), "--output"]
    data_prep_main([*argv, str(output), "--max_new_tokens", "16", "--batch_size", "4", "--eval_fraction", "0.5", *wide])
    manifest = json.loads((output / "manifest.json").read_text())
    counts = manifest["counts"]
    assert counts["pages"] == counts["pages_generated"] == 6 and manifest["pages_per_s"] > 0
    assert counts["candidates"] == counts["kept"] + sum(counts["rejected"].values())
    assert counts["kept"] == counts["eval_queries"] + counts["train_pairs"] // 2 > 0
    assert "data_prep queries:" in capsys.readouterr().out

    record = read_run_record(output, expected_stage="queries")
    assert str(pages / "manifest.json") in record["inputs"] and TH in record["inputs"]
    assert record["config"]["generator"]["fingerprint"] == manifest["generator"]["fingerprint"]
    assert record["config"]["languages"] == ["en", "th"]  # th.yaml sets none: English and the pages' language

    evaluate(["--config", TH, "--model", str(tiny_model[2]), "--data", str(output / "evalset")])
    assert "bm25 (page text)" in capsys.readouterr().out
    # a recipe without a contrast section: the pairs come from the flags alone
    recipe = tmp_path / "th.yaml"
    recipe.write_text("lang: th\n")
    contrast(
        [
            "--config",
            str(recipe),
            "--model_name_or_path",
            str(tiny_model[2]),
            "--train_files",
            str(output / "train_pairs.jsonl"),
            "--pages_datasets",
            str(pages),
            "--exclude_evalsets",
            str(output / "evalset"),
            "--output_dir",
            str(tmp_path / "contrast"),
            "--contrastive_batch_size",
            "2",
            "--mini_batch_size",
            "2",
            "--max_steps",
            "2",
            "--eval_fraction",
            "0",
            "--image_max_side",
            "200",
            "--max_text_tokens",
            "48",
        ]
    )
    contrast_record = read_run_record(tmp_path / "contrast" / "final", expected_stage="contrast")
    assert len(contrast_record["results"]["loss_history"]) == 2
    # the eval set's documents gave no pair built from the pages dataset either
    assert contrast_record["results"]["pairs"]["excluded_documents"] == len(manifest["split"]["eval_documents"])


def run(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(data_prep_main, argv)
    return exit_info.value.code, capsys.readouterr().err


@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the generator was loaded before the input was checked")

    monkeypatch.setattr(queries, "transformers_engine", refuse)
    monkeypatch.setattr(queries, "vllm_engine", refuse)


def bad_input_argv(pages, generator, output, *extra):
    return [
        "queries",
        "--config",
        TH,
        "--pages",
        str(pages),
        "--generator",
        str(generator),
        "--output",
        str(output),
        *extra,
    ]


def test_a_generator_that_is_not_a_chat_vlm_exits_2_before_loading(pages, tiny_model, tmp_path, capsys, no_model_load):
    text_model = tmp_path / "bert"
    text_model.mkdir()
    (text_model / "config.json").write_text(json.dumps({"model_type": "bert"}))
    code, err = run(bad_input_argv(pages, text_model, tmp_path / "out"), capsys)
    assert code == 2 and "is a `bert` model, not a vision-language one" in err

    no_chat = tmp_path / "no-chat"
    shutil.copytree(tiny_model[2], no_chat)
    (no_chat / "chat_template.jinja").unlink(missing_ok=True)
    for name in ("tokenizer_config.json", "processor_config.json"):
        config = json.loads((no_chat / name).read_text())
        config.pop("chat_template", None)
        (no_chat / name).write_text(json.dumps(config))
    code, err = run(bad_input_argv(pages, no_chat, tmp_path / "out"), capsys)
    assert code == 2 and "has no chat template" in err
    assert not (tmp_path / "out").exists()


def test_a_pages_dataset_without_images_exits_2_before_loading(tiny_model, tmp_path, capsys, no_model_load):
    folder = tmp_path / "text-pages"
    datasets.Dataset.from_list([{"doc_id": "d", "page": 1, "text": "x", "lang": "th"}]).save_to_disk(str(folder))
    (folder / "manifest.json").write_text(json.dumps({"lang": "th", "counts": {"pages": 1}, "inputs": []}))
    code, err = run(bad_input_argv(folder, tiny_model[2], tmp_path / "out"), capsys)
    assert code == 2 and "has no page images" in err


def test_a_language_without_a_recipe_exits_2_before_loading(
    pages, tiny_model, tmp_path, capsys, monkeypatch, no_model_load
):
    shutil.copy(REPO / "recipes/en.yaml", tmp_path)
    monkeypatch.setattr(queries, "RECIPES_DIR", tmp_path)  # recipes/ without lo.yaml
    code, err = run(bad_input_argv(pages, tiny_model[2], tmp_path / "out", "--languages", "en", "lo"), capsys)
    assert code == 2 and "language `lo` has no recipe" in err and "lo.yaml" in err
    code, err = run(bad_input_argv(pages, tiny_model[2], tmp_path / "out", "--languages", "xx"), capsys)
    assert code == 2 and "unknown language 'xx'" in err


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed here")
def test_vllm_when_not_installed_exits_2_before_loading(pages, tiny_model, tmp_path, capsys, no_model_load):
    code, err = run(bad_input_argv(pages, tiny_model[2], tmp_path / "out", "--engine", "vllm"), capsys)
    assert code == 2 and "vllm is not installed" in err
