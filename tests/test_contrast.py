import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from peft import get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText

from common.errors import UsageError, run_cli
from common.recipe import parse_stage_arguments
from common.run_record import read_run_record, verify_chain
from lco.contrast_data import pages_pairs, passages, read_jsonl_pairs
from lco.contrastive_loss import backpropagate, cached_contrastive_step, info_nce
from lco.embedder import Embedder, EmbeddingModel, Item, encode_items, model_inputs
from lco.lora import lora_config
from stages.contrast import main as contrast

from .conftest import DEEPSPEED_ENV, REPO, thai_pages_dataset

TEXTS = ["สวัสดี", "ข้อ 1 มนุษย์ทั้งหลายเกิดมามีอิสระ", "Article 2", "ข้อ 3", "ทุกคนมีสิทธิในการดำรงชีวิต เสรีภาพ", "x"]


def test_loss_is_log_b_for_uninformative_embeddings():
    same = F.normalize(torch.ones(8, 16), dim=-1)
    loss, candidates = info_nce(same, same, temperature=0.03)
    assert candidates == 8 and loss.item() == pytest.approx(math.log(8), rel=1e-6)
    loss, candidates = info_nce(same, same, same, temperature=0.03)
    assert candidates == 16 and loss.item() == pytest.approx(math.log(16), rel=1e-6)


def test_loss_is_zero_for_a_perfect_separation():
    one_hot = torch.eye(8)
    assert info_nce(one_hot, one_hot, temperature=0.01)[0].item() < 1e-30


def lora_embedding_model(folder, dropout=0.1):
    torch.manual_seed(0)
    base = AutoModelForImageTextToText.from_pretrained(folder)
    model = EmbeddingModel(get_peft_model(base, lora_config(base.config, 4, 8, dropout)))
    with torch.no_grad():  # LoRA B starts at zero; move it so the adapters matter
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.1)
    return model.train()


def test_trainable_parameters_are_exactly_the_language_models_lora(tiny_model):
    model = lora_embedding_model(tiny_model[2])
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    lora = {name for name, _ in model.named_parameters() if "lora_" in name}
    assert trainable == lora and lora
    assert all(".language_model.layers." in name for name in lora)
    assert {name.split(".lora_")[0].rsplit(".", 1)[1] for name in lora} == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }


def mini_batches(processor, size: int) -> list[list]:
    """The 6 anchors of TEXTS and their positives (each text with " ." added), as model inputs `size` at a time."""
    return [
        [model_inputs(processor, [Item(t + end) for t in TEXTS[i : i + size]], 64, 448) for i in range(0, 6, size)]
        for end in ("", " .")
    ]


def plain_step(tiny_model):
    """(model, its trained parameters, 3 mini-batches of 2 pairs per role, the plain InfoNCE loss of seed 1, its
    gradients, the next random draw after it); the model's gradients are zeroed again."""
    model = lora_embedding_model(tiny_model[2], dropout=0.2)
    chunks = mini_batches(tiny_model[1], 2)
    params = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(1)
    plain = info_nce(*[torch.cat([model(**inputs) for inputs in role]) for role in chunks], temperature=0.05)[0]
    plain.backward()
    plain_grads, plain_next = [p.grad.clone() for p in params], torch.rand(4)
    model.zero_grad()
    return model, params, chunks, plain, plain_grads, plain_next


def test_cached_loss_equals_the_plain_loss_in_value_and_gradients(tiny_model):
    model, params, chunks, plain, plain_grads, _ = plain_step(tiny_model)
    torch.manual_seed(1)

    def backward_chunk(inputs, grad):
        backpropagate(model(**inputs), grad).backward()

    cached, candidates = cached_contrastive_step(lambda inputs: model(**inputs), chunks, backward_chunk, 0.05)
    assert candidates == 6 and cached == pytest.approx(plain.item(), rel=1e-5)
    for plain_grad, param in zip(plain_grads, params):
        torch.testing.assert_close(param.grad, plain_grad, rtol=1e-4, atol=1e-6)
    assert any(g.abs().sum() > 0 for g in plain_grads)


