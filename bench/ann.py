"""Approximate search against exact search: recall@10 and query latency of the FAISS indexes `stages.index` builds
(lco.index.new_faiss_index), on synthetic page vectors of the model's dimension.

    .venv/bin/python -m bench.ann --output bench/results/ann_cpu2.json
    .venv/bin/python -m bench.ann --sizes 20000 --queries 200 --output /tmp/ann.json    # a quick look

The vectors are 2048 components (Qwen2.5-VL-3B's hidden size; `stages.index` keeps them whole unless --dim says
otherwise), drawn from a Gaussian mixture and L2-normalised: 1000 cluster centres, each vector its centre plus a
64-dimensional latent offset (shared directions) plus isotropic noise. Real page embeddings are clustered (by
topic, layout, language) and lie near a low-dimensional subspace; uniform noise has neither, and there every
approximate index looks far worse than on real embeddings. The queries are other draws of the same mixture.
Recall@10 is the share of the exact top 10 (inner product over the float32 vectors) that an index's top 10 keeps.
Latency is per query: `batch` searches all queries in one call, `single` one query a call (50 of them), on the
machine's threads. Each size runs every kind its build time and memory allow (--kinds_over_limit for the sizes
over --large), with the IVF k-means sample --large_training_per_list vectors a list there.
"""

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from common.artifacts import write_text_atomic
from lco.index import HNSW_NEIGHBOURS, TRAINING_PER_LIST, ivf_lists, new_faiss_index, search_vectors

CENTRES = 1000
LATENT = 64
SINGLE_QUERIES = 50
PROBES = {"ivf": (4, 8, 16, 32, 64), "hnsw": (32, 64, 128, 256)}


