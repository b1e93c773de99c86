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
from common.recipe import parse_stage_arguments
from common.run_record import RUN_RECORD, chain_records, model_fingerprint, parent_run, sha256_file, write_run_record

from .evaluate import EvaluateArguments, page_size


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

    def validate(self) -> None:
        from lco.embedder import embedding_size
        from lco.index import QUANTIZATIONS

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
    }


def check_same_settings(existing: dict, wanted: dict, output: str) -> None:
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
    read back instead of encoded again (an interrupted run's chunks)."""
    import numpy as np
    from PIL import Image
    from tqdm import tqdm

    from lco.embedder import Embedder, Item, LazyItems

    embedder, chunks = None, []
    done = sum(1 for start in range(0, len(todo), chunk_pages) if (work / chunk_name(start, chunk_pages)).is_file())
    if done:
        print(f"index: resuming: {min(done * chunk_pages, len(todo))} of {len(todo)} pages already encoded")
    with tqdm(total=len(todo), unit="page", desc="index") as bar:
        for start in range(0, len(todo), chunk_pages):
            path = work / chunk_name(start, chunk_pages)
            if not path.is_file():
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
                buffer = io.BytesIO()
                np.save(buffer, vectors.float().numpy())
                write_bytes_atomic(path, buffer.getvalue())
            chunks.append(np.load(path))
            bar.update(len(chunks[-1]))
    return np.concatenate(chunks)


def chunk_name(start: int, chunk_pages: int) -> str:
    return f"chunk-{start // chunk_pages:06d}.npy"


def write_index(output: str, todo: list, vectors, existing, settings: dict, record: dict, pages_per_s: float) -> dict:
    """The index folder, complete, renamed into place (the existing one's pages first under --add), its run record
    (`record`: write_run_record's fields) written last; returns the record's results."""
    import os

    from lco.index import (
        INDEX_FILE,
        PAGES_FILE,
        add_vectors,
        fit_vectors,
        image_file,
        index_bytes,
        new_faiss_index,
        thumbnail_file,
        thumbnail_jpeg,
    )

    pages = list(existing.pages) if existing else []
    faiss_index = existing.faiss_index if existing else None
    fitted = fit_vectors(vectors, settings["dim"])
    faiss_index = faiss_index or new_faiss_index(fitted, settings["quantize"])
    add_vectors(faiss_index, fitted, settings["quantize"])
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
        }
        config = {**record["config"], "index": settings}
        write_run_record(tmp, **{**record, "config": config}, results=results)
    return results


def main(argv: list[str] | None = None) -> None:
    import sys

    from lco.index import load_index

    argv = with_model_recipe(sys.argv[1:] if argv is None else argv)
    recipe_args, args, inputs = parse_stage_arguments(
        "evaluate", (EvaluateArguments,), argv, cli_only_types=(IndexInputs,), prog="python -m stages.index"
    )
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
    prepare_work_folder(work, run_key, inputs.resume)
    from_pdfs = pdf_pages(pdfs, work, recipe_args, indexed) if pdfs else None
    todo = pages_to_index([*datasets, *([from_pdfs] if from_pdfs else [])], indexed)
    if not todo:
        shutil.rmtree(work)
        print(f"index: nothing new to index in {' '.join(inputs.input)}; {inputs.output} is unchanged")
        return
    encoding_started = time.monotonic()
    vectors = encode_pages(todo, work, settings, args.batch_size, inputs.chunk_pages, args.encode_workers)
    encoding_s = time.monotonic() - encoding_started

    # the PDFs' pages dataset goes with the work folder: the pages' sha256 say which documents they came from
    record = dict(
        config={"recipe": vars(recipe_args), "evaluate": asdict(args), "inputs": asdict(inputs)},
        stage="index",
        seed=recipe_args.seed,
        inputs=[*([recipe_args.config] if recipe_args.config else []), *(Path(d) / "manifest.json" for d in datasets)],
        parent=parent_run(inputs.model),
    )
    counts = write_index(inputs.output, todo, vectors, existing, settings, record, len(todo) / max(encoding_s, 1e-9))
    shutil.rmtree(work)
    print(
        f"index: {len(todo)} pages added ({len({entry['sha256'] for *_, entry in todo})} documents), "
        f"{counts['pages']} in all, {counts['pages_per_s']} pages/s encoded, "
        f"{counts['index_bytes_per_page']} index bytes per page ({inputs.quantize}, "
        f"dim {inputs.dim or vectors.shape[1]}), {time.monotonic() - started:.0f}s -> {inputs.output}"
    )
    print(f'index: search it: python -m stages.search --index {inputs.output} "your question"')


if __name__ == "__main__":
    run_cli(main)
