"""Recipes: one YAML file per language, one section per stage, parsed into typed dataclasses.

The YAML sets the defaults of a stage's argument dataclasses and command-line flags override them
(TRL's `TrlParser` idiom). Unlike `TrlParser`, a key the dataclasses do not know and a value of the
wrong type are errors that name the file and the key: a typo in a recipe must stop the run.
"""

import argparse
import dataclasses
import difflib
import re
import reprlib
import sys
import types
import typing
import warnings
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from .artifacts import refuse_remote_code
from .errors import UsageError
from .languages import normalize_lang
from .output import VERBOSE_HELP

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"
MAX_KNOWN_KEYS = 20  # an unknown-key error lists at most this many known keys
_REPR = reprlib.Repr()
_REPR.maxstring, _REPR.maxother, _REPR.maxlevel, _REPR.maxlist, _REPR.maxdict = 80, 80, 2, 5, 4
# one section per command that reads a recipe; the dataclasses each fills are the commands' own (stages.SECTION_TYPES)
SECTIONS = ("base_model", "data_prep", "queries", "pretrain", "contrast", "evaluate", "pipeline", "analyze")


@dataclass
class RecipeArguments:
    """Arguments every stage shares: the recipe file and the recipe's top-level keys."""

    config: str | None = field(
        default=None, metadata={"help": "Recipe YAML. Default: recipes/<lang>.yaml when --lang is given."}
    )
    lang: str | None = field(default=None, metadata={"help": "Language code (ISO 639-1, or 639-3 alias)."})
    seed: int = field(default=42, metadata={"help": "Seed for everything random in the stage."})
    verbose: bool = field(default=False, metadata={"help": VERBOSE_HELP})

    def validate(self) -> None:
        if self.lang is None:
            raise UsageError("no language: give --lang CODE or a recipe with a top-level `lang:` key.")
        self.lang = normalize_lang(self.lang)
        if not 0 <= self.seed < 2**32:  # numpy's range (transformers' set_seed seeds numpy too)
            raise UsageError(f"seed must be in [0, 2**32), got {_show(self.seed)}.")


def recipe_section(path: str | None, section: str) -> dict[str, Any]:
    """A recipe's section as written (empty without a recipe): what a run record keeps to tell whether
    a later run would be the same."""
    return (load_recipe(path).get(section) or {}) if path else {}


def load_recipe(path: str | Path) -> dict[str, Any]:
    """Load a recipe safely and check its top-level keys; sections are checked by the stage that reads them."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"recipe {path} does not exist; pass --config recipes/<lang>.yaml (see {RECIPES_DIR}).")
    try:
        # safe_load builds plain values only: a `!!python/...` tag is an error, never a call
        recipe = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError, ValueError) as error:  # ValueError: an integer of > 4300 digits
        raise UsageError(f"recipe {path} is not valid YAML: {_shorten(' '.join(str(error).split()), 300)}") from None
    except RecursionError:
        raise UsageError(f"recipe {path} is not valid YAML: it nests deeper than Python can read.") from None
    except OSError as error:
        raise UsageError(f"recipe {path} cannot be read ({error.strerror or error}).") from None
    if recipe is None:
        recipe = {}
    if not isinstance(recipe, dict):
        raise UsageError(f"recipe {path} must be a mapping of keys to values, got {type(recipe).__name__}.")
    allowed = {f.name for f in dataclasses.fields(RecipeArguments)} - {"config"} | set(SECTIONS)
    for key, value in recipe.items():
        if key not in allowed:
            raise UsageError(_unknown_key_message(path, key, allowed))
        if key in SECTIONS and not isinstance(value, dict | None):
            raise UsageError(f"recipe {path}: section `{key}` must be a mapping, got {_show(value)}.")
    return recipe


def check_recipe(path: str | Path, section_types: dict[str, tuple[type, ...]]) -> dict[str, Any]:
    """Check every key and value type of a recipe against each section's dataclasses; return the recipe."""
    recipe = load_recipe(path)
    _check_values(Path(path), None, {k: v for k, v in recipe.items() if k not in SECTIONS}, (RecipeArguments,))
    for section in SECTIONS:
        _check_values(Path(path), section, recipe.get(section) or {}, section_types[section])
    if not recipe.get("lang"):
        raise UsageError(f"recipe {path} has no language: give it a top-level `lang:` key (e.g. `lang: km`).")
    normalize_lang(recipe["lang"])
    return recipe


INTERVAL = re.compile(r"([\[(])(-?[0-9.e+-]+|-inf), (-?[0-9.e+-]+|inf)([\])])")


