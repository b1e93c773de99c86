"""The cases of bench/stages_bench.py: every stage against what a user would otherwise run, each case calling the
stage or the library it measures. Each is a function of the run's context (bench/harness.py) returning its figures.

Set-up, first: base_model (`stages.base_model`: on a GPU, a randomly initialised model with Qwen2.5-VL-3B's
configuration, as bench/real_size_base.sh; with --tiny, recipes/tiny.yaml's tiny model) and pages (synthetic
pages datasets in `data_prep pages`' format, pages of 300-1500 text tokens at the recipe's pixel budget, and the
eval queries). Then, in this order (the issue's targets first, within the default budget on an H200):

- matmul_peak: the device's measured matmul rate (bf16 on a GPU; float32 on a CPU), the MFU denominator;
- pretrain_plain: TRL's SFTTrainer with SFTConfig defaults on the same model and examples (batch size, steps,
  bf16 and the max_length the examples were cut to set alike) vs pretrain_ours: stages.pretrain's trainer, built
  from the stage's own functions with its recipe (recipes/th.yaml, or tiny.yaml);
- evaluate: pages/s and queries/s through lco.embedder.Embedder, as stages.evaluate encodes;
- contrast_plain: the plain InfoNCE (one graph over the whole batch) at the largest batch that fits;
  contrast_cached: the stage's cached step (`ContrastiveTraining.step`) at that same batch; contrast_stage:
  `stages.contrast.train` at a contrastive batch of 1024; contrast_accum: the reference implementation's gradient
  accumulation (InfoNCE within each mini-batch only) over two mini-batches (its cost per pair does not depend on
  how many are accumulated). The baselines run on the stage's own set-up (`load_model`, `ContrastiveTraining`);
- pretrain_ours_ckpt_all, pretrain_ours_collate_main, pretrain_ours_no_ckpt, pretrain_ours_ckpt_every2: the stage
  with one setting forced beside its defaults: activation checkpointing on every layer (TRL's default, the stage's
  before it chose by memory), batches collated on the main process (before workers), checkpointing off, or on every
  other layer;
- pretrain_packed: the stage with padding-free batches (`--padding_free true`, lco/packing.py), its loss curve
  beside pretrain_ours' (the same examples in the same order);
- evaluate_sorted_workers: the Embedder as stages.evaluate runs it now (pages decoded and prepared in data loader
  workers, batched by estimated token count) beside `evaluate`, the path the H200 run of 2026-11-26 measured;
  contrast_cached_reencode_all: the cached step re-encoding every mini-batch (`--kept_graphs 0`, as on that run)
  beside contrast_cached, which keeps the last one's graph.

Times are end to end (data collation included), over the steps after the warm-up steps. Model FLOPs are counted
with torch.utils.flop_counter on a forward pass per example (no padding), times 3 for the trained parts (forward +
backward) and times 1 for a frozen vision tower, which needs no backward.
"""

import collections
import hashlib
import json
import math
import random
import statistics
import textwrap
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

from bench.harness import Case

REPO = Path(__file__).resolve().parents[1]
LINE_CHARS = 80  # of synthetic page text: about a printed line, which a text layer keeps
# Qwen2.5-VL-3B's configuration, as bench/real_size_base.sh builds it
REAL_SIZE_FLAGS = (
    "--dtype bfloat16 --hidden_size 2048 --num_hidden_layers 36 --num_attention_heads 16 --num_key_value_heads 2 "
    "--intermediate_size 11008 --embedding_rows 151936 --tie_word_embeddings true --vision_depth 32 "
    "--vision_hidden_size 1280 --vision_num_heads 16 --vision_intermediate_size 3420 --max_pixels 1003520"
).split()


@dataclass(frozen=True)
class Scale:
    recipe: str
    base_flags: tuple[str, ...]
    pages: int  # per dataset
    pages_datasets: int  # pretraining and evaluation read the first, contrast all
    text_tokens: tuple[int, int]  # page text length, drawn uniformly
    queries: int
    pretrain_batch: int
    warmup_steps: int
    timed_steps: int
    flop_examples: int
    contrast_batch: int  # the stage's contrastive batch (the 1024)
    contrast_steps: int  # steps at contrast_batch; the first is timed only when it is the only one
    plain_batches: tuple[int, ...]  # tried largest first, until the plain loss fits
    accum_batch: int  # per pair, accumulation costs the same whatever the number of mini-batches accumulated
    matmul_size: int