@pytest.mark.parametrize("kept_graphs", [1, 3, 9])
def test_cached_loss_keeping_first_pass_graphs_equals_the_plain_loss_with_fewer_forwards(tiny_model, kept_graphs):
    """The last mini-batches keep their first encoding's graph (all but one at most: 9 of 6 keeps 5); the value, the
    gradients and the random stream after the step (dropout masks replayed) are the plain loss's."""
    model, params, chunks, plain, plain_grads, plain_next = plain_step(tiny_model)
    forwards = []

    def encode(inputs):
        forwards.append(torch.is_grad_enabled())
        return model(**inputs)

    def backward(embeddings, grad):
        backpropagate(embeddings, grad).backward()

    torch.manual_seed(1)
    cached, _ = cached_contrastive_step(
        encode,
        chunks,
        lambda inputs, grad: backward(encode(inputs), grad),
        0.05,
        forward_chunk=encode,
        backward=backward,
        kept_graphs=kept_graphs,
    )
    assert cached == pytest.approx(plain.item(), rel=1e-5)
    torch.testing.assert_close(torch.rand(4), plain_next, rtol=0, atol=0)
    for plain_grad, param in zip(plain_grads, params):
        torch.testing.assert_close(param.grad, plain_grad, rtol=1e-4, atol=1e-6)
    kept = min(kept_graphs, 5)
    assert len(forwards) == 12 - kept and forwards.count(True) == 6  # every mini-batch once with a graph


# bf16 keeps 8 bits of mantissa: the cached step's gradients differ from the plain loss's by rounding, measured on
# this CPU at 1.5% of each parameter's largest entry (every mini-batch encoded twice) and 1.0% (last graph kept)
BF16_GRAD_RTOL = 0.03


def check_cached_step_in_bf16(tiny_model, device: str, kept_graphs: int) -> None:
    """The cached step equals the plain loss in bf16 on `device`, dropout on: the value, each parameter's gradient
    within BF16_GRAD_RTOL of its largest entry, and the random stream after the step (dropout masks replayed from
    the device's generator, CUDA's on a GPU)."""
    model = lora_embedding_model(tiny_model[2], dropout=0.2).to(device, torch.bfloat16)
    chunks = [[inputs.to(device) for inputs in role] for role in mini_batches(tiny_model[1], 2)]
    params = [p for p in model.parameters() if p.requires_grad]

    torch.manual_seed(1)
    plain = info_nce(*[torch.cat([model(**inputs) for inputs in role]) for role in chunks], temperature=0.05)[0]
    plain.backward()
    plain_grads, plain_next = [p.grad.float().clone() for p in params], torch.rand(4, device=device)
    model.zero_grad()

    def backward(embeddings, grad):
        backpropagate(embeddings, grad).backward()

    torch.manual_seed(1)
    cached, _ = cached_contrastive_step(
        lambda inputs: model(**inputs),
        chunks,
        lambda inputs, grad: backward(model(**inputs), grad),
        0.05,
        forward_chunk=lambda inputs: model(**inputs),
        backward=backward,
        kept_graphs=kept_graphs,
    )
    assert cached == pytest.approx(plain.item(), rel=1e-2)
    torch.testing.assert_close(torch.rand(4, device=device), plain_next, rtol=0, atol=0)
    assert sum(bool(g.any()) for g in plain_grads) > 10
    for plain_grad, param in zip(plain_grads, params):
        assert (param.grad.float() - plain_grad).abs().max() <= BF16_GRAD_RTOL * plain_grad.abs().max()


@pytest.mark.parametrize("kept_graphs", [0, 1])  # every mini-batch encoded twice, or the last one's graph kept
def test_cached_loss_equals_the_plain_loss_in_bf16_with_dropout_replayed(tiny_model, kept_graphs):
    check_cached_step_in_bf16(tiny_model, "cpu", kept_graphs)  # tests/test_gpu.py runs it with CUDA's kernels


def _two_process_loss(rank, init_file, anchors, positives, results):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    mine = slice(rank * 3, rank * 3 + 3)
    local_positives = positives[mine].clone().requires_grad_()
    loss, candidates = info_nce(anchors[mine], local_positives, temperature=0.1)
    loss.backward()
    results[rank] = (loss.item(), candidates, local_positives.grad)
    dist.destroy_process_group()


