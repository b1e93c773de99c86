import pytest
import torch

from lco.representation import anisotropy, linear_cka, mutual_knn


def test_anisotropy_is_near_zero_for_isotropic_and_one_for_collapsed_embeddings():
    torch.manual_seed(0)
    assert abs(anisotropy(torch.randn(500, 256))) < 0.01
    collapsed = torch.ones(50, 16) + 1e-4 * torch.randn(50, 16)
    assert anisotropy(collapsed) == pytest.approx(1.0, abs=1e-4)
    # a shared offset, the usual anisotropy of language-model states, shows up as a positive mean cosine
    assert 0.4 < anisotropy(torch.randn(500, 64) + 1.0) < 0.6


def test_alignment_is_perfect_for_identical_or_rotated_pairs_and_low_for_shuffled_ones():
    torch.manual_seed(0)
    images = torch.randn(200, 32)
    rotation, _ = torch.linalg.qr(torch.randn(32, 32))
    texts = 3.0 * images @ rotation
    assert mutual_knn(images, texts, k=5) == pytest.approx(1.0)
    assert linear_cka(images, texts) == pytest.approx(1.0, abs=1e-9)

    shuffled = texts[torch.randperm(200)]
    assert mutual_knn(images, shuffled, k=5) < 0.1  # chance is k / n = 0.025
    assert linear_cka(images, shuffled) < 0.3


def test_cka_between_the_same_items_in_different_spaces_tracks_shared_structure():
    torch.manual_seed(0)
    shared = torch.randn(300, 8)
    a = torch.cat([shared, 0.1 * torch.randn(300, 24)], dim=1)
    b = torch.cat([shared @ torch.randn(8, 8), torch.randn(300, 24)], dim=1)
    assert linear_cka(a, b) > linear_cka(a, torch.randn(300, 32))


def test_layer_states_are_per_layer_and_independent_of_the_batch(tiny_model, thai_khmer_page):
    from lco.embedder import EmbeddingModel, Item
    from lco.representation import layer_states

    model, processor = tiny_model[0].eval(), tiny_model[1]
    items = [Item("สวัสดี"), Item(image=thai_khmer_page), Item("a much longer text to pad the others on the left")]
    states = layer_states(model, processor, items, batch_size=3, image_max_side=200)
    alone = layer_states(model, processor, items, batch_size=1, image_max_side=200)
    assert states.shape == (model.config.text_config.num_hidden_layers + 1, 3, model.config.text_config.hidden_size)
    torch.testing.assert_close(states, alone, rtol=1e-4, atol=1e-5)
    # the last layer's state, normalised, is the embedding the Embedder uses
    with torch.no_grad():
        from lco.embedder import model_inputs

        embedded = EmbeddingModel(model)(**model_inputs(processor, items, 650, 200))
    torch.testing.assert_close(torch.nn.functional.normalize(states[-1], dim=-1), embedded, rtol=1e-4, atol=1e-5)
