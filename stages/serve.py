"""A local web page to search an index built by `python -m stages.index`, and the JSON API it uses.

    python -m stages.serve --index checkpoints/km/index [--host 127.0.0.1] [--port 8000]

Open http://127.0.0.1:8000/ : a query box, a language filter, results as page thumbnails with document, page and
score; a click opens the full page. `GET /search?q=...&k=10&lang=km` answers JSON. It binds to the loopback
address unless told otherwise, and serves no file but the index's page images and thumbnails, by row number.
"""

import html
import sys
import threading
from pathlib import Path

from common.errors import UsageError, run_cli
from common.languages import normalize_lang
from common.output import set_up_output

from .search import MAX_K, index_parser, query_encoder

DEFAULT_K = 10
MAX_QUERY_CHARS = 2000
PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Search the index</title>
<style>
/* a word longer than a phone's width (a pasted query, a document id) breaks rather than widen the page */
body { font-family: "Noto Sans", sans-serif; margin: 1.5rem; color: #222; overflow-wrap: anywhere; }
form { display: flex; gap: .5rem; flex-wrap: wrap; }
#q { flex: 1 1 24rem; font-size: 1.1rem; padding: .4rem; }
#status { color: #555; }
#results { display: grid; grid-template-columns: repeat(auto-fill, minmax(14rem, 1fr)); gap: 1rem; }
.hit { border: 1px solid #ccc; border-radius: 4px; padding: .5rem; text-decoration: none; color: inherit; }
.hit img { width: 100%; border: 1px solid #eee; }
.hit .where { font-weight: bold; overflow-wrap: anywhere; }
.hit .snippet { font-size: .85rem; color: #444; }
</style>
</head>
<body>
<h1>Search %%NAME%%</h1>
<form id="search">
  <input id="q" name="q" type="search" value="%%QUERY%%" placeholder="Ask a question" autofocus>
  <select id="lang" name="lang" aria-label="language"><option value="">all languages</option>%%LANGS%%</select>
  <input id="k" name="k" type="number" value="%%K%%" min="1" max="%%MAX_K%%" aria-label="results">
  <button type="submit">Search</button>
</form>
<p id="status"></p>
<div id="results"></div>
<script>
// every string from the index or the query is set as text (textContent, attributes), never parsed as HTML
const field = (id) => document.getElementById(id);
function hitCard(hit) {
  const card = document.createElement("a");
  card.className = "hit";
  card.href = hit.image;
  card.target = "_blank";
  const image = document.createElement("img");
  image.src = hit.thumbnail;
  image.alt = hit.doc_id + " page " + hit.page;
  const where = document.createElement("div");
  where.className = "where";
  where.textContent = hit.rank + ". " + hit.doc_id + ", page " + hit.page;
  const score = document.createElement("div");
  score.textContent = "score " + hit.score.toFixed(4) + " (" + hit.lang + ")";
  const snippet = document.createElement("p");
  snippet.className = "snippet";
  snippet.textContent = hit.snippet;
  card.append(image, where, score, snippet);
  return card;
}
async function runSearch() {
  const params = new URLSearchParams({ q: field("q").value, k: field("k").value, lang: field("lang").value });
  history.replaceState(null, "", "?" + params);
  field("status").textContent = "searching...";
  const response = await fetch("/search?" + params);
  const body = await response.json();
  if (!response.ok) {
    field("status").textContent = body.detail;
    field("results").replaceChildren();
    return;
  }
  field("status").textContent = body.results.length + " pages for \\u201c" + body.query + "\\u201d";
  field("results").replaceChildren(...body.results.map(hitCard));
}
field("search").addEventListener("submit", (event) => { event.preventDefault(); runSearch(); });
if (field("q").value) runSearch();
</script>
</body>
</html>
"""


def page_html(name: str, langs: list[str], query: str, k: str, lang: str) -> str:
    """The search page, with the query of a shared link (`/?q=...`) filled in; every value escaped."""
    options = "".join(
        f'<option value="{html.escape(code)}"{" selected" if code == lang else ""}>{html.escape(code)}</option>'
        for code in langs
    )
    values = {
        "%%NAME%%": html.escape(name),
        "%%QUERY%%": html.escape(query),
        "%%LANGS%%": options,
        "%%K%%": html.escape(k),
        "%%MAX_K%%": str(MAX_K),
    }
    text = PAGE
    for marker, value in values.items():
        text = text.replace(marker, value)
    return text


def create_app(index, encode=None):
    """The FastAPI app over a loaded index; `encode` (query texts -> embeddings) defaults to the index's model."""
    from fastapi import FastAPI, HTTPException
    from fastapi.responses import FileResponse, HTMLResponse

    from lco.index import image_file, snippet, thumbnail_file

    encode = encode or query_encoder(index)
    lock = threading.Lock()  # one query through the model at a time
    langs = sorted({page["lang"] for page in index.pages})
    app = FastAPI(title="lco-docs search", docs_url=None, redoc_url=None, openapi_url=None)

    @app.middleware("http")
    async def no_sniffing(request, call_next):
        response = await call_next(request)
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response

    @app.get("/", response_class=HTMLResponse)
    def home(q: str = "", k: str = str(DEFAULT_K), lang: str = "") -> str:
        return page_html(index.folder.name, langs, q, k, lang)

    @app.get("/search")
    def search(q: str = "", k: str = str(DEFAULT_K), lang: str = "") -> dict:
        query = q.strip()
        if not query:
            raise HTTPException(400, "the query is empty: type a question.")
        if len(query) > MAX_QUERY_CHARS:
            raise HTTPException(400, f"the query is longer than {MAX_QUERY_CHARS} characters.")
        if not (k.isdigit() and 1 <= int(k) <= MAX_K):
            raise HTTPException(400, f"k must be a whole number from 1 to {MAX_K}, got {k[:20]!r}.")
        if lang:
            try:
                lang = normalize_lang(lang)
            except UsageError:
                lang = lang[:20]
            if lang not in langs:
                raise HTTPException(400, f"no pages in language {lang!r}; the index has {', '.join(langs)}.")
        with lock:
            vectors = encode([query])
        hits = index.search(vectors, int(k), lang or None)[0]
        results = [
            {
                "rank": rank,
                "score": round(score, 6),
                "doc_id": page["doc_id"],
                "page": page["page"],
                "lang": page["lang"],
                "source": Path(page["source"]).name,
                "snippet": snippet(page["text"]),
                "thumbnail": f"/thumb/{page['row']}",
                "image": f"/page/{page['row']}",
            }
            for rank, (score, page) in enumerate(hits, start=1)
        ]
        return {"query": query, "k": int(k), "lang": lang or None, "results": results}

    def index_file(row: str, name_of) -> FileResponse:
        # a row number and nothing else: no path from the request reaches the file system
        if not (row.isdigit() and int(row) < len(index.pages)):
            raise HTTPException(404, f"no page {row[:40]!r} in this index.")
        return FileResponse(index.folder / name_of(int(row)))

    @app.get("/page/{row}")
    def page_image(row: str) -> FileResponse:
        return index_file(row, image_file)

    @app.get("/thumb/{row}")
    def page_thumbnail(row: str) -> FileResponse:
        return index_file(row, thumbnail_file)

    return app


def check_model_unchanged(index) -> None:
    from common.run_record import model_fingerprint

    settings = index.settings
    if Path(settings["model"]).is_dir() and model_fingerprint(settings["model"]) != settings["model_fingerprint"]:
        raise UsageError(
            f"the model {settings['model']} changed since {index.folder} was built (its weights differ); "
            "index again with it, or restore the model."
        )


def main(argv: list[str] | None = None) -> None:
    import argparse

    import uvicorn

    from lco.index import load_index

    parser = index_parser("python -m stages.serve", __doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="Address to bind; the default is reachable from here only.")
    parser.add_argument("--port", type=int, default=8000, help="Port to listen on (http://HOST:PORT/).")
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    except argparse.ArgumentError as error:
        raise UsageError(f"{error}; run with --help to list the flags.") from None
    if not 0 <= args.port < 65536:
        raise UsageError(f"--port must be in [0, 65535], got {args.port}.")
    set_up_output(args.verbose)
    index = load_index(args.index)
    check_model_unchanged(index)
    app = create_app(index)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"serve: WARNING: listening on {args.host}: whoever reaches it can read every indexed page")
    print(f"serve: {len(index.pages)} pages of {args.index} at http://{args.host}:{args.port}/ (Ctrl-C stops)")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    run_cli(main)