def clustered_vectors(count: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(`count` page vectors, 1000 queries): unit vectors of one Gaussian mixture, made in blocks (1M x 2048
    float32 is 8 GB; one block of temporaries at a time)."""
    model = np.random.default_rng(0)  # the same mixture for every size
    centres = model.standard_normal((CENTRES, dim), dtype=np.float32) / np.sqrt(dim)
    directions = model.standard_normal((LATENT, dim), dtype=np.float32) / np.sqrt(dim)
    rng = np.random.default_rng(seed)

    def draw(n: int) -> np.ndarray:
        # norms: centre 1, latent offset ~0.8, noise ~0.3; a vector's cosine with its centre is ~0.75
        block = centres[rng.integers(CENTRES, size=n)]
        block += 0.1 * rng.standard_normal((n, LATENT), dtype=np.float32) @ directions
        block += 0.3 * rng.standard_normal((n, dim), dtype=np.float32) / np.sqrt(dim)
        return block / np.linalg.norm(block, axis=1, keepdims=True)

    vectors = np.empty((count, dim), dtype=np.float32)
    for start in range(0, count, 50_000):
        vectors[start : start + 50_000] = draw(min(50_000, count - start))
    return vectors, draw(1000)


def latency_ms(search, queries: np.ndarray) -> dict:
    """ms per query searching all `queries` in one call, and one at a time."""
    started = time.perf_counter()
    found = search(queries)
    batch = (time.perf_counter() - started) * 1000 / len(queries)
    started = time.perf_counter()
    for query in queries[:SINGLE_QUERIES]:
        search(query[None])
    single = (time.perf_counter() - started) * 1000 / SINGLE_QUERIES
    return {"ms_per_query_batch": round(batch, 3), "ms_per_query_single": round(single, 3)}, found


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    return round(float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(found.tolist(), exact.tolist())])), 4)


def set_probe(index, kind: str, value: int) -> None:
    if kind == "hnsw":
        index.hnsw.efSearch = value
    else:
        index.nprobe = value


def run_size(size: int, dim: int, queries_count: int, kinds: list[str], training_per_list: int) -> list[dict]:
    import faiss

    started = time.monotonic()
    vectors, queries = clustered_vectors(size, dim, seed=size)
    queries = queries[:queries_count]
    print(f"ann: {size} x {dim} vectors made in {time.monotonic() - started:.0f}s", flush=True)
    # the exact reference over the array itself: an IndexFlatIP would hold a second copy (8 GB at 1M)
    timing, (_, exact) = latency_ms(lambda q: faiss.knn(q, vectors, 10, faiss.METRIC_INNER_PRODUCT), queries)
    rows = [{"vectors": size, "dim": dim, "kind": "exact", "probe": None, "recall_at_10": 1.0, **timing}]
    rows[0]["bytes_per_vector"] = 4 * dim
    print(f"ann: {rows[-1]}", flush=True)
    for name in kinds:
        kind, _, quantize = name.partition("-")  # ivf, hnsw, ivf-int8, hnsw-int8
        started = time.monotonic()
        index = new_faiss_index(vectors, quantize or "none", kind, training_per_list=training_per_list)
        trained = time.monotonic() - started
        index.add(vectors)
        built = time.monotonic() - started
        size_bytes = len(faiss.serialize_index(index))
        for probe in PROBES[kind]:
            set_probe(index, kind, probe)
            timing, (_, found) = latency_ms(lambda q: search_vectors(index, q, 10, "none"), queries)
            rows.append({
                "vectors": size, "dim": dim, "kind": name, "probe": probe, "recall_at_10": recall(found, exact),
                **timing,
                "bytes_per_vector": round(size_bytes / size, 1), "train_s": round(trained, 1),
                "build_s": round(built, 1),
            })  # fmt: skip
            print(f"ann: {rows[-1]}", flush=True)
        index.reset()  # its memory back before the next kind
    return rows


def markdown(runs: list[dict], rows: list[dict], notes: list[str]) -> str:
    lines = ["# Approximate search against exact search (bench/ann.py)", ""]
    for run in runs:
        lines.append(
            f"Command: `{run['command']}`. Machine: {run['machine']}; load average {run['load_before']} before, "
            f"{run.get('load_after', 'not recorded (stopped after its last size)')} after (other engineers' tests "
            f"share the CPU); faiss {run['faiss']} on {run['threads']} threads; {run.get('elapsed_s', '?')} s."
        )
    lines += [
        "",
        f"Vectors: a normalised Gaussian mixture ({CENTRES} centres, a {LATENT}-dim latent offset, isotropic noise; "
        "see the script's docstring: clustered like real embeddings, not uniform noise), "
        f"{runs[0]['queries']} queries from the same mixture. IVF lists ~4 sqrt(n); k-means sample "
        f"{TRAINING_PER_LIST} vectors a list up to {runs[0]['large']} vectors, `--large_training_per_list` beyond; "
        f"int8 = 8-bit scalar codes (`--quantize int8`); HNSW M={HNSW_NEIGHBOURS}. probe = nprobe (IVF) or efSearch "
        "(HNSW).",
        "",
        "| vectors | dim | index | lists | probe | recall@10 | ms/query batch | ms/query single | bytes/vector | "
        "train s | build s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lists = ivf_lists(row["vectors"]) if row["kind"].startswith("ivf") else ""
        lines.append(
            f"| {row['vectors']} | {row['dim']} | {row['kind']} | {lists} | {row['probe'] or ''} | "
            f"{row['recall_at_10']:.3f} | {row['ms_per_query_batch']} | {row['ms_per_query_single']} | "
            f"{row['bytes_per_vector']} | {row.get('train_s', '')} | {row.get('build_s', '')} |"
        )
    return "\n".join([*lines, *(line for note in notes for line in ("", note))]) + "\n"


def main() -> None:
    import faiss

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[100_000, 1_000_000], help="None: notes only.")
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--kinds", nargs="+", default=["ivf", "ivf-int8", "hnsw"])
    parser.add_argument("--large", type=int, default=500_000, help="Sizes above this run --kinds_over_limit only.")
    parser.add_argument("--kinds_over_limit", nargs="+", default=["ivf-int8"])
    parser.add_argument("--large_training_per_list", type=int, default=64)
    parser.add_argument("--note", action="append", default=[], help="A line for the report's notes (kept).")
    parser.add_argument("--append", action="store_true", help="Keep the rows --output holds; add this run's.")
    parser.add_argument("--output", required=True)
    options = parser.parse_args()

    started = time.monotonic()
    settings = {
        "command": "python -m bench.ann " + " ".join(sys.argv[1:]),
        "machine": f"{os.cpu_count()} cores, {platform.machine()}",
        "faiss": faiss.__version__,
        "threads": faiss.omp_get_max_threads(),
        "dim": options.dim,
        "queries": options.queries,
        "large": options.large,
        "large_training_per_list": options.large_training_per_list,
        "load_before": [round(load, 2) for load in os.getloadavg()],
    }
    earlier = json.loads(Path(options.output).read_text()) if options.append else {"rows": [], "runs": []}
    # a file from a run stopped after its last size has one run's settings, and rows of its --dim
    runs = earlier["runs"] if "runs" in earlier else [earlier["settings"]]
    rows = [{"dim": runs[0]["dim"], **row} for row in earlier["rows"]]
    notes = earlier.get("notes", []) + options.note
    runs += [settings] if options.sizes else []
    for size in options.sizes:
        large = size > options.large
        kinds = options.kinds_over_limit if large else options.kinds
        per_list = options.large_training_per_list if large else TRAINING_PER_LIST
        rows += run_size(size, options.dim, options.queries, kinds, per_list)
        write_text_atomic(options.output, json.dumps({"runs": runs, "rows": rows}, indent=2) + "\n")
    settings["load_after"] = [round(load, 2) for load in os.getloadavg()]
    settings["elapsed_s"] = round(time.monotonic() - started)
    write_text_atomic(options.output, json.dumps({"runs": runs, "rows": rows, "notes": notes}, indent=2) + "\n")
    write_text_atomic(Path(options.output).with_suffix(".md"), markdown(runs, rows, notes))


if __name__ == "__main__":
    main()
