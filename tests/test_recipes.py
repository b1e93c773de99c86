from pathlib import Path

import pytest
import yaml

from data_prep.settings import DataPrepSettings
from stages.base_model import BaseModelArguments
from stages.errors import UsageError
from stages.languages import normalize_lang
from stages.recipe import SECTIONS, check_recipe, load_recipe, parse_stage_arguments

from .conftest import REPO

RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
LANGUAGE_RECIPES = [path for path in RECIPES if path.stem != "tiny"]


def write_recipe(tmp_path: Path, recipe: dict | str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe if isinstance(recipe, str) else yaml.safe_dump(recipe, allow_unicode=True))
    return path


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_parses_and_validates(path):
    recipe = check_recipe(path)
    assert set(recipe) <= {"lang", "seed", *SECTIONS}
    assert path.read_text().startswith("#"), "a recipe starts with the command that runs it"
    DataPrepSettings(**recipe.get("data_prep", {})).validate()


@pytest.mark.parametrize("path", LANGUAGE_RECIPES, ids=lambda p: p.stem)
def test_language_recipes_are_complete_and_named_by_their_language(path):
    recipe = load_recipe(path)
    assert normalize_lang(recipe["lang"]) == path.stem
    assert {"data_prep", "pretrain", "contrast", "evaluate"} <= set(recipe)
    assert recipe["contrast"]["temperature"] == 0.03  # the method's default (DESIGN.md section 2)


def test_every_recipe_tesseract_language_is_installed_by_setup():
    packages = (REPO / "setup" / "debian-packages.txt").read_text().split()
    for path in LANGUAGE_RECIPES:
        for lang in load_recipe(path)["data_prep"]["tesseract_langs"].split("+"):
            assert f"tesseract-ocr-{lang}" in packages, (path.name, lang)


def test_unknown_key_names_the_key_the_file_and_a_suggestion(tmp_path):
    path = write_recipe(tmp_path, {"lang": "km", "base_model": {"hiden_size": 64}})
    with pytest.raises(UsageError, match=r"recipe .*recipe\.yaml: unknown key `base_model\.hiden_size`\. Did you mean `hidden_size`\?"):
        parse_stage_arguments("base_model", (BaseModelArguments,), ["--config", str(path)])
    with pytest.raises(UsageError, match="unknown key `base_model.hiden_size`"):
        check_recipe(path)


def test_unknown_top_level_key_and_section(tmp_path):
    with pytest.raises(UsageError, match="unknown key `pretrian`. Did you mean `pretrain`"):
        load_recipe(write_recipe(tmp_path, {"lang": "th", "pretrian": {}}))


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"vocab_size": "big"}, r"`base_model.vocab_size` must be an integer, got 'big'"),
        ({"vocab_size": 4096.5}, r"must be an integer"),
        ({"overwrite": "yes"}, r"`base_model.overwrite` must be true or false"),
        ({"family": "llama"}, r"must be one of 'qwen2_5_vl', 'qwen2_vl'"),
        ({"tokenizer_corpus": "samples/udhr"}, r"must be a list of a string"),
    ],
)
def test_wrong_types_are_reported(tmp_path, section, message):
    path = write_recipe(tmp_path, {"lang": "km", "base_model": section})
    with pytest.raises(UsageError, match=message):
        check_recipe(path)


def test_float_written_without_a_dot_gets_a_hint(tmp_path):
    path = write_recipe(tmp_path, "lang: km\npretrain:\n  learning_rate: 1e-5\n")
    with pytest.raises(UsageError, match=r"learning_rate` must be a number, got '1e-5' \(PyYAML reads 1e-5 as a string"):
        check_recipe(path)


@pytest.mark.parametrize("text", ["lang: [km", "- a\n- b\n", "lang: km\npretrain: 3\n"])
def test_malformed_yaml_is_one_clear_error(tmp_path, text):
    with pytest.raises(UsageError, match="recipe .*recipe.yaml"):
        load_recipe(write_recipe(tmp_path, text))


def test_missing_recipe_file():
    with pytest.raises(UsageError, match="recipe no/such.yaml does not exist"):
        load_recipe("no/such.yaml")


def test_yaml_is_loaded_safely(tmp_path):
    path = write_recipe(tmp_path, "lang: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(UsageError, match="not valid YAML"):
        load_recipe(path)


@pytest.mark.parametrize(("given", "code"), [("khm", "km"), ("THA", "th"), ("lo", "lo"), ("fil", "tl")])
def test_language_aliases(given, code):
    assert normalize_lang(given) == code


def test_unknown_language(tmp_path):
    path = write_recipe(tmp_path, {"lang": "xx"})
    with pytest.raises(UsageError, match="unknown language 'xx'"):
        parse_stage_arguments("base_model", (BaseModelArguments,), ["--config", str(path)])


def test_cli_flags_override_the_recipe_and_recipe_overrides_defaults(tmp_path):
    path = write_recipe(tmp_path, {"lang": "khm", "seed": 7, "base_model": {"vocab_size": 1000, "hidden_size": 128}})
    out = str(tmp_path / "out")
    recipe_args, args = parse_stage_arguments(
        "base_model", (BaseModelArguments,), ["--config", str(path), "--vocab-size", "2000", "--output_dir", out]
    )
    assert (recipe_args.lang, recipe_args.seed) == ("km", 7)
    assert (args.vocab_size, args.hidden_size, args.output_dir) == (2000, 128, out)
    assert args.num_hidden_layers == BaseModelArguments().num_hidden_layers


def test_lang_flag_selects_the_language_recipe():
    recipe_args, settings = parse_stage_arguments("data_prep", (DataPrepSettings,), ["--lang", "khm"])
    assert recipe_args.config.endswith("recipes/km.yaml")
    assert settings.tesseract_langs == "khm+eng"


def test_unknown_flag_is_an_error(tmp_path):
    with pytest.raises(UsageError, match="--vocab_sise"):
        parse_stage_arguments("base_model", (BaseModelArguments,), ["--lang", "km", "--vocab_sise", "3"])

