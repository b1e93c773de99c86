"""A language's data preparation settings, derived from maintained data instead of a hand-written table.

- the script: CLDR's likely subtags (`langcodes`: `dz` -> `Tibt`);
- the script's characters, for the garble check: Unicode's Scripts.txt as fontTools ships it;
- the OCR model: Tesseract's model for the language (`dzo`), else the one for its script (`Tibetan`; `script/Tibetan`
  in upstream's tessdata layout),
  among those installed (`tesseract --list-langs`) or installable (the Debian packages `tesseract-ocr-<model>`
  and `tesseract-ocr-script-<script>`, `apt-cache pkgnames`);
- the fonts: those fontconfig says cover the language (`fc-list :lang=dz`), Noto's for the script first;
- the Debian packages a fresh machine needs for them (`dpkg -S` of the font files), which set-up installs.

`write_recipe` writes all of it into a complete recipe whose other sections are those of the shipped recipes.
"""

import re
import shutil
import subprocess
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import langcodes
from fontTools import unicodedata as unicode_data

from common.errors import UsageError
from common.languages import language_name, likely_script

# Tesseract names its script models after Unicode's script names, except where one Unicode script has several
# models (Han) or a model covers a writing system rather than a script
TESSERACT_SCRIPT_NAMES = {"Hans": "HanS", "Hant": "HanT", "Jpan": "Japanese", "Kore": "Hangul"}
# ISO 15924 codes for writing systems that Unicode's Scripts.txt splits into several scripts, or lumps into one
UNICODE_SCRIPTS = {"Hans": ("Hani",), "Hant": ("Hani",), "Jpan": ("Hani", "Hira", "Kana"), "Kore": ("Hang", "Hani")}
FONT_STYLE_ORDER = ("Serif", "Sans", "Looped")  # the order of the shipped recipes' fonts
MAX_FONTS = 3
NOTO_PACKAGES = ("fonts-noto-core", "fonts-noto-extra", "fonts-noto-cjk")
TEMPLATE_RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "en.yaml"


@dataclass(frozen=True)
class LanguageData:
    """What `data_prep recipe` derives for a language, each value with the source it came from."""

    code: str
    name: str
    script: str  # ISO 15924
    tesseract_langs: str
    tesseract_source: str
    script_ranges: list[str]
    fonts: list[str]
    font_source: str
    debian_packages: list[str]


def script_name(script: str) -> str:
    """Unicode's name of an ISO 15924 script code (`Tibt` -> `Tibetan`)."""
    base = UNICODE_SCRIPTS.get(script, (script,))[0]
    return unicode_data.Scripts.NAMES.get(base, script).replace("_", " ")


def script_ranges(script: str) -> list[str]:
    """The code point ranges Unicode assigns to `script` (Scripts.txt), adjacent ones merged, as `0F00-0F47`."""
    wanted = UNICODE_SCRIPTS.get(script, (script,))
    starts, values = unicode_data.Scripts.RANGES, unicode_data.Scripts.VALUES
    merged: list[list[int]] = []
    for index, value in enumerate(values):
        if value not in wanted:
            continue
        low = starts[index]
        high = (starts[index + 1] if index + 1 < len(starts) else 0x110000) - 1
        if merged and merged[-1][1] + 1 == low:
            merged[-1][1] = high
        else:
            merged.append([low, high])
    return [f"{low:04X}-{high:04X}" for low, high in merged]


def tesseract_script_model(script: str) -> str:
    """Tesseract's model for a script (`Tibt` -> `Tibetan`): Debian installs it as `Tibetan`, upstream's tessdata
    as `script/Tibetan`; language models are named in lower case."""
    return TESSERACT_SCRIPT_NAMES.get(script, script_name(script).replace(" ", "_"))


def debian_package(model: str) -> str:
    """The Debian package carrying a Tesseract model (`Tibetan` or `script/Tibetan` -> `tesseract-ocr-script-tibt`)."""
    name = model.removeprefix("script/")
    if name[:1].isupper():
        codes = {tesseract_script_model(code): code for code in _script_codes()}
        return f"tesseract-ocr-script-{codes.get(name, name).lower()}"
    return "tesseract-ocr-" + name.lower().replace("_", "-")


@cache
def installed_tesseract_models() -> frozenset[str]:
    if shutil.which("tesseract") is None:
        return frozenset()
    listing = subprocess.run(["tesseract", "--list-langs"], capture_output=True, text=True, check=False).stdout
    return frozenset(line.strip() for line in listing.splitlines()[1:] if line.strip())


