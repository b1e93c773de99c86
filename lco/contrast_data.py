"""Training pairs for the contrastive stage: read from any-to-any JSONL, or built offline from pages datasets.

JSONL (the reference format, one object per line; "" = that modality absent; image paths relative to
the file):  {"anchor": {"text": "...", "image_path": ""}, "positive": {...}, "negative": {...}}
A line may name the document it was cut from, by content: "source": {"sha256": "...", "doc_id": "..."}
(`data_prep queries` writes it). Training then leaves it out when an eval set covers that document
(`--exclude_evalsets`) and records it as trained on; lines without it cannot be checked, and are counted.
For the omnimodal family a side may also name an `audio_path` (an audio file) and a `video_path` (a folder of
the video's frames); the reference's omni script reads only text and images, so these two names are ours,
made like its `image_path`.

From a pages dataset (pages cut into passages of about `passage_chars` characters at line breaks):
- text pairs: consecutive passages of a document; two overlapping random crops of a passage (Contriever's
  independent cropping, Izacard et al. 2022); and each bookmark title with the passage it heads;
- multimodal pairs: a passage of a page's text -> that page's image (the retrieval direction).

A passage takes part in several pairs. Two pairs cut from the same passage in one batch would each be
scored as the other's negative although they match (a false negative): batches never hold two pairs
that share a source.
"""

import functools
import io
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from common.errors import UsageError

from .embedder import Item

MAX_LISTED = 5
MEDIA_FIELDS = ("image_path", "audio_path", "video_path")


@dataclass(frozen=True)
class PageImage:
    """A page's image in a pages dataset, read when its batch is prepared: pairs hold no image bytes, so their
    memory does not grow with the page count (the dataset itself is memory-mapped from disk)."""

    dataset: str
    row: int

    def read(self) -> bytes:
        return _pages_dataset(self.dataset)[self.row]["image"]["bytes"]


@functools.cache
def _pages_dataset(folder: str):
    import datasets

    return datasets.load_from_disk(folder).cast_column("image", datasets.Image(decode=False))


@dataclass(frozen=True)
class Side:
    text: str = ""
    image: str | PageImage | None = None  # a file path or a pages dataset's page, opened when batched
    audio: str | None = None  # an audio file, read when batched
    video: str | None = None  # a folder of frames, read when batched

    def item(self) -> Item:
        from .embedder import load_audio, load_frames

        audio = load_audio(self.audio) if self.audio else None
        video = load_frames(self.video) if self.video else None
        if self.image is None:
            return Item(text=self.text, audio=audio, video=video)
        from PIL import Image

        source = io.BytesIO(self.image.read()) if isinstance(self.image, PageImage) else self.image
        with Image.open(source) as image:
            return Item(text=self.text, image=image.convert("RGB"), audio=audio, video=video)

    def media(self) -> tuple:
        return tuple(value for value in (self.image, self.audio, self.video) if value is not None)


@dataclass(frozen=True)
class Pair:
    anchor: Side
    positive: Side
    negative: Side | None
    document: str  # held-out splits are by document
    kind: str  # "text" (both sides text only) or "multimodal"
    sources: frozenset = frozenset()  # what the sides were cut from (passages, pages); default: the sides themselves
    source_sha256: str | None = None  # a JSONL line's document, by content, where the line names it

    def __post_init__(self):
        if not self.sources:
            sides = [side for side in (self.anchor, self.positive, self.negative) if side is not None]
            values = (value for side in sides for value in (side.text, *side.media()) if value)
            object.__setattr__(self, "sources", frozenset(values))


def _kind(*sides: Side | None) -> str:
    return "multimodal" if any(side is not None and side.media() for side in sides) else "text"


def read_jsonl_pairs(path: str) -> list[Pair]:
    """Pairs of a JSONL file; every bad line is collected and reported at once."""
    folder = Path(path).parent
    pairs, problems = [], []

    def side(line_number: int, value, role: str) -> Side | None:
        if not isinstance(value, dict):
            problems.append(f"line {line_number}: `{role}` is not an object")
            return None
        fields = {name: value.get(name) or "" for name in ("text", *MEDIA_FIELDS)}
        if not all(isinstance(field, str) for field in fields.values()):
            problems.append(f"line {line_number}: `{role}` text, {', '.join(MEDIA_FIELDS)} must be strings")
            return None
        if not any(fields[name] for name in MEDIA_FIELDS) and not fields["text"].strip():
            problems.append(f"line {line_number}: `{role}` has neither text nor image_path, audio_path or video_path")
            return None
        for name in MEDIA_FIELDS:
            if fields[name] and not (folder / fields[name]).exists():
                problems.append(
                    f"line {line_number}: `{role}` {name.removesuffix('_path')} {fields[name]} not found "
                    f"(paths are relative to {folder})"
                )
                return None
        media = {
            name.removesuffix("_path"): str(folder / fields[name]) if fields[name] else None for name in MEDIA_FIELDS
        }
        return Side(fields["text"], **media)

    def source(line_number: int, value) -> str | None | bool:
        """The line's source document's sha256, None where it names none, False where it is malformed."""
        if value is None:
            return None
        sha256 = value.get("sha256") if isinstance(value, dict) else None
        if not (isinstance(sha256, str) and re.fullmatch(r"[0-9a-f]{64}", sha256)):
            problems.append(f"line {line_number}: `source` must be an object with the document's `sha256` (64 hex)")
            return False
        return sha256

    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                problems.append(f"line {line_number}: not JSON ({error.msg})")
                continue
            if not isinstance(row, dict) or "anchor" not in row or "positive" not in row:
                problems.append(f"line {line_number}: needs `anchor` and `positive`")
                continue
            anchor, positive = (
                side(line_number, row["anchor"], "anchor"),
                side(line_number, row["positive"], "positive"),
            )
            negative = side(line_number, row["negative"], "negative") if row.get("negative") else None
            sha256 = source(line_number, row.get("source"))
            if anchor and positive and sha256 is not False:
                # a line's document is its source where it names one, so that a document's lines stay together
                # on one side of the held-out split
                document = f"sha256:{sha256}" if sha256 else f"{path}:{line_number}"
                kind = _kind(anchor, positive, negative)
                pairs.append(Pair(anchor, positive, negative, document, kind, source_sha256=sha256))
    if problems:
        listed = "; ".join(problems[:MAX_LISTED])
        raise UsageError(
            f"--train_files {path}: {len(problems)} bad lines "
            f"({listed}{'; ...' if len(problems) > MAX_LISTED else ''}); fix or remove them."
        )
    if not pairs:
        raise UsageError(f"--train_files {path} holds no pairs.")
    return pairs


