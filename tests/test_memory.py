"""Activation checkpointing chosen by memory (lco/memory.py, `stages.pretrain --checkpointing`)."""

import pytest
import torch
import yaml

import stages.pretrain
from common.errors import UsageError
from common.run_record import read_run_record
from lco.memory import MemoryEstimate, choose_every_n_layers, training_state_bytes
from stages.pretrain import main as pretrain
from stages.pretrain import set_checkpointing

from .conftest import REPO, thai_pages_dataset
from .test_pretrain import pretrain_argv


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    return thai_pages_dataset(tmp_path_factory.mktemp("pages"), documents=4, chars=160)


def test_the_fewest_checkpointed_layers_that_fit_are_chosen():
    # 8 layers keeping 10 bytes each (1 when checkpointed, plus 10 for the layer recomputed in backward):
    # peaks of 180 (none), 172 (every 4th), 163 (every 3rd), 154 (every 2nd) and 118 (all)
    estimate = MemoryEstimate(state_bytes=100, layers=8, hidden_bytes=1, layer_bytes=10, head_bytes=0, tokens=1)
    assert [estimate.peak(n) for n in (0, 4, 3, 2, 1)] == [180, 172, 163, 154, 118]
    chosen = {device: choose_every_n_layers(estimate, device, budget=1.0) for device in (200, 175, 165, 160, 120, 50)}
    assert chosen == {200: 0, 175: 4, 165: 3, 160: 2, 120: 1, 50: 1}  # nothing fits: all, the least memory
    assert choose_every_n_layers(estimate, 200, budget=0.85) == 3  # 170 usable


def test_training_state_counts_weights_gradients_and_moments_as_each_setup_keeps_them(tiny_model):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_model[2])  # float32
    model.model.visual.requires_grad_(False)
    total = sum(p.numel() for p in model.parameters())
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert 0 < trained < total
    assert training_state_bytes(model, None, None, 1) == 4 * total + 3 * 4 * trained  # AdamW in the weights' dtype
    # DeepSpeed: gradient in the weights' dtype, fp32 master weights and moments, each partitioned from its stage on
    assert training_state_bytes(model, None, 1, 2) == 4 * total + 4 * trained + 12 * trained // 2
    assert training_state_bytes(model, None, 2, 2) == 4 * total + 4 * trained // 2 + 12 * trained // 2
    assert training_state_bytes(model, None, 3, 2) == 4 * total // 2 + 4 * trained // 2 + 12 * trained // 2
    from peft import get_peft_model

    from lco.lora import lora_config

    lora = sum(
        p.numel() for p in get_peft_model(model, lora_config(model.config, 4, 8, 0.0)).parameters() if p.requires_grad
    )
    model = AutoModelForImageTextToText.from_pretrained(tiny_model[2])
    assert training_state_bytes(model, 4, None, 1) == 4 * (total + lora) + 3 * 4 * lora


def test_checkpointing_recomputes_the_chosen_layers_changes_no_loss_and_auto_chooses_none_where_it_fits(
    recorded_base, pages, tmp_path, monkeypatch
):
    from transformers.modeling_layers import GradientCheckpointingLayer

    calls = {}  # per setting: forward calls with autograd on, per decoder layer (a recompute is a second call)

    def counting(args, training, model):
        layers = [m for n, m in model.named_modules() if isinstance(m, GradientCheckpointingLayer) and "language" in n]
        counts = calls.setdefault(args.checkpointing, [0] * len(layers))
        for number, layer in enumerate(layers):
            # on entering the layer's MLP: a recompute calls the layer's forward again, not its hooks, and stops
            # once it has what backward needs, before the MLP returns
            layer.mlp.register_forward_pre_hook(
                lambda *_, n=number: counts.__setitem__(n, counts[n] + torch.is_grad_enabled())
            )
        return set_checkpointing(args, training, model)

    monkeypatch.setattr(stages.pretrain, "set_checkpointing", counting)
    losses = {}
    for setting in ("auto", "all", "every_2"):
        output = tmp_path / setting
        argv = pretrain_argv(recorded_base, pages, output, "--max_steps", "2", "--eval_fraction", "0")
        pretrain([*argv, "--checkpointing", setting])
        results = read_run_record(output / "final")["results"]
        losses[setting] = [entry["loss"] for entry in results["loss_history"]]
        assert results["checkpointing"]["setting"] == setting
        assert results["checkpointing"]["every_n_layers"] == {"auto": 0, "all": 1, "every_2": 2}[setting]
    # the tiny model's step fits this machine's memory many times over
    assert read_run_record(tmp_path / "auto" / "final")["results"]["checkpointing"]["estimated_peak_gib"] < 1
    steps = calls["auto"][0]
    assert steps > 0 and calls["auto"] == [steps] * len(calls["auto"])
    assert calls["all"] == [2 * steps] * len(calls["auto"])
    assert sorted(set(calls["every_2"])) == [steps, 2 * steps]  # some layers recomputed, some not
    assert losses["all"] == pytest.approx(losses["auto"], rel=1e-5)
    assert losses["every_2"] == pytest.approx(losses["auto"], rel=1e-5)


@pytest.mark.parametrize("where", ["flag", "recipe"])
def test_the_trainers_own_checkpointing_switch_is_refused_with_the_stage_setting_named(
    recorded_base, pages, tmp_path, where
):
    argv = pretrain_argv(recorded_base, pages, tmp_path / "run")
    if where == "flag":
        argv += ["--gradient_checkpointing", "true"]
    else:
        recipe = yaml.safe_load((REPO / "recipes/tiny.yaml").read_text(encoding="utf-8"))
        recipe["pretrain"]["activation_checkpointing"] = False
        (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
        argv[1] = str(tmp_path / "recipe.yaml")
    with pytest.raises(UsageError, match="set `checkpointing` instead"):
        pretrain(argv)
    assert not (tmp_path / "run").exists()


def test_a_checkpointing_value_of_no_known_form_is_refused(recorded_base, pages, tmp_path):
    with pytest.raises(UsageError, match="auto, none, all or every_N"):
        pretrain(pretrain_argv(recorded_base, pages, tmp_path / "run", "--checkpointing", "sometimes"))
