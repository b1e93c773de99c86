"""The embedding path shows the model a page as pretraining showed it (issue 29's fault hunt): a model that
learned to read at one scale would read nothing at another."""

import numpy as np
import pytest
import torch
from PIL import Image

from lco.embedder import EmbeddingModel, Item, model_inputs
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


def glyph_page(text: str) -> Image.Image:
    from PIL import ImageDraw, ImageFont

    font = ImageFont.truetype("/usr/share/fonts/truetype/dejavu/DejaVuSansMono.ttf", 26)
    page = Image.new("RGB", (28 * len(text), 28), "white")
    draw = ImageDraw.Draw(page)
    for i, glyph in enumerate(text):
        draw.text((i * 28 + 6, 1), glyph, fill="black", font=font)
    return page


@pytest.mark.slow
def test_a_model_that_reads_its_pages_embeds_them_apart(tmp_path):
    """A tiny model overfit to transcribe 6 one-glyph pages exactly (with the stage's examples) gives each page, pooled
    by the embedder from the prompt it reads with, an embedding of its own (the issue's collapsed tower gave every page
    the same one, cosine 1.00000): images are placed, padded and pooled so that what the model read reaches the
    embedding.

    Not asserted, as measured (bench/results/toy_search_cpu2.md): under the embedding prompt ("Summarize the above
    image in one word:"), never seen in pretraining, this model ignores the page (it writes "1" for all six; page
    cosines 0.998-0.9999): a tiny model reads only when asked as it was trained. Nor that a page is nearest its own
    text: a model that has only ever read pages leaves a text's last state unrelated to its page's (chance on 64
    unseen pages); a model that also learned to read texts (`make toy`'s text continuations) lines them up somewhat
    before any refinement (page -> own text top-1 0.083 among 48, chance 0.021)."""
    from stages.base_model import BaseModelArguments, build_tiny_base_model
    from tests.conftest import REPO

    torch.manual_seed(0)
    args = BaseModelArguments(
        tokenizer_corpus=[str(REPO / "samples/udhr/en.md")],
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        vision_hidden_size=64,
        vision_intermediate_size=128,
        rope_theta=10.0,
        min_pixels=28 * 28,
    )
    model, processor = build_tiny_base_model(args, seed=0)
    texts = list("012345")
    rows = [{"image": glyph_page(t), "text": t, "doc_id": "d", "page": i + 1} for i, t in enumerate(texts)]
    examples = [page_example(row, processor, max_length=128, max_pixels=448 * 448, seed=0) for row in rows]
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "right"
    prompts = [processor.apply_chat_template(e["prompt"], add_generation_prompt=True, tokenize=False) for e in examples]
    inputs = processor(
        text=[p + t + "<|im_end|>" for p, t in zip(prompts, texts)],
        images=[e["images"] for e in examples],
        padding=True,
        return_tensors="pt",
    )
    labels = torch.full_like(inputs["input_ids"], -100)
    for i, length in enumerate(inputs["attention_mask"].sum(1).tolist()):
        labels[i, length - 2 : length] = inputs["input_ids"][i, length - 2 : length]  # the glyph and <|im_end|>
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    for _ in range(150):
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if loss.item() < 0.01:
            break
    model.eval()
    tokenizer.padding_side = "left"
    asked = processor(text=prompts, images=[e["images"] for e in examples], padding=True, return_tensors="pt")
    with torch.no_grad():
        generated = model.generate(**asked, max_new_tokens=3, do_sample=False)
    read = tokenizer.batch_decode(generated[:, asked["input_ids"].shape[1] :], skip_special_tokens=True)
    assert [t.strip() for t in read] == texts  # it reads its pages

    # pooled by the embedder (left padding, last token) from the prompt the model learned to read with
    embedder = EmbeddingModel(model)
    with torch.no_grad():
        pages = embedder(**asked)
    cosines = pages @ pages.T
    assert cosines[~torch.eye(len(texts), dtype=torch.bool)].max() < 0.5
    # each embedding is the state the model reads its page from: the language model head turns it into the glyph
    with torch.no_grad():
        decoded = tokenizer.convert_ids_to_tokens(model.lm_head(pages).argmax(-1).tolist())
    assert decoded == texts
