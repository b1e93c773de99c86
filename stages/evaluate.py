"""Visual-document retrieval evaluation (text query -> page image), SeaDoc/ViDoRe style.

    python -m stages.evaluate --config recipes/km.yaml --model checkpoints/km/contrast/final \
        --data checkpoints/km/evalset
    python -m stages.evaluate --config recipes/tiny.yaml --model checkpoints/tiny/base checkpoints/tiny/contrast/final \
        --data checkpoints/tiny/evalset --output results.json --report report/ [--run other_system.trec]

Scores every model given, BM25 over the pages' text and a random ranking (and a TREC run file) on the
same queries with trec_eval's measures: nDCG@1/5/10, Recall@1/5/10/100, MRR@10, MAP, overall and per
language of the relevant pages, with 95% bootstrap intervals over queries and paired randomization tests
of nDCG@10 (each model against BM25 and the others, Holm-adjusted). Embeddings are cached on disk, keyed
by the model's weights, the eval data and the encoding settings, so scoring again is instant.
"""

import hashlib
import io
import itertools
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

from common.artifacts import check_model_source, write_bytes_atomic, write_text_atomic
from common.errors import UsageError, run_cli
from common.output import set_up_output
from common.recipe import parse_stage_arguments
from common.run_record import (
    chain_training_documents,
    chain_unsourced_pairs,
    model_fingerprint,
    parent_run,
    sha256_file,
    stage_record,
    write_run_record,
)
from lco.distributed import join_process_group, main_process_decides, rank
from lco.families import check_reads
from lco.retrieval import (
    BEIR_FILES,
    MEDIA,
    METRICS,
    bm25_rankings,
    load_evalset,
    mean_scores,
    page_size,
    per_query_scores,
    random_rankings,
    read_trec_run,
    search,
)
from lco.significance import ALPHA, CONFIDENCE, RESAMPLES, bootstrap_interval, compare_systems

BASELINES = ("random", "bm25 (page text)")
INTERVAL_METRICS = ("ndcg@5", "ndcg@10", "recall@10")  # the table's; each gets a 95% bootstrap interval
COMPARED_METRIC = "ndcg@10"  # the primary metric, the one the paired tests compare systems on


@dataclass
class EvaluateArguments:
    # the values each numeric field can take (common.recipe.check_ranges, before anything loads)
    RANGES: ClassVar[dict[str, str]] = {
        "batch_size": "[1, inf)",
        "max_text_tokens": "[1, inf)",
        "max_pixels": "[0, inf)",
        "image_max_side": "[0, inf)",
        "report_queries": "[0, inf)",
        "encode_workers": "[-1, inf)",
    }

    query_instruction: str = field(default="", metadata={"help": "Prefix added to every query."})
    batch_size: int = field(default=16, metadata={"help": "Inputs encoded at once; the scores do not depend on it."})
    max_text_tokens: int = field(default=650, metadata={"help": "Texts are cut to this many tokens before encoding."})
    max_pixels: int = field(
        default=0,
        metadata={
            "help": "Pixel budget pages are embedded at (aspect kept); 0: the budget the model was pretrained "
            "at (its run-record chain), else Qwen2.5-VL's 1003520."
        },
    )
    image_max_side: int = field(
        default=0, metadata={"help": "Instead of a budget: pages thumbnailed to fit this square, in pixels (0: off)."}
    )
    faiss: bool = field(default=False, metadata={"help": "Search with a FAISS index instead of a matrix product."})
    cache_dir: str = field(default="checkpoints/.embedding-cache", metadata={"help": "Where embeddings are cached."})
    report_queries: int = field(default=20, metadata={"help": "Queries shown per model in the --report HTML."})
    encode_workers: int = field(
        default=-1, metadata={"help": "Processes preparing batches for the encoder (-1: up to 4 on a GPU, 0 on a CPU)."}
    )


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
        for path in (self.output, self.output and record_path(self.output)):
            if path and Path(path).exists():
                raise UsageError(f"--output {path} already exists; choose another file or remove it.")
        if self.report and Path(self.report).exists():
            raise UsageError(f"--report {self.report} already exists; choose another folder or remove it.")


def record_path(output: str) -> Path:
    """The run record beside a results file: `results.json` -> `results.run_record.json`."""
    return Path(output).with_suffix(".run_record.json")


def evalset_files(folder: str) -> list[Path]:
    """The files an eval set's scores depend on (images are fingerprinted apart, in the embedding cache key)."""
    root = Path(folder)
    if all((root / name).is_file() for name in BEIR_FILES):
        return [root / name for name in BEIR_FILES]
    return sorted(root.rglob("*.parquet"))


