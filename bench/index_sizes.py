"""nDCG@10 and FAISS index bytes per page for each (dim, quantisation) pair that `stages.index` writes.

    .venv/bin/python -m bench.index_sizes --config recipes/tiny.yaml --data checkpoints/tiny/evalset \
        --model checkpoints/tiny/base checkpoints/tiny/contrast-16/final checkpoints/tiny/contrast-matryoshka-16/final \
        [--dims 0 128 64 32 16] --output bench/results/index_sizes_cpu2.json

Each model encodes the eval set's pages and queries once, as `stages.evaluate` (and so `stages.index`) encodes
them; each pair then truncates, re-normalises and quantises the vectors with the functions `stages.index` uses,
builds the FAISS index and searches it. Besides nDCG@10: overlap@10, the share of the full-size float32
ranking's top 10 pages that the pair's top 10 keeps (how faithfully the smaller index ranks as the full one).
The two refined models of bench/results/index_sizes_cpu2 came from `python -m stages.contrast --config
recipes/tiny.yaml --model_name_or_path checkpoints/tiny/base --max_steps 16 --eval_steps 0 --output_dir DIR`
(with the pipeline's pages datasets and --exclude_evalsets), the second with `--matryoshka_dims 256 128 64 32 16`.
"""

import argparse
import json
import time
from pathlib import Path

from common.artifacts import write_text_atomic
from common.recipe import parse_stage_arguments
from lco.index import QUANTIZATIONS, add_vectors, fit_vectors, index_bytes, new_faiss_index, search_vectors
from lco.retrieval import load_evalset, mean_scores, per_query_scores
from stages.evaluate import EvaluateArguments, page_size


def encode(model: str, evalset, args: EvaluateArguments):
    """(page vectors, query vectors, page ids, query ids, pages/s) of one model, as float32 arrays."""
    from lco.embedder import Embedder, Item, LazyItems

    embedder = Embedder(model, max_text_tokens=args.max_text_tokens, **page_size(model, args))
    page_ids, query_ids = list(evalset.pages), list(evalset.queries)
    started = time.monotonic()
    items = LazyItems(page_ids, lambda pid: Item(image=evalset.open_image(pid)))
    pages = embedder.encode(items, args.batch_size, progress="pages").numpy()
    pages_per_s = len(page_ids) / (time.monotonic() - started)
    texts = [args.query_instruction + evalset.queries[qid]["text"] for qid in query_ids]
    queries = embedder.encode_texts(texts, args.batch_size).numpy()
    return pages, queries, page_ids, query_ids, pages_per_s


def rankings(pages, queries, page_ids, query_ids, dim: int, quantize: str, k: int = 100):
    """({query: {page: score}} from the pair's FAISS index, its bytes per page)."""
    fitted_pages, fitted_queries = fit_vectors(pages, dim), fit_vectors(queries, dim)
    index = new_faiss_index(fitted_pages, quantize)
    add_vectors(index, fitted_pages, quantize)
    scores, rows = search_vectors(index, fitted_queries, k, quantize)
    run = {
        qid: {page_ids[r]: float(s) for s, r in zip(row_scores, row_ids)}
        for qid, row_scores, row_ids in zip(query_ids, scores, rows)
    }
    return run, len(index_bytes(index, quantize)) / len(page_ids)


def top(run: dict, qid: str, k: int = 10) -> set[str]:
    return set(sorted(run[qid], key=lambda pid: -run[qid][pid])[:k])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="The recipe whose `evaluate` section sets the encoding.")
    parser.add_argument("--data", required=True, help="An eval set (`data_prep evalset`).")
    parser.add_argument("--model", nargs="+", required=True)
    parser.add_argument("--dims", nargs="+", type=int, default=[0, 128, 64, 32, 16], help="0: the full size.")
    parser.add_argument("--output", required=True, help="JSON results; a Markdown table goes beside it (.md).")
    options = parser.parse_args()
    _, args = parse_stage_arguments("evaluate", (EvaluateArguments,), ["--config", options.config])
    evalset = load_evalset(options.data)
    rows, lines = [], ["| model | dim | quantisation | bytes/page | nDCG@10 | overlap@10 with float32 full |"]
    lines.append("|---|---|---|---|---|---|")
    for model in options.model:
        pages, queries, page_ids, query_ids, pages_per_s = encode(model, evalset, args)
        full, _ = rankings(pages, queries, page_ids, query_ids, 0, "none")
        for dim in options.dims:
            for quantize in QUANTIZATIONS:
                run, size = rankings(pages, queries, page_ids, query_ids, dim, quantize)
                ndcg = mean_scores(per_query_scores(run, evalset))["ndcg@10"]
                overlap = sum(len(top(run, q) & top(full, q)) / 10 for q in query_ids) / len(query_ids)
                shown_dim = dim or pages.shape[1]
                rows.append(dict(model=model, dim=shown_dim, quantize=quantize, bytes_per_page=round(size, 1),
                                 ndcg_at_10=round(ndcg, 4), overlap_at_10=round(overlap, 4)))  # fmt: skip
                lines.append(f"| {model} | {shown_dim} | {quantize} | {size:.1f} | {ndcg:.4f} | {overlap:.2f} |")
        print(f"index_sizes: {model}: {pages_per_s:.2f} pages/s encoded ({len(page_ids)} pages)")
        rows.append(dict(model=model, pages=len(page_ids), queries=len(query_ids), pages_per_s=round(pages_per_s, 3)))
    table = "\n".join(lines)
    print(table)
    settings = {"config": options.config, "data": options.data, "evaluate": vars(args)}
    write_text_atomic(options.output, json.dumps({"settings": settings, "rows": rows}, indent=2) + "\n")
    write_text_atomic(Path(options.output).with_suffix(".md"), table + "\n")


if __name__ == "__main__":
    main()