def passages(text: str, passage_chars: int) -> list[str]:
    """Consecutive lines joined until about `passage_chars` characters; lines that are only a number
    (page numbers) dropped."""
    found, current = [], []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.isdigit():
            continue
        current.append(line)
        if sum(map(len, current)) >= passage_chars:
            found.append(" ".join(current))
            current = []
    if current:
        found.append(" ".join(current))
    return found


def crop(text: str, rng: random.Random, share: float = 0.6) -> str:
    """A random span of `share` of the text's characters, widened to whole words where there are spaces."""
    length = max(1, round(share * len(text)))
    start = rng.randrange(len(text) - length + 1)
    end = start + length
    while 0 < start and not text[start - 1].isspace() and start > end - length * 1.5:
        start -= 1
    while end < len(text) and not text[end].isspace() and end < start + length * 1.5:
        end += 1
    return text[start:end].strip()


def pages_pairs(folder: str, passage_chars: int, seed: int) -> tuple[list[Pair], list[Pair]]:
    """(text pairs, multimodal pairs) built from one pages dataset."""
    import datasets

    from data_prep.pages import read_pages_manifest

    outlines = {
        entry["doc_id"]: entry.get("outline") or []
        for entry in read_pages_manifest(folder, "--pages_datasets")["inputs"]
    }
    pages = datasets.load_from_disk(folder).select_columns(["doc_id", "page", "text"])
    rng = random.Random(seed)
    text_pairs, image_pairs = [], []
    previous: dict[str, str] = {}  # doc_id -> its last passage so far, to pair across page breaks
    for index, row in enumerate(pages):
        doc, page_passages = row["doc_id"], passages(row["text"], passage_chars)
        if not page_passages:
            continue
        for passage in page_passages:
            if doc in previous:
                pair = Pair(Side(previous[doc]), Side(passage), None, doc, "text", frozenset({previous[doc], passage}))
                text_pairs.append(pair)
            previous[doc] = passage
            pair = Pair(Side(crop(passage, rng)), Side(crop(passage, rng)), None, doc, "text", frozenset({passage}))
            text_pairs.append(pair)
        for _level, title, page in outlines.get(doc, []):
            if page == row["page"]:
                heads = [p for p in page_passages if title in p]
                if heads and heads[0].strip() != title:
                    text_pairs.append(Pair(Side(title), Side(heads[0]), None, doc, "text", frozenset({heads[0]})))
        page = frozenset({*page_passages, f"{doc} page {row['page']}"})  # the image shows every passage of the page
        image = Side(image=PageImage(str(folder), index))
        image_pairs.append(Pair(Side(rng.choice(page_passages)), image, None, doc, "multimodal", page))
    return text_pairs, image_pairs


def mix(text_pairs: list[Pair], image_pairs: list[Pair], multimodal_fraction: float, seed: int) -> list[Pair]:
    """All text pairs plus multimodal pairs making up `multimodal_fraction` of the result (sampled with
    replacement when there are too few distinct ones; all of them and no text when the fraction is 1)."""
    if multimodal_fraction >= 1.0 or not text_pairs:
        return list(image_pairs) if multimodal_fraction > 0 else []
    wanted = round(multimodal_fraction / (1 - multimodal_fraction) * len(text_pairs))
    if wanted and not image_pairs:
        return list(text_pairs)
    rng = random.Random(seed)
    chosen = rng.sample(image_pairs, wanted) if wanted <= len(image_pairs) else rng.choices(image_pairs, k=wanted)
    return list(text_pairs) + chosen


def batches(pairs: list[Pair], batch_size: int, *, homogeneous: bool, seed: int) -> list[list[Pair]]:
    """One epoch of full batches in a seeded order, no two pairs of a batch sharing a source (a pair that
    would is put off to a later batch; those left when no full batch can be made are dropped, as are the
    last pairs of an epoch); with `homogeneous`, each batch is text-only or multimodal throughout (ZeRO-3
    hangs when ranks disagree about having images)."""
    rng = random.Random(seed)
    pools = [[p for p in pairs if p.kind == kind] for kind in ("text", "multimodal")] if homogeneous else [list(pairs)]
    result = []
    for pool in pools:
        rng.shuffle(pool)
        while len(pool) >= batch_size:
            batch, taken, put_off = [], set(), []
            for index, pair in enumerate(pool):
                if taken.isdisjoint(pair.sources):
                    batch.append(pair)
                    taken |= pair.sources
                    if len(batch) == batch_size:
                        put_off += pool[index + 1 :]
                        break
                else:
                    put_off.append(pair)
            if len(batch) < batch_size:
                break
            result.append(batch)
            pool = put_off
    rng.shuffle(result)
    return result
