"""mkdocs hook: the reference parts of the site, generated from the code at every build so they cannot drift.

A page asks for a part with a marker on a line of its own:

    <!-- flags: stages.contrast -->   every flag of that command (name, type, default, help), read from the parser
                                      the command itself builds, with the fields of its arguments dataclasses
    <!-- recipe-sections -->          every key of every recipe section, from the dataclasses the section fills
    <!-- errors -->                   every one-line error (UsageError, RunFailed) the code raises, by stage

The build fails on an unknown marker, and when a command in COMMANDS has no page showing its flags.
tests/test_docs.py renders the same parts and checks them against the commands' parsers.
"""

import argparse
import ast
import dataclasses
import importlib
import sys
import types
import typing
from enum import Enum
from pathlib import Path

from mkdocs.exceptions import PluginError

ROOT = Path(__file__).resolve().parents[1]
# the code this checkout holds, not an installed copy of it (the venv has the project installed in editable mode,
# which may point at another checkout)
sys.path.insert(0, str(ROOT))

# command -> (module whose `main` parses it, the arguments that select it before its flags)
COMMANDS = {
    "data_prep pages": ("data_prep.cli", ["pages"]),
    "data_prep render": ("data_prep.cli", ["render"]),
    "data_prep evalset": ("data_prep.cli", ["evalset"]),
    "data_prep queries": ("data_prep.cli", ["queries"]),
    "data_prep speak": ("data_prep.cli", ["speak"]),
    "data_prep recipe": ("data_prep.cli", ["recipe"]),
    "stages.base_model": ("stages.base_model", []),
    "stages.pretrain": ("stages.pretrain", []),
    "stages.contrast": ("stages.contrast", []),
    "stages.evaluate": ("stages.evaluate", []),
    "stages.export": ("stages.export", []),
    "stages.index": ("stages.index", []),
    "stages.search": ("stages.search", []),
    "stages.serve": ("stages.serve", []),
    "stages.pipeline": ("stages.pipeline", []),
    # scaling and diagnostics parse the same dataclass
    "stages.analyze": ("stages.analyze", ["scaling"]),
}
# where each source folder's errors are met
ERROR_GROUPS = {
    "common": "Every command (recipes, flags, output folders, run records)",
    "data_prep": "Data preparation (`python -m data_prep ...`)",
    "lco": "The library the stages share (models, pairs, eval sets, indexes)",
    "stages": "The stages (`python -m stages.<name>`)",
}
MARKER_PREFIX = "<!-- "


class _Captured(Exception):
    def __init__(self, parser):
        self.parser = parser


def command_parser(command: str) -> argparse.ArgumentParser:
    """The argument parser `command` builds, caught when it starts parsing (so nothing past parsing runs)."""
    from transformers import HfArgumentParser

    module, argv = COMMANDS[command]
    main = importlib.import_module(module).main

    def capture(parser, *args, **kwargs):
        raise _Captured(parser)

    # the commands parse with one of these two; the pre-parse of --config and --lang that finds the recipe
    # (common.recipe._find_recipe) calls parse_known_args and goes through
    patched = [(argparse.ArgumentParser, "parse_args"), (HfArgumentParser, "parse_args_into_dataclasses")]
    originals = [getattr(owner, name) for owner, name in patched]
    for owner, name in patched:
        setattr(owner, name, capture)
    try:
        main(list(argv))
    except _Captured as captured:
        return captured.parser
    finally:
        for (owner, name), original in zip(patched, originals):
            setattr(owner, name, original)
    raise RuntimeError(f"{command}: its main returned without parsing any arguments")


def type_name(annotation) -> str:
    if annotation is type(None):
        return "None"
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " | ".join(repr(value) for value in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(arg) for arg in typing.get_args(annotation))
    if origin is not None:
        arguments = ", ".join(type_name(argument) for argument in typing.get_args(annotation))
        return f"{getattr(origin, '__name__', str(origin))}[{arguments}]"
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return " | ".join(repr(member.value) for member in annotation)
    return getattr(annotation, "__name__", str(annotation))


def _default(value) -> str:
    if value is dataclasses.MISSING:
        return "required"
    if isinstance(value, Enum):
        value = value.value
    return f"`{value!r}`"


