"""The documentation: every flag of every command and every recipe key on its page, the site building with
--strict, and a README short enough to read."""

import argparse
import dataclasses
import importlib.util
import pkgutil
import re
import typing
from pathlib import Path

import pytest

import stages
from data_prep.cli import COMMANDS as DATA_PREP_COMMANDS
from stages import SECTION_TYPES, section_types

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"


def load_hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", DOCS / "hooks.py")
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    return hooks


hooks = load_hooks()


def row_of(markdown: str, flag: str) -> str:
    """The table row that documents `flag` (its first option string)."""
    rows = [line for line in markdown.splitlines() if line.startswith(f"| `{flag}`")]
    assert rows, f"{flag} has no row in the generated page"
    return rows[0]


def test_every_command_has_a_flags_page():
    """Every command a user can run is in the generator's list, and some page of the site shows its flags."""
    commands = {f"data_prep {name}" for name in DATA_PREP_COMMANDS}
    for module in pkgutil.iter_modules(stages.__path__):
        if re.search(r"^def main\(", (REPO / "stages" / f"{module.name}.py").read_text(encoding="utf-8"), re.M):
            commands.add(f"stages.{module.name}")
    assert commands == set(hooks.COMMANDS)
    pages = "\n".join(path.read_text(encoding="utf-8") for path in DOCS.rglob("*.md"))
    for command in commands:
        assert f"<!-- flags: {command} -->" in pages, f"no page shows the flags of {command}"


@pytest.mark.parametrize("command", sorted(hooks.COMMANDS))
def test_every_flag_is_documented(command):
    """Each flag the command's own parser accepts (what --help lists) has a row with its type, default and help;
    for the dataclass-based commands, each field of each arguments dataclass does. A flag without a help text would
    be shown as a name alone: each has one."""
    parser = hooks.command_parser(command)
    markdown = hooks.flags_markdown(command)
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help and action.help.strip(), f"{command}: {action.option_strings or action.dest} has no help"
        if action.option_strings:
            for option in action.option_strings:  # `--max-steps` is said once, as the dashed `--max_steps`
                assert f"`{option}`" in markdown or f"`{hooks._underscored(option)}`" in markdown, option
        else:
            assert f"| `{action.dest}` (positional)" in markdown
    for cls in getattr(parser, "dataclass_types", []):
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            if not field.init:
                continue
            row = row_of(markdown, f"--{field.name}")
            assert f"| {hooks._cell(hooks.type_name(hints[field.name]))} |" in row, f"{command}: --{field.name}'s type"
            assert hooks._default(hooks._field_default(field)) in row, f"{command}: --{field.name}'s default"
            assert field.metadata.get("help"), f"{command}: --{field.name} has no help"
            assert hooks._cell(field.metadata["help"]) in row, f"{command}: --{field.name}'s help"


def test_every_recipe_key_is_documented():
    markdown = hooks.recipe_markdown()
    pretrain_flags = hooks.flags_markdown("stages.pretrain")
    for section in SECTION_TYPES:
        assert f"### `{section}`" in markdown
        for cls in section_types(section):
            shown = pretrain_flags if cls.__module__.startswith("trl") else markdown
            for field in dataclasses.fields(cls):
                if field.init:
                    assert f"`--{field.name}`" in shown, f"recipe key {section}.{field.name} is not documented"


def test_errors_are_harvested_from_the_code():
    markdown = hooks.errors_markdown()
    assert "--resume and --overwrite contradict each other; pass one of them. (exit 2;" in markdown
    assert "### `stages/contrast.py`" in markdown and "### `data_prep/cli.py`" in markdown


def test_readme_is_short_and_its_links_resolve():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) < 150
    links = re.findall(r"\]\(([^)#]+)[^)]*\)", readme)
    missing = [link for link in links if not (REPO / link).is_file()]
    assert links and not missing, missing


def test_site_builds_strict(tmp_path):
    """`make docs`'s build, into a temporary folder: a broken link, a missing anchor or page, an unknown marker or a
    command without a flags page fails it."""
    from mkdocs.commands.build import build
    from mkdocs.config import load_config

    site = tmp_path / "site"
    build(load_config(str(REPO / "mkdocs.yml"), site_dir=str(site), strict=True))
    # each command's flags reach the built page that asks for them
    for source in DOCS.rglob("*.md"):
        for command in re.findall(r"^<!-- flags: (.+) -->$", source.read_text(encoding="utf-8"), re.M):
            page = (site / source.relative_to(DOCS).with_suffix(".html")).read_text(encoding="utf-8")
            for action in hooks.command_parser(command)._actions:
                for option in action.option_strings:
                    if option not in ("-h", "--help"):
                        assert f"<code>{hooks._underscored(option)}</code>" in page, f"{command}: {option}"
    assert (site / "img" / "report-desktop.png").is_file()
