import json
import subprocess
from pathlib import Path

import pytest
import yaml

import stages.pretrain
from common.errors import UsageError
from common.languages import normalize_lang
from common.recipe import SECTIONS, load_recipe, parse_stage_arguments
from data_prep.language_data import debian_package
from data_prep.settings import DataPrepSettings
from stages import SECTION_TYPES, check_recipe, section_types
from stages.base_model import BaseModelArguments

from .conftest import REPO

RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
# tiny and toy are the embedded default and the toy world (issue 29), not languages
LANGUAGE_RECIPES = [path for path in RECIPES if path.stem not in ("tiny", "toy")]
# the sections each recipe sets: one it leaves out has no values of its own to judge (its stage runs on defaults and
# flags, as `python -m stages.analyze` with a language recipe does)
RECIPE_SECTIONS = [(path, section) for path in RECIPES for section in SECTION_TYPES if load_recipe(path).get(section)]


def write_recipe(tmp_path: Path, recipe: dict | str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe if isinstance(recipe, str) else yaml.safe_dump(recipe, allow_unicode=True))
    return path


# Recipe values under checkpoints/ name what earlier stages write: git-ignored, absent on a fresh clone, and an output
# folder may hold an earlier run on a developer's machine. These fields get a stand-in instead, so that the checks
# judge the recipe's own values, not this machine's folders; a hub id (Qwen/...) or a shipped path (samples/...) is
# judged as written, and a field the recipe leaves unset stays unset.
STAND_IN_FIELDS = ("output_dir", "model_name_or_path", "datasets", "pages_datasets", "exclude_evalsets")


def stage_argv(path: Path, section: str, folder: Path, processor) -> list[str]:
    """`--config path` and a flag for each STAND_IN_FIELDS value of the section that is under checkpoints/; the
    stand-in model has `processor` (pretrain's checks read its prompt and image sizes)."""
    recipe = load_recipe(path)
    model, pages, evalset = folder / "stand-in-model", folder / "stand-in-pages", folder / "stand-in-evalset"
    for stand_in in (model, pages, evalset):
        stand_in.mkdir(parents=True, exist_ok=True)
    # what check_model_source asks of a local model folder, and the stages of its family (lco/families.py)
    (model / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))
    processor.save_pretrained(model)
    # what pretrain's validate_run reads of a pages dataset: its language
    (pages / "manifest.json").write_text(json.dumps({"lang": normalize_lang(recipe["lang"])}))
    stand_ins = {
        "output_dir": folder / "output",
        "model_name_or_path": model,
        "datasets": pages,
        "pages_datasets": pages,
        "exclude_evalsets": evalset,  # validate() asks only that it exists
    }
    argv = ["--config", str(path)]
    for name, value in (recipe.get(section) or {}).items():
        values = value if isinstance(value, list) else [value]
        if name in STAND_IN_FIELDS and values and all(str(v).startswith("checkpoints/") for v in values):
            argv += [f"--{name}", *[str(stand_ins[name])] * len(values)]
    return argv


def validate_section(path: Path, section: str, folder: Path, processor) -> None:
    """Build the section's dataclasses from the recipe as its stage does, which runs each one's validate()."""
    argv = stage_argv(path, section, folder, processor)
    if section == "pretrain":
        recipe_args, args, training = parse_stage_arguments(
            section, section_types(section), argv, machine_defaults=stages.pretrain.CPU_DEFAULTS
        )
        # the stage's checks that need the trainer settings too (max_length, batch sizes, output_dir)
        stages.pretrain.validate_run(args, training, recipe_args.lang)
    else:
        # data_prep: the settings only (each data_prep command's inputs and outputs are flags, never recipe values);
        # evaluate and pipeline have no validate() of their own, so parsing judges their values' types only
        parse_stage_arguments(section, section_types(section), argv)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_parses_and_validates(path):
    recipe = check_recipe(path)
    assert set(recipe) <= {"lang", "seed", *SECTIONS}
    assert path.read_text().startswith("#"), "a recipe starts with the command that runs it"
    DataPrepSettings(**recipe.get("data_prep", {})).validate()


@pytest.mark.parametrize(("path", "section"), RECIPE_SECTIONS, ids=lambda v: getattr(v, "stem", v))
def test_every_recipe_value_passes_its_stage_checks(path, section, tiny_model, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # a recipe's relative paths (samples/udhr) start at the repository root, where it runs
    monkeypatch.delenv("WORLD_SIZE", raising=False)  # one process: the launcher, not the recipe, sets more
    validate_section(path, section, tmp_path, tiny_model[1])


def test_every_stage_section_is_in_some_recipe():
    assert {section for _, section in RECIPE_SECTIONS} == set(SECTION_TYPES)


@pytest.mark.parametrize("section", ["pretrain", "contrast"])
def test_a_recipe_value_out_of_range_is_refused(section, tiny_model, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    recipe = load_recipe(REPO / "recipes/tiny.yaml")
    validate_section(write_recipe(tmp_path, recipe), section, tmp_path, tiny_model[1])  # the copy passes as shipped
    recipe[section]["eval_fraction"] = 1.5
    with pytest.raises(UsageError, match=r"--eval_fraction must be in \[0, 1\), got 1\.5"):
        validate_section(write_recipe(tmp_path, recipe), section, tmp_path, tiny_model[1])


@pytest.mark.parametrize("path", LANGUAGE_RECIPES, ids=lambda p: p.stem)
def test_language_recipes_are_complete_and_named_by_their_language(path):
    recipe = load_recipe(path)
    assert normalize_lang(recipe["lang"]) == path.stem
    assert {"data_prep", "pretrain", "contrast", "evaluate"} <= set(recipe)
    assert recipe["contrast"]["temperature"] == 0.03  # the method's default (DESIGN.md section 2)


def test_every_recipe_debian_package_is_installed_by_setup():
    listed = subprocess.run(
        ["bash", "setup/install.sh", "--packages"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    assert {"tesseract-ocr", "chromium"} <= set(listed)
    for path in LANGUAGE_RECIPES:
        section = load_recipe(path)["data_prep"]
        packages = section["debian_packages"]
        assert {debian_package(model) for model in section["tesseract_langs"].split("+")} <= set(packages), path.name
        assert set(packages) <= set(listed), path.name


def test_unknown_key_names_the_key_the_file_and_a_suggestion(tmp_path):
    path = write_recipe(tmp_path, {"lang": "km", "base_model": {"hiden_size": 64}})
    with pytest.raises(
        UsageError, match=r"recipe .*recipe\.yaml: unknown key `base_model\.hiden_size`\. Did you mean `hidden_size`\?"
    ):
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
    with pytest.raises(
        UsageError, match=r"learning_rate` must be a number, got '1e-5' \(PyYAML reads 1e-5 as a string"
    ):
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
