"""Embeddings from a VLM the LCO-Emb way, shared by stages.contrast (training) and stages.evaluate.

An input is wrapped in the chat template with its modality's prompt and a generation prompt, padded on
the LEFT, and its embedding is the final hidden state of the last token, L2-normalised. With right
padding the last position would be a pad token for every input shorter than the longest.
"""

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from common.errors import UsageError

TEXT_PROMPT = "\nSummarize the above text in one word:"
IMAGE_PROMPT = "\nSummarize the above image in one word:"
# the reference's pattern for the omnimodal model's other inputs
AUDIO_PROMPT = "\nSummarize the above audio in one word:"
VIDEO_PROMPT = "\nSummarize the above video in one word:"
# a text with any other input
IMAGE_TEXT_PROMPT = "\nSummarize the above in one word:"
# the sampling rate of Qwen2.5-Omni's (Whisper's) feature extractor
AUDIO_SAMPLING_RATE = 16_000


@dataclass(frozen=True)
class Item:
    """One side of a pair: a text, a page image (PIL), audio (mono samples at `AUDIO_SAMPLING_RATE`, see
    `load_audio`), a video (its frames, PIL), or several of them."""

    text: str = ""
    image: object = None
    audio: object = None
    video: object = None


class LazyItems(Sequence):
    """`to_item(source)` for each of `sources`, made only when the batch that holds it is prepared (in a data
    loader worker where there are some): a corpus of page images is never decoded all at once.

    `measure(source)`: the item's (text, image size as (width, height) or None), had without decoding its image
    (PIL reads the size from the file's header), from which its token count is estimated so that batches hold
    items of similar sizes; without it, the items are batched in their given order."""

    def __init__(
        self,
        sources: Sequence,
        to_item: Callable[[Any], Item],
        measure: Callable[[Any], tuple[str, tuple[int, int] | None]] | None = None,
    ):
        self.sources, self.to_item, self.measure = sources, to_item, measure

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, index: int) -> Item:
        return self.to_item(self.sources[index])


def item_messages(item: Item) -> list[dict]:
    inputs = {"image": item.image, "video": item.video, "audio": item.audio}
    content = [{"type": kind} for kind, value in inputs.items() if value is not None]
    prompts = {"image": IMAGE_PROMPT, "video": VIDEO_PROMPT, "audio": AUDIO_PROMPT}
    if not content:
        prompt = TEXT_PROMPT
    elif item.text or len(content) > 1:
        prompt = IMAGE_TEXT_PROMPT
    else:
        prompt = prompts[content[0]["type"]]
    content.append({"type": "text", "text": item.text + prompt})
    return [{"role": "user", "content": content}]


def load_frames(folder) -> list:
    """A video given as a folder of its frames (image files, in name order)."""
    from pathlib import Path

    from PIL import Image

    frames = []
    for path in sorted(p for p in Path(folder).iterdir() if p.is_file()):
        with Image.open(path) as frame:
            frames.append(frame.convert("RGB"))
    return frames


