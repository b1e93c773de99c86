"""Visual-document retrieval evaluation (text query -> page image), SeaDoc/ViDoRe style.

    python -m stages.evaluate --config recipes/km.yaml --model checkpoints/km/contrast/final --data checkpoints/km/evalset
    python -m stages.evaluate --config recipes/tiny.yaml --model checkpoints/tiny/base checkpoints/tiny/contrast/final \
        --data checkpoints/tiny/evalset --output results.json --report report/ [--run other_system.trec]

Scores every model given, BM25 over the pages' text and a random ranking (and a TREC run file) on the
same queries with trec_eval's measures: nDCG@1/5/10, Recall@1/5/10/100, MRR@10, MAP, overall and per
language of the relevant pages. Embeddings are cached on disk, keyed by the model's weights, the
eval data and the encoding settings, so scoring again is instant.
"""

import hashlib
import io
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .artifacts import check_model_source, write_bytes_atomic, write_text_atomic
from .errors import UsageError, run_cli
from .recipe import parse_stage_arguments
from .retrieval import BEIR_FILES, METRICS, bm25_rankings, load_evalset, random_rankings, read_trec_run, score, search
from .run_record import sha256_file


@dataclass
class EvaluateArguments:
    query_instruction: str = field(default="", metadata={"help": "Prefix added to every query."})
    batch_size: int = field(default=16, metadata={"help": "Inputs encoded at once; the scores do not depend on it."})
    max_text_tokens: int = 650
    image_max_side: int = field(default=700, metadata={"help": "Pages are thumbnailed to fit this square, in pixels."})
    faiss: bool = field(default=False, metadata={"help": "Search with a FAISS index instead of a matrix product."})
    cache_dir: str = field(default="checkpoints/.embedding-cache", metadata={"help": "Where embeddings are cached."})
    report_queries: int = field(default=20, metadata={"help": "Queries shown per model in the --report HTML."})


@dataclass
class EvaluateInputs:
    model: list[str] = field(default_factory=list, metadata={"help": "Model folders to compare."})
    data: str | None = field(default=None, metadata={"help": "Eval folder: BEIR-with-images or SeaDoc/ViDoRe parquet."})
    output: str | None = field(default=None, metadata={"help": "JSON file for every metric and setting."})
    run: str | None = field(default=None, metadata={"help": "A TREC run file to score as well."})
    report: str | None = field(default=None, metadata={"help": "Folder for a static HTML report of top-5 pages."})

    def validate(self) -> None:
        for model in self.model:
            check_model_source(model, "--model")
        if self.data is None:
            raise UsageError("--data is not set; give an eval folder written by `python -m data_prep evalset`.")
        data = Path(self.data)
        has_beir = all((data / name).is_file() for name in BEIR_FILES)
        has_parquet = data.is_dir() and any(data.rglob("*.parquet"))
        if not (has_beir or has_parquet):
            raise UsageError(
                f"--data {data} holds neither {', '.join(BEIR_FILES)} nor SeaDoc/ViDoRe parquet files; "
                "build one with `python -m data_prep evalset`."
            )
        if self.run and not Path(self.run).is_file():
            raise UsageError(f"--run {self.run} not found.")
        if self.output and Path(self.output).exists():
            raise UsageError(f"--output {self.output} already exists; choose another file or remove it.")
        if self.report and Path(self.report).exists():
            raise UsageError(f"--report {self.report} already exists; choose another folder or remove it.")


def model_fingerprint(model: str) -> str:
    """sha256 over the model's config and weight files (content, not dates)."""
    digest = hashlib.sha256()
    for path in sorted(Path(model).glob("*.safetensors")) + [Path(model) / "config.json"]:
        digest.update(path.name.encode() + sha256_file(path).encode())
    return digest.hexdigest()[:16]


def data_fingerprint(evalset, part: str) -> str:
    digest = hashlib.sha256()
    if part == "pages":
        for page_id, page in evalset.pages.items():
            image = page["image"]
            digest.update(page_id.encode() + (hashlib.sha256(image).hexdigest() if isinstance(image, bytes) else sha256_file(image)).encode())
    else:
        for query_id, query in evalset.queries.items():
            digest.update(json.dumps([query_id, query["text"]], ensure_ascii=False).encode())
    return digest.hexdigest()[:16]


def cached_embeddings(key: dict, cache_dir: str, compute):
    """`compute()` once per key; later calls load the saved tensor."""
    import torch

    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    path = Path(cache_dir) / f"{name}.pt"
    if path.is_file():
        return torch.load(path), True
    embeddings = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    # through memory: torch.save on a full disk fails with an iostream error that names nothing
    buffer = io.BytesIO()
    torch.save(embeddings, buffer)
    write_bytes_atomic(path, buffer.getvalue())
    return embeddings, False