def test_gathered_candidates_and_rank_offset_labels_for_two_processes(tmp_path):
    torch.manual_seed(0)
    anchors, positives = F.normalize(torch.randn(6, 8), dim=-1), F.normalize(torch.randn(6, 8), dim=-1)
    results = mp.Manager().dict()
    mp.spawn(_two_process_loss, args=(str(tmp_path / "init"), anchors, positives, results), nprocs=2)

    # single process: rank r's anchors against all six positives, labels 3r..3r+2; the total of both losses
    everything = positives.clone().requires_grad_()
    losses = [F.cross_entropy(anchors[r * 3 : r * 3 + 3] @ everything.T / 0.1, torch.arange(3) + 3 * r) for r in (0, 1)]
    sum(losses).backward()
    for rank in (0, 1):
        loss, candidates, grad = results[rank]
        assert candidates == 6 and loss == pytest.approx(losses[rank].item(), rel=1e-6)
        torch.testing.assert_close(grad, everything.grad[rank * 3 : rank * 3 + 3])  # the other rank's share came back


def test_left_padded_pooling_equals_the_unpadded_embedding(tiny_model):
    processor, model = tiny_model[1], EmbeddingModel(tiny_model[0]).eval()
    items = [Item(TEXTS[0]), Item(TEXTS[4]), Item(TEXTS[5])]
    with torch.no_grad():
        batched = model(**model_inputs(processor, items, 64, 448))
        alone = torch.cat([model(**model_inputs(processor, [item], 64, 448)) for item in items])
    torch.testing.assert_close(batched, alone, rtol=1e-4, atol=1e-5)
    assert torch.allclose(batched.norm(dim=-1), torch.ones(3))


def test_images_and_texts_embed_together(tiny_model, thai_khmer_page):
    processor, model = tiny_model[1], EmbeddingModel(tiny_model[0]).eval()
    with torch.no_grad():
        mixed = model(**model_inputs(processor, [Item(TEXTS[1]), Item(image=thai_khmer_page)], 64, 200))
        image_alone = model(**model_inputs(processor, [Item(image=thai_khmer_page)], 64, 200))
    torch.testing.assert_close(mixed[1:], image_alone, rtol=1e-4, atol=1e-5)


def test_encoding_with_worker_processes_gives_the_same_embeddings_in_the_same_order(tiny_model, thai_khmer_page):
    processor, model = tiny_model[1], EmbeddingModel(tiny_model[0])
    items = [Item(text) for text in TEXTS] + [Item(image=thai_khmer_page), Item(TEXTS[0], thai_khmer_page)]
    settings = dict(batch_size=3, max_text_tokens=64, image_max_side=200)
    inline = encode_items(model, processor, items, workers=0, **settings)
    prefetched = encode_items(model, processor, items, workers=2, **settings)
    assert inline.shape == (len(items), model.model.config.text_config.hidden_size)
    torch.testing.assert_close(prefetched, inline)


def test_passages_drop_page_numbers_and_keep_every_line():
    text = "3\nline one\nline two is longer\n\nthird"
    assert passages(text, 10) == ["line one line two is longer", "third"]