def load_audio(path, sampling_rate: int = AUDIO_SAMPLING_RATE):
    """An audio file (wav, flac, mp3, ...: what libsndfile reads) as mono float32 samples at `sampling_rate`."""
    from math import gcd

    import numpy as np
    import soundfile
    from scipy.signal import resample_poly

    samples, rate = soundfile.read(path, dtype="float32", always_2d=True)
    samples = samples.mean(axis=1)
    if rate != sampling_rate:
        common = gcd(rate, sampling_rate)
        samples = resample_poly(samples, sampling_rate // common, rate // common).astype(np.float32)
    return samples


def truncate_to_tokens(tokenizer, text: str, max_tokens: int) -> tuple[str, bool]:
    """`text` cut after `max_tokens` tokens, on a token boundary; and whether it was cut."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= max_tokens:
        return text, False
    return tokenizer.decode(ids[:max_tokens]), True


def fitted_size(size: tuple[int, int], max_pixels: int | None, image_max_side: int | None) -> tuple[int, int]:
    """The (width, height) that `within_pixels` or `thumbnail` give an image of `size`, as `model_inputs` fits it
    (to the nearest pixel for a thumbnail: PIL rounds its own way)."""
    width, height = size
    if not (max_pixels or image_max_side):
        return size
    if max_pixels:
        scale = (max_pixels / (width * height)) ** 0.5
        return (max(1, int(width * scale)), max(1, int(height * scale))) if scale < 1 else size
    scale = image_max_side / max(size)
    return (max(1, round(width * scale)), max(1, round(height * scale))) if scale < 1 else size


def thumbnail(image, max_side: int):
    image = image.convert("RGB")
    if max(image.size) > max_side:
        image = image.copy()
        image.thumbnail((max_side, max_side))
    return image


def within_pixels(image, max_pixels: int):
    """`image` scaled down, aspect kept, to at most `max_pixels` pixels (as pages are for pretraining)."""
    image = image.convert("RGB")
    scale = (max_pixels / (image.width * image.height)) ** 0.5
    if scale < 1:
        image = image.resize((max(1, int(image.width * scale)), max(1, int(image.height * scale))))
    return image


def model_inputs(
    processor, items: list[Item], max_text_tokens: int, image_max_side: int | None, max_pixels: int | None = None
) -> dict:
    """Processor outputs for `items`, left-padded, texts cut to `max_text_tokens`, images to a pixel budget
    (`max_pixels`) or, without one, thumbnailed into an `image_max_side` square."""
    tokenizer = processor.tokenizer
    prompts, images, audio, videos = [], [], [], []
    for item in items:
        item = Item(truncate_to_tokens(tokenizer, item.text, max_text_tokens)[0], item.image, item.audio, item.video)
        prompts.append(processor.apply_chat_template(item_messages(item), add_generation_prompt=True, tokenize=False))
        if item.image is None:
            images.append([])
        else:
            fitted = within_pixels(item.image, max_pixels) if max_pixels else thumbnail(item.image, image_max_side)
            images.append([fitted])
        if item.audio is not None:
            audio.append(item.audio)
        if item.video is not None:
            videos.append([frame.convert("RGB") for frame in item.video])
    tokenizer.padding_side = "left"
    # images grouped by prompt: processors that count image placeholders per prompt (Gemma 3's) need it
    kwargs = {"images": images if any(images) else None}
    if audio or videos:
        if not hasattr(processor, "feature_extractor"):
            raise UsageError(
                f"the model's processor ({type(processor).__name__}) reads no audio or video; "
                "give an omnimodal model (the qwen2_5_omni family) for eval sets or pairs with audio or video."
            )
        kwargs |= {"audio": audio or None, "videos": videos or None, "sampling_rate": AUDIO_SAMPLING_RATE}
    return processor(text=prompts, padding=True, return_tensors="pt", **kwargs)


def embedding_size(model_dir: str) -> int | None:
    """The size of a model folder's embeddings (its language model's hidden size), read from config.json without
    loading the model; None for a hub id."""
    import json
    from pathlib import Path

    config = Path(model_dir) / "config.json"
    if not config.is_file():
        return None
    content = json.loads(config.read_text(encoding="utf-8"))
    return (content.get("text_config") or {}).get("hidden_size") or content.get("hidden_size")


def last_token_embeddings(hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    if not bool(attention_mask[:, -1].all()):
        raise ValueError("the last position is padding: inputs must be padded on the left")
    return F.normalize(hidden_states[:, -1].float(), dim=-1)


class EmbeddingModel(torch.nn.Module):
    """A VLM whose forward returns pooled, normalised embeddings (no vocabulary-sized logits computed).

    A module of its own so that DDP and DeepSpeed wrap the very forward that training calls."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, **inputs) -> torch.Tensor:
        backbone = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        output = backbone.model(**inputs, use_cache=False)
        return last_token_embeddings(output.last_hidden_state, inputs["attention_mask"])


def token_counts(
    processor,
    items: Sequence[Item],
    indices: Sequence[int],
    *,
    max_text_tokens: int,
    image_max_side: int | None,
    max_pixels: int | None = None,
) -> list[int] | None:
    """The input tokens of `items[i]` for i in `indices` as `model_inputs` makes them, estimated without running the
    processor: text tokens (cut to `max_text_tokens`) plus visual tokens (from the image's size fitted as
    `model_inputs` fits it, and the image processor's patch and merge sizes at its pixel budget); audio and video
    are not counted. The prompt's tokens, the same for every item, are left out. None for `LazyItems` without
    `measure`: counting them would decode every image."""
    if isinstance(items, LazyItems):
        if items.measure is None:
            return None
        measured = [items.measure(items.sources[i]) for i in indices]
    else:
        measured = [
            (item.text, item.image.size if item.image is not None else None) for item in map(items.__getitem__, indices)
        ]
    texts = [text for text, _ in measured]
    text_tokens = processor.tokenizer(texts, add_special_tokens=False)["input_ids"] if any(texts) else [[]] * len(texts)
    image_processor = getattr(processor, "image_processor", None)
    patches = getattr(image_processor, "get_number_of_image_patches", None)
    merged = getattr(image_processor, "merge_size", 1) ** 2  # patches per visual token (Qwen's 2 x 2 merge)

    def visual_tokens(size) -> int:
        if size is None:
            return 0
        if patches is None:  # a processor that gives every image the same number of tokens (Gemma 3's)
            return 1
        width, height = fitted_size(size, max_pixels, image_max_side)
        return patches(height, width) // merged

    return [min(len(ids), max_text_tokens) + visual_tokens(size) for ids, (_, size) in zip(text_tokens, measured)]


