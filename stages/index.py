"""Index your documents: page embeddings of a trained model in a FAISS index, with a page store to show results.

    python -m stages.index --model checkpoints/km/contrast/final --input my_pdfs/ --output checkpoints/km/index
    python -m stages.index --model checkpoints/km/contrast/final --input more_pdfs/ checkpoints/km/pages \
        --output checkpoints/km/index --add
    python -m stages.index --model DIR --input PAGES_DATASET --output DIR --dim 128 --quantize int8

`--input` takes PDFs (files or folders, read into pages with `data_prep pages` and the recipe's settings) and
pages datasets (folders written by `python -m data_prep pages`). The recipe is the one the model was trained
with (its run-record chain), unless `--config` or `--lang` names another; pages are embedded as
`stages.evaluate` embeds them (the recipe's `evaluate` section: prompt, text length, pixel budget). `--add`
adds the documents the index does not hold yet (by content, sha256) and refuses a model or settings other
than the index's. The index is written under a temporary name and renamed when complete; an interrupted run
keeps its encoded pages in `.<output>.work/`, and `--resume` encodes only the rest.

Under `torchrun --nproc_per_node N -m stages.index ...` (or `accelerate launch`), every process encodes a
contiguous share of each chunk of pages, and rank 0 saves the chunks, writes the index and prints: the same index
as one process writes. The inputs are then pages datasets on a filesystem every process reads.

Search: `--ann auto` (the default) searches exactly up to `--exact_limit` pages (200k) and through FAISS IVF lists
beyond; `--ann ivf` or `--ann hnsw` choose. An approximate index is trained on a sample of the pages, and its
recall@10 against exact search (its own vectors as queries) is measured when it is written: the run record's
`recall_at_10`, and the last line printed. `--add` adds to the lists trained first, without retraining.
"""

import io
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from common.artifacts import (
    atomic_directory,
    check_input_paths,
    check_model_source,
    prepare_work_folder,
    usable_path,
    write_bytes_atomic,
)
from common.errors import UsageError, run_cli
from common.output import set_up_output
from common.recipe import parse_stage_arguments
from common.run_record import RUN_RECORD, chain_records, model_fingerprint, parent_run, sha256_file, write_run_record
from lco.distributed import join_process_group, main_process_decides
from lco.index import EXACT_SEARCH_LIMIT
from lco.retrieval import page_size

from .evaluate import EvaluateArguments


