"""Multi-process contrastive training is one process's training, split: the same learning rate at every step,
the same losses and the same weights at the same global batch and seed (DESIGN.md, contracts)."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from common.run_record import read_run_record

from .conftest import DEEPSPEED_ENV, REPO, thai_pages_dataset
from .test_contrast import contrast_argv

# no dropout: its masks are drawn per process, so they could not match one process's draws
SCHEDULE = ["--max_steps", "6", "--warmup_ratio", "0.3333", "--learning_rate", "1.0e-3", "--lora_dropout", "0.0"]


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    return thai_pages_dataset(tmp_path_factory.mktemp("pages"), documents=6, chars=220, bookmarks=True)


def run_contrast(processes: int, base, pages, output, *extra, timeout: int = 900) -> subprocess.CompletedProcess:
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", str(processes)] if processes > 1 else []
    argv = contrast_argv(base, pages, output, *SCHEDULE, *extra)
    result = subprocess.run(
        [sys.executable, *launcher, "-m", "stages.contrast", *argv],
        capture_output=True, text=True, timeout=timeout, cwd=REPO, env={**os.environ, **DEEPSPEED_ENV},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_two_processes_train_as_one_at_the_same_global_batch_and_seed(recorded_base, pages, tmp_path):
    run_contrast(1, recorded_base, pages, tmp_path / "one")
    printed = run_contrast(2, recorded_base, pages, tmp_path / "two").stdout.splitlines()
    assert len(printed) == len(set(printed)) and any("contrast: base" in line for line in printed)  # rank 0 alone

    one, two = (read_run_record(tmp_path / name / "final")["results"] for name in ("one", "two"))
    # warm-up over 2 steps, then linear decay to 0 at step 6: a schedule stepped once per optimizer step
    assert [entry["lr"] for entry in one["loss_history"]] == pytest.approx([5e-4, 1e-3, 7.5e-4, 5e-4, 2.5e-4, 0.0])
    assert [entry["lr"] for entry in two["loss_history"]] == [entry["lr"] for entry in one["loss_history"]]
    assert [entry["candidates"] for entry in two["loss_history"]] == [8] * 6  # 4 anchors per process, gathered
    # losses are rounded to 4 decimals in the record; float sums in another order differ by ~1e-7
    for a, b in zip(one["loss_history"], two["loss_history"]):
        assert b["loss"] == pytest.approx(a["loss"], abs=2e-4)
    weights_one = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    weights_two = load_file(tmp_path / "two" / "adapter" / "adapter_model.safetensors")
    assert weights_one.keys() == weights_two.keys()
    for name, weight in weights_one.items():
        torch.testing.assert_close(weights_two[name], weight, rtol=1e-3, atol=1e-5, msg=name)


def _count_all_reduces(rank, base, pages, output, mini_batch_size, counts):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533", WORLD_SIZE="2", RANK=str(rank))
    os.environ.update(LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2", OMP_NUM_THREADS="1")
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    from common.recipe import parse_stage_arguments
    from stages.contrast import ContrastArguments, ContrastiveTraining, load_model, load_pairs

    recipe_args, args = parse_stage_arguments(
        "contrast", (ContrastArguments,), contrast_argv(base, pages, output, "--mini_batch_size", str(mini_batch_size))
    )
    train_pairs, _, _ = load_pairs(args, recipe_args.seed)
    model, processor = load_model(args, recipe_args.seed)
    run = ContrastiveTraining(args, model, processor, train_pairs, recipe_args.seed)
    calls = []

    def counting_hook(state, bucket):
        calls.append(bucket.index())
        return allreduce_hook(state, bucket)

    run.model.register_comm_hook(None, counting_hook)
    for batch in run.epoch_batches(0)[:2]:
        run.step(batch)
    counts[(mini_batch_size, rank)] = len(calls)
    torch.distributed.destroy_process_group()


def test_plain_multi_process_training_all_reduces_once_per_step_whatever_the_mini_batches(
    recorded_base, pages, tmp_path
):
    counts = mp.Manager().dict()
    for mini_batch_size in (1, 4):  # 4 anchors per process: 8 backward passes per step, or 2
        mp.spawn(_count_all_reduces, args=(recorded_base, pages, tmp_path / "run", mini_batch_size, counts), nprocs=2)
    assert counts[(1, 0)] == counts[(4, 0)] == counts[(1, 1)] == counts[(4, 1)] > 0


def _gradient_before_clipping(rank, world, base, pages, output, port, grads):
    """The trainable gradients of one training step of `world` processes as they reach the clipping (DDP's
    all-reduce done, before clipping and the optimizer), on every rank; with one process, also the gradient of the
    plain InfoNCE loss of the same global batch, encoded whole by the same model."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank))
    os.environ.update(LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
    from common.recipe import parse_stage_arguments
    from lco.contrastive_loss import info_nce
    from lco.embedder import model_inputs
    from stages.contrast import ContrastArguments, ContrastiveTraining, load_model, load_pairs

    argv = contrast_argv(base, pages, output, "--mini_batch_size", "2", "--lora_dropout", "0.0")
    recipe_args, args = parse_stage_arguments("contrast", (ContrastArguments,), argv)
    train_pairs, _, _ = load_pairs(args, recipe_args.seed)
    run = ContrastiveTraining(args, *load_model(args, recipe_args.seed), train_pairs, recipe_args.seed)
    batch = run.epoch_batches(0)[0]

    def capture(parameters, max_norm):
        grads[(world, rank)] = [parameter.grad.detach().clone() for parameter in parameters]
        return torch.tensor(0.0)

    run.accelerator.clip_grad_norm_ = capture
    run.step(batch)
    if world == 1:
        model = run.accelerator.unwrap_model(run.model)
        model.zero_grad()
        sides = [model(**model_inputs(run.processor, [getattr(pair, role).item() for pair in batch],
                                      args.max_text_tokens, args.image_max_side)) for role in run.roles]  # fmt: skip
        info_nce(*sides, temperature=args.temperature)[0].backward()
        grads["plain"] = [parameter.grad.detach().clone() for parameter in run.trainable]
    if world > 1:
        torch.distributed.destroy_process_group()


def test_the_gradient_before_clipping_is_the_plain_losss_gradient_of_the_global_batch(recorded_base, pages, tmp_path):
    """AdamW and clipping to norm 1 hide a constant factor in the gradient, so the training tests cannot see a
    factor of N in DDP's averaging, the gathered loss or the accumulation: this checks the gradient itself. 8
    anchors, mini-batches of 2: 4 backward passes per role in one process, 2 in each of two."""
    grads = mp.Manager().dict()
    mp.spawn(_gradient_before_clipping, args=(1, recorded_base, pages, tmp_path / "one", 29541, grads), nprocs=1)
    mp.spawn(_gradient_before_clipping, args=(2, recorded_base, pages, tmp_path / "two", 29542, grads), nprocs=2)
    plain = grads["plain"]
    assert len(plain) > 10 and sum(bool(g.any()) for g in plain) > 10
    for key in [(1, 0), (2, 0), (2, 1)]:
        for got, expected in zip(grads[key], plain, strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6, msg=str(key))


@pytest.mark.slow
def test_two_process_zero3_finishes_and_its_model_embeds_like_the_zero2_ones(recorded_base, pages, tmp_path):
    from lco.embedder import Embedder

    from .test_contrast import TEXTS

    # every parameter partitioned, as a 7B model's LoRA matrices are: by default ZeRO-3 keeps tensors of under
    # 1e5 elements whole on every process, which is all of the tiny model's LoRA
    config = json.loads((REPO / "recipes/deepspeed/zero3.json").read_text())
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (tmp_path / "zero3.json").write_text(json.dumps(config))
    configs = {2: REPO / "recipes/deepspeed/zero2.json", 3: tmp_path / "zero3.json"}
    embeddings = {}
    for stage in (2, 3):
        zero = ["--deepspeed", str(configs[stage]), "--homogeneous_batches", "true"]
        run_contrast(2, recorded_base, pages, tmp_path / f"zero{stage}", *zero, timeout=600)  # a hang: a failure
        embeddings[stage] = Embedder(str(tmp_path / f"zero{stage}" / "final")).encode_texts(TEXTS)
    # the same training, partitioned differently: the sums of gradients differ in order only
    torch.testing.assert_close(embeddings[3], embeddings[2], rtol=0, atol=1e-4)


# ZeRO-3 needs each step all text or all images; the plain reference batches alike
HOMOGENEOUS = ["--homogeneous_batches", "true"]
ZERO = {stage: REPO / f"recipes/deepspeed/zero{stage}.json" for stage in (2, 3)}


@pytest.fixture(scope="module")
def plain_reference(recorded_base, pages, tmp_path_factory):
    """The plain one-process run that every DeepSpeed run must equal at the same global batch and seed."""
    output = tmp_path_factory.mktemp("plain") / "run"
    result = run_contrast(1, recorded_base, pages, output, *HOMOGENEOUS)
    assert "contrast: engine single-process, fp32 master weights, fp32 compute" in result.stdout
    return output


def assert_deepspeed_trained_as_the_plain_run(result, output, reference, stage: int) -> None:
    """The live engine was DeepSpeed's at `stage` (ZeRO-3: with its parameters partitioned), not a silent fallback,
    and it trained as the plain run did: the same learning rates and losses, the same LoRA weights."""
    engine = read_run_record(output / "final")["results"]["engine"]
    assert engine["engine"] == f"deepspeed-zero{stage}", engine
    assert f"contrast: engine deepspeed-zero{stage}, fp32 master weights" in result.stdout
    if stage == 3:
        assert 0 < engine["partitioned_parameters"] <= engine["parameters"], engine

    one, other = (read_run_record(folder / "final")["results"] for folder in (reference, output))
    assert [entry["lr"] for entry in other["loss_history"]] == [entry["lr"] for entry in one["loss_history"]]
    for a, b in zip(one["loss_history"], other["loss_history"], strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=2e-4)
    weights_one = load_file(reference / "adapter" / "adapter_model.safetensors")
    weights_other = load_file(output / "adapter" / "adapter_model.safetensors")
    assert weights_one.keys() == weights_other.keys()
    for name, weight in weights_one.items():
        torch.testing.assert_close(weights_other[name], weight, rtol=1e-3, atol=1e-5, msg=name)


def test_zero3_in_one_process_runs_deepspeeds_engine_and_trains_as_the_plain_run(
    recorded_base, pages, plain_reference, tmp_path
):
    output = tmp_path / "zero3"
    result = run_contrast(1, recorded_base, pages, output, "--deepspeed", str(ZERO[3]), *HOMOGENEOUS)
    assert_deepspeed_trained_as_the_plain_run(result, output, plain_reference, stage=3)


@pytest.mark.slow
@pytest.mark.parametrize(("processes", "stage"), [(1, 2), (2, 2), (2, 3)])
def test_deepspeed_runs_its_engine_and_trains_as_the_plain_run(
    processes, stage, recorded_base, pages, plain_reference, tmp_path
):
    output = tmp_path / f"zero{stage}"
    result = run_contrast(processes, recorded_base, pages, output, "--deepspeed", str(ZERO[stage]), *HOMOGENEOUS)
    assert_deepspeed_trained_as_the_plain_run(result, output, plain_reference, stage)
