"""Questions written by an instruction-tuned VLM from each page, filtered, for eval sets and training pairs.

    python -m data_prep queries --config recipes/km.yaml --pages checkpoints/km/pages --generator MODEL_DIR \
        --output checkpoints/km/queries [--languages en km] [--per_page 3] [--engine transformers|vllm] [--resume]

The generator sees each page image (and its text, where the recipe says so) and writes up to `per_page`
questions per language, one per line: English for SeaDoc-style cross-lingual retrieval, the page's language
for in-language retrieval. Each question then meets the filters in this order, and the first that refuses it
is counted in the manifest:

    length          fewer than `min_chars` or more than `max_chars` characters
    language        under `min_script_fraction` of its letters in the language's script (the recipes' ranges)
    copied          shares a span of `max_copied_chars` characters with the page text
    duplicate       the same letters and digits as an earlier question that passed the filters above (any page)
    near_duplicate  as similar as `near_duplicate` (difflib ratio) to such a question of the same page and language
    consistency     its page is not in the top `top_k` under BM25 over the page texts (questions in the pages'
                    language) or under the embedding model `consistency_model` (any language, when given)

Output folder:
    evalset/            BEIR-with-images (`stages.evaluate --data`), the eval documents' pages, each query with
                        its provenance; evalset.json lists the documents (training's `--exclude_evalsets`)
    train_pairs.jsonl   any-to-any pairs (`stages.contrast --train_files`): question -> page image (images/),
                        question -> the page's passage that shares most words with it
    candidates.jsonl    every question generated, with its checks and the filter that refused it
    manifest.json, run_record.json

Documents go to the eval set or to training by a seeded draw (`eval_fraction`). Generation runs in batches of
`batch_size` pages, each with its own seed, kept in `.<output>.work/` when done: `--resume` generates only the
batches that are missing and gives what an uninterrupted run gives. Only generation settings decide whether
the work folder can be resumed, so a run can be resumed with other filter settings and no new generation.
"""

import difflib
import json
import logging
import re
import shutil
import time
import unicodedata
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from common.artifacts import (
    atomic_directory,
    check_model_source,
    naming_full_disk,
    prepare_work_folder,
    write_text_atomic,
)
from common.errors import UsageError
from common.languages import language_name, normalize_lang
from common.recipe import RECIPES_DIR, load_recipe
from data_prep.evalset import page_id, write_queries_and_qrels
from data_prep.settings import DataPrepSettings
from data_prep.text_quality import parse_ranges

logger = logging.getLogger(__name__)

DEFAULT_PROMPT = (
    "Write {n} questions in {language} that a person could ask a search engine and that this document page "
    "answers. Each question must be specific and self-contained: it names what it asks about, so that it finds "
    'this page among thousands of others. Never refer to "this page", "this document", "the text" or '
    '"the image", and do not copy sentences from the page: ask in your own words. Write one question per '
    "line and nothing else."
)
DEFAULT_CONTEXT_PROMPT = "\n\nThe page's text (extracted, it may contain errors):\n{text}"
FILTERS = ("length", "language", "copied", "duplicate", "near_duplicate", "consistency")
LIST_MARKER = re.compile(r"^\s*(?:[-*\u2022]|\(?\d{1,2}[.):]|(?:Q|Question)\s*\d*\s*[.:])\s*", re.IGNORECASE)
WORK_FILE = "batch-{:06d}.json"

# an engine: (page images, prompts, seed) -> one generated text per prompt
Engine = Callable[[list, list[str], int], list[str]]


