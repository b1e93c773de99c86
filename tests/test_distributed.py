"""Process groups and devices under torchrun (lco/distributed.py): which GPU each process takes, and the
embeddings its processes gather."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lco.distributed import join_process_group


def fake_cuda(monkeypatch, devices: int) -> dict:
    """CUDA as a process that sees `devices` GPUs would find it (0: none), and a process group that records how it
    was started instead of starting."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: devices > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: devices)
    calls = {"set_device": []}
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls["set_device"].append(torch.device(device)))

    def init_process_group(backend=None, **kwargs):
        calls["init"] = {"backend": backend, **kwargs}

    monkeypatch.setattr(dist, "init_process_group", init_process_group)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    return calls


@pytest.mark.parametrize(
    ("devices", "local_rank", "expected"),
    [
        (4, 2, "cuda:2"),  # torchrun on a 4-GPU node: one GPU per local rank
        (2, 1, "cuda:1"),
        (1, 1, "cuda:0"),  # srun --gpus-per-task, Kubernetes: each process sees its own GPU as cuda:0
        (1, 0, "cuda:0"),
    ],
)
def test_each_process_binds_its_own_gpu_before_the_nccl_group_starts(monkeypatch, devices, local_rank, expected):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", str(local_rank % 2))
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    calls = fake_cuda(monkeypatch, devices)
    assert join_process_group() == local_rank % 2
    # the current device is what broadcast_object_list and all_gather run on; device_id binds the group to it
    assert calls["set_device"] == [torch.device(expected)]
    assert calls["init"]["backend"] == "nccl" and calls["init"]["device_id"] == torch.device(expected)


def test_a_local_rank_beyond_several_visible_gpus_is_refused(monkeypatch):
    """4 processes on a node where each sees the same 2 GPUs: two of them would share a GPU (NCCL refuses it)."""
    from common.errors import UsageError

    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    calls = fake_cuda(monkeypatch, 2)
    with pytest.raises(UsageError, match="LOCAL_RANK is 3 but this process sees 2 GPUs"):
        join_process_group()
    assert "init" not in calls


def test_without_cuda_the_group_is_gloo_and_no_device_is_bound(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    calls = fake_cuda(monkeypatch, 0)
    assert join_process_group() == 1
    assert calls["set_device"] == [] and calls["init"]["backend"] == "gloo" and "device_id" not in calls["init"]


def test_one_process_starts_no_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    calls = fake_cuda(monkeypatch, 2)
    assert join_process_group() == 0 and "init" not in calls


@pytest.mark.parametrize(("devices", "local_rank", "expected"), [(2, 1, "cuda:1"), (1, 1, "cuda:0"), (0, 1, "cpu")])
def test_the_embedder_encodes_on_the_process_gpu(tiny_model, monkeypatch, devices, local_rank, expected):
    from lco.embedder import Embedder, EmbeddingModel

    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    fake_cuda(monkeypatch, devices)
    moved = []
    monkeypatch.setattr(EmbeddingModel, "to", lambda self, device: moved.append(torch.device(device)) or self)
    embedder = Embedder(str(tiny_model[2]))
    assert torch.device(embedder.device) == torch.device(expected) and moved == [torch.device(expected)]


TEXTS = ["one page", "a second, longer page of text", "three", "four pages of it", "five"]


def _encode_in_two_processes(rank, init_file, model, results):
    from lco.embedder import Embedder

    def refuse(*args, **kwargs):
        raise AssertionError("embeddings gathered as pickled objects")

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    dist.all_gather_object = refuse  # tensors travel as tensors: all_gather, not pickles
    torch.set_num_threads(1)
    results[rank] = Embedder(model, device="cpu").encode_texts(TEXTS, batch_size=2)
    dist.destroy_process_group()


def test_two_processes_gather_embedding_tensors_equal_to_one_process(tiny_model, tmp_path):
    """5 texts over 2 processes: shares of 2 and 3 (uneven, padded to gather), back in their order on both."""
    from lco.embedder import Embedder

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    results = mp.Manager().dict()
    mp.spawn(_encode_in_two_processes, args=(str(tmp_path / "init"), str(tiny_model[2]), results), nprocs=2)
    alone = Embedder(str(tiny_model[2]), device="cpu").encode_texts(TEXTS, batch_size=2)
    for rank in (0, 1):
        assert isinstance(results[rank], torch.Tensor) and results[rank].shape == alone.shape == (5, alone.shape[1])
        torch.testing.assert_close(results[rank], alone, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("world", [2, 3])
def test_each_item_is_encoded_once_by_the_process_whose_contiguous_share_holds_it(tiny_model, monkeypatch, world):
    import lco.distributed
    import lco.embedder
    from lco.embedder import Embedder

    texts = [f"text {i} " * (i % 4 + 1) for i in range(7)]  # 7 items of other lengths: sorted within a share
    embedder = Embedder(str(tiny_model[2]), device="cpu")
    alone = embedder.encode_texts(texts, batch_size=2)
    encoded_by, encode_items = {}, lco.embedder.encode_items

    def recording(*args, indices, **kwargs):
        encoded_by.setdefault(rank, []).extend(indices)
        return encode_items(*args, indices=indices, **kwargs)

    monkeypatch.setattr(lco.embedder, "encode_items", recording)
    monkeypatch.setattr(lco.distributed, "gather_rows", lambda rows: rows)  # each process's own rows, to compare
    shares = []
    for rank in range(world):
        monkeypatch.setattr(lco.distributed, "process_group", lambda: (world, rank))
        shares.append(embedder.encode_texts(texts, batch_size=2))
    cuts = [len(texts) * r // world for r in range(world + 1)]
    assert [sorted(encoded_by[r]) for r in range(world)] == [list(range(cuts[r], cuts[r + 1])) for r in range(world)]
    assert sorted(i for r in range(world) for i in encoded_by[r]) == list(range(len(texts)))  # once each
    torch.testing.assert_close(torch.cat(shares), alone, rtol=1e-5, atol=1e-6)  # in order once gathered
