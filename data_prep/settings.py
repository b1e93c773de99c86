"""Per-language data preparation settings (the `data_prep` section of a recipe) and their checks."""

import re
import shutil
from dataclasses import dataclass, field
from typing import Literal

from common.errors import UsageError

from .language_data import debian_package, installed_tesseract_models

SCRIPT_RANGE = re.compile(r"^[0-9A-Fa-f]{4,6}-[0-9A-Fa-f]{4,6}$")
DEBIAN_PACKAGE = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")  # Debian policy 5.6.1; set-up passes these to apt-get


@dataclass
class DataPrepSettings:
    tesseract_langs: str = field(default="eng", metadata={"help": "Tesseract languages for OCR, e.g. khm+eng."})
    script_ranges: list[str] = field(
        default_factory=lambda: ["0000-024F"],
        metadata={"help": "Unicode ranges (hex, e.g. 1780-17FF) of the language's script, for the garble check."},
    )
    fonts: list[str] = field(default_factory=lambda: ["Noto Sans"], metadata={"help": "Fonts for rendering."})
    debian_packages: list[str] = field(
        default_factory=list,
        metadata={"help": "Debian packages of the OCR model and fonts; setup/install.sh installs those of recipes/."},
    )
    dpi: int = field(default=144, metadata={"help": "Render resolution; higher = sharper pages, more pixels."})
    max_pixels: int = field(default=1003520, metadata={"help": "Pixel cap per page image (aspect ratio kept)."})
    ocr_dpi: int = field(
        default=144, metadata={"help": "Resolution Tesseract reads pages at; its models prefer their glyph size."}
    )
    ocr: Literal["auto", "always", "never"] = field(
        default="auto", metadata={"help": "auto: OCR pages whose text layer is missing or garbled."}
    )
    workers: int = field(default=2, metadata={"help": "Processes, one document each at a time."})
    max_skip_fraction: float = field(
        default=0.1, metadata={"help": "Fail (exit 1) when more than this share of inputs is unreadable."}
    )
    page_timeout_s: float = field(
        default=300.0,
        metadata={"help": "pages: a PDF that finishes no page (open, render, OCR) in this time is skipped as hung."},
    )
    document_memory_mb: int = field(
        default=8192,
        metadata={
            "help": "pages: address-space cap of each document's process (~700 MB is taken before any page); "
            "a PDF needing more is skipped. A document's page images are held until it is done: "
            "higher = longer scanned books fit."
        },
    )

    def validate(self) -> None:
        for value in self.script_ranges:
            if not SCRIPT_RANGE.match(value):
                raise UsageError(f"script_ranges: {value!r} is not a hex range like 1780-17FF.")
        for package in self.debian_packages:
            if not DEBIAN_PACKAGE.match(package):
                raise UsageError(f"debian_packages: {package!r} is not a Debian package name (e.g. fonts-noto-core).")
        positive = (self.dpi, self.ocr_dpi, self.max_pixels, self.workers, self.page_timeout_s, self.document_memory_mb)
        if min(positive) <= 0:
            raise UsageError(
                "dpi, ocr_dpi, max_pixels, workers, page_timeout_s and document_memory_mb must be positive."
            )
        if not 0.0 <= self.max_skip_fraction <= 1.0:
            raise UsageError(f"max_skip_fraction must be in [0, 1], got {self.max_skip_fraction}.")

    def check_tesseract(self) -> None:
        """Fail before any work if OCR may run and Tesseract or a language pack is missing."""
        if self.ocr == "never":
            return
        if shutil.which("tesseract") is None:
            raise UsageError(
                "tesseract is not installed; install the Debian package tesseract-ocr (the README's set-up does), "
                "or pass --ocr never."
            )
        # `tesseract --list-langs`: pytesseract's list leaves out script models named in capitals (Myanmar)
        installed = installed_tesseract_models()
        missing = [lang for lang in self.tesseract_langs.split("+") if lang not in installed]
        if missing:
            packages = " ".join(debian_package(lang) for lang in missing)
            raise UsageError(
                f"Tesseract language data missing for {', '.join(missing)} (tesseract_langs={self.tesseract_langs}); "
                f"install the Debian package(s) {packages}, or pass --ocr never."
            )
