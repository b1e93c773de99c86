"""The evaluation report and the search page as a user sees them, in headless Chromium at a phone's width and a
desktop's: screenshots for the docs (docs/img/{report,search}-{phone,desktop}.png), and what is cut off.

    .venv/bin/python -m bench.screenshots [--report checkpoints/tiny/evaluation/report] \
        [--index checkpoints/tiny/contrast-index] [--query "..."] [--output docs/img]

After `make demo` and its `python -m stages.index` command (`make screenshots` runs both). The search page is
served by `python -m stages.serve` on a free port and shown with the results of `--query`. tests/test_layout.py
checks the same pages, built small, for anything wider than the window.
"""

import argparse
import json
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from PIL import Image

WIDTHS = {"phone": 390, "desktop": 1280}
HEIGHTS = {"phone": 844, "desktop": 800}
PALETTE_COLOURS = 128  # screenshots of text and thumbnails stay readable with a 128-colour palette, at ~1/3 the bytes

# the document's width and the elements that reach past `width` (their tag, class and right edge), in CSS pixels
OVERFLOW = """(width) => {
  const wide = [...document.querySelectorAll("body *")]
    .filter((e) => e.getBoundingClientRect().right > width + 0.5)
    .map((e) => `${e.tagName.toLowerCase()}.${e.className} right ${e.getBoundingClientRect().right}`);
  return { scrollWidth: document.documentElement.scrollWidth, wide: wide.slice(0, 10) };
}"""


def layout_problems(page) -> list[str]:
    """What is wider than the window on a loaded page: the document (a horizontal scrollbar, or on a phone a page
    laid out for a desktop's width and shrunk to fit, its text too small to read) and each element."""
    width = page.viewport_size["width"]
    found = page.evaluate(OVERFLOW, width)
    problems = [f"the document is {found['scrollWidth']} px wide in a {width} px window"]
    return (problems if found["scrollWidth"] > width else []) + found["wide"]


@contextmanager
def browser():
    """Headless Chromium, the set-up's own (data_prep.render.find_chromium), as tests/test_serve.py starts it."""
    from playwright.sync_api import sync_playwright

    from data_prep.render import find_chromium

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=find_chromium(), args=["--no-sandbox"])
        try:
            yield chromium
        finally:
            chromium.close()


def open_page(chromium, url: str, width: str):
    """A page at `url` in a window of the named width ("phone" is a touch screen, as phones are)."""
    phone = width == "phone"
    page = chromium.new_page(
        viewport={"width": WIDTHS[width], "height": HEIGHTS[width]}, is_mobile=phone, has_touch=phone
    )
    page.goto(url)
    return page


def search(page, query: str) -> None:
    """Type `query` into the search page and wait for the results' thumbnails."""
    page.locator("#q").fill(query)
    page.keyboard.press("Enter")
    page.wait_for_selector(".hit img")
    page.wait_for_function("[...document.querySelectorAll('.hit img')].every(i => i.complete)")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def serving(index: str):
    """`python -m stages.serve --index INDEX` on a free port; its address."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "stages.serve", "--index", index, "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"stages.serve exited: {process.stdout.read().decode()[-2000:]}")
            try:
                urllib.request.urlopen(url, timeout=5).read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("stages.serve did not answer in 120 s") from None
                time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def save_small(page, path: Path) -> None:
    """The window's screenshot as a palette PNG (a few tens of KB)."""
    page.screenshot(path=str(path))
    Image.open(path).convert("RGB").quantize(PALETTE_COLOURS).save(path, optimize=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", default="checkpoints/tiny/evaluation/report")
    parser.add_argument("--index", default="checkpoints/tiny/contrast-index")
    parser.add_argument("--query", default=None, help="Default: the first query of checkpoints/tiny/evalset.")
    parser.add_argument("--output", default="docs/img")
    args = parser.parse_args()
    query = args.query or json.loads(Path("checkpoints/tiny/evalset/queries.jsonl").read_text().splitlines()[0])["text"]
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    report = (Path(args.report) / "index.html").resolve().as_uri()
    with browser() as chromium, serving(args.index) as url:
        for width in WIDTHS:
            for name, address in (("report", report), ("search", url)):
                page = open_page(chromium, address, width)
                if name == "search":
                    search(page, query)
                problems = layout_problems(page)
                save_small(page, output / f"{name}-{width}.png")
                size = (output / f"{name}-{width}.png").stat().st_size // 1024
                print(f"{name} at {WIDTHS[width]} px: {size} KB" + (f"; cut off: {problems}" if problems else ""))
                page.close()


if __name__ == "__main__":
    main()
