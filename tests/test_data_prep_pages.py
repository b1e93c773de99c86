import difflib
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pymupdf
import pytest

import data_prep.cli as data_prep_cli
import data_prep.pages as pages_module
from common.errors import run_cli
from data_prep.pages import PageSettings, build_pages_dataset
from data_prep.text_quality import parse_ranges, text_layer_problem

from .conftest import REPO

KHMER = (REPO / "samples/udhr/km.md").read_text(encoding="utf-8").split("\n\n")[4][:220]
VIETNAMESE = (REPO / "samples/udhr/vi.md").read_text(encoding="utf-8").split("\n\n")[4]
THAI = (REPO / "samples/udhr/th.md").read_text(encoding="utf-8").split("\n\n")[4][:220]


def html_pdf(path, text, font, lang, pages=1, size=(420, 300)):
    document = pymupdf.open()
    for _ in range(pages):
        page = document.new_page(width=size[0], height=size[1])
        page.insert_htmlbox(
            page.rect + (20, 20, -20, -20), f"<p lang='{lang}' style='font-family: {font}; font-size: 14px'>{text}</p>"
        )
    document.save(path)
    return path


def scanned_pdf(path, source_pdf):
    """An image-only copy of `source_pdf`: what a scanner gives."""
    scan = pymupdf.open()
    for page in pymupdf.open(source_pdf):
        new = scan.new_page(width=page.rect.width, height=page.rect.height)
        new.insert_image(new.rect, pixmap=page.get_pixmap(dpi=200))
    scan.save(path)
    return path


def settings(lang="km", ocr="auto", dpi=144, max_pixels=1_003_520):
    recipe = {
        "km": ("khm+eng", ("1780-17FF", "19E0-19FF")),
        "vi": ("vie+eng", ("0041-005A", "0061-007A", "00C0-024F", "0300-036F", "1E00-1EFF")),
        "th": ("tha+eng", ("0E00-0E7F",)),
    }
    langs, ranges = recipe[lang]
    return PageSettings(
        lang=lang, dpi=dpi, max_pixels=max_pixels, ocr=ocr, ocr_dpi=144, tesseract_langs=langs, script_ranges=ranges
    )


def build(inputs, output, page_settings, workers=1, resume=False, max_skip_fraction=1.0):
    return build_pages_dataset(
        [str(p) for p in inputs],
        str(output),
        page_settings,
        workers=workers,
        resume=resume,
        max_skip_fraction=max_skip_fraction,
    )


def similarity(a: str, b: str) -> float:
    return difflib.SequenceMatcher(None, "".join(a.split()), "".join(b.split())).ratio()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pdfs")
    (folder / "sub").mkdir()
    files = {
        "vi": html_pdf(folder / "vi.pdf", VIETNAMESE, "Noto Serif", "vi", pages=2),
        "km": html_pdf(folder / "sub" / "km.pdf", KHMER, "Noto Sans Khmer", "km"),
    }
    files["scan"] = scanned_pdf(folder / "scan.pdf", files["km"])
    (folder / "notes.txt").write_text("not a pdf and not named .pdf: ignored")
    return folder, files


def test_garbled_khmer_layer_and_scans_are_ocrd_folders_searched_inputs_untouched(corpus, tmp_path):
    folder, files = corpus
    before = {path: hashlib.sha256(path.read_bytes()).hexdigest() for path in folder.rglob("*") if path.is_file()}
    manifest = build([folder / "sub", files["scan"]], tmp_path / "pages", settings("km"))

    assert manifest["counts"] == {
        "inputs": 2,
        "documents": 2,
        "skipped": 0,
        "pages": 2,
        "pages_layer": 0,
        "pages_ocr": 2,
    }
    dataset = datasets.load_from_disk(str(tmp_path / "pages"))
    assert {"doc_id", "page", "image", "text", "text_source", "lang"} <= set(dataset.column_names)
    assert [Path(row["source"]).name for row in dataset] == ["km.pdf", "scan.pdf"]  # input order
    for row in dataset:
        assert row["text_source"] == "ocr" and row["lang"] == "km" and row["image"].mode == "RGB"
        assert similarity(row["text"], KHMER) > 0.8, row["text"]
    assert all(hashlib.sha256(path.read_bytes()).hexdigest() == digest for path, digest in before.items())
    inputs = {Path(entry["path"]).name: entry for entry in manifest["inputs"]}
    assert inputs["scan.pdf"]["sha256"] == before[files["scan"]] and inputs["km.pdf"]["ocr_pages"] == 1
    assert json.loads((tmp_path / "pages" / "manifest.json").read_text())["fingerprint"] == manifest["fingerprint"]


