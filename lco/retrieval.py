"""Retrieval evaluation machinery: eval sets, exact and FAISS search, BM25 and random baselines, TREC
run files and metrics (trec_eval through pytrec_eval)."""

import io
import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

from common.errors import UsageError

BEIR_FILES = ("corpus.jsonl", "queries.jsonl", "qrels.tsv")
MEASURES = {"ndcg_cut.1,5,10", "recall.1,5,10,100", "map"}
METRICS = ("ndcg@1", "ndcg@5", "ndcg@10", "recall@1", "recall@5", "recall@10", "recall@100", "mrr@10", "map")
DEPTH = 100  # rankings keep this many pages per query
MAX_LISTED = 5
# what a query or a corpus entry may hold besides text and image: an audio file, a video as a folder of its frames
# (paths relative to the eval folder, as images are)
MEDIA = ("audio", "video")


@dataclass
class EvalSet:
    """Pages (id -> image as a path or bytes, text, lang), queries (id -> text, lang), qrels (query -> page ->
    grade). Queries and pages may also hold `audio` and `video` paths (an audio file, a folder of frames)."""

    pages: dict[str, dict]
    queries: dict[str, dict]
    qrels: dict[str, dict[str, int]]

    def subset(self, page_ids: list[str]) -> "EvalSet":
        """The task restricted to `page_ids`: their pages, and the queries with a judged page among them."""
        keep = set(page_ids)
        qrels = {qid: {pid: g for pid, g in judged.items() if pid in keep} for qid, judged in self.qrels.items()}
        qrels = {qid: judged for qid, judged in qrels.items() if judged}
        return EvalSet({pid: self.pages[pid] for pid in page_ids}, {qid: self.queries[qid] for qid in qrels}, qrels)

    def tasks(self) -> dict[str, "EvalSet"]:
        """ "all" (every page) and, when the pages are in several languages, one task per language (SeaDoc's
        per-language scores: each language's pages are searched on their own)."""
        langs = sorted({page["lang"] for page in self.pages.values()})
        tasks = {"all": self}
        if len(langs) > 1:
            tasks |= {
                lang or "unknown": self.subset([pid for pid, page in self.pages.items() if page["lang"] == lang])
                for lang in langs
            }
        return {name: task for name, task in tasks.items() if task.qrels}

    def open_image(self, page_id: str):
        from PIL import Image

        image = self.pages[page_id]["image"]
        with Image.open(io.BytesIO(image) if isinstance(image, bytes) else image) as opened:
            return opened.convert("RGB")

    def image_size(self, page_id: str) -> tuple[int, int] | None:
        """(width, height) of a page's image, read from its header without decoding it; None for a page without."""
        from PIL import Image

        image = self.pages[page_id]["image"]
        if image is None:
            return None
        with Image.open(io.BytesIO(image) if isinstance(image, bytes) else image) as opened:
            return opened.size


def _listed(problems: list[str]) -> str:
    return "; ".join(problems[:MAX_LISTED]) + ("; ..." if len(problems) > MAX_LISTED else "")


def load_evalset(folder: str) -> EvalSet:
    """A BEIR-with-images folder or a SeaDoc/ViDoRe parquet folder, checked as a whole before any encoding.

    Eval folders come from elsewhere: an image path that leads out of the folder (absolute, `..`, a link) is
    an error, so that evaluating a downloaded folder reads no file outside it."""
    root = Path(folder)
    if all((root / name).is_file() for name in BEIR_FILES):
        pages = {}
        for row in _jsonl(root / "corpus.jsonl"):
            image = row.get("image")
            pages[str(row["_id"])] = {
                "image": root / image if isinstance(image, str) and image else None,
                "text": str(row.get("text") or ""),
                "lang": str(row.get("lang") or ""),
                **_media(row, root),
            }
        queries = {
            str(row["_id"]): {
                "text": str(row.get("text") or ""),
                "lang": str(row.get("lang") or ""),
                **_media(row, root),
            }
            for row in _jsonl(root / "queries.jsonl")
        }
        qrels = _qrels(root / "qrels.tsv")
    else:
        from data_prep.evalset import read_parquet_evalset

        corpus, query_rows, qrel_rows = read_parquet_evalset(folder)
        pages = {row["_id"]: {"image": row["image"], "text": row["text"], "lang": row["lang"]} for row in corpus}
        queries = {row["_id"]: {"text": row["text"], "lang": row["lang"]} for row in query_rows}
        qrels = {}
        for query_id, page_id, score in qrel_rows:
            qrels.setdefault(query_id, {})[page_id] = score
    evalset = EvalSet(pages, queries, qrels)
    check_evalset(evalset, folder)
    return evalset


