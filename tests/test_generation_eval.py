"""The held-out transcription CER (lco/generation_eval.py): pages generated in batches, split across processes,
bounded in time, its cost recorded."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .conftest import thai_pages_dataset


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    return thai_pages_dataset(tmp_path_factory.mktemp("pages"), documents=5, chars=60)


def held_out_examples(base, pages):
    """(model, processor, 5 held-out pretraining examples of different lengths)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from stages.pretrain import PretrainArguments, load_examples

    processor = AutoProcessor.from_pretrained(base)
    args = PretrainArguments(model_name_or_path=str(base), datasets=[str(pages)], max_pixels=20000, eval_fraction=0.6)
    held_out = load_examples(args, processor, 120, 0)[1]
    model = AutoModelForImageTextToText.from_pretrained(base).eval()
    return model, processor, held_out.select(range(5))


def counting_generate(model) -> list:
    """The batch sizes `model.generate` is called with, as it is called."""
    calls, generate = [], model.generate
    model.generate = lambda **inputs: calls.append(len(inputs["input_ids"])) or generate(**inputs)
    return calls


def test_batched_transcriptions_equal_one_page_at_a_time_and_their_cost_is_counted(recorded_base, pages):
    from lco.generation_eval import transcription_cer

    model, processor, examples = held_out_examples(recorded_base, pages)
    calls = counting_generate(model)
    alone = transcription_cer(model, processor, examples, batch_size=1)
    assert calls == [1] * 5
    calls.clear()
    batched = transcription_cer(model, processor, examples, batch_size=4)
    assert calls == [4, 1]  # 5 pages: a batch of 4, then 1
    assert batched["hypotheses"] == alone["hypotheses"] and len(set(alone["hypotheses"])) > 1
    assert batched["cer"] == pytest.approx(alone["cer"], abs=0) and batched["cer"] > 0
    assert batched["pages"] == 5 and batched["left_out"] == 0 and batched["batches"] == 2
    assert batched["tokens"] == alone["tokens"] > 0 and batched["seconds"] > 0


def test_pages_past_the_time_budget_are_left_out_and_said_so(recorded_base, pages, caplog):
    from lco.generation_eval import transcription_cer

    model, processor, examples = held_out_examples(recorded_base, pages)
    calls = counting_generate(model)
    spent = transcription_cer(model, processor, examples, batch_size=2, time_budget_s=1e-9)
    assert calls == [] and spent["cer"] is None and spent["pages"] == 0 and spent["left_out"] == 5
    assert "time budget" in caplog.text


def test_pages_a_batch_cut_short_by_the_time_budget_are_left_out(recorded_base, pages, caplog):
    """A generate call stopped by `max_time` (here: 2 tokens, no end of sequence) leaves its pages unfinished: they
    are left out of the CER rather than scored as truncated transcriptions."""
    from lco.generation_eval import transcription_cer

    model, processor, examples = held_out_examples(recorded_base, pages)
    limits = []

    def cut_short(input_ids, max_time=None, **kwargs):
        limits.append(max_time)
        return torch.cat([input_ids, torch.full((len(input_ids), 2), 100)], dim=1)

    model.generate = cut_short
    spent = transcription_cer(model, processor, examples, batch_size=2, time_budget_s=3600)
    assert 3500 < limits[0] <= 3600 and len(limits) == 3
    assert spent["cer"] is None and spent["pages"] == 0 and spent["left_out"] == 5 and spent["batches"] == 3
    assert "5 of 5 pages left out" in caplog.text
    unbounded = transcription_cer(model, processor, examples, batch_size=2)  # no budget: nothing was cut
    assert unbounded["pages"] == 5 and unbounded["left_out"] == 0 and limits[-1] is None


def _transcribe_in_two_processes(rank, init_file, base, pages, results):
    from lco.generation_eval import transcription_cer

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    model, processor, examples = held_out_examples(base, pages)
    calls = counting_generate(model)
    results[rank] = {**transcription_cer(model, processor, examples, batch_size=2), "calls": calls}
    dist.destroy_process_group()


def test_two_processes_share_the_pages_and_give_one_process_cer(recorded_base, pages, tmp_path):
    from lco.generation_eval import transcription_cer

    results = mp.Manager().dict()
    mp.spawn(_transcribe_in_two_processes, args=(str(tmp_path / "init"), recorded_base, pages, results), nprocs=2)
    model, processor, examples = held_out_examples(recorded_base, pages)
    alone = transcription_cer(model, processor, examples, batch_size=2)
    # 5 pages: 2 on rank 0 (one batch), 3 on rank 1 (two); each page transcribed once in all
    assert results[0]["calls"] == [2] and results[1]["calls"] == [2, 1]
    for rank in (0, 1):
        assert results[rank]["cer"] == pytest.approx(alone["cer"], rel=1e-12)
        assert results[rank]["pages"] == 5 and results[rank]["tokens"] == alone["tokens"]
        assert results[rank]["batches"] == 3