@cache
def installable_packages(prefix: str) -> frozenset[str]:
    """Debian packages whose names start with `prefix` that apt can install here (none without apt)."""
    if shutil.which("apt-cache") is None:
        return frozenset()
    listing = subprocess.run(["apt-cache", "pkgnames", prefix], capture_output=True, text=True, check=False).stdout
    return frozenset(listing.split())


def choose_tesseract_model(code: str, script: str) -> tuple[str, str]:
    """The language's own Tesseract model if there is one, else its script's; with where it was found."""
    language = langcodes.Language.get(code)
    alpha3 = {language.to_alpha3()}
    standard = langcodes.Language.get(langcodes.standardize_tag(code))  # CLDR's preferred code: tl -> fil
    alpha3.add(standard.to_alpha3())
    candidates = [f"{a3}_{script.lower()}" for a3 in sorted(alpha3)]
    if script == likely_script(code):  # a model named by the language alone reads it in its usual script
        candidates += sorted(alpha3, key=lambda a3: a3 != "fil")
    candidates += [tesseract_script_model(script), "script/" + tesseract_script_model(script)]
    installed, installable = installed_tesseract_models(), installable_packages("tesseract-ocr-")
    for model in candidates:
        if model in installed or (debian_package(model) in installable and not model.startswith("script/")):
            kind = "script" if debian_package(model).startswith("tesseract-ocr-script-") else "language"
            return model, f"Tesseract's {kind} model ({debian_package(model)})"
    raise UsageError(
        f"no Tesseract model reads {language_name(code)} ({code}) or its script {script_name(script)} ({script}): "
        f"tried {', '.join(candidates)}, none installed (tesseract --list-langs) nor installable (apt-cache). "
        "Train or download a model into Tesseract's tessdata folder and write the recipe by hand "
        "(data_prep.tesseract_langs), or prepare this language's pages with --ocr never."
    )


def _font_families(pattern: str) -> list[tuple[str, str]]:
    """(family, file) of the installed fonts fontconfig matches against `pattern`."""
    if shutil.which("fc-list") is None:
        return []
    listing = subprocess.run(
        ["fc-list", "--format", "%{family[0]}\t%{file}\n", pattern], capture_output=True, text=True, check=False
    ).stdout
    return [tuple(line.split("\t", 1)) for line in listing.splitlines() if "\t" in line]