def _media(row: dict, root: Path) -> dict[str, Path]:
    return {kind: root / row[kind] for kind in MEDIA if isinstance(row.get(kind), str) and row[kind]}


def _jsonl(path: Path) -> list[dict]:
    """The rows of a JSONL file, each a JSON object with an `_id`."""
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    raise UsageError(f"{path} line {number} is not JSON ({error.msg}).") from None
                if not isinstance(row, dict) or "_id" not in row:
                    raise UsageError(
                        f"{path} line {number}: expected a JSON object with an `_id`, got {line.strip()[:80]!r}."
                    )
                rows.append(row)
    return rows


def _qrels(path: Path) -> dict[str, dict[str, int]]:
    qrels: dict[str, dict[str, int]] = {}
    with open(path, encoding="utf-8") as handle:
        next(handle, None)  # header
        for number, line in enumerate(handle, start=2):
            if line.strip():
                fields = line.rstrip("\n").split("\t")
                try:
                    query_id, page_id, score = fields[0], fields[1], int(fields[2])
                except (IndexError, ValueError):
                    raise UsageError(
                        f"{path} line {number}: expected query-id, corpus-id and an integer score separated by tabs, "
                        f"got {line.strip()[:80]!r}."
                    ) from None
                qrels.setdefault(query_id, {})[page_id] = score
    return qrels


def images_outside(evalset: EvalSet, folder: str) -> dict[str, str]:
    """{page id: how its image path leaves `folder`} for each page whose image resolves outside it."""
    return paths_outside({pid: page["image"] for pid, page in evalset.pages.items()}, folder)


def media_paths(evalset: EvalSet) -> dict[str, Path]:
    """{"<kind> of <query or page id>": path} of the audio and video of queries and pages."""
    entries = [*evalset.queries.items(), *evalset.pages.items()]
    return {f"{kind} of {key}": entry[kind] for key, entry in entries for kind in MEDIA if kind in entry}


def paths_outside(paths: dict[str, object], folder: str) -> dict[str, str]:
    """{id: how its path leaves `folder`} for each of `paths` (those that are paths) that resolves outside it."""
    root = Path(folder)
    inside = root.resolve()
    outside = {}
    for key, path in paths.items():
        if not isinstance(path, Path):
            continue
        try:
            target = path.resolve()
        except (OSError, RuntimeError, ValueError) as error:  # a loop of links (RuntimeError before 3.13), a NUL byte
            outside[key] = f"{str(path)[:80]!r} cannot be followed ({error})"
            continue
        if target.is_relative_to(inside):
            continue
        if not path.is_relative_to(root):  # root / "/abs/path" is "/abs/path"
            outside[key] = f"{path} is an absolute path"
        elif os.path.normpath(path.relative_to(root)).split(os.sep)[0] == "..":
            outside[key] = f"{path.relative_to(root)} goes up out of the folder"
        else:
            outside[key] = f"{path.relative_to(root)} is a link to {target}"
    return outside


