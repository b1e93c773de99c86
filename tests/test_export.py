"""stages.export: the sentence-transformers folder and the mteb encoder embed like Embedder, offline."""

import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from common.errors import run_cli
from lco.embedder import Embedder, Item
from stages import export

from .conftest import KHMER, THAI

# lengths differ, so the batch is padded: the last position must still be each input's own last token
TEXTS = ["hello", THAI, f"{KHMER} {THAI}"]
# a fresh process that may not reach a hub, with nothing imported from this project
LOAD_AND_ENCODE = """
import json, sys, torch
from PIL import Image
from sentence_transformers import SentenceTransformer

folder, texts, images, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3:-1], sys.argv[-1]
model = SentenceTransformer(folder, device="cpu")
torch.save({
    "texts": model.encode(texts, convert_to_tensor=True),
    "images": model.encode([Image.open(path) for path in images], convert_to_tensor=True),
    "pairs": model.encode([{"image": Image.open(path), "text": text} for path, text in zip(images, texts)],
                          convert_to_tensor=True),
}, out)
"""


@pytest.fixture(scope="module")
def exported(tiny_model, tmp_path_factory):
    output = tmp_path_factory.mktemp("export") / "st"
    run_cli(export.main, ["--model", str(tiny_model[2]), "--output", str(output)])
    return output


def test_sentence_transformers_folder_loads_offline_and_embeds_like_embedder(
    exported, tiny_model, thai_khmer_page, tmp_path
):
    modules = json.loads((exported / "modules.json").read_text())
    assert [m["type"].rsplit(".", 1)[1] for m in modules] == ["Transformer", "Pooling", "Normalize"]
    assert all(m["type"].startswith("sentence_transformers.") for m in modules)  # no trust_remote_code needed
    assert json.loads((exported / "run_record.json").read_text())["stage"] == "export"

    # PNG is lossless: both processes see the very same pixels
    pages = [thai_khmer_page, thai_khmer_page.rotate(90, expand=True), Image.new("RGB", (180, 260), "white")]
    paths = [tmp_path / f"page{i}.png" for i in range(len(pages))]
    for page, path in zip(pages, paths):
        page.save(path)
    out = tmp_path / "embeddings.pt"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    subprocess.run(
        [sys.executable, "-c", LOAD_AND_ENCODE, str(exported), json.dumps(TEXTS), *map(str, paths), str(out)],
        cwd=tmp_path,
        env=env,
        check=True,
        timeout=120,
    )
    ours = torch.load(out)

    embedder = Embedder(str(tiny_model[2]), device="cpu")
    torch.testing.assert_close(ours["texts"], embedder.encode_texts(TEXTS), atol=1e-5, rtol=0)
    torch.testing.assert_close(
        ours["images"], embedder.encode_images([Image.open(path) for path in paths]), atol=1e-5, rtol=0
    )
    pairs = [Item(text, Image.open(path)) for text, path in zip(TEXTS, paths)]
    torch.testing.assert_close(ours["pairs"], embedder.encode(pairs), atol=1e-5, rtol=0)


def test_export_bad_input_is_one_line(tiny_model, exported, tmp_path, capsys):
    def error(argv):
        with pytest.raises(SystemExit) as exit_info:
            run_cli(export.main, argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.count("\n") == 1
        return err

    model = str(tiny_model[2])
    assert "--model nowhere/at/all does not exist" in error(
        ["--model", "nowhere/at/all", "--output", str(tmp_path / "o")]
    )
    assert "--output is not set" in error(["--model", model])
    assert "already exists and is not empty; pass --overwrite" in error(["--model", model, "--output", str(exported)])
    assert "is the --model folder" in error(["--model", model, "--output", model, "--overwrite"])


def test_mteb_retrieval_runs_offline_with_the_encoder(tiny_model, thai_khmer_page, tmp_path):
    import mteb
    from datasets import Dataset
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.abstasks.task_metadata import TaskMetadata
    from mteb.models import EncoderProtocol

    pages = [thai_khmer_page, thai_khmer_page.rotate(90, expand=True), Image.new("RGB", (180, 260), "white")]
    queries = [THAI, KHMER, "a blank page"]

    class TinyPagesRetrieval(AbsTaskRetrieval):
        metadata = TaskMetadata(
            name="TinyPagesRetrieval",
            description="Text queries against page images, held in memory.",
            dataset={"path": "local/tiny-pages", "revision": "none"},
            type="DocumentUnderstanding",
            category="t2i",
            modalities=["text", "image"],
            eval_splits=["test"],
            eval_langs=["tha-Thai", "khm-Khmr", "eng-Latn"],
            main_score="ndcg_at_5",
        )

        def load_data(self, num_proc=None, **kwargs):
            self.corpus = {"test": Dataset.from_dict({"id": [f"p{i}" for i in range(len(pages))], "image": pages})}
            self.queries = {"test": Dataset.from_dict({"id": [f"q{i}" for i in range(len(queries))], "text": queries})}
            self.relevant_docs = {"test": {f"q{i}": {f"p{i}": 1} for i in range(len(queries))}}
            self.data_loaded = True

    encoder = export.LcoEncoder(str(tiny_model[2]), device="cpu")
    assert isinstance(encoder, EncoderProtocol)
    result = mteb.evaluate(
        encoder,
        TinyPagesRetrieval(),
        cache=None,
        prediction_folder=tmp_path,
        encode_kwargs={"batch_size": 2},
        show_progress_bar=False,
    )
    scores = result.task_results[0].scores["test"][0]
    assert 0 <= scores["ndcg_at_5"] <= 1 and scores["main_score"] == scores["ndcg_at_5"]

    # mteb ranked the pages by the cosine similarity of Embedder's embeddings
    predictions = json.loads(next(tmp_path.glob("*predictions.json")).read_text())["default"]["test"]
    similarity = encoder.model.encode_texts(queries) @ encoder.model.encode_images(pages).T
    expected = {f"q{i}": {f"p{j}": similarity[i, j].item() for j in range(len(pages))} for i in range(len(queries))}
    assert predictions.keys() == expected.keys()
    for query, page_scores in predictions.items():
        assert page_scores == pytest.approx(expected[query], abs=1e-5)
