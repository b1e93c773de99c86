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


GIB = 2**30


def test_the_estimate_is_compared_with_free_memory_and_what_this_process_holds(monkeypatch):
    """Another process's 67 GiB on the same 80 GiB GPU are not this run's: 10 GiB free + 3 GiB this process holds."""
    from types import SimpleNamespace

    from lco.memory import device_memory_bytes

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=80 * GIB))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *device: (10 * GIB, 80 * GIB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda *device: 3 * GIB)
    assert device_memory_bytes() == 13 * GIB


def test_the_peak_adds_every_resident_term_and_the_larger_of_activations_and_the_optimizer_step():
    # 8 layers of 10 bytes a token, 4 tokens in sequences of 2, eager scores of 3 bytes a pair: 10 + 3 x 2 a token
    base = dict(state_bytes=100, layers=8, hidden_bytes=1, layer_bytes=10, head_bytes=5, tokens=4, sequence=2)
    eager = MemoryEstimate(**base, attention_bytes=3, tower_bytes=7)
    assert eager.peak(0) == 100 + 4 * 8 * (10 + 3 * 2) + 5 + 7
    assert eager.peak(1) == 100 + 4 * (8 * 1 + 16) + 5 + 7  # checkpointed: inputs kept, one layer recomputed
    resident = dict(context_bytes=1000, nccl_bytes=2000, bucket_bytes=400)
    assert MemoryEstimate(**base, **resident, optimizer_bytes=50).peak(0) == 100 + 3400 + 4 * 8 * 10 + 5
    assert MemoryEstimate(**base, **resident, optimizer_bytes=9000).peak(0) == 100 + 3400 + 9000


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_eager_attention_keeps_a_score_per_head_and_key_for_each_token(tiny_model, implementation):
    """The tiny model's 4 heads in float32: 4 x 4 bytes per (query, key) pair and layer with eager attention (its
    softmax output, kept for backward), none with SDPA; the estimate grows as sequence x tokens x layers."""
    from transformers import AutoModelForImageTextToText

    from lco.memory import estimate_memory

    model = AutoModelForImageTextToText.from_pretrained(tiny_model[2], attn_implementation=implementation)
    heads, layers = model.config.text_config.num_attention_heads, model.config.text_config.num_hidden_layers
    estimate = estimate_memory(model, 2048, None, None, 1, sequence=1024, on_gpu=False)
    pair = heads * 4 if implementation == "eager" else 0
    assert estimate.attention_bytes == pair
    without = MemoryEstimate(**{**estimate.__dict__, "attention_bytes": 0})
    assert estimate.peak(0) - without.peak(0) == 2048 * layers * pair * 1024


def test_gpu_runs_count_the_cuda_context_and_several_processes_nccl_buffers(tiny_model):
    from transformers import AutoModelForImageTextToText

    from lco.memory import CUDA_CONTEXT_BYTES, NCCL_BYTES, estimate_memory

    model = AutoModelForImageTextToText.from_pretrained(tiny_model[2])
    terms = {
        (gpu, world): (estimate.context_bytes, estimate.nccl_bytes)
        for gpu in (True, False)
        for world in (1, 2)
        for estimate in [estimate_memory(model, 64, None, None, world, on_gpu=gpu)]
    }
    assert terms[True, 2] == (CUDA_CONTEXT_BYTES, NCCL_BYTES) == (512 * 2**20, GIB)
    assert terms[True, 1] == (CUDA_CONTEXT_BYTES, 0) and terms[False, 2] == terms[False, 1] == (0, 0)


def test_zero_buckets_come_from_the_deepspeed_config_doubled_with_overlap_comm(tiny_model, tmp_path):
    import json

    from transformers import AutoModelForImageTextToText

    from lco.memory import estimate_memory

    model = AutoModelForImageTextToText.from_pretrained(tiny_model[2])  # float32, hidden size 256
    hidden = model.config.text_config.hidden_size

    def buckets(zero: dict | str) -> int:
        config = REPO / f"recipes/deepspeed/{zero}.json" if isinstance(zero, str) else {"zero_optimization": zero}
        stage = (json.loads(config.read_text()) if isinstance(zero, str) else config)["zero_optimization"]["stage"]
        return estimate_memory(model, 64, None, stage, 2, deepspeed=str(config) if isinstance(zero, str) else config,
                               on_gpu=False).bucket_bytes  # fmt: skip

    # the recipes: "auto" is hidden^2 (reduce) and 0.9 hidden^2 (prefetch) elements, overlap_comm on
    assert buckets("zero2") == 2 * hidden**2 * 4
    assert buckets("zero3") == (2 * hidden**2 + int(0.9 * hidden**2)) * 4
    assert buckets({"stage": 2, "reduce_bucket_size": 1000}) == 1000 * 4  # overlap_comm off by default at ZeRO-2
    assert buckets({"stage": 3}) == (2 * 5e8 + 5e7) * 4  # DeepSpeed's defaults; overlap_comm on at ZeRO-3
    assert estimate_memory(model, 64, None, None, 1, on_gpu=False).bucket_bytes == 0


def test_the_optimizer_steps_temporaries_as_each_optimizer_makes_them(tiny_model):
    from transformers import AutoModelForImageTextToText

    from lco.memory import estimate_memory

    model = AutoModelForImageTextToText.from_pretrained(tiny_model[2])  # float32
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    step = {
        (optim, stage): estimate_memory(model, 64, None, stage, 2, optim=optim, on_gpu=False).optimizer_bytes
        for optim in ("adamw_torch", "adamw_torch_fused")
        for stage in (None, 2)
    }
    assert step["adamw_torch", None] == trained * 4  # the foreach step's sqrt of the second moments
    assert step["adamw_torch_fused", None] == 0
    assert step["adamw_torch", 2] == step["adamw_torch_fused", 2] == 4 * trained // 2  # fp32 gradient partition


def test_a_trained_vision_tower_adds_its_blocks_activations_for_the_micro_batchs_pages(tiny_model):
    from transformers import AutoModelForImageTextToText

    from lco.memory import estimate_memory

    model = AutoModelForImageTextToText.from_pretrained(tiny_model[2])
    vision = model.config.vision_config  # 2 blocks of hidden size 32, 14-px patches, 2 x 2 merged
    # 2 pages of 200 tokens: 40,000 pixels are 204 patches (under 200 tokens x 4 patches), in float32
    trained = estimate_memory(model, 400, None, None, 1, sequence=200, max_pixels=40_000, on_gpu=False)
    assert trained.tower_bytes == 2 * (40_000 // 14**2) * vision.depth * 34 * vision.hidden_size * 4 // 2
    capped = estimate_memory(model, 40, None, None, 1, sequence=20, max_pixels=40_000, on_gpu=False)
    assert capped.tower_bytes == 2 * (20 * 4) * vision.depth * 34 * vision.hidden_size * 4 // 2
    model.model.visual.requires_grad_(False)
    assert estimate_memory(model, 400, None, None, 1, sequence=200, max_pixels=40_000, on_gpu=False).tower_bytes == 0
