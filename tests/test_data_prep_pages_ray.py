"""`data_prep pages --engine ray` on a local Ray of 2 CPUs: the local engine's output, resume, bad input."""

import json
import os
import signal
import subprocess
import sys
import time

import datasets
import pytest

import data_prep.cli as data_prep_cli
import data_prep.pages as pages_module
import data_prep.pages_ray as pages_ray
from common.errors import run_cli

from .conftest import REPO
from .test_data_prep_pages import VIETNAMESE, build, html_pdf, scanned_pdf, settings

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the module (its start-up is most of these tests' time); the engine uses it as it is."""
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def pdfs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pdfs")
    (folder / "sub").mkdir()
    layer = html_pdf(folder / "layer.pdf", VIETNAMESE, "Noto Serif", "vi", pages=2)
    scanned_pdf(folder / "sub" / "scan.pdf", html_pdf(folder / "one.pdf", VIETNAMESE[:300], "Noto Serif", "vi"))
    (folder / "empty.pdf").write_bytes(b"")
    return folder, layer


def ray_build(inputs, output, page_settings, resume=False):
    from data_prep.pages import build_pages_dataset

    return build_pages_dataset(
        [str(p) for p in inputs],
        str(output),
        page_settings,
        workers=2,
        resume=resume,
        max_skip_fraction=1.0,
        engine="ray",
    )


def test_ray_engine_gives_the_local_engines_dataset_and_manifest(local_ray, pdfs, tmp_path):
    folder, layer = pdfs
    page_settings = settings("vi")
    local = build([layer, folder / "sub", folder / "empty.pdf"], tmp_path / "local", page_settings, workers=2)
    # the folder as a file:// URL: listed and read with fsspec, on the Ray worker
    on_ray = ray_build([layer, f"file://{folder / 'sub'}", folder / "empty.pdf"], tmp_path / "ray", page_settings)

    assert local["counts"] == {"inputs": 3, "documents": 2, "skipped": 1, "pages": 3, "pages_layer": 2, "pages_ocr": 1}
    assert on_ray["fingerprint"] == local["fingerprint"]
    url = f"file://{folder / 'sub' / 'scan.pdf'}"
    for key in ("counts", "skipped", "settings", "tools"):
        assert on_ray[key] == local[key], key
    assert on_ray["inputs"] == [e | {"path": url} if e["path"].endswith("scan.pdf") else e for e in local["inputs"]]
    assert json.loads((tmp_path / "ray" / "manifest.json").read_text())["fingerprint"] == local["fingerprint"]

    local_rows = datasets.load_from_disk(str(tmp_path / "local")).to_list()
    ray_rows = datasets.load_from_disk(str(tmp_path / "ray")).to_list()
    assert [row["source"] for row in ray_rows] == [str(layer), str(layer), url]
    for row in local_rows + ray_rows:
        row.pop("source")
    assert ray_rows == local_rows  # images (decoded), text, text source, page numbers, in input order


@pytest.mark.parametrize("interrupted_engine", ["ray", "local"])
def test_interrupted_run_resumes_on_ray_with_only_the_missing_documents(
    local_ray, pdfs, tmp_path, monkeypatch, interrupted_engine
):
    folder, layer = pdfs
    inputs = [layer, folder / "one.pdf", folder / "sub" / "scan.pdf"]
    page_settings = settings("vi", ocr="never")
    reference = ray_build(inputs, tmp_path / "reference", page_settings)
    module = pages_ray if interrupted_engine == "ray" else pages_module
    name = "run_on_ray" if interrupted_engine == "ray" else "_run"
    real_run = getattr(module, name)

    def interrupted_after_the_first_document(*args, **kwargs):
        results = real_run(*args, **kwargs)
        yield next(results)
        results.close()
        raise KeyboardInterrupt

    monkeypatch.setattr(module, name, interrupted_after_the_first_document)
    with pytest.raises(KeyboardInterrupt):
        if interrupted_engine == "ray":
            ray_build(inputs, tmp_path / "pages", page_settings)
        else:
            build(inputs, tmp_path / "pages", page_settings)
    monkeypatch.undo()
    assert not (tmp_path / "pages").exists()
    assert len(list((tmp_path / ".pages.work").glob("*.parquet"))) == 1

    sent = []
    real_ray_run = pages_ray.run_on_ray

    def recording_run(paths, *args, **kwargs):
        sent.extend(paths)
        return real_ray_run(paths, *args, **kwargs)

    monkeypatch.setattr(pages_ray, "run_on_ray", recording_run)
    resumed = ray_build(inputs, tmp_path / "pages", page_settings, resume=True)
    assert len(sent) == 2 and set(sent) < set(inputs)  # Ray finishes documents in any order: the other two
    assert resumed["fingerprint"] == reference["fingerprint"]
    assert resumed["counts"] == reference["counts"]
    assert not (tmp_path / ".pages.work").exists()


def pages_argv(inputs, output, *extra):
    return ["pages", "--lang", "vi", "--ocr", "never", "--input", *map(str, inputs), "--output", str(output), *extra]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--engine", "ray", "--address", "127.0.0.1:1"], "--address 127.0.0.1:1: no Ray cluster answers there"),
        (["--address", "127.0.0.1:6379"], "--address 127.0.0.1:6379 needs --engine ray"),
        (["--engine", "spark"], "--engine"),
    ],
)
def test_bad_engine_options_are_one_line(pdfs, tmp_path, capsys, extra, message):
    _, layer = pdfs
    with pytest.raises(SystemExit) as exit_info:
        run_cli(data_prep_cli.main, pages_argv([layer], tmp_path / "out", *extra))
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert message in error and len(error.splitlines()) == 1, error
    assert not (tmp_path / "out").exists()


