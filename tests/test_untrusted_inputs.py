"""Inputs from elsewhere can't reach outside their folder, run code, or crash a stage (issue 9).

Eval folders whose image paths leave the folder, recipes with Python tags, model folders that bring code
(`auto_map`), and random malformed recipes (hypothesis): each gives one clear line on stderr and exit code 2.
"""

import dataclasses
import enum
import io
import json
import types
import typing
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from common.artifacts import check_model_source, refuse_remote_code
from common.errors import UsageError, run_cli
from common.recipe import SECTIONS, parse_stage_arguments
from data_prep.evalset import convert_parquet_evalset
from lco.retrieval import load_evalset
from stages import base_model, check_recipe, evaluate, section_types
from stages.pretrain import CPU_DEFAULTS

from .conftest import REPO


def run(main, argv, capsys) -> tuple[int | None, str]:
    """(exit code, stderr) of a stage run through `run_cli`; exit code None when it returned."""
    try:
        run_cli(main, argv)
    except SystemExit as exit_info:
        return exit_info.code, capsys.readouterr().err
    return None, capsys.readouterr().err


def assert_one_line_error(code, err):
    """Exit code 2 and one line on stderr that says `error:`, besides progress bars (which end in a carriage return)."""
    assert code == 2, err
    assert "Traceback" not in err and err.endswith("\n"), err
    lines = [line for line in err.split("\n")[:-1] if "\r" not in line]
    assert len(lines) == 1 and "error: " in lines[0], err


def png(color=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 24), color).save(buffer, format="PNG")
    return buffer.getvalue()


# --- eval folders -------------------------------------------------------------------------------------


def beir_folder(folder: Path, images: dict[str, str]) -> Path:
    """A BEIR-with-images eval folder: one page per entry of `images` (page id -> image path as written in
    corpus.jsonl), each with a real PNG at images/<id>.png, one query per page."""
    (folder / "images").mkdir(parents=True)
    corpus, queries, qrels = [], [], ["query-id\tcorpus-id\tscore"]
    for number, (page_id, image) in enumerate(images.items()):
        (folder / "images" / f"{page_id}.png").write_bytes(png((40 * number % 256, 90, 120)))
        corpus.append({"_id": page_id, "image": image, "text": f"page {page_id}", "lang": "th"})
        queries.append({"_id": f"q{number}", "text": f"question {number}", "lang": "en"})
        qrels.append(f"q{number}\t{page_id}\t1")
    (folder / "corpus.jsonl").write_text("".join(json.dumps(row) + "\n" for row in corpus), encoding="utf-8")
    (folder / "queries.jsonl").write_text("".join(json.dumps(row) + "\n" for row in queries), encoding="utf-8")
    (folder / "qrels.tsv").write_text("\n".join(qrels) + "\n", encoding="utf-8")
    return folder


@pytest.fixture
def outside(tmp_path) -> Path:
    """An image beside the eval folder, not in it: what an escaping path points at."""
    secret = tmp_path / "secret.png"
    secret.write_bytes(png((0, 0, 0)))
    return secret


def test_a_normal_eval_folder_loads(tmp_path):
    folder = beir_folder(tmp_path / "eval", {"p0": "images/p0.png", "p1": "images/../images/p1.png"})
    evalset = load_evalset(str(folder))
    assert set(evalset.pages) == {"p0", "p1"} and evalset.open_image("p1").size == (32, 24)


def test_a_link_inside_the_folder_and_a_linked_folder_are_fine(tmp_path):
    folder = beir_folder(tmp_path / "eval", {"p0": "images/p0.png", "p1": "images/alias.png"})
    (folder / "images" / "alias.png").symlink_to("p1.png")
    (tmp_path / "linked").symlink_to(folder)
    assert set(load_evalset(str(tmp_path / "linked")).pages) == {"p0", "p1"}


