"""Search an index built by `python -m stages.index`: ranked pages for a question.

    python -m stages.search --index checkpoints/km/index "តើ​ការ​បោះឆ្នោត​ធ្វើ​ឡើង​នៅ​ពេល​ណា"
    python -m stages.search --index checkpoints/km/index "question" --k 5 --lang km --json

The query is encoded by the index's model with the index's settings (its run record), truncated and quantised
as the pages were. Prints rank, score, document, page and a snippet of the page text; `--json` prints one JSON
object per result instead.
"""

import argparse
import json
import sys

from common.errors import UsageError, run_cli
from common.languages import normalize_lang
from common.output import VERBOSE_HELP, set_up_output

MAX_K = 1000


def index_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The flags search and serve share."""
    parser = argparse.ArgumentParser(prog=prog, description=description, exit_on_error=False)
    parser.add_argument("--index", required=True, help="An index folder written by `python -m stages.index`.")
    parser.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    return parser


def checked_k(k: int) -> int:
    if not 1 <= k <= MAX_K:
        raise UsageError(f"--k must be between 1 and {MAX_K}, got {k}.")
    return k


def query_encoder(index):
    """A function from query texts to their embeddings, with the model and settings the index was built with."""
    from common.artifacts import check_model_source
    from lco.embedder import Embedder

    settings = index.settings
    check_model_source(settings["model"], f"the model of {index.folder}")
    embedder = Embedder(
        settings["model"],
        max_text_tokens=settings["max_text_tokens"],
        image_max_side=settings["image_max_side"],
        max_pixels=settings["max_pixels"],
    )
    return lambda texts: embedder.encode_texts([settings["query_instruction"] + text for text in texts]).numpy()


def main(argv: list[str] | None = None) -> None:
    from lco.index import load_index, snippet

    parser = index_parser("python -m stages.search", __doc__.splitlines()[0])
    parser.add_argument("query", help="The question.")
    parser.add_argument("--k", type=int, default=10, help="Pages to show.")
    parser.add_argument("--lang", default=None, help="Only pages in this language.")
    parser.add_argument("--json", action="store_true", help="One JSON object per result.")
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    except argparse.ArgumentError as error:
        raise UsageError(f"{error}; run with --help to list the flags.") from None
    if not args.query.strip():
        raise UsageError("the query is empty; give the question to search for.")
    k, lang = checked_k(args.k), normalize_lang(args.lang) if args.lang else None
    set_up_output(args.verbose)
    index = load_index(args.index)
    results = index.search(query_encoder(index)([args.query]), k, lang)[0]
    for rank, (score, page) in enumerate(results, start=1):
        if args.json:
            shown = {key: page[key] for key in ("doc_id", "page", "lang", "source")}
            print(json.dumps({"rank": rank, "score": round(score, 6), **shown, "snippet": snippet(page["text"])},
                             ensure_ascii=False))  # fmt: skip
        else:
            print(f"{rank:>3}  {score:.4f}  {page['doc_id']}  p.{page['page']}  {snippet(page['text'], 100)}")
    if not results:
        print(f"search: no pages{f' in {lang}' if lang else ''} in {args.index}", file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)
