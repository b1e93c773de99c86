"""Text to realistic PDFs: title, headings, paragraphs, lists, one or two columns, several fonts and
sizes, page numbers, bookmarks. Headless Chromium lays the pages out.

Why Chromium: pymupdf's HTML layout shapes Thai, Lao, Khmer and Burmese correctly but breaks lines only
at spaces, so lines of these scripts (written without spaces between words) overflow or end ragged;
Chromium breaks them at word boundaries (ICU dictionaries), supports CSS columns, page margin boxes
(page numbers) and writes the PDF outline from the headings, which `evalset` turns into queries.
"""

import hashlib
import html
import json
import os
import random
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from common.artifacts import atomic_directory, prepare_work_folder, write_text_atomic
from common.errors import UsageError
from common.run_record import sha256_file

TEXT_SUFFIXES = (".md", ".txt")
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-pdf-header-footer",
    "--generate-pdf-document-outline",
)
CHROMIUM_TIMEOUT_S = 120


@dataclass(frozen=True)
class Style:
    font: str
    font_size_pt: float
    columns: int
    align: str
    page_size: str
    heading_color: str


def find_chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    raise UsageError("Chromium is not installed; install the Debian package chromium (setup/install.sh does).")


def find_texts(inputs: list[str]) -> list[Path]:
    found: dict[Path, None] = {}
    for entry in map(Path, inputs):
        files = sorted(p for p in entry.rglob("*") if p.suffix in TEXT_SUFFIXES) if entry.is_dir() else [entry]
        found.update(dict.fromkeys(files))
    if not found:
        raise UsageError(f"--input {' '.join(inputs)}: no .md or .txt files found.")
    return list(found)


def parse_blocks(text: str) -> list[tuple[str, str]]:
    """(kind, text) blocks: `# ` title, `## ` heading, `- ` list item, other paragraphs.

    Plain text works too: paragraphs are separated by blank lines, and a short first line is the title.
    """
    blocks = []
    for paragraph in (p.strip() for p in text.replace("\r\n", "\n").split("\n\n")):
        for line in paragraph.split("\n") if paragraph.startswith(("#", "- ")) else [paragraph]:
            line = " ".join(line.split())
            if not line:
                continue
            if line.startswith("## "):
                blocks.append(("h2", line[3:]))
            elif line.startswith("# "):
                blocks.append(("h1", line[2:]))
            elif line.startswith("- "):
                blocks.append(("li", line[2:]))
            else:
                blocks.append(("p", line))
    if blocks and blocks[0][0] == "p" and len(blocks[0][1]) <= 80 and len(blocks) > 1:
        blocks[0] = ("h1", blocks[0][1])
    return blocks


def choose_style(fonts: list[str], seed: int, name: str) -> Style:
    """A document's look, drawn deterministically from the seed and the document's name."""
    rng = random.Random(f"{seed}:{name}")
    return Style(
        font=rng.choice(fonts),
        font_size_pt=rng.choice([10.5, 11.0, 12.0]),
        columns=rng.choices([1, 2], weights=[2, 1])[0],
        align=rng.choice(["start", "justify"]),
        page_size=rng.choice(["A4", "letter"]),
        heading_color=rng.choice(["#111111", "#1f3a68", "#5a1a1a"]),
    )


def document_html(blocks: list[tuple[str, str]], lang: str, style: Style, section_pages: bool = False) -> str:
    body, in_list = [], False
    for kind, text in blocks:
        if kind == "li" and not in_list:
            body.append("<ul>")
        if kind != "li" and in_list:
            body.append("</ul>")
        in_list = kind == "li"
        body.append(f"<{kind}>{html.escape(text)}</{kind}>")
    if in_list:
        body.append("</ul>")
    title = html.escape(next((text for kind, text in blocks if kind == "h1"), ""))
    # line-height: normal takes each font's own metrics, which leave room for stacked marks (Khmer, Burmese)
    css = f"""
@page {{ size: {style.page_size}; margin: 20mm 18mm 22mm 18mm;
  @bottom-center {{ content: counter(page); font-family: "{style.font}", sans-serif; font-size: 9pt; color: #444; }} }}
html {{ font-family: "{style.font}", "Noto Sans", sans-serif; font-size: {style.font_size_pt}pt;
       line-height: normal; color: #111; }}
body {{ margin: 0; }}
.columns {{ column-count: {style.columns}; column-gap: 8mm; }}
h1 {{ font-size: 1.7em; margin: 0 0 0.6em 0; column-span: all; color: {style.heading_color}; }}
h2 {{ font-size: 1.2em; margin: 1em 0 0.3em 0; break-after: avoid; color: {style.heading_color}; }}
p {{ margin: 0 0 0.5em 0; text-align: {style.align}; orphans: 2; widows: 2; }}
ul {{ margin: 0 0 0.5em 0; padding-inline-start: 1.4em; }}
"""
    if section_pages:  # every section after the first on a page of its own (the first shares the title's); Chromium
        # breaks pages inside a multi-column box only at its end, so such documents flow in one column
        css += ".columns { columns: auto; }\nh2 ~ h2 { break-before: page; }\n"
    return (
        # dir="auto": the document's first letter sets the direction, so Hebrew, Arabic or Thaana pages run right to
        # left (lines, columns, list indents) as they are printed
        f'<!DOCTYPE html>\n<html lang="{lang}" dir="auto"><head><meta charset="utf-8"><title>{title}</title>'
        f'<style>{css}</style></head>\n<body><div class="columns">\n' + "\n".join(body) + "\n</div></body></html>\n"
    )