def _cell(text) -> str:
    """Text fit for one cell of a Markdown table, shown as written (no HTML, no emphasis)."""
    text = " ".join(str(text or "").split())
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|").replace("*", "\\*")


def _field_default(f: dataclasses.Field):
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def _options(parser: argparse.ArgumentParser, dest: str) -> list[str]:
    """The option strings that set `dest`, less the dashed spelling HfArgumentParser adds beside an underscored
    one (`--max-steps` beside `--max_steps`), which each page mentions once."""
    options = [option for action in parser._actions if action.dest == dest for option in action.option_strings]
    return [option for option in options if option == _underscored(option) or _underscored(option) not in options]


def _underscored(option: str) -> str:
    return "--" + option[2:].replace("-", "_")


def _table(rows: list[tuple[str, str, str, str]]) -> str:
    lines = ["| flag | type | default | help |", "|---|---|---|---|"]
    lines += [f"| {flag} | {kind} | {default} | {text} |" for flag, kind, default, text in rows]
    return "\n".join(lines)


def dataclass_rows(cls, parser: argparse.ArgumentParser | None = None) -> list[tuple[str, str, str, str]]:
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        options = _options(parser, f.name) if parser is not None else [f"--{f.name}"]
        flags = "<br>".join(f"`{option}`" for option in options or [f"--{f.name}"])
        rows.append(
            (flags, _cell(type_name(hints[f.name])), _default(_field_default(f)), _cell(f.metadata.get("help")))
        )
    return rows


def section_of(cls) -> str | None:
    """The recipe section whose keys fill `cls`, or None for a command's own flags."""
    from stages import SECTION_TYPES, section_types

    if cls.__name__ == "RecipeArguments":
        return ""
    return next((section for section in SECTION_TYPES if cls in section_types(section)), None)


def flags_markdown(command: str) -> str:
    """Every flag `command` takes, as Markdown: one table per arguments dataclass (or one for a plain parser)."""
    parser = command_parser(command)
    dataclass_types = getattr(parser, "dataclass_types", None)
    parts = [
        f"`python -m {command} --help` prints the same flags. A flag can be written with dashes for its underscores "
        "(`--max-steps` for `--max_steps`)."
    ]
    if not dataclass_types:
        rows = []
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            flag = "<br>".join(f"`{o}`" for o in action.option_strings) or f"`{action.dest}` (positional)"
            if isinstance(action, argparse._StoreTrueAction):
                kind, default = "flag", "`False`"
            else:
                kind = getattr(action.type, "__name__", "str")
                default = "required" if action.required or not action.option_strings else _default(action.default)
            rows.append((flag, kind, default, _cell(action.help)))
        parts.append(_table(rows))
        return "\n\n".join(parts)
    for cls in dataclass_types:
        section = section_of(cls)
        if section == "":
            title = "Recipe and language (every command; top-level recipe keys)"
        elif section is not None:
            title = f"`{cls.__name__}`: recipe section `{section}`"
        else:
            title = f"`{cls.__name__}`: flags only (not in a recipe)"
        anchor = cls.__name__.lower()
        parts.append(f"### {title} {{#{anchor}}}")
        doc = (cls.__doc__ or "").strip()
        if doc and not doc.startswith(f"{cls.__name__}("):  # dataclasses without a docstring get their signature
            parts.append(" ".join(doc.split("\n\n")[0].split()))
        parts.append(_table(dataclass_rows(cls, parser)))
    return "\n\n".join(parts)


def recipe_markdown() -> str:
    """Every key a recipe may hold, section by section, from the dataclasses each section fills."""
    from common.recipe import RecipeArguments
    from stages import SECTION_TYPES, section_types

    rows = [row for row in dataclass_rows(RecipeArguments) if row[0] != "`--config`"]
    parts = ["### Top level", _table(rows).replace("| flag |", "| key |", 1)]
    for section in SECTION_TYPES:
        parts.append(f"### `{section}`")
        for cls in section_types(section):
            if cls.__module__.startswith("trl"):
                count = len([f for f in dataclasses.fields(cls) if f.init])
                parts.append(
                    f"Every field of TRL's `{cls.__name__}` ({count} fields): listed with their defaults and help "
                    f"on [the pretrain page](commands/pretrain.md#{cls.__name__.lower()})."
                )
                continue
            parts.append(f"`{cls.__module__}.{cls.__name__}`")
            parts.append(_table(dataclass_rows(cls)).replace("| flag |", "| key (and flag) |", 1))
    return "\n\n".join(parts)