def test_bad_jsonl_lines_are_listed_together(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(
        '{"anchor": {"text": "a"}, "positive": {"text": "b"}}\n'
        "not json\n"
        '{"anchor": {"text": ""}, "positive": {"text": "b"}}\n'
        '{"anchor": {"text": "a"}, "positive": {"image_path": "missing.png"}}\n'
        '{"anchor": {"text": "a"}, "positive": {"text": "b"}, "source": {"doc_id": "d"}}\n',
        encoding="utf-8",
    )
    with pytest.raises(
        UsageError,
        match=r"4 bad lines \(line 2: not JSON.*line 3: `anchor` has neither"
        r".*line 4: `positive` image missing.png not found.*line 5: `source` must be an object with the document's",
    ):
        read_jsonl_pairs(str(path))


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    """A Thai pages dataset: 6 documents of 2 pages each, with bookmarks."""
    return thai_pages_dataset(tmp_path_factory.mktemp("pages"), documents=6, chars=220, bookmarks=True)


@pytest.fixture
def base(recorded_base):
    return recorded_base


def contrast_argv(base, pages, output, *extra):
    return [
        "--config",
        str(REPO / "recipes/tiny.yaml"),
        "--lang",
        "th",
        "--model_name_or_path",
        str(base),
        "--pages_datasets",
        str(pages),
        "--output_dir",
        str(output),
        "--passage_chars",
        "40",
        "--contrastive_batch_size",
        "8",
        "--mini_batch_size",
        "4",
        "--eval_fraction",
        "0.3",
        "--eval_steps",
        "0",
        "--logging_steps",
        "1",
        "--image_max_side",
        "200",
        "--max_text_tokens",
        "48",
        *extra,
    ]


ENCODE = """
import json, sys
from lco.embedder import Embedder
embedder = Embedder(sys.argv[1])
print(json.dumps(embedder.encode_texts(json.loads(sys.argv[2]), batch_size=2).tolist()))
"""


def test_contrast_run_trains_lora_and_its_merged_final_embeds_like_the_adapter(base, pages, tmp_path, capsys):
    contrast(contrast_argv(base, pages, tmp_path / "run", "--max_steps", "3", "--learning_rate", "1.0e-2"))
    final = tmp_path / "run" / "final"
    record = read_run_record(final, expected_stage="contrast")
    assert [r["stage"] for r in verify_chain(final)] == ["contrast", "base_model"]
    history = record["results"]["loss_history"]
    assert [e["step"] for e in history] == [1, 2, 3] and all(e["candidates"] == 8 for e in history)
    assert [e["step"] for e in record["results"]["held_out_accuracy"]] == [0, 3]
    assert record["results"]["pairs"]["train_multimodal"] > 0 and record["results"]["pairs"]["held_out_pairs"] > 0
    assert (final / "chat_template.jinja").is_file() or (final / "processor_config.json").is_file()

    # the merged model in a fresh process embeds as the base model plus the saved adapter does here
    from peft import PeftModel

    adapted = EmbeddingModel(
        PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(base), tmp_path / "run" / "adapter")
    ).eval()
    processor = Embedder(str(final)).processor
    with torch.no_grad():
        expected = torch.cat(
            [adapted(**model_inputs(processor, [Item(t) for t in TEXTS[i : i + 2]], 650, 700)) for i in (0, 2, 4)]
        )
    plain = Embedder(str(base)).encode_texts(TEXTS)
    output = subprocess.run(
        [sys.executable, "-c", ENCODE, str(final), json.dumps(TEXTS)],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=True,
    )
    merged = torch.tensor(json.loads(output.stdout))
    torch.testing.assert_close(merged, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(merged, plain, atol=1e-4)  # training changed the embeddings


def test_resume_after_a_kill_gives_the_losses_and_weights_of_an_uninterrupted_run(base, pages, tmp_path):
    argv = contrast_argv(
        base,
        pages,
        tmp_path / "run",
        "--max_steps",
        "4",
        "--save_steps",
        "2",
        "--eval_steps",
        "2",
        "--learning_rate",
        "1.0e-2",
        "--lora_dropout",
        "0.3",
    )
    contrast(argv)
    straight = read_run_record(tmp_path / "run" / "final")["results"]
    weights = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    # what a kill during step 3's checkpoint would leave: the step-2 one, a half-written one, no final/
    shutil.rmtree(tmp_path / "run" / "final")
    shutil.rmtree(tmp_path / "run" / "adapter")
    (tmp_path / "run" / "checkpoint-3").mkdir()
    contrast([*argv, "--resume"])
    resumed = read_run_record(tmp_path / "run" / "final")["results"]
    assert [e["step"] for e in resumed["loss_history"]] == [1, 2, 3, 4]
    assert [e["loss"] for e in resumed["loss_history"]] == pytest.approx(
        [e["loss"] for e in straight["loss_history"]], rel=1e-5
    )
    assert [e["step"] for e in resumed["held_out_accuracy"]] == [0, 2, 4]
    assert resumed["held_out_accuracy"] == straight["held_out_accuracy"]
    # it continued from the checkpoint: two steps trained here, not four again (a restart gives the same losses)
    assert (straight["resumed_from"], straight["steps_this_run"]) == (None, 4)
    assert (resumed["resumed_from"], resumed["steps_this_run"]) == ({"checkpoint": "checkpoint-2", "step": 2}, 2)
    for name, tensor in load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors").items():
        torch.testing.assert_close(tensor, weights[name], rtol=1e-5, atol=1e-6)


def test_resume_without_a_finished_checkpoint_is_refused(base, pages, tmp_path, capsys):
    (tmp_path / "run" / "checkpoint-2").mkdir(parents=True)  # killed while saving it
    with pytest.raises(SystemExit):
        run_cli(contrast, contrast_argv(base, pages, tmp_path / "run", "--resume"))
    assert "holds no finished checkpoint-* folder to continue from" in capsys.readouterr().err


def mining_arguments(base, pages):
    """The settings of the hard-negative mining tests (here and tests/test_rank_work.py)."""
    from stages.contrast import ContrastArguments

    return ContrastArguments(
        model_name_or_path=str(base),
        pages_datasets=[str(pages)],
        passage_chars=40,
        contrastive_batch_size=8,
        mini_batch_size=4,
        eval_fraction=0.3,
    )


def test_mined_hard_negatives_come_from_other_documents_and_join_the_candidates(base, pages, tmp_path, capsys):
    from lco.embedder import Embedder
    from stages.contrast import load_pairs, mine_hard_negatives

    args = mining_arguments(base, pages)
    train_pairs = load_pairs(args, seed=0)[0]
    embedder = Embedder(str(base))
    mined = mine_hard_negatives(embedder.model, embedder.processor, train_pairs, args)
    positives_by_side = {pair.positive: pair.document for pair in train_pairs}
    assert all(positives_by_side[pair.negative] != pair.document for pair in mined)

    contrast(contrast_argv(base, pages, tmp_path / "run", "--max_steps", "1", "--mine_hard_negatives", "true"))
    record = read_run_record(tmp_path / "run" / "final")
    assert record["results"]["mined_negatives"] and record["results"]["loss_history"][0]["candidates"] == 16


def test_a_batch_larger_than_the_data_is_refused(base, pages, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(contrast, contrast_argv(base, pages, tmp_path / "run", "--contrastive_batch_size", "4096"))
    assert exit_info.value.code == 2 and "fewer than --contrastive_batch_size 4096" in capsys.readouterr().err


@pytest.mark.slow
def test_two_process_deepspeed_zero2_with_the_cached_loss_finishes(base, pages, tmp_path):
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "-m",
        "stages.contrast",
        *contrast_argv(
            base, pages, tmp_path / "run", "--max_steps", "2", "--deepspeed", str(REPO / "recipes/deepspeed/zero2.json")
        ),
    ]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=900, cwd=REPO, env={**os.environ, **DEEPSPEED_ENV}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    record = read_run_record(tmp_path / "run" / "final", expected_stage="contrast")
    assert [e["candidates"] for e in record["results"]["loss_history"]] == [8, 8]  # 4 per process, gathered
    assert "4 per process x 2" in result.stdout and "contrast: engine deepspeed-zero2" in result.stdout


def test_mix_and_homogeneous_batches():
    from lco.contrast_data import Pair, Side, batches, mix

    text = [Pair(Side(f"t{i}"), Side(f"u{i}"), None, f"d{i % 3}", "text") for i in range(16)]
    images = [Pair(Side(f"p{i}"), Side(image=b"png"), None, f"d{i}", "multimodal") for i in range(3)]
    mixed = mix(text, images, 0.2, seed=0)
    assert len(mixed) == 20 and sum(p.kind == "multimodal" for p in mixed) == 4  # 4 of 20: sampled with replacement
    assert mix(text, images, 0.0, seed=0) == text and mix(text, images, 1.0, seed=0) == images
    # a pair drawn twice never shares a batch with itself: of these 4 multimodal pairs, no full batch of 4
    assert len(batches(mixed, 4, homogeneous=True, seed=0)) == 4
    images = [Pair(Side(f"p{i}"), Side(image=f"png {i}".encode()), None, f"d{i}", "multimodal") for i in range(5)]
    mixed = mix(text, images, 0.2, seed=0)
    every = batches(mixed, 4, homogeneous=True, seed=0)
    assert len(every) == 5 and all(len({p.kind for p in batch}) == 1 for batch in every)
    assert batches(mixed, 4, homogeneous=True, seed=0) == every != batches(mixed, 4, homogeneous=True, seed=1)


def test_no_batch_holds_two_pairs_cut_from_the_same_source():
    from lco.contrast_data import Pair, Side, batches

    # passage k gives a crop pair and the consecutive pair (k-1 -> k): two pairs per source, which in one
    # batch would each be the other's false negative
    crops = [Pair(Side(f"c{k}"), Side(f"d{k}"), None, "doc", "text", frozenset({f"p{k}"})) for k in range(12)]
    following = [
        Pair(Side(f"p{k - 1}"), Side(f"p{k}"), None, "doc", "text", frozenset({f"p{k - 1}", f"p{k}"}))
        for k in range(1, 12)
    ]
    every = batches(crops + following, 4, homogeneous=False, seed=0)
    assert every and all(len(batch) == 4 for batch in every)
    for batch in every:
        assert all(a.sources.isdisjoint(b.sources) for i, a in enumerate(batch) for b in batch[i + 1 :])
    assert len({id(p) for batch in every for p in batch}) == 4 * len(every)  # a pair at most once per epoch
    assert len(every) >= 4  # pairs put off are used by later batches, not dropped


def test_pairs_without_sources_of_their_own_are_kept_apart_by_their_sides():
    from lco.contrast_data import Pair, Side, batches

    assert Pair(Side("a"), Side("b"), Side("n"), "doc", "text").sources == {"a", "b", "n"}
    answers = ["the same answer", "the same answer", "a2", "a3", "a4", "a5"]
    duplicated = [Pair(Side(f"q{k}"), Side(answer), None, "doc", "text") for k, answer in enumerate(answers)]
    for batch in batches(duplicated, 3, homogeneous=False, seed=1):
        assert sum(p.positive.text == "the same answer" for p in batch) <= 1


def test_held_out_accuracy_leaves_positives_of_the_same_source_out_of_the_candidates(monkeypatch):
    from lco.contrast_data import Pair, Side
    from stages import contrast

    vectors = {  # anchor "a1" is nearest to "p2", which was cut from a1's source: a match, not a miss
        "a1": [1.0, 0.0, 0.0],
        "p1": [0.8, 0.6, 0.0],
        "p2": [1.0, 0.0, 0.0],
        "a2": [0.0, 1.0, 0.0],
        "p3": [0.0, 0.9, 0.1],  # ...while a2's nearest, p3, is a real miss
        "a3": [0.0, 0.0, 1.0],
    }
    monkeypatch.setattr(
        contrast, "embed", lambda _model, _processor, sides, _args: torch.tensor([vectors[side.text] for side in sides])
    )
    pairs = [
        Pair(Side("a1"), Side("p1"), None, "doc", "text", frozenset({"s"})),
        Pair(Side("a2"), Side("p2"), None, "doc", "text", frozenset({"s", "t"})),
        Pair(Side("a3"), Side("p3"), None, "doc", "multimodal", frozenset({"u"})),
    ]
    args = contrast.ContrastArguments(contrastive_batch_size=8)
    accuracy = contrast.held_out_accuracy(None, None, pairs, args, seed=0)
    # a1: p2 left out, p1 wins (hit); a2: p1 left out, p3 beats p2 (miss); a3: p3 is its own and the only one left
    assert accuracy == {
        "in_batch_accuracy": round(2 / 3, 4),
        "multimodal_pairs": {"accuracy": 1.0, "count": 1},
        "text_pairs": {"accuracy": 0.5, "count": 2},
    }


def test_overwrite_keeps_the_earlier_run_until_the_new_one_is_complete(base, pages, tmp_path, capsys):
    earlier = tmp_path / "run" / "final"
    earlier.mkdir(parents=True)
    (earlier / "run_record.json").write_text('{"earlier": true}')
    with pytest.raises(SystemExit) as exit_info:
        run_cli(
            contrast, contrast_argv(base, pages, tmp_path / "run", "--contrastive_batch_size", "4096", "--overwrite")
        )
    assert exit_info.value.code == 2 and "fewer than --contrastive_batch_size 4096" in capsys.readouterr().err
    assert (earlier / "run_record.json").read_text() == '{"earlier": true}'
    assert [path.name for path in tmp_path.iterdir()] == ["run"]  # nothing half-written beside it

    contrast(contrast_argv(base, pages, tmp_path / "run", "--max_steps", "1", "--overwrite"))
    record = read_run_record(earlier, expected_stage="contrast")
    assert record["config"]["contrast"]["output_dir"] == str(tmp_path / "run")
    assert sorted(path.name for path in (tmp_path / "run").iterdir()) == ["adapter", "final"]
    assert [path.name for path in tmp_path.iterdir()] == ["run"]


def test_optimizer_and_schedule_follow_the_reference_no_weight_decay_and_a_warm_up_share(base, pages, tmp_path):
    from stages.contrast import ContrastArguments, ContrastiveTraining, load_model, load_pairs

    argv = contrast_argv(base, pages, tmp_path / "run", "--max_steps", "20", "--warmup_ratio", "0.1")
    recipe_args, args = parse_stage_arguments("contrast", (ContrastArguments,), argv)
    train_pairs, _, _ = load_pairs(args, recipe_args.seed)
    run = ContrastiveTraining(args, *load_model(args, recipe_args.seed), train_pairs, recipe_args.seed)
    assert {group["weight_decay"] for group in run.optimizer.param_groups} == {0.0}
    rates = []
    for _ in range(run.total_steps):
        run.scheduler.step()
        rates.append(run.scheduler.get_last_lr()[0])
    assert rates[:3] == pytest.approx([args.learning_rate / 2, args.learning_rate, args.learning_rate * 17 / 18])


def test_documents_of_an_excluded_evalset_give_no_pairs_and_are_recorded(base, pages, tmp_path):
    from data_prep.evalset import build_evalset
    from data_prep.pages import PageSettings, build_pages_dataset
    from stages.contrast import ContrastArguments, load_pairs

    # an eval set built from a copy of one of the training PDFs: the same content under another name
    shutil.copy(pages.parent / "doc0.pdf", tmp_path / "renamed.pdf")
    settings = PageSettings("th", 72, 50_000, "never", 144, "tha", ("0E00-0E7F",))
    build_pages_dataset([str(tmp_path / "renamed.pdf")], str(tmp_path / "eval-pages"), settings, workers=1,
                        resume=False, max_skip_fraction=0.0)  # fmt: skip
    build_evalset([str(tmp_path / "eval-pages")], str(tmp_path / "eval"), parallel_source=None, parallel_lang="en",
                  outline_level=1)  # fmt: skip
    argv = contrast_argv(base, pages, tmp_path / "run", "--exclude_evalsets", str(tmp_path / "eval"))
    recipe_args, args = parse_stage_arguments("contrast", (ContrastArguments,), argv)
    train, held_out, counts = load_pairs(args, recipe_args.seed)
    assert counts["excluded_documents"] == 1
    assert not [pair for pair in train + held_out if pair.document.startswith("doc0-")]
    assert {pair.document.split("-")[0] for pair in train + held_out} == {f"doc{i}" for i in range(1, 6)}

    contrast([*argv, "--max_steps", "1"])
    record = read_run_record(tmp_path / "run" / "final", expected_stage="contrast")
    manifest = json.loads((pages / "manifest.json").read_text())
    doc0 = next(entry["sha256"] for entry in manifest["inputs"] if entry["doc_id"].startswith("doc0-"))
    assert doc0 not in record["results"]["training_documents"] and len(record["results"]["training_documents"]) >= 3
    assert str(tmp_path / "eval" / "evalset.json") in record["inputs"]


def test_jsonl_pairs_cut_from_an_excluded_evalsets_documents_are_left_out_and_unsourced_ones_counted(
    base, pages, tmp_path
):
    from data_prep.evalset import build_evalset
    from data_prep.pages import PageSettings, build_pages_dataset
    from stages.contrast import ContrastArguments, load_pairs

    shutil.copy(pages.parent / "doc0.pdf", tmp_path / "renamed.pdf")  # evaluated under another name
    settings = PageSettings("th", 72, 50_000, "never", 144, "tha", ("0E00-0E7F",))
    build_pages_dataset([str(tmp_path / "renamed.pdf")], str(tmp_path / "eval-pages"), settings, workers=1,
                        resume=False, max_skip_fraction=0.0)  # fmt: skip
    build_evalset([str(tmp_path / "eval-pages")], str(tmp_path / "eval"), parallel_source=None, parallel_lang="en",
                  outline_level=1)  # fmt: skip
    hashes = {
        entry["doc_id"][:4]: entry["sha256"] for entry in json.loads((pages / "manifest.json").read_text())["inputs"]
    }
    lines = [
        {
            "anchor": {"text": "leaked question"},
            "positive": {"text": "leaked passage"},
            "source": {"sha256": hashes["doc0"]},
        },
        {
            "anchor": {"text": "kept question"},
            "positive": {"text": "kept passage"},
            "source": {"sha256": hashes["doc1"]},
        },
        {"anchor": {"text": "unsourced question"}, "positive": {"text": "unsourced passage"}},
    ]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    argv = contrast_argv(base, pages, tmp_path / "run", "--exclude_evalsets", str(tmp_path / "eval"),
                         "--train_files", str(tmp_path / "pairs.jsonl"), "--eval_fraction", "0.0")  # fmt: skip
    recipe_args, args = parse_stage_arguments("contrast", (ContrastArguments,), argv)
    train, _, counts = load_pairs(args, recipe_args.seed)
    anchors = {pair.anchor.text for pair in train}
    assert "leaked question" not in anchors and {"kept question", "unsourced question"} <= anchors
    built = [pair for kind in pages_pairs(str(pages), args.passage_chars, recipe_args.seed) for pair in kind]
    assert counts["excluded_documents"] == 1  # doc0, whether cut from the pages or named by a line
    assert counts["excluded_pairs"] == 1 + sum(pair.document.startswith("doc0-") for pair in built)
    assert counts["unsourced_pairs"] == 1

    contrast([*argv, "--max_steps", "1"])
    record = read_run_record(tmp_path / "run" / "final", expected_stage="contrast")
    assert hashes["doc1"] in record["results"]["training_documents"]
    assert hashes["doc0"] not in record["results"]["training_documents"]
    assert record["results"]["pairs"]["unsourced_pairs"] == 1


def test_matryoshka_loss_at_the_full_size_is_the_plain_loss():
    torch.manual_seed(0)
    anchors, positives, negatives = (F.normalize(torch.randn(6, 16), dim=-1) for _ in range(3))
    plain = info_nce(anchors, positives, negatives, temperature=0.05)[0]
    assert info_nce(anchors, positives, negatives, temperature=0.05, matryoshka_dims=[16])[0].item() == pytest.approx(
        plain.item(), rel=1e-6
    )


def test_matryoshka_loss_sums_infonce_over_renormalised_prefixes():
    # two anchors, 4 components: the 2-component prefixes are (1, 0) and (0, 1) once re-normalised, so the
    # term at size 2 is InfoNCE of orthonormal vectors, and the term at size 4 is worked out by hand
    anchors = torch.tensor([[3.0, 0.0, 4.0, 0.0], [0.0, 3.0, 0.0, 4.0]]) / 5
    positives = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    t = 0.5
    # size 4: anchor 0 scores 0.6 with its positive and 0 with the other; anchor 1 the same by symmetry
    full = -math.log(math.exp(0.6 / t) / (math.exp(0.6 / t) + 1))
    prefix = -math.log(math.exp(1 / t) / (math.exp(1 / t) + 1))
    loss, candidates = info_nce(anchors, positives, temperature=t, matryoshka_dims=[4, 2])
    assert candidates == 2 and loss.item() == pytest.approx(full + prefix, rel=1e-6)


def test_cached_matryoshka_loss_equals_the_plain_one_in_value_and_gradients(tiny_model):
    model = lora_embedding_model(tiny_model[2], dropout=0.0)
    chunks = mini_batches(tiny_model[1], 3)
    params = [p for p in model.parameters() if p.requires_grad]
    dims = [model.model.config.text_config.hidden_size, 32, 8]
    embeddings = [torch.cat([model(**inputs) for inputs in role]) for role in chunks]
    plain = info_nce(*embeddings, temperature=0.05, matryoshka_dims=dims)
    plain[0].backward()
    plain_grads = [p.grad.clone() for p in params]
    model.zero_grad()

    def backward_chunk(inputs, grad):
        backpropagate(model(**inputs), grad).backward()

    cached, _ = cached_contrastive_step(lambda inputs: model(**inputs), chunks, backward_chunk, 0.05, dims)
    assert cached == pytest.approx(plain[0].item(), rel=1e-5)
    for plain_grad, param in zip(plain_grads, params):
        torch.testing.assert_close(param.grad, plain_grad, rtol=1e-4, atol=1e-6)
    single = info_nce(*[torch.cat([model(**inputs) for inputs in role]) for role in chunks], temperature=0.05)[0]
    assert cached > single.item()  # three terms, each positive


def test_matryoshka_dims_larger_than_the_model_are_refused(tiny_model, tmp_path):
    with pytest.raises(UsageError, match="matryoshka_dims"):
        contrast(
            ["--config", str(REPO / "recipes/tiny.yaml"), "--model_name_or_path", str(tiny_model[2]),
             "--train_files", str(tmp_path), "--output_dir", str(tmp_path / "out"), "--matryoshka_dims", "4096", "64"]
        )  # fmt: skip


def test_zero3_sizes_left_at_auto_are_filled_from_the_backbones_hidden_size():
    """Accelerate fills them from `model.config`, which the embedding wrapper lacks: `prepare` raised under ZeRO-3."""
    from stages.contrast import deepspeed_config

    config = deepspeed_config(str(REPO / "recipes/deepspeed/zero3.json"), 4, 6, bf16=False, hidden_size=256)
    zero = config["zero_optimization"]
    assert zero["stage3_prefetch_bucket_size"] == int(0.9 * 256 * 256)
    assert zero["stage3_param_persistence_threshold"] == 10 * 256
    assert "auto" not in json.dumps(config)
    assert config["train_batch_size"] == 24 and config["bf16"]["enabled"] is False