def check_ranges(args) -> None:
    """Refuse a numeric value outside the interval its dataclass declares for it in `RANGES` (a ClassVar of field
    name -> "[1, inf)", "(0, 1)", ...), naming the flag: a value no later step could use stops here, in one line,
    before anything loads."""
    for name, interval in getattr(args, "RANGES", {}).items():
        value = getattr(args, name)
        opening, low, high, closing = INTERVAL.fullmatch(interval).groups()
        above_low = float(low) <= value if opening == "[" else float(low) < value
        below_high = value <= float(high) if closing == "]" else value < float(high)
        if not (above_low and below_high):
            raise UsageError(f"--{name} must be in {interval}, got {value}.")


def parse_stage_arguments(
    stage: str,
    dataclass_types: tuple[type, ...],
    argv: list[str] | None = None,
    cli_only_types: tuple[type, ...] = (),
    machine_defaults: dict[str, Any] | None = None,
    replaced: dict[str, str] | None = None,
    **parser_kwargs,
):
    """Parse a stage's arguments: recipe section as defaults, CLI flags on top, then `validate()` each.

    The recipe's `stage` section may set the fields of `dataclass_types`; `cli_only_types` are flags
    only (the inputs and outputs of one command). Returns one instance per type in
    `(RecipeArguments, *dataclass_types, *cli_only_types)`. `machine_defaults` (e.g. `use_cpu` where
    there is no GPU) come before the recipe, which comes before the flags. `replaced` maps fields of
    `dataclass_types` that the stage sets itself to the field that sets them: a recipe or flag naming one is refused.
    """
    from transformers import HfArgumentParser

    # every stage parses here before it loads a model: from here on, transformers refuses (never asks on the
    # terminal) to run code a model folder brings in `auto_map`
    refuse_remote_code()
    # a stage dataclass may own a recipe-level field (TRL's SFTConfig has `seed`): it takes the flag and the
    # recipe value, and RecipeArguments is filled from it after parsing
    stage_fields = {f.name for cls in (*dataclass_types, *cli_only_types) for f in dataclasses.fields(cls)}
    shared = [f for f in dataclasses.fields(RecipeArguments) if f.name in stage_fields]
    recipe_type = dataclasses.make_dataclass(
        "RecipeArguments",
        [
            (f.name, f.type, field(default=f.default, metadata=f.metadata))
            for f in dataclasses.fields(RecipeArguments)
            if f not in shared
        ],
    )
    all_types = (recipe_type, *dataclass_types, *cli_only_types)
    recipe_path = _find_recipe(argv)
    defaults: dict[str, Any] = dict(machine_defaults or {})
    if recipe_path is not None:
        recipe = load_recipe(recipe_path)
        top_level = {k: v for k, v in recipe.items() if k not in SECTIONS}
        section = recipe.get(stage) or {}
        _check_values(recipe_path, None, top_level, (RecipeArguments,))
        _check_values(recipe_path, stage, section, dataclass_types)
        shared_in_section = sorted({f.name for f in shared} & set(section))
        if shared_in_section:
            raise UsageError(f"recipe {recipe_path}: set `{shared_in_section[0]}` at the top level, not in `{stage}`.")
        defaults |= {**top_level, **section, "config": str(recipe_path)}

    given = argv if argv is not None else sys.argv[1:]
    flags = {arg.split("=", 1)[0][2:].replace("-", "_") for arg in given if arg.startswith("--")}
    for name, instead in (replaced or {}).items():
        if name in flags or (recipe_path is not None and name in section):
            raise UsageError(f"{stage}: `{name}` is set by the stage from `{instead}`; set `{instead}` instead.")

    # exit_on_error=False: a value argparse cannot convert (a flag's, or a recipe's, which argparse converts as a
    # default) raises ArgumentError here instead of printing the whole usage (hundreds of lines for SFTConfig)
    parser = HfArgumentParser(all_types, **{"exit_on_error": False, **parser_kwargs})
    parser.set_defaults(**defaults)
    try:
        with warnings.catch_warnings():
            # TRL's SFTConfig defaults `gradient_checkpointing`, the name transformers 5 deprecates, and transformers
            # warns of it at every parse: a default of the library's, which stages.pretrain sets itself (`replaced`)
            warnings.filterwarnings("ignore", message=r"`gradient_checkpointing` is deprecated", category=FutureWarning)
            parsed = parser.parse_args_into_dataclasses(args=argv)
    except argparse.ArgumentError as error:
        source = f" (from recipe {recipe_path} or the flags)" if recipe_path else ""
        raise UsageError(f"{_shorten(str(error), 400)}{source}; run with --help to list the flags.") from None
    except ValueError as error:
        if "not used by the HfArgumentParser" in str(error):  # its way of reporting unknown flags
            raise UsageError(f"{error}; run with --help to list the flags.") from None
        # a dataclass's own checks (TrainingArguments' __post_init__) refused a value from the recipe or a flag
        source = f"recipe {recipe_path} (section `{stage}`) or the flags" if recipe_path else "the flags"
        raise UsageError(f"{stage}: {_shorten(' '.join(str(error).split()), 400)}; fix {source}.") from None
    recipe_args = RecipeArguments(
        **vars(parsed[0]),
        **{f.name: getattr(next(a for a in parsed[1:] if hasattr(a, f.name)), f.name) for f in shared},
    )
    parsed = [recipe_args, *parsed[1:]]
    for args in parsed:
        check_ranges(args)
        if hasattr(args, "validate"):
            try:
                args.validate()
            except UsageError:
                raise
            except (ArithmeticError, TypeError, ValueError, OSError) as error:
                # a value no check foresaw (a zero divisor, a path the OS refuses): still the user's to fix
                source = f"recipe {recipe_path} or the flags" if recipe_path else "the flags"
                raise UsageError(
                    f"{stage}: a value of {type(args).__name__} cannot be used ({type(error).__name__}: "
                    f"{_shorten(str(error), 200)}); fix {source}."
                ) from None
    return parsed