# on an H200 one cached step at 1024 took ~2 minutes (bench/results/contrast_real_size_h200.json: 8.9 pairs/s):
# one step there, so that every case fits the 8 minutes of a GPU session. The plain loss keeps every
# mini-batch's graph; there one mini-batch of 32 sequences of up to 650 tokens peaked at 60 GiB, so the plain
# loss fits ~16 pairs (32 sequences) and the accumulation baseline's mini-batches are 16 pairs. A contrastive batch
# of 1024 needs ~400 pages (no two of its pairs may be cut from one passage, nor a page's pair meet one of its
# passages); pretraining and evaluation keep to the first 128, each of them a measurement of rate alone
FULL = Scale(
    recipe="recipes/th.yaml",
    base_flags=tuple(REAL_SIZE_FLAGS),
    pages=128,
    pages_datasets=4,
    text_tokens=(300, 1500),
    queries=256,
    pretrain_batch=4,
    warmup_steps=1,
    timed_steps=3,
    flop_examples=4,
    contrast_batch=1024,
    contrast_steps=1,
    plain_batches=(32, 16, 8),
    accum_batch=32,
    matmul_size=8192,
)
TINY = Scale(
    recipe="recipes/tiny.yaml",
    base_flags=(),
    pages=24,
    pages_datasets=1,
    text_tokens=(40, 200),
    queries=16,
    pretrain_batch=2,
    warmup_steps=1,
    timed_steps=2,
    flop_examples=2,
    contrast_batch=16,
    contrast_steps=3,
    plain_batches=(16,),
    accum_batch=16,
    matmul_size=512,
)
# FULL's recipe, data and batch sizes on the tiny model's dimensions: the GPU run's code paths, tried on a CPU
DRY_RUN = replace(
    FULL, base_flags=("--max_pixels", "1003520"), queries=32, timed_steps=1, flop_examples=1, matmul_size=512
)


def write_recipe(source: str, folder: str) -> str:
    """The recipe the cases run: `source` without the eval sets its stages leave out of training, which point at
    data the bench does not have (the cases give the bench's data, model and output folders as flags)."""
    import yaml

    from common.recipe import load_recipe

    recipe = load_recipe(source)
    for section in recipe.values():
        if isinstance(section, dict):
            section.pop("exclude_evalsets", None)
    path = Path(folder) / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return str(path)


def cli_flags(**values) -> list[str]:
    """`--key value` for each value; `--key value value ...` for a list."""
    return [
        item
        for key, value in values.items()
        for item in (f"--{key}", *(map(str, value) if isinstance(value, list) else [str(value)]))
    ]


def build_base_model(ctx: dict) -> dict:
    import torch

    from common.run_record import read_run_record
    from stages.base_model import main

    # initialised on the GPU where there is one: seconds instead of minutes for 3.8B parameters
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        main(["--config", ctx["recipe"], "--output_dir", ctx["base"], *ctx["scale"]["base_flags"]])
    return read_run_record(ctx["base"])["results"]