def choose_fonts(code: str, script: str) -> tuple[list[str], list[str], str]:
    """(families, their files, where they came from): Noto's families for the script among those fontconfig says
    cover the language, else Noto's plain Serif and Sans (which cover Latin, Greek and Cyrillic), else the first
    few of the others. Languages fontconfig has no orthography for are matched by the script's letters."""
    found = _font_families(f":lang={code}")
    source = f"fc-list :lang={code}"
    if not found:
        letters = _script_letters(script)
        sample = [f"{point:x}" for point in letters[:: max(1, len(letters) // 8)][:8]]  # 8 spread over the script
        found = _font_families(":charset=" + " ".join(sample)) if sample else []
        source = f"fc-list covering {script_name(script)} letters"
    files = {}
    for family, file in found:
        files.setdefault(family, file)
    name = script_name(script)

    def noto_rank(family: str) -> int:
        style = family.split()[1] if family.count(" ") >= 1 else ""
        return FONT_STYLE_ORDER.index(style) if style in FONT_STYLE_ORDER else len(FONT_STYLE_ORDER)

    for wanted in (
        lambda family: family.startswith("Noto ") and family.endswith(" " + name) and " UI" not in family,
        lambda family: family in ("Noto Serif", "Noto Sans"),
        lambda family: True,
    ):
        families = sorted((f for f in files if wanted(f)), key=lambda f: (noto_rank(f), f))[:MAX_FONTS]
        if families:
            return families, [files[f] for f in families], source
    raise UsageError(
        f"no installed font covers {language_name(code)} ({code}, {name} script; fontconfig: {source}). "
        f"Install a font for it, e.g. the Debian package {_font_package_hint(name)}, then run this again."
    )


def _script_letters(script: str) -> list[int]:
    return [
        point
        for text in script_ranges(script)
        for point in range(int(text.split("-")[0], 16), int(text.split("-")[1], 16) + 1)
        if unicode_data.category(chr(point)).startswith("L")
    ]


def _font_package_hint(name: str) -> str:
    """Debian font packages that may cover a script: those whose description names it, else Noto's."""
    named = []
    if shutil.which("apt-cache"):
        search = ["apt-cache", "search", "--full", rf"\b{name}\b"]  # --full: the description, not only its first line
        listing = subprocess.run(search, capture_output=True, text=True, check=False).stdout
        named = re.findall(r"^Package: (fonts-\S+)$", listing, re.MULTILINE)
    noto = [package for package in NOTO_PACKAGES if not _installed(package)]
    return " or ".join(dict.fromkeys(named[:3] + noto)) or "fonts-noto-extra"


def _installed(package: str) -> bool:
    if shutil.which("dpkg-query") is None:
        return False
    status = ["dpkg-query", "-W", "-f=${Status}", package]
    return "install ok installed" in subprocess.run(status, capture_output=True, text=True, check=False).stdout


def font_packages(files: list[str]) -> list[str]:
    """The Debian packages that installed the font files (none for fonts installed by hand)."""
    if not files or shutil.which("dpkg") is None:
        return []
    listing = subprocess.run(["dpkg", "-S", *files], capture_output=True, text=True, check=False).stdout
    return sorted({line.split(":", 1)[0] for line in listing.splitlines() if ":" in line})


def derive_language_data(code: str, script: str | None = None) -> LanguageData:
    """Everything `data_prep recipe` writes for `code`, in `script` (default: the language's likely script);
    `UsageError` naming the fix when no OCR model or no font covers it."""
    if script is not None and script not in unicode_data.Scripts.NAMES and script not in TESSERACT_SCRIPT_NAMES:
        raise UsageError(f"--script {script!r} is not an ISO 15924 script code Unicode knows (e.g. Tibt, Java, Latn).")
    script = script or likely_script(code)
    model, tesseract_source = choose_tesseract_model(code, script)
    fonts, files, font_source = choose_fonts(code, script)
    tesseract_langs = model if model == "eng" else f"{model}+eng"
    packages = ["tesseract-ocr-eng"] + ([debian_package(model)] if model != "eng" else []) + font_packages(files)
    return LanguageData(
        code=code,
        name=language_name(code),
        script=script,
        tesseract_langs=tesseract_langs,
        tesseract_source=tesseract_source,
        script_ranges=script_ranges(script),
        fonts=fonts,
        font_source=font_source,
        debian_packages=sorted(set(packages)),
    )


def write_recipe(data: LanguageData) -> str:
    """The recipe for `data.code`: the shipped recipes' sections (TEMPLATE_RECIPE's, for its language's paths
    and commands) with the derived data_prep values, each commented with where it came from."""
    template = TEMPLATE_RECIPE.read_text(encoding="utf-8")
    template_code = re.search(r"^lang: (\S+)$", template, re.MULTILINE).group(1)
    derived = {
        "tesseract_langs": (
            data.tesseract_langs,
            f"derived: {data.tesseract_source}; eng for the Latin bits of pages",
        ),
        "script_ranges": (
            "[" + ", ".join(data.script_ranges) + "]",
            f"derived: Unicode Scripts.txt, {script_name(data.script)} ({data.script})"
            + (", CLDR's likely script" if data.script == likely_script(data.code) else ", given by --script"),
        ),
        "fonts": ("[" + ", ".join(data.fonts) + "]", f"derived: {data.font_source}, Noto first"),
        "debian_packages": (
            "[" + ", ".join(data.debian_packages) + "]",
            "derived: the OCR model's package and dpkg -S of the fonts; set-up installs them",
        ),
        "ocr_dpi": ("144", "the default; bench/render_cer.py measures the best for a script"),
    }
    lines = []
    for line in template.splitlines():
        line = re.sub(rf"\b(checkpoints|recipes)/{template_code}\b", rf"\1/{data.code}", line)
        line = re.sub(rf"--lang {template_code}\b", f"--lang {data.code}", line)
        if line.startswith("# ") and f"({template_code})" in line:
            line = (
                f"# {data.name} ({data.code}), written by python -m data_prep recipe --lang {data.code}"
                + (line.split(")", 1)[1])
            )
        elif line.startswith("lang:"):
            line = f"lang: {data.code}"
        key = line.strip().split(":", 1)[0]
        if line.startswith("  ") and not line.startswith("   ") and key in derived:
            value, comment = derived.pop(key)
            line = f"  {key}: {value}   # {comment}"
        lines.append(line)
    if derived:  # keys the template leaves to their defaults go after the section's first line
        index = lines.index("data_prep:") + 1
        lines[index:index] = [f"  {key}: {value}   # {comment}" for key, (value, comment) in derived.items()]
    return "\n".join(lines) + "\n"


def _script_codes() -> list[str]:
    return [*unicode_data.Scripts.NAMES, *TESSERACT_SCRIPT_NAMES]
