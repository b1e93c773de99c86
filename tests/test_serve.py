"""stages.serve: the JSON API (FastAPI's TestClient), raw requests to a running server, and the page in headless
Chromium."""

import json
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from lco.index import load_index
from stages.index import main as index
from stages.serve import create_app

from .conftest import REPO, thai_pages_dataset

TINY = str(REPO / "recipes/tiny.yaml")


@pytest.fixture(scope="module")
def built_index(tiny_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve")
    pages = thai_pages_dataset(folder, 3, 300)
    output = folder / "index"
    index(["--model", str(tiny_model[2]), "--config", TINY, "--input", str(pages), "--output", str(output)])
    return output


@pytest.fixture(scope="module")
def client(built_index):
    from fastapi.testclient import TestClient

    return TestClient(create_app(load_index(built_index)))


def test_search_answers_ranked_pages_whose_files_are_served(client, built_index):
    loaded = load_index(built_index)
    response = client.get("/search", params={"q": "สิทธิมนุษยชน", "k": 4})
    assert response.status_code == 200 and response.headers["x-content-type-options"] == "nosniff"
    body = response.json()
    assert body["query"] == "สิทธิมนุษยชน" and [hit["rank"] for hit in body["results"]] == [1, 2, 3, 4]
    scores = [hit["score"] for hit in body["results"]]
    assert scores == sorted(scores, reverse=True)
    first = body["results"][0]
    row = int(first["image"].rsplit("/", 1)[1])
    assert loaded.pages[row]["doc_id"] == first["doc_id"] and loaded.pages[row]["page"] == first["page"]
    image = client.get(first["image"])
    assert image.headers["content-type"] == "image/png"
    assert image.content == (built_index / "images" / f"{row:07d}.png").read_bytes()
    assert client.get(first["thumbnail"]).headers["content-type"] == "image/jpeg"
    assert len(client.get("/search", params={"q": "x", "k": 100}).json()["results"]) == len(loaded.pages)


def test_the_scores_served_are_the_ones_stages_search_gives(client, built_index, capsys):
    from stages.search import main as search

    query = "สิทธิมนุษยชน"
    served = client.get("/search", params={"q": query, "k": 6}).json()["results"]
    search(["--index", str(built_index), query, "--k", "6", "--json"])
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]

    def shown(hits):
        return [(hit["rank"], hit["score"], hit["doc_id"], hit["page"]) for hit in hits]

    assert shown(served) == shown(printed)
    assert len({hit["score"] for hit in served}) > 1  # the model's scores, not one constant


@pytest.mark.parametrize(
    "params, message",
    [
        ({"q": "", "k": 5}, "the query is empty"),
        ({"q": "   ", "k": 5}, "the query is empty"),
        ({"q": "x", "k": 0}, "k must be a whole number from 1 to 1000, got '0'"),
        ({"q": "x", "k": "ten"}, "k must be a whole number"),
        ({"q": "x", "k": -3}, "k must be a whole number"),
        ({"q": "x", "k": 1001}, "k must be a whole number"),
        ({"q": "x", "lang": "km"}, "no pages in language 'km'; the index has th"),
        ({"q": "x" * 2001}, "longer than 2000 characters"),
    ],
)
def test_bad_requests_get_a_400_with_a_message(client, params, message):
    response = client.get("/search", params=params)
    assert response.status_code == 400 and message in response.json()["detail"]


@pytest.mark.parametrize(
    "path",
    [
        "/page/../../etc/passwd",
        "/page/..%2F..%2Fetc%2Fpasswd",
        "/page/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        "/thumb/..%2f..%2f..%2fetc%2fpasswd",
        "/page/6",
        "/page/-1",
        "/thumb/1e3",
        "/etc/passwd",
        "/index.faiss",
        "/run_record.json",
    ],
)
def test_only_the_indexs_page_files_are_served(client, path):
    response = client.get(path)
    assert response.status_code == 404 and "root:" not in response.text


@pytest.mark.parametrize("path", ["/page/../../etc/passwd", "/page/" + "../" * 12 + "etc/passwd", "/thumb/..%2f" * 3])
def test_a_path_with_dot_segments_sent_as_is_is_not_served(server, path):
    # a client normalises "/page/../../etc/passwd" to "/etc/passwd" before sending it: this one sends it raw
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as connection:
        connection.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        answer = b"".join(iter(lambda: connection.recv(65536), b"")).decode(errors="replace")
    assert answer.startswith("HTTP/1.1 404") and "root:" not in answer


def test_a_query_with_html_in_it_is_shown_escaped(client):
    query = '<script>alert("x")</script><img src=x onerror=alert(1)>'
    page = client.get("/", params={"q": query, "lang": '"><script>alert(2)</script>'})
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&lt;img src=x onerror=alert(1)&gt;" in page.text
    assert "<script>alert" not in page.text and "<img src=x" not in page.text
    answer = client.get("/search", params={"q": query})
    assert answer.headers["content-type"] == "application/json" and answer.json()["query"] == query


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server(built_index):
    """`python -m stages.serve` on the built index, answering on a free port (its `port`)."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "stages.serve", "--index", str(built_index), "--port", str(port)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    process.port = port
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, process.stdout.read().decode()[-2000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5).read()
                break
            except OSError:
                assert time.monotonic() < deadline, "serve did not answer in 120 s"
                time.sleep(0.5)
        yield process
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_the_page_in_headless_chromium_shows_result_thumbnails(server, tmp_path):
    # the only check of the page's JavaScript and its escaping; ~12 s on this 2-core CPU
    from playwright.sync_api import sync_playwright

    from data_prep.render import find_chromium

    url = f"http://127.0.0.1:{server.port}/"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=find_chromium(), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.goto(url)
        page.locator("#q").press_sequentially("<b>สิทธิ</b> มนุษยชน")
        page.keyboard.press("Enter")
        page.wait_for_selector(".hit img")
        page.wait_for_function("[...document.querySelectorAll('.hit img')].every(i => i.complete)")
        thumbnails = page.locator(".hit img")
        assert thumbnails.count() == 6
        widths = thumbnails.evaluate_all("images => images.map(i => i.naturalWidth)")
        assert all(width > 0 for width in widths)  # each thumbnail loaded and decoded
        assert page.locator("#status").text_content() == "6 pages for \u201c<b>สิทธิ</b> มนุษยชน\u201d"
        assert page.locator("#status b").count() == 0  # the query shown as text, not as markup
        page.screenshot(path=str(tmp_path / "serve.png"), full_page=True)
        print(f"\nscreenshot: {tmp_path / 'serve.png'}")
        with page.expect_popup() as popup:
            thumbnails.first.click()
        assert popup.value.url.startswith(f"{url}page/")
        browser.close()


@pytest.mark.parametrize("width", ["phone", "desktop"])
def test_the_page_with_results_fits_a_phone_and_a_desktop(server, width):
    from bench.screenshots import browser, layout_problems, open_page, search

    with browser() as chromium:
        page = open_page(chromium, f"http://127.0.0.1:{server.port}/", width)
        # the status line repeats the query: one pasted without a space in it must still fit a phone
        search(page, "สิทธิมนุษยชน " + "0123456789" * 8)
        assert page.locator(".hit img").count() == 6
        assert layout_problems(page) == []