def page_image(rng: random.Random, width: int, height: int, lines: int):
    """A white page with `lines` lines of dark word boxes: compresses and decodes like a text page."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    margin, pitch = width // 12, max(6, (height - 2 * (height // 12)) // max(lines, 1))
    for line in range(lines):
        y, x = height // 12 + line * pitch, margin
        while x < width - margin:
            word = rng.randint(pitch, 5 * pitch)
            draw.rectangle([x, y, min(x + word, width - margin), y + max(2, pitch * 2 // 3)], fill=(30, 30, 30))
            x += word + pitch // 2
    return image


def save_pages_dataset(folder: str, rows: list[dict], settings: dict) -> None:
    """`rows` (data_prep.pages.ROW_SCHEMA) saved as `data_prep pages` saves them, with a datasets Image column,
    and a manifest with the fields the stages read."""
    import datasets
    import pyarrow as pa

    from common.artifacts import atomic_directory
    from data_prep.pages import ROW_SCHEMA

    features = datasets.Features.from_arrow_schema(ROW_SCHEMA)
    features["image"] = datasets.Image()
    dataset = datasets.Dataset(
        pa.Table.from_pylist(rows, schema=ROW_SCHEMA), info=datasets.DatasetInfo(features=features)
    )
    texts = collections.defaultdict(list)
    for row in rows:
        texts[row["doc_id"]].append(row["text"])
    # the sha256 of a document's PDF identifies it (eval sets are matched to training data by it): here, of its text
    inputs = [
        {
            "path": f"synthetic/{doc}.pdf",
            "sha256": hashlib.sha256("\f".join(pages).encode()).hexdigest(),
            "doc_id": doc,
            "pages": len(pages),
            "ocr_pages": 0,
            "outline": [],
        }
        for doc, pages in texts.items()
    ]
    manifest = {
        "lang": rows[0]["lang"],
        "settings": settings,
        "inputs": inputs,
        "skipped": [],
        "counts": {
            "inputs": len(inputs),
            "documents": len(inputs),
            "skipped": 0,
            "pages": len(rows),
            "pages_layer": len(rows),
            "pages_ocr": 0,
        },
    }
    with atomic_directory(folder) as tmp:
        dataset.save_to_disk(str(tmp))
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_pages(ctx: dict) -> dict:
    """Thai pages datasets in the format of `data_prep pages`, four pages per document, text drawn from the UDHR
    sample to a drawn token count; and the eval queries.

    Synthetic rather than `data_prep pages` on rendered PDFs: that needs pymupdf, which the GPU image lacks
    (`pymupdf: null` in bench/results/*_real_size_h200.json), and Thai at exact token counts."""
    import io

    from transformers import AutoTokenizer

    from common.recipe import load_recipe

    scale, rng = ctx["scale"], random.Random(0)
    tokenizer = AutoTokenizer.from_pretrained(ctx["base"])
    # the sample's phrases (Thai puts spaces between phrases, not words) drawn at random for each page: every
    # passage is then one of a kind, as in a real corpus (the stage never batches two pairs cut from one passage)
    phrases = [p for p in (REPO / "samples/udhr/th.md").read_text(encoding="utf-8").split() if not p.startswith("#")]
    phrase_tokens = [len(ids) for ids in tokenizer([f" {p}" for p in phrases], add_special_tokens=False)["input_ids"]]
    max_pixels = load_recipe(ctx["recipe"])["pretrain"]["max_pixels"]
    width = int(math.sqrt(max_pixels / math.sqrt(2)))  # A4 portrait at the pixel budget
    height = int(width * math.sqrt(2))
    rows, lengths = [], []
    for index in range(scale["pages"] * len(ctx["pages"])):
        n_tokens = rng.randint(*scale["text_tokens"])
        drawn, count = [], 0
        while count < n_tokens:
            drawn.append(rng.randrange(len(phrases)))
            count += phrase_tokens[drawn[-1]]
        lines = textwrap.wrap(" ".join(phrases[i] for i in drawn), LINE_CHARS, break_long_words=False)
        text = tokenizer.decode(tokenizer("\n".join(lines), add_special_tokens=False)["input_ids"][:n_tokens])
        lengths.append(len(tokenizer(text, add_special_tokens=False)["input_ids"]))
        png = io.BytesIO()
        page_image(rng, width, height, lines=max(3, n_tokens // 25)).save(png, format="PNG")
        doc_id = f"doc{index // 4:03d}"
        rows.append(
            {
                "doc_id": doc_id,
                "page": index % 4 + 1,
                "image": {"bytes": png.getvalue(), "path": None},
                "text": text,
                "text_source": "layer",
                "lang": "th",
                "source": f"synthetic/{doc_id}.pdf",
            }
        )
    settings = {"synthetic": True, "page_size": [width, height], "text_tokens": scale["text_tokens"]}
    for number, folder in enumerate(ctx["pages"]):
        save_pages_dataset(folder, rows[number * scale["pages"] : (number + 1) * scale["pages"]], settings)
    english = (REPO / "samples/udhr/en.md").read_text(encoding="utf-8")
    sentences = [line.strip("# ") for line in english.splitlines() if line.strip()]
    queries = [" ".join(rng.choice(sentences).split()[: rng.randint(6, 30)]) + "?" for _ in range(scale["queries"])]
    Path(ctx["queries"]).write_text(json.dumps(queries), encoding="utf-8")
    return {
        "datasets": len(ctx["pages"]),
        "pages": len(rows),
        "page_size": [width, height],
        "text_tokens_mean": round(statistics.mean(lengths), 1),
        "text_tokens_min": min(lengths),
        "text_tokens_max": max(lengths),
        "queries": len(queries),
    }


def matmul_peak(ctx: dict) -> dict:
    """A timed loop of large square matmuls: bf16 on a GPU, float32 on a CPU (its training dtype there)."""
    import platform

    import torch

    from bench.meters import timed

    gpu = torch.cuda.is_available()
    n = ctx["scale"]["matmul_size"] if gpu else min(ctx["scale"]["matmul_size"], 1024)
    dtype = torch.bfloat16 if gpu else torch.float32
    a, b = (torch.randn(n, n, dtype=dtype, device="cuda" if gpu else "cpu") for _ in range(2))

    def multiply(times: int) -> None:
        for _ in range(times):
            a @ b

    multiply(50 if gpu else 3)  # on a GPU, ~0.1 s: clocks up before timing
    repeats = 300 if gpu else 10
    seconds = timed(multiply, repeats)
    if gpu:
        device = torch.cuda.get_device_name()
    else:
        device = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return {
        "device": device,
        "dtype": str(dtype).removeprefix("torch."),
        "n": n,
        "tflops_per_second": round(2 * n**3 * repeats / seconds / 1e12, 3),
    }


def pretrain_plain(ctx: dict) -> dict:
    """What a user would write: the model as saved, the stage's examples, TRL's SFTConfig defaults."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from trl import SFTConfig, SFTTrainer

    from bench.meters import StepMeter
    from common.recipe import load_recipe
    from stages.pretrain import PretrainArguments, load_examples

    scale = ctx["scale"]
    recipe = load_recipe(ctx["recipe"])
    section = recipe["pretrain"]
    processor = AutoProcessor.from_pretrained(ctx["base"])
    args = PretrainArguments(
        model_name_or_path=ctx["base"], datasets=ctx["pages"][:1], max_pixels=section["max_pixels"], eval_fraction=0.0
    )
    train, _, _ = load_examples(args, processor, section["max_length"], recipe["seed"])
    gpu = torch.cuda.is_available()
    config = SFTConfig(
        output_dir=str(Path(ctx["work"]) / ctx["case"]),
        per_device_train_batch_size=scale["pretrain_batch"],
        max_steps=scale["warmup_steps"] + scale["timed_steps"],
        bf16=gpu,
        use_cpu=not gpu,
        # the default 1024 would cut image tokens ("Image features and image tokens do not match")
        max_length=section["max_length"],
        include_num_input_tokens_seen="non_padding",
        report_to="none",
        disable_tqdm=True,  # measurement and quiet only
    )
    meter = StepMeter(scale["warmup_steps"], scale["flop_examples"])
    trainer = SFTTrainer(
        model=AutoModelForImageTextToText.from_pretrained(ctx["base"]),
        args=config,
        train_dataset=train.select_columns(["images", "prompt", "completion"]),
        processing_class=processor,
        callbacks=[meter],
    )
    trainer.train()
    return {**meter.figures, "batch": scale["pretrain_batch"]}


def pretrain_ours(ctx: dict, flags: tuple[str, ...] = ()) -> dict:
    """stages.pretrain's training with its recipe and `flags` on top: its argument parsing and checks, model (the
    vision tower frozen as the recipe says), examples and Throughput callback, from the stage's own functions.
    Without what `main` adds around the steps: held-out evaluation (none is held out here) and writing final/
    (7.5 GB at the 3B size, after the measured steps: device time for nothing here)."""
    import torch
    import transformers
    from trl import SFTConfig

    from bench.meters import StepMeter
    from common.recipe import parse_stage_arguments
    from lco.packing import PackingSFTTrainer
    from lco.throughput import Throughput
    from stages.pretrain import (
        CHECKPOINTING_FIELDS,
        CPU_DEFAULTS,
        PretrainArguments,
        gpu_defaults,
        load_examples,
        load_model,
        set_checkpointing,
        validate_run,
    )

    scale = ctx["scale"]
    argv = cli_flags(
        config=ctx["recipe"],
        model_name_or_path=ctx["base"],
        datasets=ctx["pages"][0],
        output_dir=Path(ctx["work"]) / ctx["case"],
        max_steps=scale["warmup_steps"] + scale["timed_steps"],
        per_device_train_batch_size=scale["pretrain_batch"],
        gradient_accumulation_steps=1,
        eval_fraction=0.0,
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        disable_tqdm="true",
        logging_steps=1,  # the loss curve, to compare the variants' training with
    )
    recipe_args, args, training = parse_stage_arguments(
        "pretrain",
        (PretrainArguments, SFTConfig),
        [*argv, *flags],
        machine_defaults=gpu_defaults() if torch.cuda.is_available() else CPU_DEFAULTS,
        replaced={name: "checkpointing" for name in CHECKPOINTING_FIELDS},
    )
    validate_run(args, training, recipe_args.lang)
    # as stages.pretrain.main sets them: the collator needs `images`, `prompt`, `completion`; tokens/s the count
    training.remove_unused_columns = False
    training.include_num_input_tokens_seen = "non_padding"
    transformers.set_seed(training.seed)
    model, processor, peft_config = load_model(args, training, checkpoint=None)
    checkpointing = set_checkpointing(args, training, model)
    train, _, _ = load_examples(args, processor, training.max_length, recipe_args.seed)
    throughput, meter = Throughput(), StepMeter(scale["warmup_steps"], scale["flop_examples"])
    trainer = PackingSFTTrainer(  # as stages.pretrain.train_and_save: packed batches with --padding_free true
        model=model,
        args=training,
        train_dataset=train,
        processing_class=processor,
        peft_config=peft_config,
        callbacks=[throughput, meter],
    )
    trainer.train()
    return {
        **meter.figures,
        "batch": scale["pretrain_batch"],
        "flags": list(flags),
        "checkpointing": checkpointing,
        "dataloader_num_workers": training.dataloader_num_workers,
        "stage_throughput": throughput.summary(),
        "loss_curve": [round(entry["loss"], 4) for entry in trainer.state.log_history if "loss" in entry],
    }


def evaluate(ctx: dict) -> dict:
    """Pages/s and queries/s through the Embedder that stages.evaluate uses, with its recipe settings (pages
    decoded beforehand, so that the Embedder alone is timed), as it encoded on the H200 of 2026-11-26: batches
    prepared on the main process, in the given order (evaluate_sorted_workers: as it encodes now)."""
    import datasets

    from bench.meters import timed
    from common.recipe import load_recipe
    from lco.embedder import Embedder
    from stages.evaluate import EvaluateArguments, page_size

    settings = EvaluateArguments(**load_recipe(ctx["recipe"])["evaluate"])
    sizes = page_size(ctx["base"], settings)
    embedder = Embedder(ctx["base"], max_text_tokens=settings.max_text_tokens, workers=0, sort_by_size=False, **sizes)
    images = [row["image"].convert("RGB") for row in datasets.load_from_disk(ctx["pages"][0])]
    queries = json.loads(Path(ctx["queries"]).read_text(encoding="utf-8"))
    figures = {"batch": settings.batch_size, "pages": len(images), "queries": len(queries)}
    for name, encode, items in (("pages", embedder.encode_images, images), ("queries", embedder.encode_texts, queries)):
        encode(items[: settings.batch_size], settings.batch_size)  # warm-up
        figures[f"{name}_per_second"] = round(len(items) / timed(encode, items, settings.batch_size), 2)
    return {**figures, "dtype": str(next(embedder.model.parameters()).dtype).removeprefix("torch.")}


def padded_tokens(counts: list[int], batch: int) -> int:
    """Padding tokens of the batches of `batch` consecutive items of these token counts."""
    groups = [counts[i : i + batch] for i in range(0, len(counts), batch)]
    return sum(max(group) * len(group) - sum(group) for group in groups)


def evaluate_sorted_workers(ctx: dict) -> dict:
    """As `evaluate`, the way stages.evaluate encodes now: pages decoded from the dataset's PNG bytes in the data
    loader's workers (their default count, `workers`), items batched by estimated token count. With the padding
    tokens of the batches in the given order and sorted (from `lco.embedder.token_counts`, no model run)."""
    import io

    import datasets
    import torch
    from PIL import Image

    from bench.meters import timed
    from common.recipe import load_recipe
    from lco.embedder import Embedder, Item, LazyItems, default_workers, token_counts
    from stages.evaluate import EvaluateArguments, page_size

    settings = EvaluateArguments(**load_recipe(ctx["recipe"])["evaluate"])
    embedder = Embedder(ctx["base"], max_text_tokens=settings.max_text_tokens, **page_size(ctx["base"], settings))
    rows = datasets.load_from_disk(ctx["pages"][0]).cast_column("image", datasets.Image(decode=False))
    pngs = [row["image"]["bytes"] for row in rows]

    def page(png):
        return Item(image=Image.open(io.BytesIO(png)))  # the header read: the size is known, the pixels are not

    def measure(png):
        return "", page(png).image.size

    texts = json.loads(Path(ctx["queries"]).read_text(encoding="utf-8"))
    batch = settings.batch_size
    figures = {"batch": batch, "pages": len(pngs), "queries": len(texts)}
    figures["workers"] = default_workers("cuda" if torch.cuda.is_available() else "cpu")
    for name, items in (("pages", LazyItems(pngs, page, measure)), ("queries", [Item(text) for text in texts])):
        embedder.encode(LazyItems(pngs[:batch], page, measure) if name == "pages" else items[:batch], batch)  # warm-up
        figures[f"{name}_per_second"] = round(len(items) / timed(embedder.encode, items, batch), 2)
        counts = token_counts(
            embedder.processor,
            items,
            range(len(items)),
            max_text_tokens=embedder.max_text_tokens,
            image_max_side=embedder.image_max_side,
            max_pixels=embedder.max_pixels,
        )
        figures[f"{name}_tokens"] = sum(counts)
        figures[f"{name}_padded_tokens_given_order"] = padded_tokens(counts, batch)
        figures[f"{name}_padded_tokens_sorted"] = padded_tokens(sorted(counts, reverse=True), batch)
    return {**figures, "dtype": str(next(embedder.model.parameters()).dtype).removeprefix("torch.")}


def contrast_arguments(ctx: dict, batch: int, steps: int, **flags):
    """(recipe arguments, ContrastArguments) of the recipe with the bench's data, batch, steps and `flags`."""
    from common.recipe import parse_stage_arguments
    from stages.contrast import ContrastArguments

    argv = cli_flags(
        config=ctx["recipe"],
        model_name_or_path=ctx["base"],
        pages_datasets=ctx["pages"],
        output_dir=Path(ctx["work"]) / ctx["case"],
        eval_fraction=0.0,
        contrastive_batch_size=batch,
        max_steps=steps,
        **flags,
    )
    return parse_stage_arguments("contrast", (ContrastArguments,), argv)


def contrastive_training(ctx: dict, batch: int, **flags):
    """stages.contrast's set-up for contrastive batches of `batch` pairs: its pairs, model with fresh LoRA adapters,
    optimizer, schedule and Accelerate (bf16 autocast on a GPU)."""
    from stages.contrast import ContrastiveTraining, load_model, load_pairs

    scale = ctx["scale"]
    recipe_args, args = contrast_arguments(ctx, batch, scale["warmup_steps"] + scale["timed_steps"], **flags)
    pairs, _, _ = load_pairs(args, recipe_args.seed)
    model, processor = load_model(args, recipe_args.seed)
    return ContrastiveTraining(args, model, processor, pairs, recipe_args.seed)


def role_inputs(run, batch) -> list[list]:
    """The anchors' and the positives' model inputs, in mini-batches, as ContrastiveTraining.step makes them."""
    from lco.embedder import model_inputs

    size, args = run.args.mini_batch_size, run.args
    return [
        [
            model_inputs(
                run.processor,
                [getattr(pair, role).item() for pair in batch[i : i + size]],
                args.max_text_tokens,
                args.image_max_side,
            )
            for i in range(0, len(batch), size)
        ]
        for role in ("anchor", "positive")
    ]


def optimizer_step(run) -> None:
    """Clipping, then the optimizer and schedule steps, as ContrastiveTraining.step ends."""
    run.accelerator.clip_grad_norm_(run.trainable, 1.0)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad()


def plain_step(run, batch) -> None:
    """InfoNCE over the whole batch in one graph: every mini-batch encoded with its graph kept, one backward."""
    import torch

    from lco.contrastive_loss import info_nce

    anchors, positives = (torch.cat([run.encode(inputs) for inputs in chunks]) for chunks in role_inputs(run, batch))
    run.accelerator.backward(info_nce(anchors, positives, temperature=run.args.temperature)[0])
    optimizer_step(run)


def accumulated_step(run, batch) -> None:
    """The reference's gradient accumulation: InfoNCE within each mini-batch, a backward per mini-batch."""
    from lco.contrastive_loss import info_nce

    for anchors, positives in zip(*role_inputs(run, batch)):
        loss = info_nce(run.encode(anchors), run.encode(positives), temperature=run.args.temperature)[0]
        run.accelerator.backward(loss * anchors["input_ids"].shape[0] / len(batch))
    optimizer_step(run)


def time_steps(ctx: dict, step, groups: list) -> dict:
    """Figures of `step` over the batches `groups` (cycled), the warm-up steps left out."""
    from bench.meters import step_figures, timed

    scale = ctx["scale"]
    seconds = [timed(step, groups[i % len(groups)]) for i in range(scale["warmup_steps"] + scale["timed_steps"])]
    return {"batch": len(groups[0]), **step_figures(seconds[scale["warmup_steps"] :], len(groups[0]), "pairs")}


def contrast_plain(ctx: dict) -> dict:
    """The plain loss on the stage's set-up, at the largest of the scale's `plain_batches` that fits in memory."""
    import gc

    import torch

    from bench.meters import is_out_of_memory
    from lco.contrast_data import batches

    sizes = sorted(ctx["scale"]["plain_batches"], reverse=True)
    run = contrastive_training(ctx, sizes[0])
    did_not_fit = []
    for size in sizes:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()  # the peak reported is that of the batch that fits
        groups = batches(run.train_pairs, size, homogeneous=False, seed=run.seed)
        try:
            figures = time_steps(ctx, partial(plain_step, run), groups)
        except RuntimeError as error:
            if not is_out_of_memory(error):
                raise
            figures = None
        if figures:
            return {**figures, "mini_batch": run.args.mini_batch_size, "did_not_fit": did_not_fit}
        # out of the except block, so that the traceback's tensors are freed
        run.optimizer.zero_grad(set_to_none=True)
        gc.collect()
        torch.cuda.empty_cache()
        print(f"contrast_plain: a batch of {size} does not fit; trying a smaller one", flush=True)
        did_not_fit.append(size)
    raise RuntimeError(f"contrast_plain: none of the batch sizes {sizes} fits")


def contrast_cached(ctx: dict) -> dict:
    """The stage's own step at the batch the plain loss fitted."""
    batch = ctx["earlier"].get("contrast_plain", {}).get("batch") or min(ctx["scale"]["plain_batches"])
    run = contrastive_training(ctx, batch)
    return {**time_steps(ctx, run.step, run.epoch_batches(0)), "mini_batch": run.args.mini_batch_size}


def contrast_cached_reencode_all(ctx: dict) -> dict:
    """contrast_cached as it ran on the H200 of 2026-11-26: every mini-batch encoded twice (--kept_graphs 0)."""
    batch = ctx["earlier"].get("contrast_plain", {}).get("batch") or min(ctx["scale"]["plain_batches"])
    run = contrastive_training(ctx, batch, kept_graphs=0)
    return {**time_steps(ctx, run.step, run.epoch_batches(0)), "mini_batch": run.args.mini_batch_size}


def contrast_accum(ctx: dict) -> dict:
    """Gradient accumulation over two mini-batches: per pair, accumulating more of them costs the same."""
    batch = ctx["scale"]["accum_batch"]
    run = contrastive_training(ctx, batch, mini_batch_size=batch // 2)
    return {**time_steps(ctx, partial(accumulated_step, run), run.epoch_batches(0)), "mini_batch": batch // 2}


def contrast_stage(ctx: dict) -> dict:
    """stages.contrast.train at the stage's contrastive batch. Its pairs/s leave the first step out; with a single
    step, that step is timed (its wall time: warm-up included)."""
    from stages.contrast import load_pairs, train

    scale = ctx["scale"]
    recipe_args, args = contrast_arguments(ctx, scale["contrast_batch"], scale["contrast_steps"])
    pairs, _, counts = load_pairs(args, recipe_args.seed)
    _, results = train(args, pairs, [], recipe_args.seed)
    single = results["steps"] == 1
    rate = round(args.contrastive_batch_size / results["wall_time_s"], 3) if single else results["pairs_per_second"]
    return {
        "batch": args.contrastive_batch_size,
        "mini_batch": args.mini_batch_size,
        "pairs_per_second": rate,
        "timed_steps": 1 if single else results["steps"] - 1,
        "first_step_timed": single,
        "pairs": counts,
        "loss": results["loss_history"][-1]["loss"],
    }


def packing_cases() -> dict:
    """Issue 22: the stage with padding-free batches (lco/packing.py) beside pretrain_ours, at the same batch size and
    steps. Both compute the loss through TRL's fused LM head, which never makes the whole logits."""
    return {"pretrain_packed": Case(partial(pretrain_ours, flags=("--padding_free", "true")), 150)}


# in the order they run: the set-up, the targets (within the default budget on an H200), the variants
SETUP = ("base_model", "pages")
# pretrain_ours runs the stage's defaults (checkpointing by memory, batches collated in workers on a GPU); each
# variant forces one setting, the first two being the earlier defaults
PRETRAIN_VARIANTS = {
    "pretrain_ours_ckpt_all": ("--checkpointing", "all"),
    "pretrain_ours_collate_main": ("--dataloader_num_workers", "0"),
    "pretrain_ours_no_ckpt": ("--checkpointing", "none"),
    "pretrain_ours_ckpt_every2": ("--checkpointing", "every_2"),
}
CASES = {
    "base_model": Case(build_base_model, 180),
    "pages": Case(write_pages, 120),
    "matmul_peak": Case(matmul_peak, 60),
    "pretrain_plain": Case(pretrain_plain, 150),
    "pretrain_ours": Case(pretrain_ours, 150),
    "evaluate": Case(evaluate, 90),
    "contrast_plain": Case(contrast_plain, 120),
    "contrast_cached": Case(contrast_cached, 90),
    "contrast_stage": Case(contrast_stage, 240),
    "contrast_accum": Case(contrast_accum, 90),
    **{name: Case(partial(pretrain_ours, flags=flags), 150) for name, flags in PRETRAIN_VARIANTS.items()},
    **packing_cases(),
    # issue 22: the encoder and the cached loss beside their earlier paths
    "evaluate_sorted_workers": Case(evaluate_sorted_workers, 90),
    "contrast_cached_reencode_all": Case(contrast_cached_reencode_all, 90),
}
MEASURED = tuple(name for name in CASES if name not in SETUP)