def test_born_digital_latin_page_keeps_its_text_layer(corpus, tmp_path):
    _, files = corpus
    manifest = build([files["vi"]], tmp_path / "pages", settings("vi"))
    assert manifest["counts"]["pages_layer"] == 2
    row = datasets.load_from_disk(str(tmp_path / "pages"))[1]
    assert (row["page"], row["text_source"]) == (2, "layer")
    assert similarity(row["text"], VIETNAMESE) > 0.98
    assert "\n" in row["text"]  # line breaks kept


def test_ocr_never_and_always(corpus, tmp_path):
    _, files = corpus
    never = build([files["km"], files["vi"]], tmp_path / "never", settings("km", ocr="never"))
    assert never["counts"]["pages_ocr"] == 0
    always = build([files["vi"]], tmp_path / "always", settings("vi", ocr="always"))
    assert always["counts"]["pages_ocr"] == 2
    text = datasets.load_from_disk(str(tmp_path / "always"))[0]["text"]
    assert similarity(text, VIETNAMESE) > 0.9


def test_same_inputs_give_the_same_fingerprint_whatever_the_workers(corpus, tmp_path):
    _, files = corpus
    inputs = [files["vi"], files["km"]]
    one = build(inputs, tmp_path / "one", settings("km", ocr="never"), workers=1)
    two = build(inputs, tmp_path / "two", settings("km", ocr="never"), workers=2)
    assert one["fingerprint"] == two["fingerprint"]
    assert (
        datasets.load_from_disk(str(tmp_path / "one"))._fingerprint
        == datasets.load_from_disk(str(tmp_path / "two"))._fingerprint
    )
    other = build(inputs, tmp_path / "other", settings("km", ocr="never", dpi=100))
    assert other["fingerprint"] != one["fingerprint"]


