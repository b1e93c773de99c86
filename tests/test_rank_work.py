"""Work before the first step is done once in a process group, not once per process: the pretraining examples are
made by rank 0 and read by the others, and hard negatives are mined from embeddings each process computes a share
of. Both give every process what one process alone gets."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from datasets import Image, Sequence

from .conftest import thai_pages_dataset


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    return thai_pages_dataset(tmp_path_factory.mktemp("pages"), documents=4, chars=160)


def pretrain_examples(base, pages, cache_dir):
    """(train rows, held-out rows, the counts) as `stages.pretrain` makes them, images as their PNG bytes."""
    from transformers import AutoProcessor

    from stages.pretrain import PretrainArguments, load_examples

    args = PretrainArguments(model_name_or_path=str(base), datasets=[str(pages)], max_pixels=40000, eval_fraction=0.25)
    processor = AutoProcessor.from_pretrained(base)
    train, held_out, counts = load_examples(args, processor, 200, 0, cache_dir)

    def rows(dataset):
        return dataset.cast_column("images", Sequence(Image(decode=False))).to_list()

    return rows(train), rows(held_out), counts


def in_two_processes(rank, init_file, work, base, pages, results):
    """One process of 2: the pretraining examples and the mined pairs, counting the calls that make them."""
    import lco.pretrain_data
    from lco.embedder import EmbeddingModel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
    mapped, embedded = [], []
    page_example = lco.pretrain_data.page_example
    lco.pretrain_data.page_example = lambda row, *a, **k: mapped.append(row["page"]) or page_example(row, *a, **k)
    forward = EmbeddingModel.forward
    EmbeddingModel.forward = lambda self, **inputs: embedded.append(len(inputs["input_ids"])) or forward(self, **inputs)
    examples = pretrain_examples(base, pages, work / "examples")
    mined = mine(base, pages)
    results[rank] = {"examples": examples, "mined": mined, "mapped": len(mapped), "embedded": sum(embedded)}
    dist.destroy_process_group()


def mine(base, pages):
    """The negatives `stages.contrast --mine_hard_negatives` gives the training pairs (as positions)."""
    from lco.embedder import Embedder
    from stages.contrast import load_pairs, mine_hard_negatives

    from .test_contrast import mining_arguments

    args = mining_arguments(base, pages)
    train_pairs = load_pairs(args, seed=0)[0]
    embedder = Embedder(str(base), device="cpu")
    mined = mine_hard_negatives(embedder.model, embedder.processor, train_pairs, args)
    positions = {pair.positive: i for i, pair in enumerate(train_pairs)}
    return [positions[pair.negative] for pair in mined]


def test_examples_are_made_and_negatives_mined_once_in_a_process_group(recorded_base, pages, tmp_path):
    results = mp.Manager().dict()
    work = tmp_path / "two"
    mp.spawn(
        in_two_processes,
        args=(str(tmp_path / "init"), work, recorded_base, pages, results),
        nprocs=2,
    )
    alone = pretrain_examples(recorded_base, pages, None)
    mined_alone = mine(recorded_base, pages)
    pairs = len(mined_alone)
    assert results[0]["mapped"] + results[1]["mapped"] == 8  # 8 pages, each made an example once in all
    # anchors and positives embedded once in all (and each process a share)
    assert results[0]["embedded"] + results[1]["embedded"] == 2 * pairs and results[1]["embedded"] > 0
    for rank in (0, 1):
        assert results[rank]["examples"] == alone
        assert results[rank]["mined"] == mined_alone
