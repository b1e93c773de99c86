import json
import shlex
import shutil
import unicodedata

import pytest
import yaml

from common.run_record import read_run_record, verify_chain
from stages.index import main as index_main
from stages.pipeline import main as run_pipeline
from stages.pipeline import write_parts
from stages.search import main as search_main

from .conftest import REPO

LANGUAGES = {"en", "th", "lo", "km", "my", "vi", "id", "ms", "tl"}


def test_embedded_default_runs_what_exists_and_reuses_it(tmp_path, monkeypatch, capsys):
    shutil.copytree(REPO / "recipes", tmp_path / "recipes")
    recipe = yaml.safe_load((tmp_path / "recipes/tiny.yaml").read_text())
    recipe["pretrain"] |= {"max_steps": 4, "eval_steps": 2, "save_steps": 2, "cer_pages": 1, "max_length": 400}
    recipe["contrast"] |= {"max_steps": 2, "eval_steps": 0}
    (tmp_path / "recipes/tiny.yaml").write_text(yaml.safe_dump(recipe, allow_unicode=True))
    shutil.copytree(REPO / "samples", tmp_path / "samples")
    monkeypatch.chdir(tmp_path)

    argv = ["--config", "recipes/tiny.yaml", "--languages", "km", "vi"]
    run_pipeline(argv)
    first = capsys.readouterr().out
    assert "wrote a randomly initialised qwen2_5_vl model" in first
    assert "data_prep evalset: 10 queries, 20 relevance judgements" in first  # articles 21-30, trained on by none
    assert "held-out CER" in first and "held-out in-batch accuracy" in first
    assert "| bm25 (page text) |" in first and "| checkpoints/tiny/contrast/final |" in first
    results = json.loads((tmp_path / "checkpoints/tiny/evaluation/results.json").read_text())
    assert set(results["results"]) == {
        "random",
        "bm25 (page text)",
        "checkpoints/tiny/base",
        "checkpoints/tiny/pretrain/final",
        "checkpoints/tiny/contrast/final",
        "checkpoints/tiny/contrast-only/final",
    }
    assert [r["stage"] for r in verify_chain("checkpoints/tiny/contrast-only/final")] == ["contrast", "base_model"]
    assert set(results["results"]["checkpoints/tiny/base"]) == {"all", "km", "vi"}
    # no model was trained on a page of the eval set, and every training pair's source was checked
    assert set(results["trained_on_evaluated_documents"].values()) == {0}
    assert set(results["unchecked_training_pairs"].values()) == {0}
    created = read_run_record("checkpoints/tiny/base", expected_stage="base_model")["created"]

    # the index and search commands it prints run as printed, on the model it built
    commands = [shlex.split(line) for line in first.splitlines() if line.startswith("  python -m stages.")]
    assert [argv[2] for argv in commands] == ["stages.index", "stages.search", "stages.serve"] * 2
    index_main(commands[0][3:])
    search_main([*commands[1][3:], "--k", "3"])
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()[-3:]] == ["1", "2", "3"]
    qrels = (tmp_path / "checkpoints/tiny/evalset/qrels.tsv").read_text()

    run_pipeline(argv)
    second = capsys.readouterr().out
    assert "up to date" in second and second.count("complete; reusing it") == 9
    assert "pretrain/final: complete, same settings and data; reusing it" in second
    assert second.count("same settings and data; reusing it") == 3
    assert second.count("embeddings from the cache") == 4
    assert read_run_record("checkpoints/tiny/base")["created"] == created

    # pretraining held out whole documents of the languages it trained on
    examples = read_run_record("checkpoints/tiny/pretrain/final")["results"]["examples"]
    assert examples["held_out_documents"] >= 1 and examples["train_pages"] > examples["held_out_pages"] > 0

    # a changed pretrain setting reruns pretraining, and contrast after it
    recipe["pretrain"]["max_steps"] = 2
    (tmp_path / "recipes/tiny.yaml").write_text(yaml.safe_dump(recipe, allow_unicode=True))
    run_pipeline(argv)
    third = capsys.readouterr().out
    assert third.count("complete; reusing it") == 9 and "pretrain: 2 steps" in third
    assert (
        third.count("contrast: 2 steps in") == 1
    )  # the refinement of the new pretrained model; contrast-only is reused

    # another stage's section does not make them stale
    recipe["evaluate"]["batch_size"] = 3
    (tmp_path / "recipes/tiny.yaml").write_text(yaml.safe_dump(recipe, allow_unicode=True))
    run_pipeline(argv)
    assert capsys.readouterr().out.count("same settings and data; reusing it") == 3

    # a changed corpus makes the base model stale; --rebuild redoes the data, with the same result
    with open("samples/udhr/en.md", "a", encoding="utf-8") as handle:
        handle.write("\nOne more paragraph.\n")
    run_pipeline([*argv, "--rebuild"])
    assert "wrote a randomly initialised" in capsys.readouterr().out
    assert (tmp_path / "checkpoints/tiny/evalset/qrels.tsv").read_text() == qrels


@pytest.mark.parametrize("lang", sorted(LANGUAGES))
def test_samples_are_parallel_nfc_text(lang):
    text = (REPO / "samples" / "udhr" / f"{lang}.md").read_text(encoding="utf-8")
    assert unicodedata.is_normalized("NFC", text)
    assert text.startswith("# ")
    assert text.count("\n## ") == 31  # the preamble and the 30 articles, in the same order in every language


def test_samples_cut_into_documents_at_sections_lose_nothing(tmp_path):
    source = REPO / "samples/udhr/km.md"
    parts = write_parts(source, tmp_path, 4)
    texts = [part.read_text(encoding="utf-8") for part in parts]
    assert "".join(texts) == source.read_text(encoding="utf-8")
    assert all(text.startswith("## ") for text in texts[1:]) and texts[0].startswith("# ")
    assert max(map(len, texts)) < 2 * min(map(len, texts))
    assert [len(part.read_text()) for part in write_parts(source, tmp_path, 31)].count(0) == 0
