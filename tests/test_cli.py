"""The stage commands: bad input is one line on stderr and exit code 2, before any model is loaded."""

import json

import pytest

import data_prep.cli as data_prep_cli
from common.errors import run_cli
from stages import base_model, contrast, evaluate, pretrain

from .conftest import REPO

TINY = str(REPO / "recipes" / "tiny.yaml")


def run(main, argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, argv)
    return exit_info.value.code, capsys.readouterr().err


def fake_pages_dataset(folder):
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"lang": "km", "counts": {"pages": 0}}))
    return str(folder)


def test_pretrain_missing_dataset_names_the_path_and_the_fix(capsys, tiny_model):
    code, err = run(
        pretrain.main,
        ["--config", TINY, "--model_name_or_path", str(tiny_model[2]), "--datasets", "nowhere/pages"],
        capsys,
    )
    assert code == 2
    assert err.count("\n") == 1 and "--datasets: nowhere/pages not found" in err


def test_pretrain_folder_that_is_not_a_pages_dataset(capsys, tiny_model, tmp_path):
    (tmp_path / "pages").mkdir()
    code, err = run(
        pretrain.main,
        ["--config", TINY, "--model_name_or_path", str(tiny_model[2]), "--datasets", str(tmp_path / "pages")],
        capsys,
    )
    assert code == 2 and "has no manifest.json" in err and "python -m data_prep pages" in err


def test_existing_output_needs_resume_or_overwrite_and_is_left_alone(capsys, tiny_model, tmp_path):
    output = tmp_path / "run"
    output.mkdir()
    (output / "keep.txt").write_text("earlier work")
    argv = [
        "--config",
        TINY,
        "--model_name_or_path",
        str(tiny_model[2]),
        "--datasets",
        fake_pages_dataset(tmp_path / "pages"),
        "--output_dir",
        str(output),
    ]
    code, err = run(pretrain.main, argv, capsys)
    assert code == 2 and "already exists and is not empty; pass --resume" in err
    assert (output / "keep.txt").read_text() == "earlier work"
    code, err = run(pretrain.main, [*argv, "--resume", "--overwrite"], capsys)
    assert code == 2 and "contradict" in err


def test_pretrain_dataset_of_another_language_is_refused(capsys, tiny_model, tmp_path):
    argv = [
        "--config",
        TINY,
        "--lang",
        "th",
        "--model_name_or_path",
        str(tiny_model[2]),
        "--datasets",
        fake_pages_dataset(tmp_path / "pages"),
        "--output_dir",
        str(tmp_path / "run"),
    ]
    code, err = run(pretrain.main, argv, capsys)
    assert code == 2 and "holds `km` pages but the recipe's language is `th`" in err
    assert not (tmp_path / "run").exists()


