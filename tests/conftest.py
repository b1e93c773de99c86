import gc
import os
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from stages.base_model import BaseModelArguments, build_tiny_base_model

REPO = Path(__file__).resolve().parents[1]
# DeepSpeed's CPU ops compile on first use (about 35 s): one cache for every test and every test run
DEEPSPEED_ENV = {
    "OMP_NUM_THREADS": "1",
    "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions")),
}
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
    import pymupdf  # here, not at the top: tests/test_gpu.py collects where it is not installed (bench/gpu_kit.py)

    document = pymupdf.open()
    page = document.new_page(width=320, height=220)
    page.insert_htmlbox(
        page.rect + (12, 12, -12, -12),
        f"<p style='font-family: Noto Sans Thai'>{THAI}</p><p style='font-family: Noto Sans Khmer'>{KHMER}</p>",
    )
    pixmap = page.get_pixmap(dpi=96)
    return Image.frombytes("RGB", (pixmap.width, pixmap.height), pixmap.samples)


def thai_pages_dataset(folder: Path, documents: int, chars: int, bookmarks: bool = False) -> Path:
    """A text-layer Thai pages dataset of `documents` two-page PDFs (UDHR paragraphs), optionally
    with a bookmark on each document's first page."""
    import pymupdf

    from data_prep.pages import PageSettings, build_pages_dataset

    paragraphs = (REPO / "samples/udhr/th.md").read_text(encoding="utf-8").split("\n\n")
    for doc in range(documents):
        document = pymupdf.open()
        for page_number in range(2):
            page = document.new_page(width=300, height=300)
            text = paragraphs[2 + doc * 2 + page_number][:chars]
            page.insert_htmlbox(page.rect + (10, 10, -10, -10), f"<p style='font-family: Noto Sans Thai'>{text}</p>")
        if bookmarks:
            document.set_toc([[1, paragraphs[2 + doc * 2][:12], 1]])
        document.save(folder / f"doc{doc}.pdf")
    settings = PageSettings("th", 72, 50_000, "never", 144, "tha", ("0E00-0E7F",))
    build_pages_dataset([str(folder)], str(folder / "pages"), settings, workers=1, resume=False, max_skip_fraction=0.0)
    return folder / "pages"


@pytest.fixture(scope="session")
def recorded_base(tmp_path_factory):
    """The tiny base model written by its command, so it has a run record to chain to."""
    from stages.base_model import main as build_base_model

    folder = tmp_path_factory.mktemp("base") / "base"
    build_base_model(["--config", str(REPO / "recipes/tiny.yaml"), "--output_dir", str(folder)])
    return folder


@pytest.fixture
def tmpfs(tmp_path):
    """mount(size, *options) -> a fresh tmpfs of `size` under tmp_path (options such as "ro"); every one is
    unmounted afterwards. Mounting needs root (as the tests run here and in CI); elsewhere the test skips."""
    mounts = []

    def mount(size: str = "2M", *options: str) -> Path:
        folder = tmp_path / f"disk{len(mounts)}"
        folder.mkdir()
        try:
            result = subprocess.run(
                ["mount", "-t", "tmpfs", "-o", ",".join([f"size={size}", *options]), "tmpfs", str(folder)],
                capture_output=True,
                text=True,
            )
        except FileNotFoundError:
            pytest.skip("no `mount` command here: the test mounts a tmpfs")
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip()}): the test needs root")
        mounts.append(folder)
        return folder

    yield mount
    gc.collect()  # frames of failed writes may still hold files open on the disk
    for folder in mounts:
        if subprocess.run(["umount", str(folder)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "--lazy", str(folder)], check=True)