@pytest.mark.parametrize(
    ("kind", "image", "says"),
    [
        ("absolute", "{outside}", "is an absolute path"),
        ("dotdot", "../secret.png", "../secret.png goes up out of the folder"),
        ("dotdot_inside_first", "images/../../secret.png", "goes up out of the folder"),
        ("file_link", "images/link.png", "images/link.png is a link to {outside}"),
        ("folder_link", "linked/secret.png", "linked/secret.png is a link to {outside}"),
    ],
)
def test_image_paths_that_leave_the_eval_folder_are_refused(tmp_path, outside, kind, image, says):
    folder = beir_folder(tmp_path / "eval", {"p0": "images/p0.png", "bad": image.format(outside=outside)})
    (folder / "images" / "link.png").symlink_to(outside)
    (folder / "linked").symlink_to(outside.parent)
    with pytest.raises(UsageError) as error:
        load_evalset(str(folder))
    message = str(error.value)
    assert f"--data {folder}: 1 page images outside the eval folder, which are not read (bad: " in message
    assert says.format(outside=outside) in message
    assert "must be relative paths to files inside the folder, e.g. images/<id>.png" in message
    assert "pages without an image file" not in message  # an outside path is not probed for existence
    assert "\n" not in message


def test_a_loop_of_links_and_a_nul_byte_are_refused(tmp_path):
    folder = beir_folder(
        tmp_path / "eval", {"p0": "images/p0.png", "loop": "images/cycle.png", "nul": "images/a\0b.png"}
    )
    (folder / "images" / "cycle.png").symlink_to("cycle.png")
    with pytest.raises(
        UsageError,
        match=r"2 page images outside the eval folder.*loop: .*cannot be followed.*"
        r"nul: .*cannot be followed \(embedded null byte\)",
    ):
        load_evalset(str(folder))


def test_many_escaping_rows_are_counted_and_a_few_listed(tmp_path, outside):
    images = {f"p{i}": f"../secret{i}.png" for i in range(8)} | {"ok": "images/ok.png"}
    folder = beir_folder(tmp_path / "eval", images)
    with pytest.raises(
        UsageError,
        match=r"8 page images outside the eval folder, which are not read \(p0: \.\./secret0\.png "
        r"goes up out of the folder; .*p4: .*; \.\.\.\)",
    ):
        load_evalset(str(folder))


def test_evaluate_refuses_an_escaping_eval_folder_in_one_line(tmp_path, outside, capsys):
    folder = beir_folder(tmp_path / "eval", {"p0": "images/p0.png", "p1": str(outside)})
    code, err = run(
        evaluate.main,
        [
            "--config",
            str(REPO / "recipes/tiny.yaml"),
            "--data",
            str(folder),
            "--output",
            str(tmp_path / "results.json"),
        ],
        capsys,
    )
    assert_one_line_error(code, err)
    assert f"p1: {outside} is an absolute path" in err
    assert not (tmp_path / "results.json").exists()


@pytest.mark.parametrize(
    ("file", "content", "says"),
    [
        ("corpus.jsonl", '["p0", "images/p0.png"]\n', "corpus.jsonl line 1: expected a JSON object with an `_id`"),
        ("corpus.jsonl", '{"image": "images/p0.png"}\n', "corpus.jsonl line 1: expected a JSON object with an `_id`"),
        (
            "qrels.tsv",
            "query-id\tcorpus-id\tscore\nq0 p0 1\n",
            "qrels.tsv line 2: expected query-id, corpus-id and an integer score",
        ),
        ("qrels.tsv", "query-id\tcorpus-id\tscore\nq0\tp0\thigh\n", "qrels.tsv line 2: expected query-id"),
    ],
)
def test_malformed_eval_files_name_the_line(tmp_path, file, content, says):
    folder = beir_folder(tmp_path / "eval", {"p0": "images/p0.png"})
    (folder / file).write_text(content, encoding="utf-8")
    with pytest.raises(UsageError, match=says):
        load_evalset(str(folder))