def test_killed_run_leaves_no_dataset_and_resume_redoes_only_what_is_missing(corpus, tmp_path, monkeypatch):
    _, files = corpus
    inputs = [files["vi"], files["km"], files["scan"]]
    page_settings = settings("km", ocr="never")
    reference = build(inputs, tmp_path / "reference", page_settings)

    # documents are parsed in child processes: the run is killed (and its work recorded) here, in the parent
    real_run = pages_module._run

    def killed_after_the_first_document(*args, **kwargs):
        results = real_run(*args, **kwargs)
        yield next(results)
        results.close()
        raise KeyboardInterrupt

    monkeypatch.setattr(pages_module, "_run", killed_after_the_first_document)
    with pytest.raises(KeyboardInterrupt):
        build(inputs, tmp_path / "pages", page_settings)
    assert not (tmp_path / "pages").exists()

    resumed_paths = []

    def recording_run(paths, *args, **kwargs):
        resumed_paths.extend(paths)
        return real_run(paths, *args, **kwargs)

    monkeypatch.setattr(pages_module, "_run", recording_run)
    resumed = build(inputs, tmp_path / "pages", page_settings, resume=True)
    assert resumed_paths == inputs[1:]  # one document at a time: the first was done
    assert resumed["fingerprint"] == reference["fingerprint"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_resume_with_other_settings_is_refused(corpus, tmp_path, monkeypatch):
    _, files = corpus
    monkeypatch.setattr(pages_module, "_assemble", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        build([files["vi"]], tmp_path / "pages", settings("vi", ocr="never"))
    monkeypatch.undo()
    with pytest.raises(Exception, match="used other settings"):
        build([files["vi"]], tmp_path / "pages", settings("vi", ocr="never", dpi=99), resume=True)


def zero_page_pdf(path):
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [] /Count 0 >>"]
    body, offsets = b"%PDF-1.4\n", []
    for number, content in enumerate(objects, start=1):
        offsets.append(len(body))
        body += b"%d 0 obj\n" % number + content + b"\nendobj\n"
    xref = len(body)
    body += b"xref\n0 3\n0000000000 65535 f \n" + b"".join(b"%010d 00000 n \n" % o for o in offsets)
    body += b"trailer\n<< /Size 3 /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % xref
    path.write_bytes(body)
    return path


def test_bad_inputs_are_skipped_with_reasons_and_the_run_goes_on(corpus, tmp_path):
    _, files = corpus
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "empty.pdf").write_bytes(b"")
    (bad / "text.pdf").write_text("just some text with a .pdf name")
    (bad / "corrupt.pdf").write_bytes(b"%PDF-1.7\n" + bytes(range(256)) * 8)
    zero_page_pdf(bad / "zero.pdf")
    locked = pymupdf.open(files["vi"])
    locked.save(bad / "locked.pdf", encryption=pymupdf.PDF_ENCRYPT_AES_256, user_pw="user", owner_pw="owner")

    manifest = build([bad, files["vi"]], tmp_path / "pages", settings("vi", ocr="never"))
    reasons = {Path(s["path"]).name: s["reason"] for s in manifest["skipped"]}
    assert set(reasons) == {"empty.pdf", "text.pdf", "corrupt.pdf", "zero.pdf", "locked.pdf"}
    assert "empty file" in reasons["empty.pdf"] and "not a readable PDF" in reasons["text.pdf"]
    assert "password-protected" in reasons["locked.pdf"] and "no pages" in reasons["zero.pdf"]
    assert manifest["counts"]["documents"] == 1 and manifest["counts"]["pages"] == 2


def test_too_many_bad_inputs_exit_1_with_the_count_and_no_dataset(corpus, tmp_path, capsys):
    _, files = corpus
    (tmp_path / "empty.pdf").write_bytes(b"")
    argv = [
        "pages",
        "--lang",
        "vi",
        "--input",
        str(tmp_path / "empty.pdf"),
        str(files["vi"]),
        "--output",
        str(tmp_path / "out"),
        "--max_skip_fraction",
        "0.4",
    ]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(data_prep_cli.main, argv)
    assert exit_info.value.code == 1
    assert "1 of 2 inputs could not be read" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    run_cli(data_prep_cli.main, [*argv[:-1], "0.5", "--resume"])
    assert "2 pages from 1 documents" in capsys.readouterr().out
    assert (tmp_path / "out" / "manifest.json").is_file()


def test_huge_page_is_scaled_to_the_pixel_budget_keeping_its_aspect(tmp_path):
    document = pymupdf.open()
    page = document.new_page(width=6000, height=3000)
    page.insert_text((100, 100), "A very large poster page with enough text to pass the layer check.", fontsize=48)
    document.save(tmp_path / "poster.pdf")
    build([tmp_path / "poster.pdf"], tmp_path / "pages", settings("vi", ocr="never", dpi=300, max_pixels=200_000))
    image = datasets.load_from_disk(str(tmp_path / "pages"))[0]["image"]
    assert image.width * image.height <= 200_000
    assert abs(image.width / image.height - 2.0) < 0.01


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "too few characters"),
        ("ที-เป7นการจําเป7นอย่างยิ-งที-สิทธิมนุษยชนควรได้รับความคุ้มครอง", "garbled encoding"),
        ("\ue000\ue001\ue002 abc" * 10, "glyph-id junk"),
        ("\ufffd\ufffd" + "ก" * 40, "replacement characters"),
        ("This page is in English only, not Thai at all.", "too few characters in the language's script"),
        ("\u0e34\u0e35 " * 10 + "ก" * 30, "garbled encoding"),
    ],
)
def test_garbled_text_layers_are_detected(text, reason):
    assert reason in text_layer_problem(text, parse_ranges(["0E00-0E7F"]))


@pytest.mark.parametrize("lang", ["th", "lo", "km", "my", "vi", "id"])
def test_real_text_passes_the_garble_check(lang):
    import yaml

    ranges = yaml.safe_load((REPO / f"recipes/{lang}.yaml").read_text())["data_prep"]["script_ranges"]
    assert text_layer_problem((REPO / f"samples/udhr/{lang}.md").read_text(), parse_ranges(ranges)) is None


def test_children_do_not_run_the_parents_main_module_again(corpus, tmp_path):
    """multiprocessing runs the parent's __main__ again in each child it starts, unless told otherwise: under
    `python -m stages.index` or in a Ray worker that was seconds of imports per document."""
    _, files = corpus
    imports = tmp_path / "imports.txt"
    script = tmp_path / "main_script.py"
    script.write_text(
        "import os\n"
        f"with open({str(imports)!r}, 'a') as f:\n"
        "    f.write(f'{os.getpid()}\\n')\n"
        "if __name__ == '__main__':\n"
        "    from data_prep.pages import PageSettings, build_pages_dataset\n"
        "    settings = PageSettings('vi', 72, 50_000, 'never', 72, 'vie', ('0041-005A',))\n"
        f"    inputs, output = [{str(files['vi'])!r}, {str(files['km'])!r}], {str(tmp_path / 'pages')!r}\n"
        "    build_pages_dataset(inputs, output, settings, workers=1, resume=False, max_skip_fraction=1.0)\n"
    )
    subprocess.run([sys.executable, str(script)], cwd=REPO, env=os.environ | {"PYTHONPATH": str(REPO)}, check=True)
    assert (tmp_path / "pages" / "manifest.json").is_file()
    assert len(imports.read_text().splitlines()) == 1  # the parent's own run only