def default_workers(device: torch.device | str) -> int:
    """Data loader workers for encoding on `device`: on a GPU, up to 4 per process, leaving a core to each process
    of the node (LOCAL_WORLD_SIZE under torchrun); on a CPU none, as the model wants every core there."""
    if torch.device(device).type != "cuda":
        return 0
    cores = (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(0, min(4, cores - 1))


def encode_items(
    model: EmbeddingModel,
    processor,
    items: Sequence[Item],
    *,
    batch_size: int,
    max_text_tokens: int,
    image_max_side: int | None,
    max_pixels: int | None = None,
    progress: str | None = None,
    workers: int | None = None,
    indices: Sequence[int] | None = None,
) -> torch.Tensor:
    """Embeddings of `items[i]` for i in `indices` (default: all of them), in that order, on the CPU, `batch_size`
    at a time in the order of `indices`, without a graph and in eval mode.

    `workers` processes (None or negative: `default_workers`) prepare the next batches while the model encodes this
    one: on an H200 the processor's resizing and tokenising alone took 29% of page-encoding time, and the GPU sat
    idle meanwhile (bench/results/stages_bench_2026-11-26_h200.json)."""
    from functools import partial

    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    batches = DataLoader(
        items,
        batch_size=batch_size,
        sampler=range(len(items)) if indices is None else indices,
        num_workers=default_workers(device) if workers is None or workers < 0 else workers,
        collate_fn=partial(
            model_inputs,
            processor,
            max_text_tokens=max_text_tokens,
            image_max_side=image_max_side,
            max_pixels=max_pixels,
        ),
    )
    was_training = model.training
    model.eval()
    chunks = []
    with torch.no_grad():
        for inputs in tqdm(batches, desc=progress, disable=progress is None):
            chunks.append(model(**inputs.to(device)).cpu())
    model.train(was_training)
    return torch.cat(chunks) if chunks else torch.empty(0, 0)


class Embedder:
    """Load a model folder and encode texts and page images in batches."""

    def __init__(
        self,
        model_dir: str,
        *,
        device: str | None = None,
        dtype: str = "auto",
        max_text_tokens: int = 650,
        image_max_side: int | None = 700,
        max_pixels: int | None = None,
        workers: int | None = None,
        sort_by_size: bool = True,
    ):
        """`workers`: data loader workers preparing batches (None or negative: `default_workers`); `sort_by_size`:
        items batched from the largest estimated token count down (`token_counts`), so that a batch pads little; the
        embeddings come back in the items' order either way."""
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from .distributed import process_device

        self.device = torch.device(device) if device else process_device()  # under torchrun, each on its own GPU
        model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=dtype)
        self.model = EmbeddingModel(model).to(self.device).eval()
        self.processor = AutoProcessor.from_pretrained(model_dir)
        self.max_text_tokens = max_text_tokens
        self.image_max_side = image_max_side
        self.max_pixels = max_pixels  # when given, images are fitted to this budget instead of the square
        self.workers, self.sort_by_size = workers, sort_by_size

    def encode(self, items: Sequence[Item], batch_size: int = 16, progress: str | None = None) -> torch.Tensor:
        """Embeddings of `items` in order. In a process group (`torchrun`), each process encodes its contiguous
        share and all of them return the whole, gathered in order: the same as one process encoding all. Each
        process sorts its own share (balanced: shares are cut before sorting) and puts its embeddings back in the
        share's order before the gathering."""
        from .distributed import gather_rows, process_group, share

        world, rank = process_group()
        mine = share(len(items))
        settings = {"max_text_tokens": self.max_text_tokens, "image_max_side": self.image_max_side}
        settings["max_pixels"] = self.max_pixels
        indices = list(mine)
        counts = token_counts(self.processor, items, indices, **settings) if self.sort_by_size else None
        if counts is not None:
            indices = [indices[i] for i in sorted(range(len(indices)), key=lambda i: -counts[i])]
        encoded = encode_items(
            self.model,
            self.processor,
            items,
            batch_size=batch_size,
            progress=progress if rank == 0 else None,
            workers=self.workers,
            indices=indices,
            **settings,
        )
        ordered = torch.empty_like(encoded)
        ordered[torch.tensor(indices, dtype=torch.long) - mine.start] = encoded  # back in the share's order
        return gather_rows(ordered) if world > 1 else ordered

    def encode_texts(self, texts: list[str], batch_size: int = 16, progress: str | None = None) -> torch.Tensor:
        return self.encode([Item(text=text) for text in texts], batch_size, progress)

    def encode_images(self, images: list, batch_size: int = 16, progress: str | None = None) -> torch.Tensor:
        return self.encode([Item(image=image) for image in images], batch_size, progress)
