"""The evaluation report (lco/report.py) in headless Chromium at a phone's width and a desktop's: nothing wider than
the window, so nothing is cut off or needs sideways scrolling. The search page's check is in tests/test_serve.py."""

import pytest

from bench.screenshots import WIDTHS, browser, layout_problems, open_page
from lco.report import write_report
from lco.retrieval import load_evalset

from .test_evaluate import seadoc  # noqa: F401 (a fixture)

# system names as the pipeline's report shows them: model folders, the longest 38 characters
MODELS = ["checkpoints/tiny/base", "checkpoints/tiny/contrast/final", "checkpoints/tiny/contrast-only/final"]


@pytest.fixture
def report(seadoc, tmp_path):  # noqa: F811
    evalset = load_evalset(str(seadoc))
    pages = sorted(evalset.pages)
    ranking = {pid: 1 / (1 + i) for i, pid in enumerate(pages)}
    runs = {model: dict.fromkeys(evalset.qrels, ranking) for model in MODELS}
    systems = ["random", "BM25 (page text)", *MODELS]
    comparisons = [
        {"system": a, "baseline": b, "difference": 0.123, "p_value": 0.5, "p_holm": 1.0, "significant": False}
        for i, a in enumerate(MODELS)
        for b in systems[: 2 + i]
    ]
    scores = {system: (0.5, [0.25, 0.75]) for system in systems}
    write_report(str(tmp_path / "report"), evalset, runs, 3, 0, scores=scores, comparisons=comparisons)
    return (tmp_path / "report" / "index.html").as_uri()


@pytest.mark.parametrize("width", WIDTHS)
def test_the_report_fits_the_window(report, width):
    with browser() as chromium:
        page = open_page(chromium, report, width)
        assert page.locator("figure img").count() == 5 * 3 * 3  # every thumbnail is there
        assert layout_problems(page) == []


# each rendered line of each model-name cell: the characters of its text grouped by their top edge
NAME_LINES = """() => [...document.querySelectorAll("td.name")].map((cell) => {
  const lines = new Map();
  const range = document.createRange();
  const walker = document.createTreeWalker(cell, NodeFilter.SHOW_TEXT);
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    for (let i = 0; i < node.length; i++) {
      range.setStart(node, i);
      range.setEnd(node, i + 1);
      const top = Math.round(range.getBoundingClientRect().top);
      lines.set(top, (lines.get(top) || "") + node.data[i]);
    }
  }
  return [...lines.values()];
})"""


def test_model_names_wrap_between_folders_on_a_phone(report):
    """A model's path in the report's tables wraps between its folders ("checkpoints/tiny/" "contrast/final") or at a
    hyphen, not within a word ("checkp" "oints/ti" "ny/bas" "e")."""
    with browser() as chromium:
        page = open_page(chromium, report, "phone")
        cells = page.evaluate(NAME_LINES)
    wrapped = [lines for lines in cells if len(lines) > 1 and "/" in "".join(lines)]
    assert wrapped  # the phone's width does wrap some names
    for lines in wrapped:
        assert all(line.endswith(("/", "-")) for line in lines[:-1]), lines