def model_rankings(model: str, evalset, tasks: dict, args: EvaluateArguments) -> tuple[dict, dict]:
    """({task: rankings}, encoding facts) of one model; embeddings come from the cache when present."""
    from .embedder import Embedder

    embedder = None

    def get_embedder():
        nonlocal embedder
        embedder = embedder or Embedder(model, max_text_tokens=args.max_text_tokens, image_max_side=args.image_max_side)
        return embedder

    fingerprint = model_fingerprint(model)
    page_ids, query_ids = list(evalset.pages), list(evalset.queries)
    settings = {"max_text_tokens": args.max_text_tokens, "image_max_side": args.image_max_side}
    started = time.monotonic()
    pages, pages_cached = cached_embeddings(
        {"model": fingerprint, "pages": data_fingerprint(evalset, "pages"), **settings}, args.cache_dir,
        lambda: get_embedder().encode_images([evalset.open_image(pid) for pid in page_ids], args.batch_size, progress="pages"),
    )
    queries, queries_cached = cached_embeddings(
        {"model": fingerprint, "queries": data_fingerprint(evalset, "queries"), "instruction": args.query_instruction, **settings},
        args.cache_dir,
        lambda: get_embedder().encode_texts([args.query_instruction + evalset.queries[qid]["text"] for qid in query_ids], args.batch_size, progress="queries"),
    )
    page_row = {pid: i for i, pid in enumerate(page_ids)}
    query_row = {qid: i for i, qid in enumerate(query_ids)}
    runs = {}
    for name, task in tasks.items():
        task_pages, task_queries = list(task.pages), list(task.queries)
        runs[name] = search(
            queries[[query_row[q] for q in task_queries]], pages[[page_row[p] for p in task_pages]],
            task_pages, task_queries, use_faiss=args.faiss,
        )
    facts = {"fingerprint": fingerprint, "cached": pages_cached and queries_cached, "encode_and_search_s": round(time.monotonic() - started, 1)}
    return runs, facts


def markdown_table(results: dict) -> str:
    langs = sorted({lang for per_lang in results.values() for lang in per_lang if lang != "all"})
    header = ["system", "nDCG@5", "nDCG@10", "Recall@10", "MRR@10", *[f"nDCG@10 {lang}" for lang in langs]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, per_lang in results.items():
        overall = per_lang["all"]
        cells = [name, *(f"{overall[m]:.3f}" for m in ("ndcg@5", "ndcg@10", "recall@10", "mrr@10"))]
        cells += [f"{per_lang[lang]['ndcg@10']:.3f}" if lang in per_lang else "" for lang in langs]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    recipe_args, args, inputs = parse_stage_arguments("evaluate", (EvaluateArguments,), argv, cli_only_types=(EvaluateInputs,))
    evalset = load_evalset(inputs.data)
    print(f"evaluate: {len(evalset.queries)} queries, {len(evalset.pages)} pages, {sum(map(len, evalset.qrels.values()))} judgements")

    tasks = evalset.tasks()
    runs = {
        "random": {name: random_rankings(task, recipe_args.seed) for name, task in tasks.items()},
        "bm25 (page text)": {name: bm25_rankings(task) for name, task in tasks.items()},
    }
    if inputs.run:
        given = read_trec_run(inputs.run)
        unknown, unranked = set(given) - set(evalset.queries), set(evalset.qrels) - set(given)
        if unknown == set(given):
            raise UsageError(f"--run {inputs.run} ranks none of the eval set's queries (e.g. {sorted(unknown)[:3]}); wrong eval set?")
        if unknown or unranked:
            print(f"evaluate: --run ranks {len(unknown)} unknown queries (ignored) and leaves {len(unranked)} judged ones out (scored 0)")
        runs[f"run {Path(inputs.run).name}"] = dict.fromkeys(tasks, given)  # score() keeps each task's own pages
    encoding = {}
    for model in inputs.model:
        runs[model], encoding[model] = model_rankings(model, evalset, tasks, args)
        print(f"evaluate: {model}: {'embeddings from the cache' if encoding[model]['cached'] else 'encoded'} "
              f"in {encoding[model]['encode_and_search_s']}s")
    results = {system: {name: score(run[name], tasks[name]) for name in tasks} for system, run in runs.items()}

    summary = {
        "data": inputs.data, "settings": asdict(args), "seed": recipe_args.seed, "metrics": list(METRICS),
        "tasks": {name: {"queries": len(task.qrels), "pages": len(task.pages)} for name, task in tasks.items()},
        "models": encoding, "results": results,
    }
    if inputs.output:
        Path(inputs.output).parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(inputs.output, json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    if inputs.report:
        from .report import write_report

        write_report(inputs.report, evalset, {name: runs[name]["all"] for name in inputs.model}, args.report_queries, recipe_args.seed)
        print(f"evaluate: report in {inputs.report}/index.html")
    print(markdown_table(results))


if __name__ == "__main__":
    run_cli(main)
