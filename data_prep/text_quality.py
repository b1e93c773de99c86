"""Is a PDF's text layer usable, or missing/garbled so the page must be OCR'd?

Broken font encodings (common for Khmer, Lao, Burmese and Thai PDFs) show up as characters of other
scripts or digits inside words of the language's script ("ที-เป7น"), combining marks with no base
letter (a line starting with a vowel sign), replacement characters, or private-use/control
characters where glyph ids leaked through.
"""

import re
import unicodedata

MIN_CHARACTERS = 20  # fewer visible characters than this on a page: no usable text layer
MAX_REPLACEMENT_FRACTION = 0.005
MAX_JUNK_FRACTION = 0.01
MIN_SCRIPT_FRACTION = 0.5  # of the letters and marks, this share must be in the language's script
MAX_BROKEN_FRACTION = 0.01  # intruders inside words + orphan marks, per character of the script
CID_PATTERN = re.compile(r"\(cid:\d+\)")


def parse_ranges(ranges: list[str]) -> list[tuple[int, int]]:
    return [tuple(int(bound, 16) for bound in value.split("-")) for value in ranges]


def text_layer_problem(text: str, script_ranges: list[tuple[int, int]]) -> str | None:
    """Return why `text` is not a usable text layer for a page in this script, or None if it is."""
    visible = [char for char in text if not char.isspace()]
    if len(visible) < MIN_CHARACTERS:
        return f"too few characters ({len(visible)})"
    if visible.count("\ufffd") > MAX_REPLACEMENT_FRACTION * len(visible):
        return f"replacement characters ({visible.count(chr(0xFFFD))} of {len(visible)})"
    junk = sum(_is_junk(char) for char in visible) + 6 * len(CID_PATTERN.findall(text))
    if junk > MAX_JUNK_FRACTION * len(visible):
        return f"glyph-id junk ({junk} of {len(visible)} characters private-use, control or (cid:N))"

    def in_script(char: str) -> bool:
        return any(low <= ord(char) <= high for low, high in script_ranges)

    lettered = [char for char in visible if unicodedata.category(char)[0] in "LM"]
    in_script_count = sum(map(in_script, lettered))
    if in_script_count < MIN_SCRIPT_FRACTION * len(lettered):
        return f"too few characters in the language's script ({in_script_count} of {len(lettered)} letters)"

    broken = 0
    for index, char in enumerate(text):
        before = text[index - 1] if index else " "
        after = text[index + 1] if index + 1 < len(text) else " "
        if not in_script(char) and not char.isspace() and in_script(before) and in_script(after):
            broken += 1  # a foreign character inside a word of the script
        elif unicodedata.category(char) in ("Mn", "Mc") and before.isspace():
            broken += 1  # a combining mark with no base letter
    if broken > MAX_BROKEN_FRACTION * max(in_script_count, 1):
        return f"garbled encoding ({broken} broken characters per {in_script_count} in the script)"
    return None


def _is_junk(char: str) -> bool:
    category = unicodedata.category(char)
    return category in ("Co", "Cs", "Cn") or (category == "Cc" and char not in "\t\n\r")
