"""Padding-free (packed) pretraining batches and the loss SFTTrainer computes without whole logits."""

import datasets
import pytest
import torch
import trl.kernels.chunked_logprob
import trl.trainer.utils
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode
from trl import SFTConfig
from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

from common.errors import UsageError
from common.run_record import read_run_record
from lco.packing import PackingSFTTrainer, pack, rope_index
from lco.pretrain_data import continuation_example, page_example
from stages.pretrain import main as pretrain

from .test_pretrain import pages, pretrain_argv  # noqa: F401 (a fixture)

# float32 on the CPU: the packed and padded batches sum the same terms in other orders (measured: loss within 2e-6,
# every parameter's gradient within 1e-6 of its largest entry)
LOSS_RTOL, GRAD_RTOL = 1e-5, 1e-5


def noise(width: int, height: int, seed: int) -> Image.Image:
    # not a flat image: one whose patches all look alike gives the vision attention's q/k gradients of rounding size
    pixels = torch.randint(0, 256, (height, width, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    return Image.fromarray(pixels.numpy())


def examples(processor, completions=("ก" * 80, "hello world " * 5)) -> list[dict]:
    """Two pages (images of other sizes, completions of other lengths) and a text-only continuation."""
    page_rows = [
        {"doc_id": "a", "page": 1, "image": noise(300, 400, 0), "text": completions[0]},
        {"doc_id": "b", "page": 1, "image": noise(200, 150, 1), "text": completions[1]},
    ]
    rows = [page_example(row, processor, max_length=200, max_pixels=40_000, seed=0) for row in page_rows]
    text = {"doc_id": "c", "page": 1, "text": "some text here and there " * 6}
    return [*rows, continuation_example(text, processor, max_length=200)]


def padded_batch(processor, rows) -> dict:
    return DataCollatorForVisionLanguageModeling(processor=processor, completion_only_loss=True)(rows)


def loss_and_gradients(model, inputs: dict, loss=None) -> tuple[torch.Tensor, dict]:
    model.zero_grad()
    value = loss(model, inputs) if loss else model(**inputs, use_cache=False).loss
    value.backward()
    return value.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_same_training(expected, actual, loss_rtol=LOSS_RTOL, grad_rtol=GRAD_RTOL) -> None:
    (expected_loss, expected_grads), (loss, grads) = expected, actual
    torch.testing.assert_close(loss, expected_loss, rtol=loss_rtol, atol=0)
    assert grads.keys() == expected_grads.keys() and len(grads) > 20
    for name, grad in expected_grads.items():
        assert (grads[name] - grad).abs().max() <= grad_rtol * grad.abs().max(), name


def packed_equals_padded(model, processor) -> None:
    """The packed batch's loss and the gradients of every parameter equal the padded batch's."""
    batch = padded_batch(processor, examples(processor))
    model.train()
    assert_same_training(
        loss_and_gradients(model, dict(batch)), loss_and_gradients(model, pack(batch, rope_index(model)))
    )


def test_the_packed_batch_holds_each_examples_real_tokens_with_positions_restarting(tiny_model):
    model, processor, _ = tiny_model
    batch = padded_batch(processor, examples(processor))
    lengths = batch["attention_mask"].sum(-1).tolist()
    packed = pack(batch, rope_index(model))
    assert "attention_mask" not in packed and packed["input_ids"].shape == (1, sum(lengths))
    assert packed["position_ids"].shape == (4, 1, sum(lengths))
    text = packed["position_ids"][0, 0]
    assert text.tolist() == [i for n in lengths for i in range(n)]
    # the multimodal rows are the model's own positions of each example alone
    start = 0
    for row, n in enumerate(lengths):
        alone = {key: batch[key][row : row + 1, :n] for key in ("input_ids", "mm_token_type_ids", "attention_mask")}
        images = batch["image_grid_thw"][row : row + 1] if row < 2 else None
        positions = model.model.get_rope_index(
            alone["input_ids"],
            alone["mm_token_type_ids"],
            image_grid_thw=images,
            attention_mask=alone["attention_mask"],
        )[0]
        assert torch.equal(packed["position_ids"][1:, 0, start : start + n], positions[:, 0])
        assert packed["labels"][0, start] == -100  # never predicted from the example before
        start += n
    # the same completion tokens are scored as in the padded batch
    assert (packed["labels"] != -100).sum() == (batch["labels"][:, 1:] != -100).sum()


def test_no_example_attends_to_another_in_the_packed_row(tiny_model):
    model, processor, _ = tiny_model
    model.eval()

    def logits(completions):
        batch = padded_batch(processor, examples(processor, completions))
        with torch.no_grad():
            packed = model(**pack(batch, rope_index(model)), use_cache=False).logits[0]
        return packed, int(batch["attention_mask"][0].sum())

    before, second = logits(("ก" * 80, "hello world " * 5))  # second: where the second example starts
    after, same = logits(("ข" * 80, "hello world " * 5))  # the first example changed, not its length
    assert same == second and not torch.allclose(before[:second], after[:second])
    torch.testing.assert_close(after[second:], before[second:], rtol=1e-5, atol=1e-5)  # nothing after it saw it


def trainer(model, processor, tmp_path, padding_free: bool) -> PackingSFTTrainer:
    config = SFTConfig(
        output_dir=str(tmp_path), use_cpu=True, bf16=False, max_length=200, report_to="none", padding_free=padding_free
    )
    rows = datasets.Dataset.from_list(examples(processor)[:2])
    return PackingSFTTrainer(model=model, args=config, train_dataset=rows, processing_class=processor)


class LargestLogits(TorchDispatchMode):
    """The largest tensor a computation makes that has the vocabulary as a dimension, the weights' (vocab, hidden)
    shape aside: logits, or tiles of them."""

    def __init__(self, vocab: int, hidden: int):
        super().__init__()
        self.vocab, self.hidden, self.largest = vocab, hidden, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, torch.Tensor) and self.vocab in tensor.shape:
                if sorted(tensor.shape) != sorted((self.vocab, self.hidden)):
                    self.largest = max(self.largest, tensor.numel())
        return out


@pytest.mark.parametrize("packed", [False, True])
def test_the_trainers_loss_equals_the_plain_loss_without_whole_logits(tiny_model, tmp_path, monkeypatch, packed):
    """SFTTrainer (TRL 1.16) computes the loss through its fused LM head (trl/kernels/chunked_logprob.py): tiles of
    4096 tokens x 32768 vocabulary entries, recomputed in the backward. The tiny model fits one tile, so the tiles
    are shrunk here to the proportions of a 3B step (4 x 2800 tokens, 151936 entries: 3 x 5 tiles)."""
    model, processor, _ = tiny_model
    monkeypatch.setattr(trl.kernels.chunked_logprob, "TOKEN_CHUNK_SIZE", 64)
    monkeypatch.setattr(trl.trainer.utils, "_CHUNKED_LOGPROB_CHUNK_SIZE", 1024)
    vocab, hidden = model.config.text_config.vocab_size, model.config.text_config.hidden_size
    batch = padded_batch(processor, examples(processor))
    counted = int((batch["labels"][:, 1:] != -100).sum())
    items = counted + 7  # as under gradient accumulation: the tokens of every micro-batch of the step
    model.train()
    plain_memory = LargestLogits(vocab, hidden)
    with plain_memory:
        plain = loss_and_gradients(
            model, dict(batch), lambda m, x: m(**x, use_cache=False, num_items_in_batch=items).loss
        )
    sft = trainer(model, processor, tmp_path, packed)
    inputs = pack(batch, rope_index(model)) if packed else dict(batch)
    memory = LargestLogits(vocab, hidden)
    with memory:
        fused = loss_and_gradients(model, inputs, lambda m, x: sft.compute_loss(m, x, num_items_in_batch=items))
    assert_same_training(plain, fused)
    assert plain_memory.largest >= counted * vocab  # the plain loss makes the whole logits (all tokens')
    assert memory.largest <= 64 * 1024 < counted * vocab
    metrics = sft._metrics["train"]
    assert metrics["num_tokens"] == [int(batch["attention_mask"].sum())]
    assert 0 <= metrics["mean_token_accuracy"][0] <= 1 and metrics["entropy"][0] > 0


@pytest.mark.slow
def test_a_padding_free_run_gives_the_losses_of_a_padded_run(recorded_base, pages, tmp_path):  # noqa: F811
    runs = {}
    for name, flag in (("padded", "false"), ("packed", "true")):
        argv = pretrain_argv(recorded_base, pages, tmp_path / name, "--max_steps", "3", "--padding_free", flag)
        pretrain([*argv, "--eval_strategy", "steps", "--eval_steps", "3"])
        runs[name] = read_run_record(tmp_path / name / "final")["results"]
    for key in ("loss", "mean_token_accuracy", "num_tokens"):
        assert [e[key] for e in runs["packed"]["loss_history"]] == pytest.approx(
            [e[key] for e in runs["padded"]["loss_history"]], rel=1e-4
        ), key
    assert runs["packed"]["generation_quality"][-1]["eval_loss"] == pytest.approx(
        runs["padded"]["generation_quality"][-1]["eval_loss"], rel=1e-4
    )
    assert runs["packed"]["throughput"]["tokens_per_second"] > 0


def test_padding_free_is_refused_for_a_family_it_would_train_wrongly_before_weights_load(pages, tmp_path):  # noqa: F811
    folder = tmp_path / "gemma"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "gemma3"}')  # no weights: the check comes first
    argv = pretrain_argv(folder, pages, tmp_path / "run", "--padding_free", "true")
    with pytest.raises(UsageError, match="--padding_free true: gemma3 models do not train correctly on packed batches"):
        pretrain(argv)
