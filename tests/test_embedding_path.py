"""The embedding path shows the model a page as pretraining showed it (issue 29's fault hunt): a model that
learned to read at one scale would read nothing at another."""

import numpy as np
import pytest
import torch
from PIL import Image

from lco.embedder import Item, model_inputs
from lco.pretrain_data import page_example


def noise_page(width: int, height: int) -> Image.Image:
    """A page whose every pixel differs from its neighbours: any other resizing changes the pixel values."""
    pixels = np.random.default_rng(width * height).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.mark.parametrize("size", [(880, 1139), (140, 28), (1600, 240)])
def test_pages_are_embedded_at_the_scale_they_were_pretrained_at(tiny_model, size):
    """`stages.evaluate` embeds pages at the pretraining budget (`max_pixels` of the run record): the page then
    reaches the vision tower as the same pixels, in the same grid, as in the pretraining example."""
    _, processor, _ = tiny_model
    max_pixels = 448 * 448
    page = noise_page(*size)
    row = {"image": page, "text": "12345", "doc_id": "d", "page": 1}
    pretrained = page_example(row, processor, max_length=640, max_pixels=max_pixels, seed=0)["images"]
    trained = processor.image_processor(images=pretrained, return_tensors="pt")
    embedded = model_inputs(
        processor, [Item(image=page)], max_text_tokens=64, image_max_side=None, max_pixels=max_pixels
    )
    assert embedded["image_grid_thw"].tolist() == trained["image_grid_thw"].tolist()
    assert torch.equal(embedded["pixel_values"], trained["pixel_values"])
    # and every visual token has its placeholder in the prompt, once
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    merged = processor.image_processor.merge_size**2
    assert int((embedded["input_ids"] == image_pad).sum()) == int(trained["image_grid_thw"].prod()) // merged