def _hole(node: ast.expr) -> str:
    """An f-string hole: its variable's name (`{path}`, `{args.output}`), or `{...}` for a computed value."""
    source = ast.unparse(node)
    return "{" + source + "}" if source.replace(".", "").replace("_", "").isalnum() else "{...}"


def _message(node: ast.expr) -> str | None:
    """An error message as written in the source, each f-string hole shown as `{name}` or `{...}`."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(part.value if isinstance(part, ast.Constant) else _hole(part.value) for part in node.values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _message(node.left), _message(node.right)
        if left is not None or right is not None:
            return (left or "{...}") + (right or "{...}")
    if isinstance(node, ast.IfExp):
        body, orelse = _message(node.body), _message(node.orelse)
        if body is not None and orelse is not None:
            return f"{body} / {orelse}"
    return None


def raised_errors(path: Path) -> list[tuple[int, str, str]]:
    """(line, error class, message) for each `raise UsageError(...)` / `raise RunFailed(...)` in a source file whose
    message is written there (a message passed in a variable is left out)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call)):
            continue
        name = getattr(node.exc.func, "id", getattr(node.exc.func, "attr", None))
        if name not in ("UsageError", "RunFailed") or not node.exc.args:
            continue
        message = _message(node.exc.args[0])
        if message is not None:
            found.append((node.lineno, name, message))
    return sorted(found)


def errors_markdown() -> str:
    parts = []
    for folder, title in ERROR_GROUPS.items():
        parts.append(f"## {title}")
        for path in sorted((ROOT / folder).glob("*.py")):
            errors = raised_errors(path)
            if not errors:
                continue
            relative = path.relative_to(ROOT).as_posix()
            parts.append(f"### `{relative}`")
            lines = []
            for line, name, message in errors:
                exit_code = 1 if name != "UsageError" else 2
                lines.append(f"- {_cell(message)} (exit {exit_code}; line {line})")
            parts.append("\n".join(lines))
    return "\n\n".join(parts)


def render_marker(marker: str) -> str:
    """The Markdown a marker line stands for."""
    if marker.startswith("flags: "):
        command = marker.removeprefix("flags: ")
        if command not in COMMANDS:
            raise PluginError(f"docs: unknown command in marker <!-- {marker} -->; known: {', '.join(COMMANDS)}")
        return flags_markdown(command)
    if marker == "recipe-sections":
        return recipe_markdown()
    if marker == "errors":
        return errors_markdown()
    raise PluginError(f"docs: unknown marker <!-- {marker} -->")


def expand(markdown: str, shown: set[str] | None = None) -> str:
    """`markdown` with each marker line replaced by what it stands for; the commands shown are added to `shown`."""
    lines = []
    for line in markdown.split("\n"):
        stripped = line.strip()
        if stripped.startswith(MARKER_PREFIX) and stripped.endswith(" -->") and not stripped.startswith("<!-- #"):
            marker = stripped.removeprefix(MARKER_PREFIX).removesuffix(" -->")
            lines.append(render_marker(marker))
            if shown is not None and marker.startswith("flags: "):
                shown.add(marker.removeprefix("flags: "))
        else:
            lines.append(line)
    return "\n".join(lines)


_shown: set[str] = set()
# the measured plots the pages show, served from where bench/ writes them (not copied into docs/)
SHOWN_RESULTS = "bench/results/**/*.png"


def on_files(files, config, **kwargs):
    from mkdocs.structure.files import File

    for path in sorted(ROOT.glob(SHOWN_RESULTS)):
        uri = path.relative_to(ROOT).as_posix()
        files.append(File.generated(config, uri, abs_src_path=str(path)))
    return files


def on_pre_build(config, **kwargs):
    _shown.clear()


def on_page_markdown(markdown, page, config, files, **kwargs):
    return expand(markdown, _shown)


def on_post_build(config, **kwargs):
    missing = sorted(set(COMMANDS) - _shown)
    if missing:
        raise PluginError(f"docs: no page shows the flags of {', '.join(missing)}; add <!-- flags: NAME --> to one.")