@dataclass
class IndexInputs:
    model: str | None = field(default=None, metadata={"help": "The embedding model (a contrast `final/` folder)."})
    input: list[str] = field(
        default_factory=list, metadata={"help": "PDFs, folders of PDFs, and pages datasets (`data_prep pages`)."}
    )
    output: str | None = field(default=None, metadata={"help": "The index folder."})
    add: bool = field(default=False, metadata={"help": "Add the documents an existing --output does not hold yet."})
    dim: int = field(default=0, metadata={"help": "Keep the first N components, re-normalised (0: all)."})
    quantize: str = field(default="none", metadata={"help": "Vectors as float32 (none), int8, or sign bits (binary)."})
    resume: bool = field(default=False, metadata={"help": "Continue an interrupted run; encoded pages are kept."})
    chunk_pages: int = field(
        default=256, metadata={"help": "Pages encoded between two saves of the work folder (what a kill can cost)."}
    )
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing --output once the new one is done."})
    ann: str = field(
        default="auto",
        metadata={
            "help": "Search: exact, ivf (k-means lists), hnsw (a neighbour graph), or auto: exact up to --exact_limit "
            "pages, ivf beyond."
        },
    )
    exact_limit: int = field(
        default=EXACT_SEARCH_LIMIT, metadata={"help": "--ann auto: pages up to which search is exact."}
    )
    nprobe: int = field(default=16, metadata={"help": "ivf: lists searched per query (more: higher recall, slower)."})
    ef_search: int = field(default=64, metadata={"help": "hnsw: candidates kept per query (more: higher recall)."})

    def validate(self) -> None:
        from lco.distributed import world_size
        from lco.embedder import embedding_size
        from lco.index import ANN_TYPES, QUANTIZATIONS

        check_model_source(self.model, "--model")
        if not self.input:
            raise UsageError("--input is empty; give PDFs, folders of PDFs or pages datasets.")
        check_input_paths(self.input, "--input")
        if self.output is None:
            raise UsageError("--output is not set; give the index folder to write.")
        output = usable_path(self.output, "--output")
        if self.add and self.overwrite:
            raise UsageError("--add and --overwrite contradict each other; pass one of them.")
        if output.exists() and not (self.add or self.overwrite):
            raise UsageError(
                f"--output {output} already exists; pass --add to add documents to it, --overwrite to replace it, "
                "or choose another --output."
            )
        if self.add and not output.exists():
            raise UsageError(f"--add: --output {output} does not exist; build it first (without --add).")
        if self.chunk_pages < 1:
            raise UsageError(f"--chunk_pages must be at least 1, got {self.chunk_pages}.")
        if self.quantize not in QUANTIZATIONS:
            raise UsageError(f"--quantize must be one of {', '.join(QUANTIZATIONS)}, got {self.quantize!r}.")
        if self.ann not in ANN_TYPES:
            raise UsageError(f"--ann must be one of {', '.join(ANN_TYPES)}, got {self.ann!r}.")
        if self.quantize == "binary" and self.ann in ("ivf", "hnsw"):
            raise UsageError(
                f"--ann {self.ann} takes --quantize none or int8; binary codes are searched exactly (Hamming "
                "distance on 1/32 of the float32 memory): drop --ann or pass --quantize int8."
            )
        for name in ("exact_limit", "nprobe", "ef_search"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name} must be at least 1, got {getattr(self, name)}.")
        if world_size() > 1 and split_inputs(self.input)[1]:
            raise UsageError(
                f"--input {' '.join(split_inputs(self.input)[1])}: under torchrun, give pages datasets; make them "
                "from the PDFs first with `python -m data_prep pages` (one process reads PDFs, many encode)."
            )
        size = embedding_size(self.model)
        if self.dim < 0 or (size and self.dim > size):
            raise UsageError(f"--dim {self.dim}: the model's embeddings have {size} components; give 1 to {size}.")
        if self.quantize == "binary" and (self.dim or size or 8) % 8:
            raise UsageError("--quantize binary packs 8 components a byte; give a --dim that is a multiple of 8.")


def with_model_recipe(argv: list[str]) -> list[str]:
    """`argv`, plus `--config` (or `--lang`) from the model's run-record chain when neither is given: the index
    reads PDFs with the OCR settings of the recipe the model was trained with."""
    if any(arg.split("=")[0] in ("--config", "--lang") for arg in argv) or "--model" not in argv:
        return argv
    position = argv.index("--model") + 1
    model = argv[position] if position < len(argv) else None
    for record in chain_records(model) if model and Path(model).is_dir() else []:
        recipe = record["config"].get("recipe", {})
        if recipe.get("config") and Path(recipe["config"]).is_file():
            return [*argv, "--config", recipe["config"]]
        if recipe.get("lang"):
            return [*argv, "--lang", recipe["lang"]]
    return argv


def split_inputs(inputs: list[str]) -> tuple[list[str], list[str]]:
    """(pages datasets, PDF paths) among `--input`: a folder with a manifest.json is a pages dataset."""
    datasets = [path for path in inputs if (Path(path) / "manifest.json").is_file()]
    return datasets, [path for path in inputs if path not in datasets]


def index_settings(model: str, args: EvaluateArguments, inputs: IndexInputs) -> dict:
    """What decides the index's vectors: an index refuses to mix pages encoded under other settings."""
    return {
        "model": str(Path(model).resolve()) if Path(model).exists() else model,
        "model_fingerprint": model_fingerprint(model),
        "query_instruction": args.query_instruction,
        "max_text_tokens": args.max_text_tokens,
        **page_size(model, args),
        "dim": inputs.dim,
        "quantize": inputs.quantize,
        "ann": inputs.ann,
        "nprobe": inputs.nprobe,
        "ef_search": inputs.ef_search,
    }


