"""The Embedder batches items by estimated size (largest first) with workers preparing the batches, and returns the
embeddings in the items' order: equal to the plain path's, with fewer padded tokens."""

import pytest
import torch

from lco.embedder import Embedder, EmbeddingModel, Item, LazyItems, model_inputs, token_counts

from .test_contrast import TEXTS

# float32 on the CPU; an item's embedding changes with its batch only through left padding, which is masked: the
# bound of tests/test_contrast.py::test_left_padded_pooling_equals_the_unpadded_embedding
TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}
SIZES = [(40, 300), (320, 220), (60, 60), (300, 420), (90, 40)]  # pages of very different areas (pixels)


@pytest.fixture(scope="module")
def embedder(tiny_model):
    return Embedder(str(tiny_model[2]), device="cpu", image_max_side=None, max_pixels=150_000)


@pytest.fixture(scope="module")
def mixed_items(thai_khmer_page):
    """Texts of 1 to ~30 tokens and pages of 1 to 120 visual tokens, interleaved so that the given order mixes them."""
    pages = [Item(image=thai_khmer_page.resize(size)) for size in SIZES]
    texts = [Item(text) for text in (*TEXTS, TEXTS[1] * 3, TEXTS[4] * 2)]
    return [item for pair in zip(texts, pages + texts[len(pages) :]) for item in pair][:12]


def padded_tokens(embedder, items, monkeypatch) -> int:
    """Padding tokens in the batches the embedder encodes `items` in."""
    padding, forward = [], EmbeddingModel.forward
    monkeypatch.setattr(
        EmbeddingModel,
        "forward",
        lambda self, **inputs: padding.append(int((inputs["attention_mask"] == 0).sum())) or forward(self, **inputs),
    )
    embedder.encode(items, batch_size=3)
    monkeypatch.setattr(EmbeddingModel, "forward", forward)
    return sum(padding)


def test_sorted_batches_prepared_by_workers_equal_the_plain_path_in_the_items_order(embedder, mixed_items):
    embedder.sort_by_size, embedder.workers = False, 0
    plain = embedder.encode(mixed_items, batch_size=3)
    embedder.sort_by_size = True
    inline = embedder.encode(mixed_items, batch_size=3)
    embedder.workers = 2
    prefetched = embedder.encode(mixed_items, batch_size=3)
    assert plain.shape == (len(mixed_items), embedder.model.model.config.text_config.hidden_size)
    torch.testing.assert_close(inline, plain, **TOLERANCE)
    torch.testing.assert_close(prefetched, inline, rtol=0, atol=0)  # the same batches, in other processes


def test_sorting_by_size_pads_fewer_tokens_on_a_mixed_set(embedder, mixed_items, monkeypatch):
    embedder.workers = 0
    embedder.sort_by_size = False
    given_order = padded_tokens(embedder, mixed_items, monkeypatch)
    embedder.sort_by_size = True
    by_size = padded_tokens(embedder, mixed_items, monkeypatch)
    # 4 batches of 3: a text next to a page pads it to the page's length in the given order
    assert by_size < given_order / 2, (by_size, given_order)


def test_estimated_token_counts_are_the_processors_own(embedder, mixed_items):
    """The estimate, made without running the processor, equals the processor's count: a page's visual tokens (its
    grid of patches, 2 x 2 merged), a text's tokens beyond those of the empty prompt."""
    processor, settings = embedder.processor, {"max_text_tokens": 650, "image_max_side": None, "max_pixels": 150_000}
    counts = token_counts(processor, mixed_items, range(len(mixed_items)), **settings)
    # the prompt's tokens, from a one-token text ("x"): an empty one's newline merges with the prompt's first
    empty = model_inputs(processor, [Item("x")], 650, None, 150_000)["input_ids"].shape[1] - 1
    for item, count in zip(mixed_items, counts):
        inputs = model_inputs(processor, [item], 650, None, 150_000)
        expected = int(inputs["image_grid_thw"].prod()) // 4 if item.image else inputs["input_ids"].shape[1] - empty
        assert count == expected > 0


def test_lazy_items_are_measured_without_being_made_and_encoded_once(embedder, mixed_items):
    made = []

    def to_item(index):
        made.append(index)
        return mixed_items[index]

    def measure(index):
        item = mixed_items[index]
        return item.text, item.image.size if item.image else None

    embedder.workers, embedder.sort_by_size = 0, True
    lazy = embedder.encode(LazyItems(range(len(mixed_items)), to_item, measure), batch_size=3)
    assert sorted(made) == list(range(len(mixed_items)))  # each made once, for its batch
    assert made != list(range(len(mixed_items)))  # in the order of size, not the given one
    torch.testing.assert_close(lazy, embedder.encode(mixed_items, batch_size=3), rtol=0, atol=0)
