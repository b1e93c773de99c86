"""A static HTML report (no server): per model, sampled queries with their top-5 pages as thumbnails,
the relevant ones marked. People debug retrieval by looking."""

import hashlib
import html
import random
from pathlib import Path

from common.artifacts import atomic_directory
from lco.significance import ALPHA

THUMBNAIL_SIDE = 220
TOP = 5


def write_report(
    folder: str,
    evalset,
    runs: dict[str, dict[str, dict[str, float]]],
    queries: int,
    seed: int,
    *,
    scores: dict[str, tuple[float, list[float] | None]] | None = None,
    comparisons: list[dict] | None = None,
) -> None:
    """`scores` ({system: (nDCG@10, its 95% interval)}) and `comparisons` (stages.evaluate's paired tests),
    when given, head the page as tables."""
    chosen = sorted(random.Random(seed).sample(sorted(evalset.qrels), min(queries, len(evalset.qrels))))
    with atomic_directory(folder) as tmp:
        (tmp / "pages").mkdir()
        shown: set[str] = set()
        sections = [_significance(scores or {}, comparisons or [])]
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
            sections.append(f"<h2>{_name(model)}</h2>{''.join(rows)}")
        (tmp / "index.html").write_text(PAGE.format(body="".join(sections)), encoding="utf-8")


def _name(system: str) -> str:
    """A model's path, escaped, that wraps between its folders before it wraps within one."""
    return html.escape(system).replace("/", "/<wbr>")


def _significance(scores: dict, comparisons: list[dict]) -> str:
    parts = []
    if scores:
        rows = "".join(
            f'<tr><td class="name">{_name(system)}</td><td>{value:.3f}</td>'
            f"<td>{f'[{found[0]:.3f}, {found[1]:.3f}]' if found else 'n/a'}</td></tr>"
            for system, (value, found) in scores.items()
        )
        parts.append(f"<table><tr><th>system</th><th>nDCG@10</th><th>95% interval</th></tr>{rows}</table>")
    if comparisons:
        rows = "".join(
            ('<tr class="significant">' if c["significant"] else "<tr>")
            + f'<td class="name">{_name(c["system"])}</td><td class="name">{_name(c["baseline"])}</td>'
            f"<td>{c['difference']:+.3f}</td>"
            f"<td>{c['p_value']:.4f}</td><td>{c['p_holm']:.4f}{' *' if c['significant'] else ''}</td></tr>"
            for c in comparisons
        )
        parts.append(
            '<table class="comparisons"><tr><th>system</th><th>against</th><th>nDCG@10 difference</th><th>p</th>'
            "<th>p (Holm)</th></tr>"
            f"{rows}</table><p><small>Paired randomization test over queries; * Holm-adjusted p &lt; {ALPHA} over the "
            f"{len(comparisons)} tests. Intervals: percentile bootstrap over queries.</small></p>"
        )
    return "".join(parts)


def _picture(evalset, page_id: str):
    """The page's image; for a corpus entry without one, its video's first frame or a plain grey square (audio)."""
    from PIL import Image

    page = evalset.pages[page_id]
    if page["image"] is not None:
        return evalset.open_image(page_id)
    if "video" in page:
        from .embedder import load_frames

        return load_frames(page["video"])[0]
    return Image.new("RGB", (THUMBNAIL_SIDE, THUMBNAIL_SIDE), "lightgrey")


def _thumbnail(evalset, page_id: str, folder: Path, shown: set[str]) -> str:
    # readable, and unique: the hash tells apart ids that read alike once sanitised (`a/b`, `a_b`)
    readable = "".join(c if c.isalnum() or c in "-_." else "_" for c in page_id)[:80]
    name = f"{readable}-{hashlib.sha256(page_id.encode()).hexdigest()[:12]}.jpg"
    if page_id not in shown:
        image = _picture(evalset, page_id)
        image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
        image.save(folder / name, quality=85)
        shown.add(page_id)
    return name


PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>Retrieval report</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
/* a model path or a page id longer than a phone's width breaks rather than widen the page (issue 31) */
body {{ font-family: sans-serif; margin: 1em; overflow-wrap: break-word; }}
.query {{ border-top: 1px solid #ccc; padding: .5em 0; }}
.query.missed > p {{ color: #a00; }}
figure {{ display: inline-block; margin: 4px; border: 3px solid transparent; text-align: center; }}
figure.relevant {{ border-color: #0a0; }}
figcaption {{ font-size: 11px; max-width: 220px; overflow-wrap: anywhere; }}
table {{ border-collapse: collapse; margin: .5em 0; }}
td, th {{ border: 1px solid #ccc; padding: 2px 6px; text-align: left; }}
/* in a table only the names break, between their folders (<wbr>), and the numbers keep whole; on a phone the
   comparisons' two name columns fit in a smaller type */
td.name {{ overflow-wrap: break-word; }}
@media (max-width: 480px) {{ table.comparisons {{ font-size: 12px; }} }}
tr.significant {{ font-weight: bold; }}
</style></head><body>
<h1>Top-5 pages per query</h1>
<p>Relevant pages have a green frame; queries whose relevant page is not in the top 5 are red.</p>
{body}
</body></html>
"""
