"""Data preparation: page images and page text from PDFs, PDFs from text, and retrieval eval sets.

    python -m data_prep pages --input my_pdfs/ --output checkpoints/km/pages --lang km
    python -m data_prep pages --input my_pdfs/ s3://bucket/pdfs/ --output checkpoints/km/pages --lang km \
        --engine ray [--address HEAD:6379]
    python -m data_prep render --input samples/udhr/km.md --output checkpoints/km/rendered --lang km
    python -m data_prep evalset --lang km --pages checkpoints/km/pages --output checkpoints/km/evalset \
        [--parallel_source samples/udhr/en.md]
    python -m data_prep evalset --lang lo --parquet seadoc_lo/ --output checkpoints/lo/seadoc
    python -m data_prep queries --config recipes/km.yaml --pages checkpoints/km/pages --generator MODEL_DIR \
        --output checkpoints/km/queries [--languages en km] [--per_page 3] [--engine transformers|vllm] [--resume]
    python -m data_prep speak --lang en --evalset checkpoints/km/evalset --output checkpoints/km/evalset-spoken
    python -m data_prep recipe --lang dz --output recipes/dz.yaml

`--lang` selects recipes/<lang>.yaml (its `data_prep` section; `queries` for the queries command) unless `--config`
names another recipe.
"""

import logging
import sys
from dataclasses import dataclass, field
from typing import Literal

from common.artifacts import check_input_paths, check_output_dir, usable_path, write_text_atomic
from common.errors import UsageError
from common.languages import normalize_lang
from common.output import set_up_output
from common.recipe import parse_stage_arguments
from lco.queries import QueriesSettings, check_generator, check_pages

from .evalset import build_evalset, convert_parquet_evalset
from .language_data import derive_language_data, write_recipe
from .pages import PageSettings, build_pages_dataset
from .pages_ray import check_ray, is_url
from .render import render_documents
from .settings import DataPrepSettings
from .speech import speak_evalset


