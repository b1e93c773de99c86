"""A static HTML report (no server): per model, sampled queries with their top-5 pages as thumbnails,
the relevant ones marked. People debug retrieval by looking."""

import html
import random
from pathlib import Path

from .artifacts import atomic_directory

THUMBNAIL_SIDE = 220
TOP = 5


def write_report(folder: str, evalset, runs: dict[str, dict[str, dict[str, float]]], queries: int, seed: int) -> None:
    chosen = sorted(random.Random(seed).sample(sorted(evalset.qrels), min(queries, len(evalset.qrels))))
    with atomic_directory(folder) as tmp:
        (tmp / "pages").mkdir()
        shown: set[str] = set()
        sections = []
        for model, run in runs.items():
            rows = []
            for query_id in chosen:
                relevant = {pid for pid, grade in evalset.qrels[query_id].items() if grade > 0}
                top = sorted(run.get(query_id, {}).items(), key=lambda item: -item[1])[:TOP]
                cells = []
                for rank, (page_id, similarity) in enumerate(top, start=1):
                    name = _thumbnail(evalset, page_id, tmp / "pages", shown)
                    mark = " relevant" if page_id in relevant else ""
                    cells.append(
                        f'<figure class="page{mark}"><img src="pages/{name}" alt="{html.escape(page_id)}">'
                        f"<figcaption>{rank}. {html.escape(page_id)} ({similarity:.3f})</figcaption></figure>"
                    )
                found = "found" if relevant & {pid for pid, _ in top} else "missed"
                rows.append(
                    f'<div class="query {found}"><p><b>{html.escape(query_id)}</b> '
                    f"{html.escape(evalset.queries[query_id]['text'])}"
                    f"<br><small>relevant: {html.escape(', '.join(sorted(relevant)))}</small></p>{''.join(cells)}</div>"
                )
            sections.append(f"<h2>{html.escape(model)}</h2>{''.join(rows)}")
        (tmp / "index.html").write_text(PAGE.format(body="".join(sections)), encoding="utf-8")


def _thumbnail(evalset, page_id: str, folder: Path, shown: set[str]) -> str:
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in page_id) + ".jpg"
    if page_id not in shown:
        image = evalset.open_image(page_id)
        image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
        image.save(folder / name, quality=85)
        shown.add(page_id)
    return name


PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>Retrieval report</title>
<style>
body {{ font-family: sans-serif; margin: 1em; }}
.query {{ border-top: 1px solid #ccc; padding: .5em 0; }}
.query.missed > p {{ color: #a00; }}
figure {{ display: inline-block; margin: 4px; border: 3px solid transparent; text-align: center; }}
figure.relevant {{ border-color: #0a0; }}
figcaption {{ font-size: 11px; max-width: 220px; overflow-wrap: anywhere; }}
</style></head><body>
<h1>Top-5 pages per query</h1><p>Relevant pages have a green frame; queries whose relevant page is not in the top 5 are red.</p>
{body}
</body></html>
"""
