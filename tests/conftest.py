from pathlib import Path

import pymupdf
import pytest
from PIL import Image

from stages.base_model import BaseModelArguments, build_tiny_base_model

REPO = Path(__file__).resolve().parents[1]
THAI = "มนุษย์ทั้งหลายเกิดมามีอิสระและเสมอภาคกันในเกียรติศักดิ์และสิทธิ"
KHMER = "មនុស្សទាំងអស់ កើតមកមានសេរីភាព និងសមភាព ក្នុងសេចក្ដីថ្លៃថ្នូរ និងសិទ្ធិ"


def tiny_args(**overrides) -> BaseModelArguments:
    return BaseModelArguments(**{"tokenizer_corpus": [str(REPO / "samples" / "udhr")], **overrides})


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """(model, processor, folder): the tiny Qwen2.5-VL, built once and saved for the session."""
    model, processor = build_tiny_base_model(tiny_args(), seed=0)
    folder = tmp_path_factory.mktemp("tiny") / "base"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return model, processor, folder


@pytest.fixture(scope="session")
def thai_khmer_page() -> Image.Image:
    """A page image with Thai and Khmer text, shaped by MuPDF's HTML layout with Noto fonts."""
    document = pymupdf.open()
    page = document.new_page(width=320, height=220)
    page.insert_htmlbox(
        page.rect + (12, 12, -12, -12),
        f"<p style='font-family: Noto Sans Thai'>{THAI}</p><p style='font-family: Noto Sans Khmer'>{KHMER}</p>",
    )
    pixmap = page.get_pixmap(dpi=96)
    return Image.frombytes("RGB", (pixmap.width, pixmap.height), pixmap.samples)
