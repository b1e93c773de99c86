"""Pages datasets to prompt/completion examples for continual generative pretraining.

Each page becomes: user turn = the page image + an instruction (one of several phrasings, drawn by
seed), assistant turn = the page text. The image is scaled to the pixel budget, and further down if
its visual tokens alone would leave too little room for text; the text is then cut on a token
boundary so that the whole example fits `max_length`. TRL therefore never truncates, and image
tokens are never cut ("Image features and image tokens do not match").
"""

import math
import random
import zlib

from .embedder import truncate_to_tokens

INSTRUCTIONS = (
    "Transcribe the text of this page.",
    "Read this document page and write out all of its text.",
    "What does this page say? Write its full text.",
    "Extract the text from the page image, in reading order.",
    "Write down the text shown in this image.",
)
MIN_COMPLETION_TOKENS = 32  # a page whose image leaves less room than this is scaled down
COMPLETION_SUFFIX_TOKENS = 2  # <|im_end|> and the newline the chat template adds after the answer


def held_out_documents(doc_ids: list[str], fraction: float, seed: int) -> set[str]:
    """Documents whose pages are never trained on: a seeded share of distinct documents, at least one."""
    documents = sorted(set(doc_ids))
    if fraction <= 0 or len(documents) < 2:
        return set()
    random.Random(seed).shuffle(documents)
    return set(documents[: max(1, round(fraction * len(documents)))])


def evaluated_in(pages_folders: list[str], evalsets: list[str]) -> dict[str, str]:
    """doc_id -> sha256 of the documents of `pages_folders` that one of `evalsets` covers (the same content, under
    whatever file name): training leaves them out, so that no eval set scores a page its model was trained on."""
    from data_prep.evalset import evaluated_documents

    covered = set().union(*(evaluated_documents(folder, "--exclude_evalsets") for folder in evalsets))
    return {doc: sha for doc, sha in _document_hashes(pages_folders).items() if sha in covered}


def document_sha256(pages_folders: list[str], doc_ids) -> list[str]:
    """The sorted sha256 of the given documents of `pages_folders`, as the run record lists what was trained on."""
    hashes = _document_hashes(pages_folders)
    return sorted({hashes[doc] for doc in doc_ids if doc in hashes})


def _document_hashes(pages_folders: list[str]) -> dict[str, str]:
    from data_prep.pages import document_hashes

    return {doc: sha for folder in pages_folders for doc, sha in document_hashes(folder, "--datasets").items()}


def image_tokens(height: int, width: int, processor, max_pixels: int) -> int:
    """Visual tokens an image costs: a fixed count where the processor resizes every image to one square
    (Gemma 3), else one per merged patch after the processor's own resizing (the Qwen families)."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    if hasattr(processor, "image_seq_length"):
        return processor.image_seq_length
    image_processor = processor.image_processor
    factor = image_processor.patch_size * image_processor.merge_size
    h, w = smart_resize(
        height, width, factor=factor, min_pixels=image_processor.size["shortest_edge"], max_pixels=max_pixels
    )
    return (h // factor) * (w // factor)


def fit_image(image, processor, max_pixels: int, max_image_tokens: int):
    """`image` as RGB, scaled (aspect kept) to at most `max_pixels` and, where the token count depends on the
    size, to at most `max_image_tokens` tokens."""
    image = image.convert("RGB")
    budget, smallest_side = max_pixels, 1
    if not hasattr(processor, "image_seq_length"):
        image_processor = processor.image_processor
        smallest_side = image_processor.patch_size * image_processor.merge_size
        budget = min(budget, image_processor.size["longest_edge"], max_image_tokens * smallest_side**2)
    if image.width * image.height > budget:
        scale = math.sqrt(budget / (image.width * image.height))
        size = (max(smallest_side, int(image.width * scale)), max(smallest_side, int(image.height * scale)))
        image = image.resize(size)
    return image, image_tokens(image.height, image.width, processor, budget)


def prompt_overhead(processor, instruction: str) -> int:
    """Tokens of the prompt besides the image pads (system turn, user turn, instruction, assistant header)."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return len(processor.tokenizer(text, add_special_tokens=False)["input_ids"])


def smallest_max_length(processor) -> int:
    """The smallest `max_length` every page example fits: the longest instruction's prompt, the fewest image
    tokens a page can cost (the processor's minimum size) and MIN_COMPLETION_TOKENS of text."""
    if hasattr(processor, "image_seq_length"):
        fewest_image_tokens = processor.image_seq_length
    else:
        image_processor = processor.image_processor
        patch = image_processor.patch_size * image_processor.merge_size
        fewest_image_tokens = math.ceil(image_processor.size["shortest_edge"] / patch**2)
    longest_prompt = max(prompt_overhead(processor, instruction) for instruction in INSTRUCTIONS)
    return longest_prompt + COMPLETION_SUFFIX_TOKENS + fewest_image_tokens + MIN_COMPLETION_TOKENS


def page_example(row: dict, processor, *, max_length: int, max_pixels: int, seed: int) -> dict:
    """One pages-dataset row to a TRL prompt/completion example with its image."""
    rng = random.Random(zlib.crc32(f"{seed}:{row['doc_id']}:{row['page']}".encode()))
    instruction = rng.choice(INSTRUCTIONS)
    overhead = prompt_overhead(processor, instruction) + COMPLETION_SUFFIX_TOKENS
    image, n_image = fit_image(row["image"], processor, max_pixels, max_length - overhead - MIN_COMPLETION_TOKENS)
    text, truncated = truncate_to_tokens(processor.tokenizer, row["text"], max_length - overhead - n_image)
    return {
        "images": [image],
        "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}],
        "completion": [{"role": "assistant", "content": [{"type": "text", "text": text}]}],
        "doc_id": row["doc_id"],
        "page": row["page"],
        "image_tokens": n_image,
        "truncated": truncated,
    }


CONTINUATION_INSTRUCTION = "Continue this text:\n"


def continuation_example(row: dict, processor, *, max_length: int) -> dict:
    """A text-only example from a page's text: its first third in the prompt (at most half the room), the
    rest, cut to fit `max_length`, to generate."""
    tokenizer = processor.tokenizer
    ids = tokenizer(row["text"], add_special_tokens=False)["input_ids"]
    empty = [{"role": "user", "content": [{"type": "text", "text": CONTINUATION_INSTRUCTION}]}]
    overhead = len(
        tokenizer(
            processor.apply_chat_template(empty, add_generation_prompt=True, tokenize=False), add_special_tokens=False
        )["input_ids"]
    )
    # 2 tokens of margin: text decoded at a token boundary may re-encode one token longer on each side
    room = max_length - overhead - COMPLETION_SUFFIX_TOKENS - 2
    head = max(1, min(len(ids) // 3, room // 2))
    prompt = [
        {"role": "user", "content": [{"type": "text", "text": CONTINUATION_INSTRUCTION + tokenizer.decode(ids[:head])}]}
    ]
    completion_ids = ids[head : head + room - head]
    return {
        "images": [],
        "prompt": prompt,
        "completion": [{"role": "assistant", "content": [{"type": "text", "text": tokenizer.decode(completion_ids)}]}],
        "doc_id": row["doc_id"],
        "page": row["page"],
        "image_tokens": 0,
        "truncated": head + len(completion_ids) < len(ids),
    }
