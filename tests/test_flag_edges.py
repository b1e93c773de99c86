"""Every numeric flag of every stage at its edges (0, 1, -1, tiny, huge): accepted, or refused in one line (a
UsageError naming the flag), never a traceback from deep inside a library."""

import dataclasses
import typing

import pytest
import yaml

from common.errors import UsageError
from common.recipe import INTERVAL
from stages import SECTION_TYPES, section_types

from .conftest import REPO
from .test_recipes import validate_section, write_recipe

EDGES = {int: [0, 1, -1, 10**12], float: [0.0, 1.0, -1.0, 1e-12, 1e12]}


def numeric_fields(section: str):
    """(field name, type) of the section's own dataclasses (TRL's SFTConfig is the Trainer's: its own checks)."""
    for cls in section_types(section):
        if cls.__module__.startswith("trl"):
            continue
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            kind = hints[field.name]
            if kind in EDGES:
                yield field.name, kind


CASES = [
    (section, name, value)
    for section in SECTION_TYPES
    for name, kind in numeric_fields(section)
    for value in EDGES[kind]
]


@pytest.mark.parametrize(("section", "name", "value"), CASES, ids=lambda v: str(v))
def test_a_numeric_flag_at_its_edge_is_accepted_or_refused_in_one_line(
    section, name, value, tiny_model, tmp_path, monkeypatch
):
    monkeypatch.chdir(REPO)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    recipe = yaml.safe_load((REPO / "recipes/tiny.yaml").read_text())
    recipe.setdefault(section, {})[name] = value
    try:
        validate_section(write_recipe(tmp_path, recipe), section, tmp_path, tiny_model[1])
    except UsageError as error:
        assert name in str(error) and "\n" not in str(error).strip()


@pytest.mark.parametrize("section", SECTION_TYPES)
def test_every_declared_range_is_a_numeric_field_and_an_interval(section):
    for cls in section_types(section):
        numeric = {name for name, _ in numeric_fields(section)} if not cls.__module__.startswith("trl") else set()
        for name, interval in getattr(cls, "RANGES", {}).items():
            assert name in numeric and INTERVAL.fullmatch(interval), (cls.__name__, name, interval)