def check_same_settings(existing: dict, wanted: dict, output: str) -> None:
    existing = {"ann": "auto", "nprobe": 16, "ef_search": 64, **existing}  # an index from before --ann: exact, as auto
    differing = sorted(key for key in wanted if key != "model" and existing.get(key) != wanted[key])
    if differing:
        shown = ", ".join(f"{key} {existing.get(key)!r} here, {wanted[key]!r} now" for key in differing)
        raise UsageError(
            f"--add: the index {output} was built with another model or settings ({shown}); add with the same "
            "model and settings, or build a new index (another --output, or --overwrite)."
        )


def pdf_pages(pdfs: list[str], work: Path, recipe_args, indexed: set[str]) -> str | None:
    """A pages dataset (in the work folder) of the PDFs among `pdfs` whose content is not in `indexed`, made by
    `data_prep pages` with the recipe's settings; None when there is none."""
    from data_prep.pages import PageSettings, build_pages_dataset, find_pdfs
    from data_prep.settings import DataPrepSettings

    new = [str(path) for path in find_pdfs(pdfs) if sha256_file(path) not in indexed]
    if not new:
        return None
    recipe = ["--config", recipe_args.config] if recipe_args.config else ["--lang", recipe_args.lang]
    _, settings = parse_stage_arguments("data_prep", (DataPrepSettings,), recipe)
    settings.check_tesseract()
    output = work / "pdf-pages"
    if not (output / "manifest.json").is_file():
        build_pages_dataset(
            new,
            str(output),
            PageSettings.from_recipe(recipe_args.lang, settings),
            workers=settings.workers,
            resume=True,  # the work folder is this run's: what a killed run finished is kept
            max_skip_fraction=settings.max_skip_fraction,
            page_timeout_s=settings.page_timeout_s,
            document_memory_mb=settings.document_memory_mb,
        )
    return str(output)


def pages_to_index(datasets: list[str], indexed: set[str]) -> list[tuple[object, int, dict]]:
    """(dataset, row, page entry) of every page of a document not in `indexed` (nor met earlier in `datasets`)."""
    import datasets as hf

    from data_prep.pages import document_hashes

    todo, seen = [], set(indexed)
    for folder in datasets:
        hashes = document_hashes(folder, "--input")
        dataset = hf.load_from_disk(folder).cast_column("image", hf.Image(decode=False))
        columns = dataset.select_columns(["doc_id", "page", "lang", "text", "source"])
        new_documents = set()
        for row, page in enumerate(columns):
            sha = hashes.get(page["doc_id"])
            if sha in seen and page["doc_id"] not in new_documents:
                continue
            new_documents.add(page["doc_id"])
            todo.append((dataset, row, {**page, "sha256": sha}))
        seen |= {hashes.get(doc_id) for doc_id in new_documents}
    return todo


def encode_pages(todo: list, work: Path, settings: dict, batch_size: int, chunk_pages: int, workers: int = -1):
    """Embeddings of the pages in `todo`, `chunk_pages` at a time, each chunk saved in `work` as it is done and
    read back instead of encoded again (an interrupted run's chunks). In a process group every process encodes a
    share of each chunk (`Embedder.encode`), rank 0 saves and returns them, the others return None."""
    import numpy as np
    from PIL import Image
    from tqdm import tqdm

    from lco.distributed import rank
    from lco.embedder import Embedder, Item, LazyItems

    starts = range(0, len(todo), chunk_pages)
    # rank 0's look at its work folder: every process skips the same chunks
    done = main_process_decides({start for start in starts if (work / chunk_name(start, chunk_pages)).is_file()})
    if done and rank() == 0:
        print(f"index: resuming: {min(len(done) * chunk_pages, len(todo))} of {len(todo)} pages already encoded")
    embedder, chunks = None, []
    with tqdm(total=len(todo), unit="page", desc="index", disable=rank() > 0) as bar:
        for start in starts:
            path = work / chunk_name(start, chunk_pages)
            if start not in done:
                sizes = {key: settings[key] for key in ("max_pixels", "image_max_side")}
                sizes |= {"max_text_tokens": settings["max_text_tokens"], "workers": workers}
                embedder = embedder or Embedder(settings["model"], **sizes)

                def page_item(entry):
                    dataset, row, _ = entry
                    return Item(image=Image.open(io.BytesIO(dataset[row]["image"]["bytes"])))

                def page_size(entry):  # PIL has read the header only: the size, not the pixels
                    return "", page_item(entry).image.size

                vectors = embedder.encode(
                    LazyItems(todo[start : start + chunk_pages], page_item, page_size), batch_size
                )
                if rank() == 0:
                    buffer = io.BytesIO()
                    np.save(buffer, vectors.float().numpy())
                    write_bytes_atomic(path, buffer.getvalue())
            if rank() == 0:
                chunks.append(np.load(path))
            bar.update(min(chunk_pages, len(todo) - start))
    return np.concatenate(chunks) if rank() == 0 else None