def test_parquet_ids_never_name_a_file_outside_or_share_one(tmp_path):
    ids = ["../../escape", "a/b", "a_b", "/abs", "ok"]
    tables = {
        "corpus": [
            {"corpus-id": pid, "image": {"bytes": png((10 * i, 0, 0)), "path": None}} for i, pid in enumerate(ids)
        ],
        "queries": [{"query-id": "q1", "query": "which page"}],
        "qrels": [{"query-id": "q1", "corpus-id": pid, "score": 1} for pid in ids],
    }
    for name, rows in tables.items():
        (tmp_path / "seadoc" / name).mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / "seadoc" / name / "test.parquet")
    convert_parquet_evalset(str(tmp_path / "seadoc"), str(tmp_path / "eval"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval", "seadoc"]  # nothing written beside the output
    evalset = load_evalset(str(tmp_path / "eval"))
    images = {pid: page["image"] for pid, page in evalset.pages.items()}
    assert len(set(images.values())) == len(ids) and all(
        p.parent == tmp_path / "eval" / "images" for p in images.values()
    )
    assert images["ok"].name == "ok.png"
    for i, pid in enumerate(ids):  # each page kept its own image
        assert evalset.open_image(pid).getpixel((0, 0)) == (10 * i, 0, 0)


def test_parquet_rows_without_image_bytes_are_refused(tmp_path):
    for name, rows in {
        "corpus": [{"corpus-id": "p1", "image": {"bytes": None, "path": "/etc/passwd"}}],
        "queries": [{"query-id": "q1", "query": "x"}],
        "qrels": [{"query-id": "q1", "corpus-id": "p1", "score": 1}],
    }.items():
        (tmp_path / "seadoc" / name).mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / "seadoc" / name / "test.parquet")
    with pytest.raises(UsageError, match=r"1 corpus rows have no image bytes, e.g. \['p1'\]"):
        convert_parquet_evalset(str(tmp_path / "seadoc"), str(tmp_path / "eval"))
    assert not (tmp_path / "eval").exists()


# --- YAML -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tag",
    [
        "!!python/object/apply:os.system ['touch {marker}']",
        "!!python/object/new:os.system ['touch {marker}']",
        "!!python/name:os.system",
        "!!python/object/apply:subprocess.check_call [['touch', '{marker}']]",
    ],
)
def test_a_recipe_with_python_tags_runs_nothing(tmp_path, capsys, tag):
    marker = tmp_path / "pwned"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"lang: km\nseed: {tag.format(marker=marker)}\n", encoding="utf-8")
    code, err = run(base_model.main, ["--config", str(recipe), "--output_dir", str(tmp_path / "out")], capsys)
    assert_one_line_error(code, err)
    assert f"recipe {recipe} is not valid YAML" in err
    assert not marker.exists() and not (tmp_path / "out").exists()


# --- model folders that bring code ----------------------------------------------------------------------


def custom_code_folder(folder: Path, marker: Path, *, model_type: str = "evil_vlm", processor: bool = False) -> Path:
    """A model folder whose config maps the auto classes to its own module; importing it creates `marker`."""
    folder.mkdir(parents=True)
    (folder / "modeling_evil.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('custom code ran')\n"
        "from transformers import PretrainedConfig, PreTrainedModel\n"
        "class EvilConfig(PretrainedConfig):\n    model_type = 'evil_vlm'\n"
        "class EvilModel(PreTrainedModel):\n    config_class = EvilConfig\n",
        encoding="utf-8",
    )
    auto_map = {"AutoConfig": "modeling_evil.EvilConfig", "AutoModelForImageTextToText": "modeling_evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps({"model_type": model_type, "auto_map": auto_map}), encoding="utf-8")
    if processor:
        (folder / "processor_config.json").write_text(
            json.dumps(
                {"processor_class": "EvilProcessor", "auto_map": {"AutoProcessor": "modeling_evil.EvilProcessor"}}
            ),
            encoding="utf-8",
        )
    return folder


def test_model_folders_with_auto_map_are_refused_before_loading(tmp_path):
    marker = tmp_path / "ran"
    unknown = custom_code_folder(tmp_path / "unknown", marker)
    with pytest.raises(
        UsageError,
        match=r"--model .*unknown brings code of its own .*config\.json: auto_map "
        r"\{\"AutoConfig\": \"modeling_evil\.EvilConfig\".*use a model folder without `auto_map`",
    ):
        check_model_source(str(unknown), "--model")
    known = custom_code_folder(tmp_path / "known", marker, model_type="qwen2_5_vl")
    with pytest.raises(UsageError, match="brings code of its own"):
        check_model_source(str(known), "--model")
    processor_only = custom_code_folder(tmp_path / "processor", marker, processor=True)
    (processor_only / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}), encoding="utf-8")
    with pytest.raises(UsageError, match=r"processor_config\.json: auto_map \{\"AutoProcessor\""):
        check_model_source(str(processor_only), "--model")
    check_model_source(str(known), "--model", trust_remote_code=True)  # the opt-in a stage would pass
    assert not marker.exists()