def save_results(output: str, summary: dict, recipe_args, inputs: EvaluateInputs) -> None:
    """`output` (every metric and setting) and its run record: which code, recipe, eval data and models."""
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(output, json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    models = {model: {"fingerprint": summary["models"][model]["fingerprint"], "parent": parent_run(model)}
              for model in inputs.model}  # fmt: skip
    record = stage_record("evaluate", recipe_args, {"evaluate": summary["settings"]}, evalset_files(inputs.data))
    record["config"]["inputs"] = asdict(inputs)
    results = {"models": models, "results_file": str(output), "results_sha256": sha256_file(output)}
    write_run_record(record_path(output).parent, **record, results=results, name=record_path(output).name)


def data_fingerprint(evalset, part: str) -> str:
    digest = hashlib.sha256()
    entries = evalset.pages if part == "pages" else evalset.queries
    for key, entry in entries.items():
        image = entry.get("image")
        files = [entry[kind] for kind in MEDIA if kind in entry] + ([image] if isinstance(image, Path) else [])
        contents = [sha256_file(path) if path.is_file() else str(path) for path in files]
        if isinstance(image, bytes):
            contents.append(hashlib.sha256(image).hexdigest())
        digest.update(json.dumps([key, entry["text"] if part == "queries" else "", *contents]).encode())
    return digest.hexdigest()[:16]


def cached_embeddings(key: dict, cache_dir: str, compute):
    """`compute()` once per key; later calls load the saved tensor."""
    import torch

    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    path = Path(cache_dir) / f"{name}.pt"
    if main_process_decides(path.is_file()):
        return torch.load(path), True
    embeddings = compute()
    if rank() > 0:
        return embeddings, False
    path.parent.mkdir(parents=True, exist_ok=True)
    # through memory: torch.save on a full disk fails with an iostream error that names nothing
    buffer = io.BytesIO()
    torch.save(embeddings, buffer)
    write_bytes_atomic(path, buffer.getvalue())
    return embeddings, False


def entry_item(evalset, key: str, part: str, instruction: str = ""):
    """A query or a page as the Embedder takes it. A query: its text after the instruction, and its audio and
    video; a page: its image, audio and video (its extracted text is for BM25 only)."""
    from lco.embedder import Item, load_audio, load_frames

    entry = (evalset.pages if part == "pages" else evalset.queries)[key]
    audio, video = entry.get("audio"), entry.get("video")
    media = {"audio": load_audio(audio) if audio else None, "video": load_frames(video) if video else None}
    if part == "pages":
        return Item(image=evalset.open_image(key) if entry["image"] is not None else None, **media)
    text = instruction + entry["text"] if entry["text"] or not (audio or video) else instruction
    return Item(text, **media)


def model_rankings(model: str, evalset, tasks: dict, args: EvaluateArguments) -> tuple[dict, dict]:
    """({task: rankings}, encoding facts) of one model; embeddings come from the cache when present."""
    from lco.embedder import Embedder, LazyItems

    embedder = None
    size = page_size(model, args)

    def get_embedder():
        nonlocal embedder
        embedder = embedder or Embedder(
            model, max_text_tokens=args.max_text_tokens, workers=args.encode_workers, **size
        )
        return embedder

    fingerprint = model_fingerprint(model)
    page_ids, query_ids = list(evalset.pages), list(evalset.queries)
    settings = {"max_text_tokens": args.max_text_tokens, **size}
    started = time.monotonic()
    pages, pages_cached = cached_embeddings(
        {"model": fingerprint, "pages": data_fingerprint(evalset, "pages"), **settings},
        args.cache_dir,
        lambda: get_embedder().encode(
            LazyItems(
                page_ids, lambda pid: entry_item(evalset, pid, "pages"), lambda pid: ("", evalset.image_size(pid))
            ),
            args.batch_size,
            progress="pages",
        ),
    )
    queries, queries_cached = cached_embeddings(
        {
            "model": fingerprint,
            "queries": data_fingerprint(evalset, "queries"),
            "instruction": args.query_instruction,
            **settings,
        },
        args.cache_dir,
        lambda: get_embedder().encode(
            LazyItems(
                query_ids,
                lambda qid: entry_item(evalset, qid, "queries", args.query_instruction),
                lambda qid: (args.query_instruction + evalset.queries[qid]["text"], None),
            ),
            args.batch_size,
            progress="queries",
        ),
    )
    page_row = {pid: i for i, pid in enumerate(page_ids)}
    query_row = {qid: i for i, qid in enumerate(query_ids)}
    runs = {}
    for name, task in tasks.items():
        task_pages, task_queries = list(task.pages), list(task.queries)
        runs[name] = search(
            queries[[query_row[q] for q in task_queries]],
            pages[[page_row[p] for p in task_pages]],
            task_pages,
            task_queries,
            use_faiss=args.faiss,
        )
    facts = {
        "fingerprint": fingerprint,
        **size,
        "cached": pages_cached and queries_cached,
        "encode_and_search_s": round(time.monotonic() - started, 1),
    }
    return runs, facts


def significance(per_query: dict, contenders: list[str], seed: int) -> tuple[dict, list[dict]]:
    """({system: {task: {metric: [low, high] or None}}}, the paired tests): a 95% bootstrap interval of each
    INTERVAL_METRICS for every system and task, and COMPARED_METRIC on all pages compared between each
    contender (a model or --run) and random and BM25 and between every two contenders, Holm-adjusted as one
    family."""

    def interval(values: dict, metric: str) -> list[float] | None:
        found = bootstrap_interval([scores[metric] for scores in values.values()], seed)
        return found and [round(bound, 4) for bound in found]

    intervals = {
        system: {
            task: {metric: interval(values, metric) for metric in INTERVAL_METRICS} for task, values in per_task.items()
        }
        for system, per_task in per_query.items()
    }
    compared = {
        system: [scores[COMPARED_METRIC] for scores in per_task["all"].values()]
        for system, per_task in per_query.items()
    }
    # against random too: a model that learned nothing from refinement is still told apart from chance
    against_baselines = [(system, baseline) for baseline in BASELINES if baseline in per_query for system in contenders]
    pairs = against_baselines + list(itertools.combinations(contenders, 2))
    return intervals, compare_systems(compared, pairs, seed)


def markdown_table(results: dict, intervals: dict | None = None) -> str:
    """One row per system; nDCG@10 on all pages with its 95% interval when `intervals` are given."""
    langs = sorted({lang for per_lang in results.values() for lang in per_lang if lang != "all"})
    header = ["system", "nDCG@5", "nDCG@10", "Recall@10", "MRR@10", *[f"nDCG@10 {lang}" for lang in langs]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, per_lang in results.items():
        overall = per_lang["all"]
        cells = [name, *(f"{overall[m]:.3f}" for m in ("ndcg@5", "ndcg@10", "recall@10", "mrr@10"))]
        found = intervals and intervals[name]["all"]["ndcg@10"]
        cells[2] += f" [{found[0]:.3f}, {found[1]:.3f}]" if found else ""
        cells += [f"{per_lang[lang]['ndcg@10']:.3f}" if lang in per_lang else "" for lang in langs]
        lines.append("| " + " | ".join(cells) + " |")
    if intervals:
        lines.append(f"\n(nDCG@10: mean [{CONFIDENCE:.0%} bootstrap interval over queries])")
    return "\n".join(lines)


def comparison_table(comparisons: list[dict]) -> str:
    """The paired tests, `*` where the Holm-adjusted p is under ALPHA."""
    lines = [
        "| system | against | nDCG@10 difference | p | p (Holm) |",
        "|---|---|---|---|---|",
        *(
            f"| {c['system']} | {c['baseline']} | {c['difference']:+.3f} | {c['p_value']:.4f} | "
            f"{c['p_holm']:.4f}{' *' if c['significant'] else ''} |"
            for c in comparisons
        ),
        f"\n(paired randomization test over queries; * Holm-adjusted p < {ALPHA} over the {len(comparisons)} tests)",
    ]
    return "\n".join(lines)


def given_run(path: str, evalset, tasks: dict) -> dict:
    """A TREC run file as rankings for every task (scoring keeps each task's own pages)."""
    given = read_trec_run(path)
    unknown, unranked = set(given) - set(evalset.queries), set(evalset.qrels) - set(given)
    if unknown == set(given):
        raise UsageError(
            f"--run {path} ranks none of the eval set's queries (e.g. {sorted(unknown)[:3]}); wrong eval set?"
        )
    if unknown or unranked:
        print(
            f"evaluate: --run ranks {len(unknown)} unknown queries (ignored) and leaves {len(unranked)} judged "
            "ones out (scored 0)"
        )
    return dict.fromkeys(tasks, given)


def training_overlap(models: list[str], data: str) -> tuple[dict[str, int | None], dict[str, int | None]]:
    """Per model, the number of the eval set's documents that its run-record chain trained on, with a warning for
    each model that did: its scores are not held-out scores (None where either side is not known); and the number
    of its training pairs that named no source document, which could not be checked."""
    from data_prep.evalset import evaluated_documents

    unchecked = {model: chain_unsourced_pairs(model) for model in models}
    for model, count in unchecked.items():
        if count:
            print(
                f"evaluate: {model} was trained on {count} pairs that name no source document (--train_files lines "
                "without `source`): whether they come from this eval set's documents is not checked"
            )
    try:
        covered = evaluated_documents(data, "--data")
    except UsageError:  # a converted parquet set lists no documents
        print(f"evaluate: {data} does not list its documents; whether a model trained on them is not checked")
        return dict.fromkeys(models), unchecked
    overlap = {}
    for model in models:
        trained = chain_training_documents(model)
        overlap[model] = len(covered & trained) if trained is not None else None
        if overlap[model]:
            print(
                f"evaluate: WARNING: {model} was trained on {overlap[model]} of the {len(covered)} documents this "
                "eval set covers: its scores are not held-out scores (train with --exclude_evalsets)"
            )
    return overlap, unchecked


def main(argv: list[str] | None = None) -> None:
    recipe_args, args, inputs = parse_stage_arguments(
        "evaluate", (EvaluateArguments,), argv, cli_only_types=(EvaluateInputs,)
    )
    set_up_output(recipe_args.verbose)
    evalset = load_evalset(inputs.data)
    entries = [*evalset.queries.values(), *evalset.pages.values()]
    media = {kind for entry in entries for kind in MEDIA if kind in entry}
    for model in inputs.model:
        check_reads(model, media)
    tasks = evalset.tasks()
    if join_process_group() > 0:  # the other processes of a torchrun encode their shares, rank 0 does the rest
        for model in inputs.model:
            model_rankings(model, evalset, tasks, args)
        return
    print(
        f"evaluate: {len(evalset.queries)} queries, {len(evalset.pages)} pages, "
        f"{sum(map(len, evalset.qrels.values()))} judgements"
    )

    runs = {"random": {name: random_rankings(task, recipe_args.seed) for name, task in tasks.items()}}
    if all(query["text"].strip() for query in evalset.queries.values()):
        runs[BASELINES[1]] = {name: bm25_rankings(task) for name, task in tasks.items()}
    else:
        print(f"evaluate: {BASELINES[1]} left out: some queries have no text (spoken or filmed)")
    if inputs.run:
        runs[f"run {Path(inputs.run).name}"] = given_run(inputs.run, evalset, tasks)
    trained_on, unchecked = training_overlap(inputs.model, inputs.data)
    encoding = {}
    for model in inputs.model:
        runs[model], encoding[model] = model_rankings(model, evalset, tasks, args)
        print(
            f"evaluate: {model}: {'embeddings from the cache' if encoding[model]['cached'] else 'encoded'} "
            f"in {encoding[model]['encode_and_search_s']}s"
        )
    per_query = {
        system: {name: per_query_scores(run[name], tasks[name]) for name in tasks} for system, run in runs.items()
    }
    results = {
        system: {name: mean_scores(values) for name, values in per_task.items()}
        for system, per_task in per_query.items()
    }
    contenders = [system for system in runs if system not in BASELINES]
    intervals, comparisons = significance(per_query, contenders, recipe_args.seed)

    summary = {
        "data": inputs.data,
        "settings": asdict(args),
        "seed": recipe_args.seed,
        "metrics": list(METRICS),
        "tasks": {name: {"queries": len(task.qrels), "pages": len(task.pages)} for name, task in tasks.items()},
        "models": encoding,
        "results": results,
        "significance": {
            "intervals": f"percentile bootstrap over queries, {RESAMPLES} resamples, {CONFIDENCE:.0%}, seeded",
            "comparisons": f"{COMPARED_METRIC} on all pages: paired two-sided randomization test ({RESAMPLES} "
            "sign flips, exact when fewer), each model (and --run) against random, BM25 and every other one, "
            f"Holm-adjusted as one family; significant when p_holm < {ALPHA}",
        },
        "intervals": intervals,
        "comparisons": comparisons,
        # per model, how many of the eval set's documents its run-record chain trained on (None: not known)
        "trained_on_evaluated_documents": trained_on,
        # per model, its chain's training pairs that named no source document (not checked; None: not known)
        "unchecked_training_pairs": unchecked,
    }
    if inputs.output:
        save_results(inputs.output, summary, recipe_args, inputs)
    if inputs.report:
        from lco.report import write_report

        write_report(
            inputs.report,
            evalset,
            {name: runs[name]["all"] for name in inputs.model},
            args.report_queries,
            recipe_args.seed,
            scores={
                system: (results[system]["all"][COMPARED_METRIC], intervals[system]["all"][COMPARED_METRIC])
                for system in runs
            },
            comparisons=comparisons,
        )
        print(f"evaluate: report in {inputs.report}/index.html")
    print(markdown_table(results, intervals))
    if comparisons:
        print("\n" + comparison_table(comparisons))


if __name__ == "__main__":
    run_cli(main)