def print_pdf(chromium: str, html_text: str, pdf_path: Path) -> None:
    """Lay `html_text` out with Chromium into `pdf_path`, byte for byte the same on every run."""
    import pymupdf

    with tempfile.TemporaryDirectory(prefix="render-") as tmp:
        page, printed = Path(tmp) / "document.html", Path(tmp) / "printed.pdf"
        page.write_text(html_text, encoding="utf-8")
        # a profile folder of its own: parallel Chromiums sharing one refuse to start
        command = [
            chromium,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={tmp}/profile",
            f"--print-to-pdf={printed}",
            page.as_uri(),
        ]
        result = subprocess.run(command, capture_output=True, text=True, timeout=CHROMIUM_TIMEOUT_S)
        if result.returncode != 0 or not printed.is_file():
            raise RuntimeError(f"chromium exited with {result.returncode}: {result.stderr.strip()[-300:]}")
        # Chromium stamps the time into the PDF
        with pymupdf.open(printed) as document:
            save_pdf_reproducibly(document, pdf_path)


def save_pdf_reproducibly(document, path: Path) -> None:
    """Save a pymupdf document without time stamps or a random file id: the same content gives the same bytes, so the
    same document id downstream (`data_prep pages` names a document by its file's hash)."""
    document.set_metadata({**document.metadata, "creationDate": "", "modDate": ""})
    document.save(path, garbage=3, deflate=True, no_new_id=True)


def render_documents(
    inputs: list[str],
    output: str,
    *,
    lang: str,
    fonts: list[str],
    seed: int,
    workers: int,
    resume: bool = False,
    section_pages: bool = False,
) -> dict:
    """Render every text file to `output/<name>.pdf`; write `render_manifest.json`. Returns the manifest.

    Each finished PDF and its manifest entry are kept in `.<output>.work/` first, so `resume` renders only
    the rest; the output folder appears, by a rename, only when complete."""
    chromium = find_chromium()
    texts = find_texts(inputs)
    names = _unique_names(texts)
    work = Path(output).with_name(f".{Path(output).name}.work")
    prepare_work_folder(work, {"lang": lang, "fonts": fonts, "seed": seed, "section_pages": section_pages}, resume)

    def render_one(path: Path) -> dict:
        name = names[path]
        marker = work / f"{name}.entry.json"
        if marker.is_file():
            return json.loads(marker.read_text(encoding="utf-8"))
        entry = {"path": str(path), "sha256": sha256_file(path), "pdf": f"{name}.pdf"}
        blocks = parse_blocks(path.read_text(encoding="utf-8"))
        style = choose_style(fonts, seed, name)
        if not blocks:
            entry |= {"reason": "no text"}
        else:
            try:
                html_text = document_html(blocks, lang, style, section_pages)
                print_pdf(chromium, html_text, work / f".{name}.tmp.pdf")
                os.replace(work / f".{name}.tmp.pdf", work / f"{name}.pdf")
                entry |= {"style": vars(style)}
            except (RuntimeError, subprocess.TimeoutExpired, OSError) as error:
                entry |= {"reason": str(error)}
        write_text_atomic(marker, json.dumps(entry, ensure_ascii=False))
        return entry

    with ThreadPoolExecutor(max_workers=workers) as pool:
        entries = list(pool.map(render_one, texts))
    version = subprocess.run([chromium, "--version"], capture_output=True, text=True, timeout=60).stdout.strip()
    manifest = {
        "lang": lang,
        "seed": seed,
        "section_pages": section_pages,
        "tools": {"chromium": version},
        "documents": [e for e in entries if "reason" not in e],
        "skipped": [{"path": e["path"], "reason": e["reason"]} for e in entries if "reason" in e],
    }
    with atomic_directory(output) as tmp:
        for entry in manifest["documents"]:
            shutil.copyfile(work / entry["pdf"], tmp / entry["pdf"])
        (tmp / "render_manifest.json").write_text(
            json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
    shutil.rmtree(work)
    return manifest


def _unique_names(paths: list[Path]) -> dict[Path, str]:
    """File stems, disambiguated by a short hash of the path when two inputs share a stem."""
    stems = [path.stem for path in paths]
    return {
        path: path.stem
        if stems.count(path.stem) == 1
        else f"{path.stem}-{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"
        for path in paths
    }