def test_the_tiny_model_has_no_custom_code(tiny_model):
    check_model_source(str(tiny_model[2]), "--model")


def test_evaluate_refuses_a_model_folder_with_custom_code(tmp_path, capsys):
    marker = tmp_path / "ran"
    folder = custom_code_folder(tmp_path / "model", marker)
    data = beir_folder(tmp_path / "eval", {"p0": "images/p0.png"})
    code, err = run(
        evaluate.main,
        ["--config", str(REPO / "recipes/tiny.yaml"), "--model", str(folder), "--data", str(data)],
        capsys,
    )
    assert_one_line_error(code, err)
    assert "brings code of its own" in err and not marker.exists()


@pytest.mark.parametrize("processor", [False, True], ids=["model", "processor"])
def test_transformers_refuses_rather_than_asks_even_if_the_user_would_say_yes(tmp_path, monkeypatch, capsys, processor):
    """What transformers does on its own with `trust_remote_code` unset: for a `model_type` it does not know, it
    asks on the terminal for 15 s and runs the folder's code on `y`. After `refuse_remote_code()` (which every
    stage's argument parsing calls) it raises without asking, and `run_cli` says so in one line."""
    from transformers import AutoProcessor

    from lco.embedder import Embedder

    marker = tmp_path / "ran"
    folder = custom_code_folder(tmp_path / "model", marker, processor=processor)
    if processor:
        (folder / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}), encoding="utf-8")
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    asked = []
    monkeypatch.setattr("builtins.input", lambda prompt="": asked.append(prompt) or "y")

    def load(argv):
        refuse_remote_code()
        if processor:
            AutoProcessor.from_pretrained(str(folder))
        else:
            Embedder(str(folder), device="cpu")

    code, err = run(load, [], capsys)
    assert_one_line_error(code, err)
    assert "trust_remote_code" in err and "This project runs no code that a model folder brings" in err
    assert asked == [] and not marker.exists()


# --- random malformed recipes (hypothesis) --------------------------------------------------------------


HUGE = st.integers(min_value=10**18, max_value=10**400) | st.integers(min_value=-(10**400), max_value=-(10**18))
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | HUGE
    | st.floats()
    | st.text(max_size=20)
    | st.sampled_from(
        [
            0,
            -1,
            1,
            2,
            "th",
            "khm",
            "1e-5",
            "auto",
            "yes",
            "",
            "~",
            "null",
            "qwen2_5_vl",
            "a\nb",
            "nowhere/model",
            "\x00",
            "x" * 300,
            "/",
            "..",
            "-",
            "--help",
            "recipes/tiny.yaml",
            "samples/udhr",
        ]
    )
)
KEYS = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10)
JUNK = st.recursive(
    SCALARS, lambda children: st.lists(children, max_size=3) | st.dictionaries(KEYS, children, max_size=3), max_leaves=8
)


def values_for(annotation):
    """Values of about the right type for a field (edge values included), or junk."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return st.one_of(*(values_for(arg) for arg in args))
    if origin is typing.Literal:
        return st.sampled_from(args) | JUNK
    if origin in (list, tuple):
        return st.lists(values_for(args[0]) if args else SCALARS, max_size=3) | JUNK
    if annotation is bool:
        return st.booleans()
    if annotation is int:
        return st.integers(min_value=-3, max_value=5000) | HUGE
    if annotation is float:
        return st.floats() | st.integers(min_value=-3, max_value=3)
    if annotation is str:
        return st.text(max_size=20) | SCALARS.filter(lambda value: isinstance(value, str))
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return st.sampled_from([member.value for member in annotation]) | st.text(max_size=8)
    return JUNK


def mostly(good, bad, odds: int = 4):
    """`good` `odds` times in `odds + 1`, else `bad` (hypothesis weighs the branches of `a | b | c` alike)."""
    return st.integers(min_value=0, max_value=odds).flatmap(lambda pick: bad if pick == 0 else good)


def section_values(section: str):
    """A mapping of some of the section's keys to values of about their type, now and then junk."""
    fields = {}
    for cls in section_types(section):
        hints = typing.get_type_hints(cls)
        fields |= {f.name: mostly(values_for(hints[f.name]), JUNK) for f in dataclasses.fields(cls) if f.init}
    return st.lists(st.sampled_from(sorted(fields)), max_size=5, unique=True).flatmap(
        lambda keys: st.fixed_dictionaries({key: fields[key] for key in keys})
    )


