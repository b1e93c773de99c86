import hashlib
import json

import pytest

from common.artifacts import atomic_directory
from common.errors import UsageError
from common.run_record import (
    RUN_RECORD,
    chain_training_documents,
    chain_unsourced_pairs,
    read_run_record,
    verify_chain,
    write_run_record,
)
from stages.base_model import main as build_base_model

from .conftest import REPO


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A tiny base model written by its command, with its run record."""
    folder = tmp_path_factory.mktemp("runs") / "base"
    build_base_model(["--config", str(REPO / "recipes" / "tiny.yaml"), "--output_dir", str(folder), "--seed", "5"])
    return folder


def test_base_model_command_writes_a_complete_record(base_run):
    record = read_run_record(base_run, expected_stage="base_model")
    assert record["argv"][0] == "python"
    assert record["seed"] == 5 and record["parent"] is None
    assert record["config"]["base_model"]["output_dir"] == str(base_run)
    assert record["packages"]["torch"].startswith("2.14.1") and record["packages"]["transformers"]
    assert set(record["git"]) == {"commit", "dirty"} and record["git"]["commit"]
    sample = REPO / "samples" / "udhr" / "km.md"
    (digest,) = [value for key, value in record["inputs"].items() if key.endswith("samples/udhr/km.md")]
    assert digest == hashlib.sha256(sample.read_bytes()).hexdigest()
    assert record["results"]["parameters"] > 0


def test_records_chain_parent_to_child_and_catch_a_changed_parent(base_run, tmp_path):
    child = tmp_path / "child"
    child.mkdir()
    write_run_record(child, stage="pretrain", config={"lr": 1.0e-5}, seed=1, parent=base_run)
    grandchild = tmp_path / "grandchild"
    grandchild.mkdir()
    write_run_record(grandchild, stage="contrast", config={}, seed=1, parent=child)

    chain = verify_chain(grandchild)
    assert [record["stage"] for record in chain] == ["contrast", "pretrain", "base_model"]
    assert chain[0]["parent"]["path"] == str(child.resolve())

    record_path = child / RUN_RECORD
    edited = json.loads(record_path.read_text()) | {"seed": 2}
    record_path.write_text(json.dumps(edited))
    with pytest.raises(UsageError, match="changed after a child run used it"):
        verify_chain(grandchild)


def test_what_a_model_was_trained_on_is_gathered_from_every_ancestor(base_run, tmp_path):
    pretrained, refined, plain = tmp_path / "pretrained", tmp_path / "refined", tmp_path / "plain"
    for folder in (pretrained, refined, plain):
        folder.mkdir()
    write_run_record(pretrained, stage="pretrain", config={}, seed=0, parent=base_run,
                     results={"training_documents": ["a", "b"]})  # fmt: skip
    write_run_record(refined, stage="contrast", config={}, seed=0, parent=pretrained,
                     results={"training_documents": ["b", "c"], "pairs": {"unsourced_pairs": 3}})  # fmt: skip
    assert chain_training_documents(refined) == {"a", "b", "c"}  # the base model's record lists none
    assert chain_training_documents(pretrained) == {"a", "b"}
    assert chain_unsourced_pairs(refined) == 3 and chain_unsourced_pairs(pretrained) == 0
    # a plain checkpoint (no run record): what it was trained on is not known, which is not "nothing"
    assert chain_training_documents(plain) is None and chain_unsourced_pairs(plain) is None


def test_child_of_an_unfinished_run_is_refused(tmp_path):
    (tmp_path / "killed").mkdir()
    with pytest.raises(UsageError, match="has no run_record.json"):
        write_run_record(tmp_path, stage="pretrain", config={}, seed=0, parent=tmp_path / "killed")
    assert not (tmp_path / RUN_RECORD).exists()


def test_wrong_stage_and_broken_records(base_run, tmp_path):
    with pytest.raises(UsageError, match="written by stage `base_model`, expected pretrain"):
        read_run_record(base_run, expected_stage="pretrain")
    (tmp_path / RUN_RECORD).write_text("{not json")
    with pytest.raises(UsageError, match="is not valid JSON"):
        read_run_record(tmp_path)
    (tmp_path / RUN_RECORD).write_text(json.dumps({"stage": "pretrain"}))
    with pytest.raises(UsageError, match="lacks created, argv"):
        read_run_record(tmp_path)


def test_atomic_directory_leaves_nothing_on_failure_and_keeps_the_old_folder(tmp_path):
    final = tmp_path / "final"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_directory(final) as tmp:
        (tmp / "half.txt").write_text("half")
        raise RuntimeError("killed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]
    assert [p.name for p in final.iterdir()] == ["old.txt"]

    with atomic_directory(final) as tmp:
        (tmp / "new.txt").write_text("new")
        assert not (final / "new.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]
    assert [p.name for p in final.iterdir()] == ["new.txt"]