@dataclass
class QueriesSettings:
    """The recipe's `queries` section."""

    languages: list[str] = field(
        default_factory=list,
        metadata={"help": "Languages to ask in (e.g. en km); empty: English and the pages' language."},
    )
    per_page: int = field(default=3, metadata={"help": "Questions asked per page and language."})
    prompt: str = field(default=DEFAULT_PROMPT, metadata={"help": "Instruction; {n} and {language} are filled in."})
    text_context: bool = field(
        default=True, metadata={"help": "Give the page's extracted text with its image (context_prompt)."}
    )
    context_prompt: str = field(
        default=DEFAULT_CONTEXT_PROMPT, metadata={"help": "Appended to the prompt with the page text as {text}."}
    )
    context_chars: int = field(default=2000, metadata={"help": "Page text given as context is cut to this length."})
    max_pixels: int = field(default=1003520, metadata={"help": "Pixel budget of the page images the generator sees."})
    max_new_tokens: int = field(default=256, metadata={"help": "Tokens generated per page and language."})
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature; 0 = greedy decoding."})
    batch_size: int = field(
        default=8, metadata={"help": "Pages generated for at once (each in every language); the unit of --resume."}
    )
    engine: Literal["transformers", "vllm"] = field(
        default="transformers", metadata={"help": "transformers (any chat VLM), or vllm (installed, on a GPU)."}
    )
    min_chars: int = field(default=12, metadata={"help": "Shorter questions are dropped."})
    max_chars: int = field(default=250, metadata={"help": "Longer questions are dropped."})
    min_script_fraction: float = field(
        default=0.8, metadata={"help": "Share of a question's letters that must be in its language's script."}
    )
    max_copied_chars: int = field(
        default=40, metadata={"help": "A question sharing a span this long with the page text is dropped."}
    )
    near_duplicate: float = field(
        default=0.8, metadata={"help": "Similarity (0-1) at which a question repeats one kept for its page."}
    )
    top_k: int = field(default=3, metadata={"help": "Consistency: the page must rank at most this far down."})
    consistency_model: str | None = field(
        default=None,
        metadata={"help": "An embedding model (a contrast `final/`) that checks questions in every language."},
    )
    eval_fraction: float = field(default=0.3, metadata={"help": "Share of documents whose questions are the eval set."})
    passage_chars: int = field(default=400, metadata={"help": "Length of the page passages paired with questions."})

    def validate(self) -> None:
        self.languages = list(dict.fromkeys(normalize_lang(lang) for lang in self.languages))
        positive = {
            "per_page": self.per_page,
            "context_chars": self.context_chars,
            "max_pixels": self.max_pixels,
            "max_new_tokens": self.max_new_tokens,
            "batch_size": self.batch_size,
            "max_chars": self.max_chars,
            "max_copied_chars": self.max_copied_chars,
            "top_k": self.top_k,
            "passage_chars": self.passage_chars,
        }
        for name, value in positive.items():
            if value <= 0:
                raise UsageError(f"--{name} must be positive, got {value}.")
        if not 0 <= self.min_chars <= self.max_chars:
            raise UsageError(f"--min_chars must be in [0, max_chars={self.max_chars}], got {self.min_chars}.")
        if self.temperature < 0:
            raise UsageError(f"--temperature must be >= 0 (0: greedy), got {self.temperature}.")
        for name in ("min_script_fraction", "near_duplicate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise UsageError(f"--{name} must be in [0, 1], got {getattr(self, name)}.")
        if not 0.0 <= self.eval_fraction <= 1.0:
            raise UsageError(f"--eval_fraction must be in [0, 1], got {self.eval_fraction}.")
        for name, values in (("prompt", {"n": 1, "language": "English"}), ("context_prompt", {"text": ""})):
            try:
                getattr(self, name).format(**values)
            except (KeyError, IndexError, ValueError) as error:
                allowed = ", ".join("{" + key + "}" for key in values)
                raise UsageError(
                    f"--{name}: {error!r} cannot be filled in; it may use only {allowed} (a brace: {{{{ or }}}})."
                ) from None

    def generation(self) -> dict:
        """The settings that decide what the generator writes: a work folder is resumed only under the same."""
        names = ("per_page", "prompt", "text_context", "context_prompt", "context_chars", "max_pixels")
        return {name: getattr(self, name) for name in (*names, "max_new_tokens", "temperature", "batch_size")}


def script_ranges(lang: str, recipe: str | None, recipe_lang: str) -> list[str]:
    """A language's script ranges: `data_prep.script_ranges` of its recipe (the given one for the recipe's
    language, else recipes/<lang>.yaml)."""
    path = Path(recipe) if recipe and lang == recipe_lang else RECIPES_DIR / f"{lang}.yaml"
    if not path.is_file():
        raise UsageError(
            f"language `{lang}` has no recipe ({path}), which gives its script ranges (data_prep.script_ranges) for "
            f"the language check; write {path} or leave `{lang}` out of --languages."
        )
    section = load_recipe(path).get("data_prep") or {}
    return section.get("script_ranges", DataPrepSettings().script_ranges)


def resolve_languages(
    settings: QueriesSettings, recipe: str | None, recipe_lang: str, pages_folder: str
) -> tuple[list[str], dict[str, list[str]]]:
    """The languages to ask in and each one's script ranges, checked against the pages' language."""
    from data_prep.pages import read_pages_manifest

    page_lang = read_pages_manifest(pages_folder, "--pages")["lang"]
    if recipe_lang not in (page_lang, "multi"):
        raise UsageError(
            f"--pages {pages_folder} is in `{page_lang}` but the recipe is for `{recipe_lang}`; "
            f"pass --config recipes/{page_lang}.yaml."
        )
    languages = settings.languages or list(dict.fromkeys(["en", page_lang]))
    return languages, {lang: script_ranges(lang, recipe, recipe_lang) for lang in languages}


def check_pages(folder: str) -> None:
    """A finished pages dataset with page images and at least one page."""
    import datasets

    from data_prep.pages import read_pages_manifest

    manifest = read_pages_manifest(folder, "--pages")
    try:
        features = datasets.load_from_disk(folder).features
    except (FileNotFoundError, ValueError) as error:
        raise UsageError(
            f"--pages {folder} cannot be read as a dataset ({error}); rebuild it with `python -m data_prep pages`."
        ) from None
    if not isinstance(features.get("image"), datasets.Image):
        raise UsageError(
            f"--pages {folder} has no page images (no `image` column): the generator writes questions from the "
            "images; build the dataset from PDFs with `python -m data_prep pages`."
        )
    if not manifest.get("counts", {}).get("pages"):
        raise UsageError(f"--pages {folder} holds no pages; build it from PDFs with `python -m data_prep pages`.")


def check_generator(generator: str | None) -> None:
    """A chat VLM: a model type `AutoModelForImageTextToText` loads, with a chat template (a hub id is checked
    when it is loaded)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    check_model_source(generator, "--generator")
    folder = Path(generator)
    if not folder.exists():
        return
    model_type = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type")
    if model_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        raise UsageError(
            f"--generator {generator} is a `{model_type}` model, not a vision-language one "
            "(AutoModelForImageTextToText); give an instruction-tuned VLM such as Qwen/Qwen2.5-VL-3B-Instruct."
        )
    if not _has_chat_template(folder):
        raise UsageError(
            f"--generator {generator} has no chat template (chat_template.jinja or `chat_template` in its "
            "tokenizer or processor config): it is not a chat model; give an instruction-tuned VLM such as "
            "Qwen/Qwen2.5-VL-3B-Instruct."
        )


def _has_chat_template(folder: Path) -> bool:
    if any(folder.glob("chat_template.j*")):
        return True
    for name in ("tokenizer_config.json", "processor_config.json"):
        path = folder / name
        if path.is_file() and json.loads(path.read_text(encoding="utf-8")).get("chat_template"):
            return True
    return False


def check_engine(engine: str) -> None:
    """vllm only where it is installed and a GPU is present (it is an optional extra, never in the lock)."""
    import importlib.util

    if engine != "vllm":
        return
    if importlib.util.find_spec("vllm") is None:
        raise UsageError(
            "--engine vllm: vllm is not installed; `pip install vllm` on a GPU machine, or use --engine transformers."
        )
    import torch

    if not torch.cuda.is_available():
        raise UsageError("--engine vllm needs a GPU and none is visible; use --engine transformers.")


def build_prompt(settings: QueriesSettings, lang: str, page_text: str) -> tuple[str, str, int]:
    """(the prompt, its instruction, the characters of page text it gives as context)."""
    instruction = settings.prompt.format(n=settings.per_page, language=language_name(lang))
    context = page_text.strip()[: settings.context_chars] if settings.text_context else ""
    return instruction + (settings.context_prompt.format(text=context) if context else ""), instruction, len(context)


def parse_questions(output: str, limit: int) -> list[str]:
    """The first `limit` questions of a generated text: one per line, list markers and quotes taken off."""
    questions = []
    for line in output.splitlines():
        question = LIST_MARKER.sub("", line).strip().strip("\"'\u201c\u201d").strip()
        if question:
            questions.append(" ".join(question.split()))
    return questions[:limit]


def duplicate_key(text: str) -> str:
    """Letters, marks and digits, case-folded: what two questions that differ in spacing or punctuation share."""
    return "".join(
        char for char in unicodedata.normalize("NFC", text.casefold()) if unicodedata.category(char)[0] in "LMN"
    )


def script_fraction(text: str, ranges: list[tuple[int, int]]) -> float:
    """The share of `text`'s letters and marks that are in `ranges` (0 for a text without letters)."""
    letters = [char for char in text if unicodedata.category(char)[0] in "LM"]
    inside = sum(any(low <= ord(char) <= high for low, high in ranges) for char in letters)
    return inside / len(letters) if letters else 0.0


def copies_span(question: str, page_text: str, span: int) -> bool:
    """Whether the question holds `span` consecutive characters of the page text (case and spacing aside)."""
    question, page_text = " ".join(question.casefold().split()), " ".join(page_text.casefold().split())
    return any(question[start : start + span] in page_text for start in range(len(question) - span + 1))


def bm25_top(questions: list[str], pages: dict[str, str], top_k: int) -> list[list[str]]:
    """The ids of the `top_k` pages BM25 ranks first for each question, over the pages' texts."""
    from .retrieval import EvalSet, bm25_rankings

    if not questions:  # bm25s cannot retrieve for no query
        return []
    queries = {str(index): {"text": text} for index, text in enumerate(questions)}
    evalset = EvalSet({pid: {"text": text} for pid, text in pages.items()}, queries, {})
    rankings = bm25_rankings(evalset, depth=top_k)
    return [sorted(rankings[qid], key=lambda pid: -rankings[qid][pid]) for qid in queries]


def embedding_ranker(model: str, pages, batch_size: int = 8) -> Callable[[list[str], int], list[list[str]]]:
    """(questions, k) -> the ids of the top k pages of each under the embedding model `model` (the pages' images
    are encoded once, here)."""
    from .embedder import Embedder, LazyItems
    from .retrieval import search

    embedder = Embedder(model)
    page_ids = [page_id(row["doc_id"], row["page"]) for row in pages.select_columns(["doc_id", "page"])]
    page_embeddings = embedder.encode(LazyItems(range(len(pages)), lambda i: _page_item(pages, i)), batch_size)

    def top(questions: list[str], top_k: int) -> list[list[str]]:
        ids = [str(index) for index in range(len(questions))]
        rankings = search(embedder.encode_texts(questions, batch_size), page_embeddings, page_ids, ids, depth=top_k)
        return [sorted(rankings[qid], key=lambda pid: -rankings[qid][pid]) for qid in ids]

    return top


def _page_item(pages, index: int):
    from .embedder import Item

    return Item(image=pages[index]["image"])


def filter_candidates(
    candidates: list[dict],
    page_texts: dict[str, str],
    ranges: dict[str, list[str]],
    page_lang: str,
    settings: QueriesSettings,
    embedding_top: Callable[[list[str], int], list[list[str]]] | None = None,
) -> dict[str, int]:
    """Run the filters over `candidates` ({text, lang, page_id}, in generation order), setting each one's
    `checks` and `rejected` (the first filter that refused it, or None); return the count each filter refused."""
    parsed = {lang: parse_ranges(values) for lang, values in ranges.items()}
    seen: set[str] = set()
    kept_for_page: dict[tuple[str, str], list[str]] = {}
    survivors = []
    for candidate in candidates:
        text, lang, pid = candidate["text"], candidate["lang"], candidate["page_id"]
        checks = candidate["checks"] = {}
        checks["length"] = settings.min_chars <= len(text) <= settings.max_chars
        checks["script_fraction"] = round(script_fraction(text, parsed[lang]), 3)
        checks["language"] = checks["script_fraction"] >= settings.min_script_fraction
        checks["copied"] = copies_span(text, page_texts[pid], settings.max_copied_chars)
        key = duplicate_key(text)
        checks["duplicate"] = key in seen
        similar = [
            difflib.SequenceMatcher(None, key, other, autojunk=False).ratio()
            for other in kept_for_page.get((pid, lang), [])
        ]
        checks["near_duplicate"] = max(similar, default=0.0) >= settings.near_duplicate
        failed = [
            name
            for name, refused in (
                ("length", not checks["length"]),
                ("language", not checks["language"]),
                ("copied", checks["copied"]),
                ("duplicate", checks["duplicate"]),
                ("near_duplicate", checks["near_duplicate"]),
            )
            if refused
        ]
        candidate["rejected"] = failed[0] if failed else None
        if not failed:
            seen.add(key)
            kept_for_page.setdefault((pid, lang), []).append(key)
            survivors.append(candidate)
    _check_consistency(survivors, page_texts, page_lang, settings.top_k, embedding_top)
    counts = dict.fromkeys(FILTERS, 0)
    for candidate in candidates:
        if candidate["rejected"]:
            counts[candidate["rejected"]] += 1
    return counts


def _check_consistency(candidates, page_texts, page_lang, top_k, embedding_top) -> None:
    """Each candidate's page rank (1-based, None past `top_k`) under BM25 (in the pages' language) and the
    embedding model (when given); a check that does not apply is left out."""
    in_language = [c for c in candidates if c["lang"] == page_lang]
    for candidate, top in zip(in_language, bm25_top([c["text"] for c in in_language], page_texts, top_k)):
        candidate["checks"]["bm25_rank"] = _rank(top, candidate["page_id"])
    if embedding_top is not None:
        for candidate, top in zip(candidates, embedding_top([c["text"] for c in candidates], top_k)):
            candidate["checks"]["embedding_rank"] = _rank(top, candidate["page_id"])
    for candidate in candidates:
        ranks = [candidate["checks"].get(name, 0) for name in ("bm25_rank", "embedding_rank")]
        if any(rank is None for rank in ranks):
            candidate["rejected"] = "consistency"


def _rank(top: list[str], pid: str) -> int | None:
    return top.index(pid) + 1 if pid in top else None


def best_passage(question: str, page_text: str, passage_chars: int) -> str:
    """The page's passage that shares most words (bigrams in unspaced scripts) with the question."""
    from .contrast_data import passages
    from .retrieval import scripts_tokens

    words = set(scripts_tokens(question))
    found = passages(page_text, passage_chars)
    return max(found, key=lambda passage: len(words & set(scripts_tokens(passage))), default="")


def generate_pages(
    pages, work: Path, settings: QueriesSettings, languages: list[str], engine: Engine, seed: int
) -> tuple[int, float]:
    """Generate for every batch of pages that has no file in `work` yet; return (pages generated, seconds)."""
    from tqdm import tqdm

    from .embedder import within_pixels

    total = len(pages)
    batches = range(0, total, settings.batch_size)
    todo = [start for start in batches if not (work / WORK_FILE.format(start // settings.batch_size)).is_file()]
    generated, started = 0, time.monotonic()
    with tqdm(
        total=total, initial=total - sum(min(settings.batch_size, total - s) for s in todo), unit="page", desc="queries"
    ) as bar:
        for start in todo:
            rows = pages.select(range(start, min(start + settings.batch_size, total)))
            batch_seed = seed + start // settings.batch_size
            records, images, prompts = [], [], []
            for offset, row in enumerate(rows):
                image = within_pixels(row["image"], settings.max_pixels)
                for lang in languages:
                    prompt, instruction, context_chars = build_prompt(settings, lang, row["text"])
                    images.append(image)
                    prompts.append(prompt)
                    meta = {"row": start + offset, "doc_id": row["doc_id"], "page": row["page"], "lang": lang}
                    # the page text a prompt holds is in the pages dataset: records keep how much of it was given
                    records.append({**meta, "prompt": instruction, "context_chars": context_chars, "seed": batch_seed})
            for record, output in zip(records, engine(images, prompts, batch_seed), strict=True):
                record["output"] = output
            write_text_atomic(
                work / WORK_FILE.format(start // settings.batch_size), json.dumps(records, ensure_ascii=False)
            )
            generated += len(rows)
            bar.update(len(rows))
    return generated, time.monotonic() - started


def run_queries(
    pages_folder: str,
    output: str,
    settings: QueriesSettings,
    engine: Engine,
    *,
    languages: list[str],
    ranges: dict[str, list[str]],
    generator: dict,
    seed: int,
    resume: bool,
    embedding_top: Callable[[list[str], int], list[list[str]]] | None = None,
    record: Callable[[Path, dict], None] | None = None,
) -> dict:
    """Generate, filter and write the output folder (atomically); return its manifest. `generator` describes the
    model ({path, fingerprint}); `record(folder, manifest)` writes the run record into the finished folder."""
    import datasets

    from data_prep.pages import read_pages_manifest

    from .pretrain_data import held_out_documents

    started = time.monotonic()
    pages_manifest = read_pages_manifest(pages_folder, "--pages")
    page_lang = pages_manifest["lang"]
    pages = datasets.load_from_disk(pages_folder)
    output_dir = Path(output)
    work = output_dir.with_name(f".{output_dir.name}.work")
    prepare_work_folder(
        work,
        {
            "generation": settings.generation(),
            "languages": languages,
            "generator": generator["fingerprint"],
            "pages": pages_manifest["fingerprint"],
            "seed": seed,
        },
        resume,
    )
    with naming_full_disk(work):
        generated_pages, generation_s = generate_pages(pages, work, settings, languages, engine, seed)

    candidates = []
    for path in sorted(work.glob("batch-*.json")):
        for generation in json.loads(path.read_text(encoding="utf-8")):
            pid = page_id(generation["doc_id"], generation["page"])
            for number, text in enumerate(parse_questions(generation["output"], settings.per_page), start=1):
                candidates.append(
                    {
                        "_id": f"{pid}-{generation['lang']}-{number}",
                        "text": text,
                        "lang": generation["lang"],
                        "page_id": pid,
                        "doc_id": generation["doc_id"],
                        "row": generation["row"],
                        "prompt": generation["prompt"],
                        "context_chars": generation["context_chars"],
                        "seed": generation["seed"],
                    }
                )
    texts = pages.select_columns(["doc_id", "page", "text"])
    page_texts = {page_id(row["doc_id"], row["page"]): row["text"] for row in texts}
    if embedding_top is None and settings.consistency_model:
        embedding_top = embedding_ranker(settings.consistency_model, pages)
    rejected = filter_candidates(candidates, page_texts, ranges, page_lang, settings, embedding_top)
    kept = [candidate for candidate in candidates if not candidate["rejected"]]
    documents = {entry["doc_id"]: entry["sha256"] for entry in pages_manifest["inputs"]}
    eval_documents = held_out_documents(list(documents), settings.eval_fraction, seed)
    if settings.eval_fraction >= 1.0:
        eval_documents = set(documents)

    manifest = {
        "pages": pages_folder,
        "pages_fingerprint": pages_manifest["fingerprint"],
        "lang": page_lang,
        "languages": languages,
        "generator": generator,
        "settings": asdict(settings),
        "seed": seed,
        "counts": {
            "pages": len(pages),
            "pages_generated": generated_pages,
            "candidates": len(candidates),
            "rejected": rejected,
            "kept": len(kept),
            "kept_by_language": {lang: sum(c["lang"] == lang for c in kept) for lang in languages},
        },
        "split": {"seed": seed, "eval_fraction": settings.eval_fraction, "eval_documents": sorted(eval_documents)},
        "pages_per_s": round(generated_pages / generation_s, 3) if generated_pages else None,
    }
    with naming_full_disk(output_dir), atomic_directory(output_dir) as tmp:
        eval_summary = _write_evalset(
            tmp / "evalset",
            pages,
            [c for c in kept if c["doc_id"] in eval_documents],
            eval_documents,
            documents,
            generator,
            pages_folder,
        )
        train = [c for c in kept if c["doc_id"] not in eval_documents]
        manifest["counts"]["eval_queries"] = eval_summary["queries"] if eval_summary else 0
        manifest["counts"]["train_pairs"] = _write_train_pairs(
            tmp, pages, train, page_texts, documents, settings.passage_chars
        )
        with open(tmp / "candidates.jsonl", "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(c, ensure_ascii=False) + "\n" for c in candidates)
        manifest["elapsed_s"] = round(time.monotonic() - started, 1)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        if record is not None:
            record(tmp, manifest)
    shutil.rmtree(work)
    return manifest


def _write_evalset(folder: Path, pages, queries, eval_documents, documents, generator, pages_folder) -> dict | None:
    """The eval documents' pages as the corpus and their questions (with provenance); None without a question:
    an eval set without judgements cannot be scored."""
    if not queries:
        return None
    import datasets

    (folder / "images").mkdir(parents=True)
    rows = [i for i, doc in enumerate(pages["doc_id"]) if doc in eval_documents]
    subset = pages.select(rows).cast_column("image", datasets.Image(decode=False))
    with open(folder / "corpus.jsonl", "w", encoding="utf-8") as corpus:
        for row in subset:
            pid = page_id(row["doc_id"], row["page"])
            (folder / "images" / f"{pid}.png").write_bytes(row["image"]["bytes"])
            record = {"_id": pid, "image": f"images/{pid}.png", "text": row["text"], "lang": row["lang"]}
            corpus.write(json.dumps(record, ensure_ascii=False) + "\n")
    written = [
        {
            "_id": query["_id"],
            "text": query["text"],
            "lang": query["lang"],
            "provenance": {
                "generator": generator["fingerprint"],
                "prompt": query["prompt"],
                "context_chars": query["context_chars"],  # of the page's text, given after the prompt
                "seed": query["seed"],
                "checks": query["checks"],
            },
        }
        for query in queries
    ]
    write_queries_and_qrels(folder, written, [(query["_id"], query["page_id"], 1) for query in queries])
    summary = {
        "pages": len(rows),
        "queries": len(written),
        "qrels": len(written),
        # the documents the eval set covers, by content: training stages keep them out (--exclude_evalsets)
        "documents": [{"doc_id": doc, "sha256": documents[doc]} for doc in sorted(eval_documents)],
        "source": {"pages": [pages_folder], "generator": generator},
    }
    (folder / "evalset.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return summary


def _write_train_pairs(folder: Path, pages, questions, page_texts, documents: dict, passage_chars: int) -> int:
    """Two any-to-any pairs per question (-> its page image, -> its best passage), each naming its document by
    content (`documents`: doc_id -> sha256) for training's --exclude_evalsets; return how many were written."""
    if not questions:
        return 0
    import datasets

    (folder / "images").mkdir()
    rows = sorted({question["row"] for question in questions})
    images = pages.select(rows).cast_column("image", datasets.Image(decode=False))
    for row in images:
        (folder / "images" / f"{page_id(row['doc_id'], row['page'])}.png").write_bytes(row["image"]["bytes"])
    lines = []
    for question in questions:
        anchor = {"text": question["text"], "image_path": ""}
        source = {"doc_id": question["doc_id"], "sha256": documents[question["doc_id"]]}
        image = {"text": "", "image_path": f"images/{question['page_id']}.png"}
        lines.append({"anchor": anchor, "positive": image, "source": source})
        passage = best_passage(question["text"], page_texts[question["page_id"]], passage_chars)
        if passage:
            lines.append({"anchor": anchor, "positive": {"text": passage, "image_path": ""}, "source": source})
    with open(folder / "train_pairs.jsonl", "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)
    return len(lines)


def transformers_engine(generator: str, settings: QueriesSettings) -> Engine:
    """Batched generation with `AutoModelForImageTextToText` and the processor's chat template (left padding)."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForImageTextToText.from_pretrained(generator, dtype="auto").to(device).eval()
    processor = AutoProcessor.from_pretrained(generator)
    sampling = {"temperature": settings.temperature} if settings.temperature > 0 else {}

    def generate(images: list, prompts: list[str], seed: int) -> list[str]:
        texts = [
            processor.apply_chat_template(chat(prompt), add_generation_prompt=True, tokenize=False)
            for prompt in prompts
        ]
        inputs = processor(
            text=texts, images=[[image] for image in images], padding=True, padding_side="left", return_tensors="pt"
        ).to(device)
        torch.manual_seed(seed)
        with torch.no_grad():
            ids = model.generate(**inputs, max_new_tokens=settings.max_new_tokens, do_sample=bool(sampling), **sampling)
        return processor.batch_decode(ids[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)

    return generate


def vllm_engine(generator: str, settings: QueriesSettings) -> Engine:
    """Generation with vLLM (throughput at scale, on a GPU); the prompts are the chat template's, as above."""
    from transformers import AutoProcessor
    from vllm import LLM, SamplingParams

    processor = AutoProcessor.from_pretrained(generator)
    llm = LLM(model=generator, limit_mm_per_prompt={"image": 1})

    def generate(images: list, prompts: list[str], seed: int) -> list[str]:
        requests = [
            {
                "prompt": processor.apply_chat_template(chat(prompt), add_generation_prompt=True, tokenize=False),
                "multi_modal_data": {"image": image},
            }
            for image, prompt in zip(images, prompts)
        ]
        params = SamplingParams(temperature=settings.temperature, max_tokens=settings.max_new_tokens, seed=seed)
        return [result.outputs[0].text for result in llm.generate(requests, params, use_tqdm=False)]

    return generate


def chat(prompt: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