def chunk_name(start: int, chunk_pages: int) -> str:
    return f"chunk-{start // chunk_pages:06d}.npy"


def write_index(
    output: str, todo: list, vectors, existing, settings: dict, record: dict, pages_per_s: float, exact_limit: int
) -> dict:
    """The index folder, complete, renamed into place (the existing one's pages first under --add), its run record
    (`record`: write_run_record's fields) written last; returns the record's results. A new index searches as
    `settings["ann"]` says (`auto`: exactly up to `exact_limit` pages); an approximate one's recall@10 against
    exact search is measured over all its vectors (under --add, the earlier pages' read back from the index)."""
    import os

    import numpy as np

    from lco.index import (
        INDEX_FILE,
        PAGES_FILE,
        add_vectors,
        fit_vectors,
        image_file,
        index_bytes,
        index_kind,
        new_faiss_index,
        search_kind,
        search_recall,
        stored_vectors,
        thumbnail_file,
        thumbnail_jpeg,
    )

    pages = list(existing.pages) if existing else []
    fitted = fit_vectors(vectors, settings["dim"])
    if existing:
        faiss_index = existing.faiss_index
    else:
        kind = search_kind(settings["ann"], len(fitted), settings["quantize"], exact_limit)
        faiss_index = new_faiss_index(
            fitted, settings["quantize"], kind, settings["nprobe"], settings["ef_search"], seed=record["seed"]
        )
    approximate = index_kind(faiss_index) != "exact"
    earlier = stored_vectors(faiss_index) if existing and approximate else fitted[:0]
    add_vectors(faiss_index, fitted, settings["quantize"])
    recall = search_recall(faiss_index, np.concatenate([earlier, fitted]), settings["quantize"], seed=record["seed"])
    with atomic_directory(output) as tmp:
        (tmp / "images").mkdir()
        (tmp / "thumbs").mkdir()
        for page in pages:  # hard links: adding costs the new pages, not a copy of the old ones
            for name in (image_file(page["row"]), thumbnail_file(page["row"])):
                os.link(existing.folder / name, tmp / name)
        for dataset, row, entry in todo:
            number = len(pages)
            png = dataset[row]["image"]["bytes"]
            (tmp / image_file(number)).write_bytes(png)
            (tmp / thumbnail_file(number)).write_bytes(thumbnail_jpeg(png))
            pages.append({"row": number, **entry})
        lines = "".join(json.dumps(page, ensure_ascii=False) + "\n" for page in pages)
        (tmp / PAGES_FILE).write_text(lines, encoding="utf-8")
        (tmp / INDEX_FILE).write_bytes(index_bytes(faiss_index, settings["quantize"]))
        size = (tmp / INDEX_FILE).stat().st_size
        results = {
            "pages": len(pages),
            "documents": len({page["sha256"] for page in pages}),
            "languages": sorted({page["lang"] for page in pages}),
            "index_bytes": size,
            "index_bytes_per_page": round(size / len(pages), 1),
            "pages_added": len(todo),
            "pages_per_s": round(pages_per_s, 3),  # encoding the added pages
            "search": index_kind(faiss_index),
            "recall_at_10": recall,  # against exact search, the index's own vectors as queries; None when exact
        }
        config = {**record["config"], "index": settings}
        write_run_record(tmp, **{**record, "config": config}, results=results)
    return results