def _find_recipe(argv: list[str] | None) -> Path | None:
    """`--config` if given, else `recipes/<lang>.yaml` if `--lang` is given (and the file exists)."""
    pre = argparse.ArgumentParser(add_help=False, exit_on_error=False)
    pre.add_argument("--config")
    pre.add_argument("--lang")
    try:
        known, _ = pre.parse_known_args(argv)
    except argparse.ArgumentError as error:
        raise UsageError(f"{error}; run with --help to list the flags.") from None
    if known.config:
        return Path(known.config)
    if known.lang:
        candidate = RECIPES_DIR / f"{normalize_lang(known.lang)}.yaml"
        return candidate if candidate.is_file() else None
    return None


def _check_values(path: Path, section: str | None, values: dict, dataclass_types: tuple[type, ...]) -> None:
    hints = {}
    for cls in dataclass_types:
        type_hints = typing.get_type_hints(cls)
        hints.update({f.name: type_hints[f.name] for f in dataclasses.fields(cls) if f.init})
    where = f"`{section}.{{key}}`" if section else "`{key}`"
    for key, value in values.items():
        if key not in hints:
            raise UsageError(_unknown_key_message(path, key, set(hints), section))
        if not _matches(value, hints[key]):
            hint = ""
            if isinstance(value, str) and _is_float_literal(value):
                hint = " (PyYAML reads 1e-5 as a string: write floats with a dot, e.g. 1.0e-5)"
            raise UsageError(
                f"recipe {path}: {where.format(key=key)} must be {_describe(hints[key])}, got {_show(value)}{hint}."
            )


def _unknown_key_message(path: Path, key: Any, allowed: set[str], section: str | None = None) -> str:
    # a key is anything YAML can write (a number, null, a string with a line break): shown so it stays on one line
    shown = key if isinstance(key, str) and key.isprintable() and len(key) <= 60 else _show(key)
    name = f"{section}.{shown}" if section else shown
    close = difflib.get_close_matches(key, sorted(allowed), n=1) if isinstance(key, str) else []
    if close:
        suggestion = f" Did you mean `{close[0]}`?"
    elif len(allowed) <= MAX_KNOWN_KEYS:
        suggestion = f" Known keys: {', '.join(sorted(allowed))}."
    else:  # TRL's SFTConfig alone has some 200
        listed = ", ".join(sorted(allowed)[:MAX_KNOWN_KEYS])
        suggestion = f" Known keys include {listed}, ...; --help lists all {len(allowed)}."
    return f"recipe {path}: unknown key `{name}`.{suggestion}"


def _show(value: Any) -> str:
    """A value as received, cut short: YAML aliases can make a small file hold a list of a billion items."""
    return _REPR.repr(value)


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _matches(value: Any, annotation: Any) -> bool:
    """Whether a YAML value fits a dataclass field type; types we cannot judge are left to the parser."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any:
        return True
    if annotation is type(None):
        return value is None
    if origin in (Union, types.UnionType):
        return any(_matches(value, arg) for arg in args)
    if origin is Literal:
        return value in args
    if origin in (list, tuple):
        return isinstance(value, list) and (not args or all(_matches(v, args[0]) for v in value))
    if origin is dict or annotation is dict:
        return isinstance(value, dict)
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        try:
            return value in {member.value for member in annotation} or value in annotation.__members__
        except TypeError:  # a list or a mapping: unhashable, and no member
            return False
    return True


def _describe(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(arg) for arg in args)
    if origin in (list, tuple):
        return f"a list of {_describe(args[0])}" if args else "a list"
    if annotation is type(None):
        return "null"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        annotation, getattr(annotation, "__name__", str(annotation))
    )


def _is_float_literal(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
