import json

import numpy as np
import pytest
import yaml

from common.errors import run_cli
from common.run_record import read_run_record, verify_chain
from data_prep.evalset import build_evalset
from lco.embedder import Embedder
from lco.representation import anisotropy, mutual_knn
from stages.analyze import main as analyze
from stages.analyze import spearman
from stages.pretrain import main as pretrain

from .conftest import REPO, thai_pages_dataset


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    return thai_pages_dataset(tmp_path_factory.mktemp("pages"), documents=6, chars=220, bookmarks=True)


@pytest.fixture(scope="module")
def evalset(pages):
    """The six documents' bookmarks query their first pages."""
    build_evalset([str(pages)], str(pages.parent / "eval"), parallel_source=None, parallel_lang="en", outline_level=1)
    return pages.parent / "eval"


@pytest.fixture(scope="module")
def recipe(pages, tmp_path_factory):
    """The tiny recipe with a contrast section small enough for a test."""
    recipe = yaml.safe_load((REPO / "recipes/tiny.yaml").read_text(encoding="utf-8"))
    recipe["contrast"] |= {
        "pages_datasets": [str(pages)],
        "passage_chars": 40,
        "contrastive_batch_size": 8,
        "mini_batch_size": 4,
        "eval_fraction": 0.3,
        "eval_steps": 0,
        "max_steps": 2,
        "image_max_side": 200,
        "max_text_tokens": 48,
    }
    recipe["evaluate"] |= {"image_max_side": 200, "max_text_tokens": 48}
    path = tmp_path_factory.mktemp("recipe") / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe, allow_unicode=True), encoding="utf-8")
    return str(path)


def run_pretrain(base, pages, output, save_steps: int) -> None:
    pretrain(
        [
            "--config",
            str(REPO / "recipes/tiny.yaml"),
            "--lang",
            "th",
            "--model_name_or_path",
            str(base),
            "--datasets",
            str(pages),
            "--output_dir",
            str(output),
            "--max_length",
            "200",
            "--max_pixels",
            "40000",
            "--eval_fraction",
            "0.25",
            "--cer_pages",
            "1",
            "--per_device_train_batch_size",
            "2",
            "--learning_rate",
            "5.0e-3",
            "--warmup_steps",
            "0",
            "--max_steps",
            "4",
            "--eval_strategy",
            "steps",
            "--eval_steps",
            "2",
            "--save_steps",
            str(save_steps),
        ]
    )


@pytest.fixture(scope="module")
def pretrain_run(recorded_base, pages, tmp_path_factory):
    output = tmp_path_factory.mktemp("pretrain") / "run"
    run_pretrain(recorded_base, pages, output, save_steps=2)
    return output


def test_spearman_is_minus_one_for_a_reversed_order_and_undefined_for_a_constant():
    assert spearman([0.9, 0.5, 0.4, 0.1], [0.1, 0.2, 0.3, 0.8])["rho"] == -1.0
    assert spearman([1.0, 2.0, 3.0], [0.5, 0.6, 0.9])["rho"] == 1.0
    assert spearman([1.0, 1.0, 1.0], [0.5, 0.6, 0.9]) == {"rho": None, "p_value": None, "interval": None, "points": 3}
    assert spearman([0.9, 0.5, 0.4, 0.1], [0.1, 0.2, 0.3, 0.8])["interval"] is None  # |rho| = 1: z is infinite


def test_the_rank_correlations_interval_holds_the_true_value_95_times_in_100():
    # bivariate normal samples of 20 points with correlation 0.6: the population Spearman's rho is
    # (6 / pi) asin(0.6 / 2) = 0.5819; the interval holds it in 94.9% of 2000 samples (a 90% one: 91.7%)
    rng = np.random.default_rng(0)
    true_rho = 6 / np.pi * np.arcsin(0.3)
    covered = 0
    for _ in range(1000):
        x, y = rng.multivariate_normal([0, 0], [[1, 0.6], [0.6, 1]], size=20).T
        low, high = spearman(list(x), list(y))["interval"]
        covered += low <= true_rho <= high
    assert 0.93 <= covered / 1000 <= 0.97  # the standard deviation of the share is 0.7%