def check_evalset(evalset: EvalSet, folder: str) -> None:
    problems = []
    outside = images_outside(evalset, folder)
    if outside:
        problems.append(
            f"{len(outside)} page images outside the eval folder, which are not read "
            f"({_listed([f'{pid}: {how}' for pid, how in outside.items()])}); image paths in corpus.jsonl must be "
            "relative paths to files inside the folder, e.g. images/<id>.png: copy the images in"
        )
    missing = [
        pid
        for pid, page in evalset.pages.items()
        if pid not in outside
        and (
            (page["image"] is None and not any(kind in page for kind in MEDIA))
            or (isinstance(page["image"], Path) and not page["image"].is_file())
        )
    ]
    if missing:
        problems.append(f"{len(missing)} pages without an image file ({', '.join(missing[:MAX_LISTED])})")
    media = media_paths(evalset)
    media_outside = paths_outside(media, folder)
    if media_outside:
        problems.append(
            f"{len(media_outside)} audio or video paths outside the eval folder, which are not read "
            f"({_listed([f'{key}: {how}' for key, how in media_outside.items()])}); give paths relative to the folder"
        )
    media_missing = [key for key, path in media.items() if key not in media_outside and not path.exists()]
    if media_missing:
        problems.append(f"{len(media_missing)} audio or video files missing ({_listed(media_missing)})")
    empty = [
        qid
        for qid, query in evalset.queries.items()
        if not query["text"].strip() and not any(kind in query for kind in MEDIA)
    ]
    if empty:
        problems.append(f"{len(empty)} empty queries ({', '.join(empty[:MAX_LISTED])})")
    unknown_queries = [qid for qid in evalset.qrels if qid not in evalset.queries]
    if unknown_queries:
        problems.append(
            f"qrels name {len(unknown_queries)} unknown query ids ({', '.join(unknown_queries[:MAX_LISTED])})"
        )
    unknown_pages = sorted({pid for judged in evalset.qrels.values() for pid in judged if pid not in evalset.pages})
    if unknown_pages:
        problems.append(f"qrels name {len(unknown_pages)} unknown page ids ({', '.join(unknown_pages[:MAX_LISTED])})")
    if not evalset.qrels:
        problems.append("no relevance judgements")
    if problems:
        raise UsageError(
            f"--data {folder}: {'; '.join(problems)}. Fix the eval set (or rebuild it with `python -m data_prep "
            "evalset`)."
        )


# 1280*28*28: Qwen2.5-VL's default budget, at which the reference embeds documents for evaluation
DEFAULT_PIXELS = 1003520


def page_size(model: str, args) -> dict:
    """How `model` gets its pages when evaluated or indexed (`args`: anything with `image_max_side` and
    `max_pixels`, e.g. `stages.evaluate.EvaluateArguments`): thumbnailed into `image_max_side` when that is set;
    otherwise fitted to a pixel budget, `max_pixels` if set, else the one its run-record chain was pretrained at
    (pages pretrained at a large budget and embedded as small thumbnails would hide what pretraining taught), else
    DEFAULT_PIXELS."""
    from common.run_record import chain_records

    if args.image_max_side:
        return {"image_max_side": args.image_max_side, "max_pixels": None}
    pretrained_at = next(
        (r["config"]["pretrain"]["max_pixels"] for r in chain_records(model) if r["stage"] == "pretrain"), None
    )
    return {"image_max_side": None, "max_pixels": args.max_pixels or pretrained_at or DEFAULT_PIXELS}


def search(
    query_embeddings,
    page_embeddings,
    page_ids: list[str],
    query_ids: list[str],
    *,
    depth: int = DEPTH,
    use_faiss: bool = False,
    chunk: int = 1024,
) -> dict[str, dict[str, float]]:
    """Top-`depth` pages per query by inner product (cosine for normalised embeddings)."""
    import torch

    depth = min(depth, len(page_ids))
    if use_faiss:
        import faiss

        index = faiss.IndexFlatIP(page_embeddings.shape[1])
        index.add(page_embeddings.float().numpy())
        scores, indices = index.search(query_embeddings.float().numpy(), depth)
        scores, indices = torch.from_numpy(scores), torch.from_numpy(indices)
    else:
        parts = [
            (query_embeddings[start : start + chunk].float() @ page_embeddings.float().T).topk(depth, dim=1)
            for start in range(0, len(query_ids), chunk)
        ]
        scores, indices = torch.cat([p.values for p in parts]), torch.cat([p.indices for p in parts])
    return {
        query_id: {page_ids[i]: float(s) for s, i in zip(row_scores.tolist(), row_indices.tolist())}
        for query_id, row_scores, row_indices in zip(query_ids, scores, indices)
    }


def scripts_tokens(text: str) -> list[str]:
    """Words of spaced scripts; character bigrams of runs in scripts written without spaces (Thai, Lao,
    Myanmar, Khmer), where whitespace tokenisation would make each line a single token."""
    tokens = []
    for run in re.findall(r"[\u0E00-\u0EFF\u1000-\u109F\u1780-\u17FF]+|\w+", text.lower()):
        if re.match(r"[\u0E00-\u0EFF\u1000-\u109F\u1780-\u17FF]", run):
            tokens.extend(run[i : i + 2] for i in range(max(1, len(run) - 1)))
        else:
            tokens.append(run)
    return tokens