@dataclass
class PagesArguments:
    input: list[str] = field(default_factory=list, metadata={"help": "PDF files or folders of them (recursive)."})
    output: str | None = field(default=None, metadata={"help": "Folder for the pages dataset and manifest.json."})
    resume: bool = field(default=False, metadata={"help": "Skip documents already done in --output."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing --output."})
    engine: Literal["local", "ray"] = field(
        default="local",
        metadata={"help": "local: `workers` processes here; ray: Ray tasks (a local Ray, or a cluster: --address)."},
    )
    address: str | None = field(
        default=None, metadata={"help": "--engine ray: a running Ray cluster to join (HEAD:6379); else a local Ray."}
    )

    def validate(self) -> None:
        urls = [value for value in self.input if is_url(value)]
        if self.engine != "ray" and (urls or self.address):
            given = f"--input {urls[0]}" if urls else f"--address {self.address}"
            raise UsageError(f"{given} needs --engine ray (the local engine reads local files only).")
        _check_io(self.input, self.output, resume=self.resume, overwrite=self.overwrite, urls=self.engine == "ray")
        if self.engine == "ray":
            check_ray(self.address)


@dataclass
class RenderArguments:
    input: list[str] = field(default_factory=list, metadata={"help": "Text files or folders of them."})
    output: str | None = field(default=None, metadata={"help": "Folder for the rendered PDFs."})
    resume: bool = field(default=False, metadata={"help": "Skip documents already rendered by an interrupted run."})
    section_pages: bool = field(
        default=False,
        metadata={"help": "Start every `## ` section on a page of its own (eval sets: few relevant pages per query)."},
    )
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing --output."})

    def validate(self) -> None:
        _check_io(self.input, self.output, resume=self.resume, overwrite=self.overwrite)


@dataclass
class EvalsetArguments:
    pages: list[str] = field(default_factory=list, metadata={"help": "Pages datasets: every page joins the corpus."})
    parquet: str | None = field(default=None, metadata={"help": "Or: a local SeaDoc/ViDoRe parquet folder to convert."})
    output: str | None = field(default=None, metadata={"help": "Folder for corpus.jsonl, queries.jsonl, qrels.tsv."})
    parallel_source: str | None = field(
        default=None,
        metadata={"help": "Markdown whose `## ` sections parallel the documents' bookmarks (e.g. samples/udhr/en.md)."},
    )
    parallel_lang: str = field(default="en", metadata={"help": "Language of --parallel_source."})
    outline_level: int = field(default=2, metadata={"help": "Bookmark level that --parallel_source's sections match."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing --output."})

    def validate(self) -> None:
        if bool(self.pages) == bool(self.parquet):
            raise UsageError("give either --pages DIR [DIR ...] or --parquet DIR.")
        _check_io(self.pages or [self.parquet], self.output, overwrite=self.overwrite, input_flag="--pages/--parquet")
        if self.parallel_source:
            check_input_paths([self.parallel_source], "--parallel_source")
            self.parallel_lang = normalize_lang(self.parallel_lang)


@dataclass
class SpeakArguments:
    evalset: str | None = field(default=None, metadata={"help": "An eval set whose text queries are to be spoken."})
    output: str | None = field(default=None, metadata={"help": "Folder for the eval set with spoken queries."})
    rate: int = field(default=150, metadata={"help": "espeak-ng's speaking rate, in words per minute."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing --output."})

    def validate(self) -> None:
        _check_io([self.evalset] if self.evalset else [], self.output, overwrite=self.overwrite, input_flag="--evalset")
        if not 80 <= self.rate <= 450:
            raise UsageError(f"--rate {self.rate} is outside espeak-ng's 80-450 words per minute.")


@dataclass
class QueriesArguments:
    pages: str | None = field(default=None, metadata={"help": "Pages dataset whose pages the questions are about."})
    generator: str | None = field(
        default=None, metadata={"help": "Instruction-tuned chat VLM (a model folder or hub id) that writes them."}
    )
    output: str | None = field(default=None, metadata={"help": "Folder for evalset/, train_pairs.jsonl, manifest."})
    resume: bool = field(default=False, metadata={"help": "Keep the pages an interrupted run finished."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing --output."})

    def validate(self) -> None:
        if not self.pages:
            raise UsageError("--pages is not set; give a pages dataset written by `python -m data_prep pages`.")
        _check_io([self.pages], self.output, resume=self.resume, overwrite=self.overwrite, input_flag="--pages")
        check_pages(self.pages)
        check_generator(self.generator)


@dataclass
class RecipeCommandArguments:
    output: str | None = field(default=None, metadata={"help": "Recipe file to write, e.g. recipes/dz.yaml."})
    script: str | None = field(
        default=None,
        metadata={"help": "ISO 15924 script (e.g. Java), for a language written in another than its usual one."},
    )
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing --output."})

    def validate(self) -> None:
        if self.output is None:
            raise UsageError("--output is not set; give the recipe file to write (e.g. recipes/dz.yaml).")
        path = usable_path(self.output, "--output")
        if path.exists() and not self.overwrite:
            raise UsageError(f"--output {path} already exists; pass --overwrite to replace it, or choose another.")
        if not path.parent.is_dir():
            raise UsageError(f"--output {path}: folder {path.parent} does not exist; create it or choose another.")


COMMANDS = {
    "pages": PagesArguments,
    "render": RenderArguments,
    "evalset": EvalsetArguments,
    "queries": QueriesArguments,
    "speak": SpeakArguments,
    "recipe": RecipeCommandArguments,
}


def _check_io(
    inputs: list[str], output: str | None, *, resume=False, overwrite=False, input_flag="--input", urls=False
) -> None:
    """`urls`: inputs may be URLs, which are checked when they are listed."""
    if not inputs:
        raise UsageError(f"{input_flag} is empty; give at least one path.")
    check_input_paths([value for value in inputs if not (urls and is_url(value))], input_flag)
    if output is None:
        raise UsageError("--output is not set; give the folder to write to.")
    check_output_dir(output, resume=resume, overwrite=overwrite, flag="--output")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        raise UsageError(f"give a command first: python -m data_prep {{{','.join(COMMANDS)}}} ... (--help after it).")
    command, rest = argv[0], argv[1:]
    if command == "queries":
        make_queries(rest)
        return
    recipe_args, settings, args = parse_stage_arguments(
        "data_prep",
        (DataPrepSettings,),
        rest,
        cli_only_types=(COMMANDS[command],),
        prog=f"python -m data_prep {command}",
    )
    if command in ("pages", "render") and recipe_args.config is None:
        # the defaults (English OCR, Latin characters) would read another script's pages wrong without a word
        lang = recipe_args.lang
        raise UsageError(
            f"no recipe for {lang} (recipes/{lang}.yaml); write one with python -m data_prep recipe --lang {lang} "
            f"--output recipes/{lang}.yaml, or pass --config."
        )
    set_up_output(recipe_args.verbose)
    if command == "render":
        manifest = render_documents(
            args.input,
            args.output,
            lang=recipe_args.lang,
            fonts=settings.fonts,
            seed=recipe_args.seed,
            workers=settings.workers,
            resume=args.resume,
            section_pages=args.section_pages,
        )
        print(
            f"data_prep render: {len(manifest['documents'])} PDFs, {len(manifest['skipped'])} inputs skipped -> "
            f"{args.output}"
        )
        return
    if command == "evalset":
        make_evalset(args)
        return
    if command == "speak":
        counts = speak_evalset(args.evalset, args.output, recipe_args.lang, args.rate)
        voices = ", ".join(f"{count} in voice {voice}" for voice, count in counts.items())
        print(f"data_prep speak: {sum(counts.values())} queries spoken ({voices}) -> {args.output}")
        return
    if command == "recipe":
        data = derive_language_data(recipe_args.lang, args.script)
        write_text_atomic(args.output, write_recipe(data))
        print(
            f"data_prep recipe: {data.name} ({data.code}), {data.script} script, OCR {data.tesseract_langs}, "
            f"fonts {', '.join(data.fonts)} -> {args.output}; rerun setup/install.sh to install "
            f"{', '.join(data.debian_packages)}"
        )
        return
    settings.check_tesseract()
    manifest = build_pages_dataset(  # SkipThresholdExceeded past max_skip_fraction: exit code 1 under run_cli
        args.input,
        args.output,
        PageSettings.from_recipe(recipe_args.lang, settings),
        workers=settings.workers,
        resume=args.resume,
        max_skip_fraction=settings.max_skip_fraction,
        page_timeout_s=settings.page_timeout_s,
        document_memory_mb=settings.document_memory_mb,
        engine=args.engine,
        address=args.address,
    )
    counts = manifest["counts"]
    print(
        f"data_prep pages: {counts['pages']} pages from {counts['documents']} documents "
        f"({counts['pages_layer']} text layer, {counts['pages_ocr']} OCR), {counts['skipped']} inputs skipped, "
        f"{manifest['elapsed_s']}s -> {args.output}"
    )


def make_evalset(args: EvalsetArguments) -> None:
    if args.parquet:
        summary = convert_parquet_evalset(args.parquet, args.output)
    else:
        summary = build_evalset(
            args.pages,
            args.output,
            parallel_source=args.parallel_source,
            parallel_lang=args.parallel_lang,
            outline_level=args.outline_level,
        )
    unmatched = len(summary.get("unmatched_documents", []))
    print(
        f"data_prep evalset: {summary['queries']} queries, {summary['qrels']} relevance judgements, "
        f"{summary['pages']} pages"
        + (f", {unmatched} documents whose outline did not match" if unmatched else "")
        + f" -> {args.output}"
    )


def make_queries(argv: list[str]) -> None:
    """Parse (the recipe's `queries` section), check every input, then load the generator, generate, filter, write."""
    from dataclasses import asdict
    from pathlib import Path

    from common.artifacts import check_model_source
    from common.run_record import model_fingerprint, parent_run, stage_record, write_run_record
    from lco.queries import check_engine, resolve_languages, run_queries, transformers_engine, vllm_engine

    recipe_args, settings, args = parse_stage_arguments(
        "queries", (QueriesSettings,), argv, cli_only_types=(QueriesArguments,), prog="python -m data_prep queries"
    )
    languages, ranges = resolve_languages(settings, recipe_args.config, recipe_args.lang, args.pages)
    check_engine(settings.engine)
    if settings.consistency_model:
        check_model_source(settings.consistency_model, "--consistency_model")
    set_up_output(recipe_args.verbose)
    local = Path(args.generator).exists()
    generator = {"path": args.generator, "fingerprint": model_fingerprint(args.generator) if local else args.generator}
    engine = (vllm_engine if settings.engine == "vllm" else transformers_engine)(args.generator, settings)

    def record(folder: Path, manifest: dict) -> None:
        write_run_record(
            folder,
            **stage_record(
                "queries",
                recipe_args,
                {"queries": asdict(settings), "languages": languages, "inputs": asdict(args), "generator": generator},
                [Path(args.pages) / "manifest.json"],
            ),
            parent=parent_run(args.generator) if local else None,
            results={"counts": manifest["counts"], "pages_per_s": manifest["pages_per_s"]},
        )

    manifest = run_queries(
        args.pages,
        args.output,
        settings,
        engine,
        languages=languages,
        ranges=ranges,
        generator=generator,
        seed=recipe_args.seed,
        resume=args.resume,
        record=record,
    )
    counts = manifest["counts"]
    if not counts["kept"]:
        logging.warning(
            "data_prep queries: no question passed the filters; candidates.jsonl in %s says which filter refused "
            "each (a generator that is not instruction-tuned writes no usable questions)",
            args.output,
        )
    refused = ", ".join(f"{count} {name}" for name, count in counts["rejected"].items())
    print(
        f"data_prep queries: {counts['candidates']} questions from {counts['pages']} pages"
        + (f" ({manifest['pages_per_s']} pages/s)" if manifest["pages_per_s"] else "")
        + f", {counts['kept']} kept (refused: {refused}); "
        f"{counts['eval_queries']} eval queries, {counts['train_pairs']} training pairs -> {args.output}"
    )