@st.composite
def recipes(draw, target: str) -> bytes:
    """A recipe file for `target` (a section, or check_recipe): mostly a well-formed mapping with the target's
    section holding values of about the right types, so parsing gets past the first check and into the stage's
    own checks; else junk YAML, invalid YAML, random text or bytes that are not UTF-8."""
    form = draw(st.sampled_from(["structured"] * 5 + ["text"] * 3 + ["junk", "unicode", "bytes"]))
    section = target if target in SECTIONS else draw(st.sampled_from(sorted(SECTIONS)))
    if form == "text":
        key = draw(st.sampled_from(sorted({f.name for cls in section_types(section) for f in dataclasses.fields(cls)})))
        return draw(TEXTS).replace("SECTION", section).replace("KEY", key).encode()
    if form == "unicode":
        return draw(st.text(max_size=200)).encode()
    if form == "bytes":
        return draw(st.binary(max_size=200))
    if form == "junk":
        value = draw(JUNK)
    else:
        value = {
            "lang": draw(mostly(st.sampled_from(["th", "km", "khm", "multi"]), SCALARS)),
            "seed": draw(mostly(st.integers(), SCALARS)),
            section: draw(mostly(section_values(section), JUNK)),
        }
        value = {
            key: item for key, item in value.items() if key == section or draw(mostly(st.just(True), st.just(False)))
        }
    return yaml.safe_dump(value, allow_unicode=True, sort_keys=False).encode("utf-8")


LAUGHS = (
    "[&a [x, x, x, x, x, x, x, x, x, x], "
    + ", ".join(f"&{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 10)}]" for i in range(8))
    + "]"
)
# recipe texts that yaml.safe_dump does not write: broken YAML, tags, aliases, documents, edge values; SECTION and
# KEY are replaced by a section and one of its keys
TEXTS = st.sampled_from(
    [
        "lang: [km",
        "SECTION: {KEY: [",
        "- a\n- b\n",
        "lang: km\nSECTION: 3\n",
        "{",
        "lang: &a [*a]\n",
        "lang: !!python/object/apply:os.system ['true']\n",
        "%YAML 9.9\n---\nlang: km\n",
        "lang: km\n---\nlang: th\n",
        "lang: km\nseed: 1" + "0" * 5000 + "\n",
        "lang: km\nSECTION: {KEY: " + "[" * 3000 + "]" * 3000 + "}\n",
        f"lang: km\nSECTION: {{KEY: {LAUGHS}}}\n",
        "lang: km\nSECTION:\n  ? [a, b]\n  : 1\n",
        "lang: km\nSECTION: {KEY: !!binary aGVsbG8=}\n",
        "lang: km\nSECTION: {KEY: !!set {a, b}}\n",
        "lang: km\nSECTION: {KEY: 2001-01-01}\n",
        'lang: km\nSECTION: {"KEY\\nb": 1}\n',
        "lang: null\n",
        "\ufefflang: km\n",
        "lang: km\nSECTION: {KEY: ''}\n",
        "lang: km\nSECTION: {KEY: [1]}\n",
        "lang: km\nSECTION: {KEY: 0}\n",
        'lang: km\nSECTION: {KEY: "a\\0b"}\n',
        "lang: km\nSECTION: {KEY: " + "x" * 300 + "}\n",
    ]
)