def test_urls_without_ray_and_unknown_protocols_and_ray_missing_are_one_line(pdfs, tmp_path, capsys, monkeypatch):
    _, layer = pdfs
    cases = [
        (pages_argv([f"file://{layer}"], tmp_path / "out"), f"--input file://{layer} needs --engine ray"),
        (pages_argv(["nosuch://bucket/a.pdf"], tmp_path / "out", "--engine", "ray"), "--input nosuch://bucket/a.pdf"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            run_cli(data_prep_cli.main, argv)
        assert exit_info.value.code == 2
        error = capsys.readouterr().err.strip()
        assert message in error and len(error.splitlines()) == 1, error
    monkeypatch.setitem(sys.modules, "ray", None)  # what find_spec reports where ray is not installed
    with pytest.raises(SystemExit):
        run_cli(data_prep_cli.main, pages_argv([layer], tmp_path / "out", "--engine", "ray"))
    assert "ray is not installed; install it with `pip install '.[cluster]'`" in capsys.readouterr().err


@pytest.mark.slow
def test_ray_run_interrupted_by_ctrl_c_then_resumed_equals_an_uninterrupted_run(tmp_path):
    folder = tmp_path / "pdfs"
    folder.mkdir()
    for number in range(8):
        html_pdf(folder / f"doc{number}.pdf", VIETNAMESE[number * 40 :], "Noto Serif", "vi", pages=3)
    command = [sys.executable, "-m", "data_prep", *pages_argv([folder], tmp_path / "pages", "--engine", "ray")]
    reference = [sys.executable, "-m", "data_prep", *pages_argv([folder], tmp_path / "reference", "--engine", "ray")]
    subprocess.run(reference, cwd=REPO, check=True, capture_output=True)

    run = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    work = tmp_path / ".pages.work"
    while run.poll() is None and len(list(work.glob("*.parquet"))) < 2:
        time.sleep(0.05)
    os.kill(run.pid, signal.SIGINT)
    assert run.wait(timeout=60) != 0, "the run finished before it was interrupted: give it more documents"
    assert not (tmp_path / "pages").exists()
    done = len(list(work.glob("*.parquet")))
    assert 2 <= done < 8

    subprocess.run([*command, "--resume"], cwd=REPO, check=True, capture_output=True)
    manifest = json.loads((tmp_path / "pages" / "manifest.json").read_text())
    expected = json.loads((tmp_path / "reference" / "manifest.json").read_text())
    assert manifest["fingerprint"] == expected["fingerprint"] and manifest["counts"]["pages"] == 24