def test_pretrain_resume_without_a_checkpoint(capsys, tiny_model, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("x")
    argv = [
        "--config",
        TINY,
        "--model_name_or_path",
        str(tiny_model[2]),
        "--datasets",
        fake_pages_dataset(tmp_path / "pages"),
        "--output_dir",
        str(tmp_path / "run"),
        "--resume",
    ]
    code, err = run(pretrain.main, argv, capsys)
    assert code == 2 and "holds no finished checkpoint-* folder" in err


def test_model_path_that_is_not_a_model(capsys, tmp_path):
    code, err = run(contrast.main, ["--config", TINY, "--model_name_or_path", str(tmp_path)], capsys)
    assert code == 2 and "has no config.json" in err


def test_contrast_bad_values(capsys, tiny_model, tmp_path):
    pages = fake_pages_dataset(tmp_path / "pages")
    base = [
        "--config",
        TINY,
        "--model_name_or_path",
        str(tiny_model[2]),
        "--pages_datasets",
        pages,
        "--output_dir",
        str(tmp_path / "c"),
    ]
    assert "--temperature must be in (0, inf), got 0.0" in run(contrast.main, [*base, "--temperature", "0"], capsys)[1]
    assert (
        "--multimodal_fraction must be in [0, 1]"
        in run(contrast.main, [*base, "--multimodal_fraction", "1.5"], capsys)[1]
    )
    assert "--eval_fraction must be in [0, 1)" in run(contrast.main, [*base, "--eval_fraction", "1"], capsys)[1]
    assert "--deepspeed nope.json not found" in run(contrast.main, [*base, "--deepspeed", "nope.json"], capsys)[1]
    zero3 = [*base, "--deepspeed", str(REPO / "recipes/deepspeed/zero3.json")]
    assert "set --homogeneous_batches true" in run(contrast.main, zero3, capsys)[1]


def test_evaluate_checks_the_eval_folder(capsys, tiny_model, tmp_path):
    code, err = run(evaluate.main, ["--config", TINY, "--model", str(tiny_model[2]), "--data", str(tmp_path)], capsys)
    assert code == 2 and "holds neither corpus.jsonl" in err


def test_type_error_on_the_command_line_exits_2(capsys):
    code, err = run(base_model.main, ["--config", TINY, "--vocab_size", "many"], capsys)
    assert code == 2 and "invalid int value: 'many'" in err


def test_data_prep_needs_a_command(capsys):
    code, err = run(data_prep_cli.main, ["--lang", "km"], capsys)
    assert code == 2 and "give a command first" in err


def test_data_prep_missing_tesseract_language_names_the_debian_package(capsys, tmp_path):
    (tmp_path / "doc.pdf").write_bytes(b"%PDF-1.4")
    argv = [
        "pages",
        "--lang",
        "km",
        "--input",
        str(tmp_path / "doc.pdf"),
        "--output",
        str(tmp_path / "out"),
        "--tesseract_langs",
        "khm+zzz",
    ]
    code, err = run(data_prep_cli.main, argv, capsys)
    assert code == 2 and "tesseract-ocr-zzz" in err and "tesseract-ocr-khm" not in err
    assert not (tmp_path / "out").exists()


def test_data_prep_recipe_cannot_set_command_inputs(capsys, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("lang: km\ndata_prep:\n  input: [x]\n")
    code, err = run(data_prep_cli.main, ["pages", "--config", str(recipe)], capsys)
    assert code == 2 and "unknown key `data_prep.input`" in err


def test_output_under_a_file_is_reported(capsys, tmp_path):
    (tmp_path / "file.txt").write_text("not a folder")
    code, err = run(base_model.main, ["--config", TINY, "--output_dir", str(tmp_path / "file.txt" / "base")], capsys)
    assert code == 2 and "file.txt is a file, not a folder" in err


def test_evalset_needs_exactly_one_source(capsys, tmp_path):
    code, err = run(data_prep_cli.main, ["evalset", "--lang", "km", "--output", str(tmp_path / "e")], capsys)
    assert code == 2 and "give either --pages DIR [DIR ...] or --parquet DIR" in err
    code, err = run(
        data_prep_cli.main,
        ["evalset", "--lang", "km", "--pages", str(tmp_path), "--output", str(tmp_path / "e")],
        capsys,
    )
    assert code == 2 and "has no manifest.json" in err


def test_unwritable_output_folder_is_reported_before_any_work(capsys, tmp_path, tmpfs):
    # a read-only file system: unwritable for root too (CI runs as root, for whom permission bits do not apply)
    read_only = tmpfs("1M", "ro")
    (tmp_path / "doc.pdf").write_bytes(b"")
    argv = ["pages", "--lang", "km", "--input", str(tmp_path / "doc.pdf"), "--output", str(read_only / "out")]
    code, err = run(data_prep_cli.main, argv, capsys)
    assert code == 2 and f"cannot write to {read_only} (no write permission, or a read-only file system)" in err
    assert not (read_only / "out").exists()


def test_pretrain_needs_a_max_length(capsys, tiny_model, tmp_path):
    argv = [
        "--config",
        TINY,
        "--lang",
        "km",
        "--model_name_or_path",
        str(tiny_model[2]),
        "--datasets",
        fake_pages_dataset(tmp_path / "pages"),
        "--output_dir",
        str(tmp_path / "run"),
        "--max_length",
        "16",
    ]
    code, err = run(pretrain.main, argv, capsys)
    assert code == 2 and "--max_length 16 leaves no room for a page" in err