def bm25_rankings(evalset: EvalSet, depth: int = DEPTH) -> dict[str, dict[str, float]]:
    """BM25 (bm25s) over the pages' extracted text."""
    import bm25s

    page_ids = list(evalset.pages)
    retriever = bm25s.BM25()
    retriever.index([scripts_tokens(evalset.pages[pid]["text"]) or ["\0"] for pid in page_ids], show_progress=False)
    query_ids = list(evalset.queries)
    results, scores = retriever.retrieve(
        [scripts_tokens(evalset.queries[qid]["text"]) or ["\0"] for qid in query_ids],
        k=min(depth, len(page_ids)),
        show_progress=False,
    )
    return {
        qid: {page_ids[i]: float(s) for i, s in zip(row, row_scores)}
        for qid, row, row_scores in zip(query_ids, results, scores)
    }


def random_rankings(evalset: EvalSet, seed: int, depth: int = DEPTH) -> dict[str, dict[str, float]]:
    rng = random.Random(seed)
    page_ids = list(evalset.pages)
    rankings = {}
    for query_id in evalset.queries:
        chosen = rng.sample(page_ids, min(depth, len(page_ids)))
        rankings[query_id] = {pid: float(len(chosen) - rank) for rank, pid in enumerate(chosen)}
    return rankings


def read_trec_run(path: str) -> dict[str, dict[str, float]]:
    """`query Q0 page rank score tag` lines; ranks come from the scores, as trec_eval ranks them."""
    run: dict[str, dict[str, float]] = {}
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 6:
                raise UsageError(
                    f"--run {path} line {number}: expected `query Q0 page rank score tag`, got {len(fields)} fields."
                )
            try:
                run.setdefault(fields[0], {})[fields[2]] = float(fields[4])
            except ValueError:
                raise UsageError(f"--run {path} line {number}: score {fields[4]!r} is not a number.") from None
    return run


def write_trec_run(run: dict[str, dict[str, float]], path: Path, tag: str) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for query_id, ranking in run.items():
            ordered = sorted(ranking.items(), key=lambda item: -item[1])
            handle.writelines(
                f"{query_id} Q0 {pid} {rank} {score:.6f} {tag}\n" for rank, (pid, score) in enumerate(ordered, start=1)
            )


def score(run: dict[str, dict[str, float]], evalset: EvalSet) -> dict[str, float]:
    """Metrics averaged over every judged query (a query the run does not rank scores 0); rankings of
    pages outside the eval set are ignored."""
    return mean_scores(per_query_scores(run, evalset))


def mean_scores(per_query: dict[str, dict[str, float]]) -> dict[str, float]:
    """The mean of each metric over the queries of `per_query_scores`, to 4 decimals, and the query count."""
    totals = {metric: sum(values[metric] for values in per_query.values()) for metric in METRICS}
    return {metric: round(total / len(per_query), 4) for metric, total in totals.items()} | {"queries": len(per_query)}


def per_query_scores(run: dict[str, dict[str, float]], evalset: EvalSet) -> dict[str, dict[str, float]]:
    """{query: {metric: value}} for every judged query, in the qrels' order (a query the run does not rank
    scores 0): what `score` averages, and what intervals and paired tests resample."""
    import pytrec_eval

    run = {
        qid: {pid: s for pid, s in ranking.items() if pid in evalset.pages}
        for qid, ranking in run.items()
        if qid in evalset.qrels
    }
    per_query = pytrec_eval.RelevanceEvaluator(evalset.qrels, MEASURES).evaluate(run)
    top10 = {qid: dict(sorted(ranking.items(), key=lambda item: -item[1])[:10]) for qid, ranking in run.items()}
    reciprocal = pytrec_eval.RelevanceEvaluator(evalset.qrels, {"recip_rank"}).evaluate(top10)
    names = {
        "ndcg_cut_1": "ndcg@1",
        "ndcg_cut_5": "ndcg@5",
        "ndcg_cut_10": "ndcg@10",
        "recall_1": "recall@1",
        "recall_5": "recall@5",
        "recall_10": "recall@10",
        "recall_100": "recall@100",
        "map": "map",
    }
    scores = {}
    for query_id in evalset.qrels:
        values = {names[key]: value for key, value in per_query.get(query_id, {}).items()}
        values["mrr@10"] = reciprocal.get(query_id, {}).get("recip_rank", 0.0)
        scores[query_id] = {metric: values.get(metric, 0.0) for metric in METRICS}
    return scores