def search_summary(counts: dict, settings: dict, exact_limit: int) -> str:
    """How the written index searches, and what that costs against exact search."""
    if counts["search"] == "exact":
        grown = settings["ann"] == "auto" and counts["pages"] > exact_limit
        # an index keeps the search it was built with: --add never retrains
        return "exact search" + (
            f"; {counts['pages']} pages is past --exact_limit {exact_limit}: rebuild it (--overwrite) for IVF search"
            if grown
            else ""
        )
    probe = f"nprobe {settings['nprobe']}" if counts["search"] == "ivf" else f"ef_search {settings['ef_search']}"
    return (
        f"{counts['search']} search ({probe}): recall@10 {counts['recall_at_10']} against exact search, "
        "its own pages as queries"
    )


def main(argv: list[str] | None = None) -> None:
    import sys

    from lco.index import load_index

    argv = with_model_recipe(sys.argv[1:] if argv is None else argv)
    recipe_args, args, inputs = parse_stage_arguments(
        "evaluate", (EvaluateArguments,), argv, cli_only_types=(IndexInputs,), prog="python -m stages.index"
    )
    set_up_output(recipe_args.verbose)
    started = time.monotonic()
    existing = load_index(inputs.output, "--output") if inputs.add else None
    settings = index_settings(inputs.model, args, inputs)
    if existing:
        check_same_settings(existing.settings, settings, inputs.output)
    indexed = {page["sha256"] for page in existing.pages} if existing else set()

    output = Path(inputs.output)
    work = output.with_name(f".{output.name}.work")
    datasets, pdfs = split_inputs(inputs.input)
    run_key = {
        **settings,
        "inputs": [str(Path(path).resolve()) for path in inputs.input],
        "manifests": [sha256_file(Path(path) / "manifest.json") for path in datasets],
        "add_to": existing and sha256_file(output / RUN_RECORD),
    }
    main_process = join_process_group() == 0  # under torchrun; 1 process: rank 0
    if main_process:
        prepare_work_folder(work, run_key, inputs.resume)
    from_pdfs = pdf_pages(pdfs, work, recipe_args, indexed) if pdfs else None  # pages datasets only under torchrun
    todo = pages_to_index([*datasets, *([from_pdfs] if from_pdfs else [])], indexed)
    if not todo:
        if main_process:
            shutil.rmtree(work)
            print(f"index: nothing new to index in {' '.join(inputs.input)}; {inputs.output} is unchanged")
        return
    encoding_started = time.monotonic()
    vectors = encode_pages(todo, work, settings, args.batch_size, inputs.chunk_pages, args.encode_workers)
    encoding_s = time.monotonic() - encoding_started
    if not main_process:  # the other processes of a torchrun encoded their shares
        return

    # the PDFs' pages dataset goes with the work folder: the pages' sha256 say which documents they came from
    record = dict(
        config={"recipe": vars(recipe_args), "evaluate": asdict(args), "inputs": asdict(inputs)},
        stage="index",
        seed=recipe_args.seed,
        inputs=[*([recipe_args.config] if recipe_args.config else []), *(Path(d) / "manifest.json" for d in datasets)],
        parent=parent_run(inputs.model),
    )
    pages_per_s = len(todo) / max(encoding_s, 1e-9)
    counts = write_index(inputs.output, todo, vectors, existing, settings, record, pages_per_s, inputs.exact_limit)
    shutil.rmtree(work)
    print(
        f"index: {len(todo)} pages added ({len({entry['sha256'] for *_, entry in todo})} documents), "
        f"{counts['pages']} in all, {counts['pages_per_s']} pages/s encoded, "
        f"{counts['index_bytes_per_page']} index bytes per page ({inputs.quantize}, "
        f"dim {inputs.dim or vectors.shape[1]}), {time.monotonic() - started:.0f}s -> {inputs.output}"
    )
    print(f"index: {search_summary(counts, settings, inputs.exact_limit)}")
    print(f'index: search it: python -m stages.search --index {inputs.output} "your question"')


if __name__ == "__main__":
    run_cli(main)