def test_scaling_refines_every_pretraining_length_and_sets_generation_against_retrieval(
    recipe, recorded_base, pretrain_run, evalset, tmp_path, capsys
):
    argv = [
        "scaling",
        "--config",
        recipe,
        "--pretrain_run",
        str(pretrain_run),
        "--evalset",
        str(evalset),
        "--output_dir",
        str(tmp_path / "analysis"),
    ]
    analyze(argv)
    out = capsys.readouterr().out
    folder = tmp_path / "analysis" / "scaling"
    summary = json.loads((folder / "scaling.json").read_text())
    points = summary["points"]
    assert [p["step"] for p in points] == [0, 2, 4]
    assert [p["model"] for p in points] == [
        str(recorded_base),
        str(pretrain_run / "checkpoint-2"),
        str(pretrain_run / "final"),
    ]

    # each point's generation quality is what pretraining measured at that step
    measured = read_run_record(pretrain_run / "final")["results"]["generation_quality"]
    assert [(p["cer"], p["eval_loss"]) for p in points] == [(m["cer"], m["eval_loss"]) for m in measured]
    # each refined model chains to the checkpoint it started from, and its score is the evaluation's
    evaluation = json.loads((folder / "evaluation.json").read_text())["results"]
    for point in points:
        assert point["ndcg@10"] == evaluation[point["refined"]]["all"]["ndcg@10"]
    # and its 95% interval over queries, in the JSON and the table
    intervals = json.loads((folder / "evaluation.json").read_text())["intervals"]
    for point in points:
        low, high = point["ndcg@10_interval"]
        assert [low, high] == intervals[point["refined"]]["all"]["ndcg@10"] and low <= point["ndcg@10"] <= high
        assert f"| {point['ndcg@10']:.3f} [{low:.3f}, {high:.3f}] |" in (folder / "scaling.md").read_text()
    chain = verify_chain(points[1]["refined"])
    assert [r["stage"] for r in chain] == ["contrast", "pretrain", "base_model"]
    assert chain[0]["parent"]["path"] == str((pretrain_run / "checkpoint-2").resolve())
    assert summary["spearman_with_ndcg@10"]["cer"]["points"] == 3
    assert (folder / "scaling.png").read_bytes()[:4] == b"\x89PNG"
    assert "| 2 |" in (folder / "scaling.md").read_text() and "Spearman rank correlation of held-out CER" in out
    assert read_run_record(folder, expected_stage="analyze")["parent"]["stage"] == "pretrain"

    analyze(argv)
    again = capsys.readouterr().out
    assert again.count("same settings and data; reusing it") == 3 and again.count("embeddings from the cache") == 3
    assert json.loads((folder / "scaling.json").read_text())["points"] == points


def test_scaling_without_enough_checkpoints_says_how_to_get_them(
    recipe, recorded_base, pages, evalset, tmp_path, capsys
):
    run_pretrain(recorded_base, pages, tmp_path / "run", save_steps=100)
    argv = [
        "scaling",
        "--config",
        recipe,
        "--pretrain_run",
        str(tmp_path / "run"),
        "--evalset",
        str(evalset),
        "--output_dir",
        str(tmp_path / "analysis"),
    ]
    with pytest.raises(SystemExit):
        run_cli(analyze, argv)
    assert "set the recipe's pretrain `save_steps` equal to `eval_steps`" in capsys.readouterr().err
    assert not (tmp_path / "analysis").exists()


def test_diagnostics_measure_every_layer_and_their_last_layer_is_the_retrieval_embedding(
    recipe, recorded_base, pretrain_run, pages, tmp_path, capsys
):
    analyze(
        [
            "diagnostics",
            "--config",
            recipe,
            "--models",
            f"base={recorded_base}",
            f"pretrain={pretrain_run / 'final'}",
            "--pages",
            str(pages),
            "--output_dir",
            str(tmp_path / "analysis"),
            "--knn",
            "3",
        ]
    )
    folder = tmp_path / "analysis" / "diagnostics"
    summary = json.loads((folder / "diagnostics.json").read_text())
    assert summary["page_count"] == 12 and summary["knn"] == 3 and list(summary["models"]) == ["base", "pretrain"]
    layers = summary["models"]["base"]["layers"]
    assert [row["layer"] for row in layers] == [1, 2]  # the tiny model's two layers
    assert all(-1 <= row[key] <= 1 for row in layers for key in ("anisotropy_image", "anisotropy_text", "cka"))
    assert (folder / "diagnostics.png").read_bytes()[:4] == b"\x89PNG"
    assert "| pretrain | 2 |" in capsys.readouterr().out

    # cosine-based metrics of the last layer are those of the embeddings retrieval uses
    import datasets

    rows = datasets.load_from_disk(str(pages))
    embedder = Embedder(str(recorded_base), max_text_tokens=256, image_max_side=448)  # the recipe's analyze settings
    images, texts = embedder.encode_images(rows["image"]), embedder.encode_texts(rows["text"])
    assert layers[-1]["anisotropy_image"] == pytest.approx(anisotropy(images), abs=2e-4)
    assert layers[-1]["anisotropy_text"] == pytest.approx(anisotropy(texts), abs=2e-4)
    assert layers[-1]["mutual_knn"] == pytest.approx(mutual_knn(images, texts, 3), abs=1e-4)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "give a command first"),
        (["diagnostics", "--models", "a=/nowhere"], "is not a model folder"),
        (["scaling", "--pretrain_run", "/nowhere", "--evalset", "/nowhere"], "/nowhere, /nowhere not found"),
    ],
)
def test_bad_arguments_get_a_one_line_error(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit):
        run_cli(
            analyze,
            [*argv[:1], "--config", str(REPO / "recipes/tiny.yaml"), "--output_dir", str(tmp_path), *argv[1:]]
            if argv
            else [],
        )
    assert message in capsys.readouterr().err
