"""Language codes: ISO 639-1 where one exists (SeaDoc's convention), ISO 639-3 accepted as aliases."""

from .errors import UsageError

# code -> (ISO 639-3 aliases, English name)
LANGUAGES = {
    "en": (("eng",), "English"),
    "th": (("tha",), "Thai"),
    "lo": (("lao",), "Lao"),
    "km": (("khm",), "Khmer"),
    "my": (("mya", "bur"), "Burmese"),
    "vi": (("vie",), "Vietnamese"),
    "id": (("ind",), "Indonesian"),
    "ms": (("msa", "zlm", "may"), "Malay"),
    "tl": (("tgl", "fil"), "Tagalog"),
    # the embedded default: several languages in one tiny recipe
    "multi": ((), "several languages"),
}
_ALIASES = {alias: code for code, (aliases, _) in LANGUAGES.items() for alias in aliases}


def normalize_lang(value: str) -> str:
    """Return the canonical code for `value` (`khm` -> `km`); raise `UsageError` for unknown codes."""
    code = value.strip().lower()
    code = _ALIASES.get(code, code)
    if code not in LANGUAGES:
        known = ", ".join(sorted(LANGUAGES))
        raise UsageError(
            f"unknown language {value!r}; known codes: {known} (ISO 639-3 aliases such as 'khm' also work). "
            "To add a language, add it to common/languages.py and write recipes/<code>.yaml."
        )
    return code