# recipes that crashed a stage's argument parsing, printed all of argparse's usage, or passed it only to fail later
# ("passed, to fail ..."), before issue 9; and what each one says now
CRASHED_BEFORE = {
    "an integer of 5000 digits": (
        "base_model",
        "lang: km\nseed: 1" + "0" * 5000 + "\n",
        "is not valid YAML: Exceeds the limit",
    ),
    "lists nested 3000 deep": (
        "base_model",
        "lang: km\nbase_model: {vocab_size: " + "[" * 3000 + "]" * 3000 + "}\n",
        "is not valid YAML: it nests deeper than Python can read",
    ),
    "lang: null": ("check_recipe", "lang: null\n", "has no language: give it a top-level `lang:` key"),
    "a key with a line break": (
        "base_model",
        'lang: km\nbase_model: {"a\\nb": 1}\n',
        "unknown key `base_model.'a\\nb'`",
    ),
    "a billion laughs": (
        "base_model",
        f"lang: km\nbase_model: {{vocab_size: {LAUGHS}}}\n",
        "`base_model.vocab_size` must be an integer, got [['x', 'x', 'x', 'x', 'x', ...], [[...]",
    ),
    "a value argparse cannot convert": (
        "pretrain",
        "lang: km\npretrain: {debug: ''}\n",
        "argument --debug: invalid DebugOption value: '' (from recipe",
    ),
    "a list for an enum": (
        "pretrain",
        "lang: km\npretrain: {save_strategy: [1]}\n",
        "`pretrain.save_strategy` must be SaveStrategy or a string, got [1]",
    ),
    "zero attention heads": (
        "base_model",
        "lang: km\nbase_model: {num_attention_heads: 0}\n",
        "--num_attention_heads must be in [1, inf), got 0.",
    ),
    "a NUL in a path": (
        "base_model",
        'lang: km\nbase_model: {output_dir: "a\\0b"}\n',  # passed, to fail at mkdir
        "--output_dir 'a\\x00b' holds a NUL byte, which no file name can",
    ),
    "a seed numpy refuses": (
        "evaluate",
        "lang: km\nseed: -1\n",
        "seed must be in [0, 2**32), got -1",
    ),  # passed, to fail later
    "a file name of 300 characters": (
        "contrast",
        f"lang: km\ncontrast: {{model_name_or_path: {'x' * 300}}}\n",
        f"--model_name_or_path {'x' * 77}...: File name too long",
    ),
}


@pytest.mark.parametrize(("target", "text", "says"), CRASHED_BEFORE.values(), ids=CRASHED_BEFORE)
def test_recipes_that_crashed_before_give_one_line_errors(tmp_path, capsys, target, text, says):
    path = tmp_path / "recipe.yaml"
    path.write_text(text, encoding="utf-8")
    code, err = run(parser_for(target), ["--config", str(path)], capsys)
    assert_one_line_error(code, err)
    assert says in err and len(err) < 1000


def parser_for(target: str):
    """A `main` that parses as the stage of section `target` does (or runs check_recipe), and does nothing else."""
    if target == "check_recipe":
        return lambda argv: check_recipe(argv[1])
    stage_types, defaults = section_types(target), CPU_DEFAULTS if target == "pretrain" else None
    return lambda argv: parse_stage_arguments(target, stage_types, argv, machine_defaults=defaults)


def test_random_malformed_recipes_give_one_line_errors(tmp_path, capsys):
    """Every stage's argument parsing and `check_recipe`, fed random recipes: each run parses or exits with
    code 2 and one line on stderr; no exception escapes and no traceback is printed."""
    path = tmp_path / "recipe.yaml"
    outcomes = Counter()

    @settings(
        max_examples=200,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(data=st.data(), target=st.sampled_from([*SECTIONS, "check_recipe"]))
    def parse(data, target: str):
        path.write_bytes(data.draw(recipes(target)))
        code, err = run(parser_for(target), ["--config", str(path)], capsys)
        if code is None:
            outcomes["parsed"] += 1
        else:
            assert_one_line_error(code, err)
            assert len(err) < 1000, err
            outcomes["one-line error"] += 1

    parse()
    print(f"random recipes: {dict(outcomes)}")
    assert outcomes["one-line error"] > 100
