"""Language codes: any language CLDR knows (via `langcodes`), written as ISO 639-1 where one exists (SeaDoc's
convention), ISO 639-3 otherwise; 639-3 and 639-2/B codes (`khm`, `bur`) and CLDR's aliases are accepted."""

import langcodes

from .errors import UsageError

# the embedded default: several languages in one tiny recipe
MULTI = "multi"
# Where CLDR's preferred code differs from the one SeaDoc and this project's recipes use (CLDR replaces `tl` by
# `fil`; `zlm`, Malaysian Malay, is the Malay that SeaDoc's `ms` pages are in).
PROJECT_CODES = {"fil": "tl", "zlm": "ms"}


def normalize_lang(value: str) -> str:
    """Return the canonical code for `value` (`khm` -> `km`); raise `UsageError` for a code no standard has."""
    code = value.strip().lower().replace("_", "-")
    if code == MULTI:
        return code
    try:
        tag = langcodes.standardize_tag(code, macro=True)
    except ValueError:
        tag = None
    language = langcodes.Language.get(tag) if tag else None
    if language is None or not language.is_valid() or language.language in (None, "und"):
        raise UsageError(
            f"unknown language {value!r}: not an ISO 639 code CLDR knows. Give the language's ISO 639-1 code "
            "(e.g. km) or ISO 639-3 code (e.g. khm); https://iso639-3.sil.org lists them."
        )
    if tag != language.language:
        raise UsageError(
            f"language {value!r}: give the language code alone ({language.language!r}), no script or region."
        )
    return PROJECT_CODES.get(language.language, language.language)


def language_name(code: str) -> str:
    """The language's English name (`km` -> `Khmer`)."""
    return "several languages" if code == MULTI else langcodes.Language.get(code).display_name()


def likely_script(code: str) -> str:
    """The ISO 15924 code of the script the language is most likely written in (CLDR likely subtags: `km` -> `Khmr`)."""
    return langcodes.Language.get(code).maximize().script
