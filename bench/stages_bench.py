"""Every stage against the baseline a user would otherwise run, side by side on one device (issue 8).

    .venv/bin/python bench/stages_bench.py --tiny --out bench/results/tiny.json   # CPU smoke run, ~1 min
    .venv/bin/python bench/stages_bench.py --dry_run --out /tmp/dry.json          # the GPU run's paths on a CPU
    python bench/stages_bench.py --out $OUT/bench.json                           # one GPU, Qwen2.5-VL-3B size
    bash bench/gpu_bench.sh $OUT                                                  # a GPU session, wheels included

Builds a randomly initialised base model with `stages.base_model` (on a GPU: Qwen2.5-VL-3B's configuration,
as bench/real_size_base.sh; with --tiny: recipes/tiny.yaml's tiny model) and a synthetic pages dataset in
`data_prep pages`' format (pages of 300-1500 text tokens, images at the recipe's pixel budget), then runs
each case in a process of its own, so peak memory is per case:

- matmul_peak: the device's measured matmul rate (bf16 on a GPU; float32 on a CPU), the MFU denominator;
- pretrain_ours: `stages.pretrain.main` (recipes/th.yaml, or tiny.yaml) vs pretrain_plain: TRL's
  SFTTrainer with SFTConfig defaults on the same model and examples (batch size, steps, bf16 and the
  max_length the examples were cut to set alike); pretrain_ours_no_ckpt and pretrain_ours_ckpt_every2: the
  stage with activation checkpointing off, or on every other layer (PRETRAIN_VARIANTS);
- checkpointing: where activation checkpointing's cost goes: forward+backward steps of full fine-tuning and
  of a frozen vision tower, with and without checkpointing, in one process on one batch;
- evaluate: pages/s and queries/s through stages.embedder.Embedder, as stages.evaluate encodes;
- contrast_plain: the plain InfoNCE (one graph over the whole batch) at the largest batch that fits;
  contrast_cached: the stage's cached step at that same batch; contrast_stage: `stages.contrast.train`
  (cached InfoNCE) at a contrastive batch of 1024; contrast_accum: the reference implementation's gradient
  accumulation (InfoNCE within each mini-batch only), over two mini-batches (its cost per pair does not
  depend on how many are accumulated).

Cases run in the order of CASE_LIMITS, the issue's targets first; none starts past --budget_s.

Times are end to end (data collation included), over the steps after the warm-up steps. Model FLOPs are
counted with torch.utils.flop_counter on a forward pass per example (no padding), times 3 for the trained
parts (forward + backward) and times 1 for a frozen vision tower, which needs no backward.
With --tiny, cases are forked from a parent that imported the libraries once (a CPU has no CUDA state to
lose); on a GPU each case is a fresh interpreter.
"""

import argparse
import json
import math
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

SCRIPT = Path(__file__).resolve()
REPO = SCRIPT.parents[1]
# Qwen2.5-VL-3B's configuration, as bench/real_size_base.sh builds it
REAL_SIZE_FLAGS = [
    "--dtype", "bfloat16", "--hidden_size", "2048", "--num_hidden_layers", "36", "--num_attention_heads", "16",
    "--num_key_value_heads", "2", "--intermediate_size", "11008", "--embedding_rows", "151936",
    "--tie_word_embeddings", "true", "--vision_depth", "32", "--vision_hidden_size", "1280", "--vision_num_heads", "16",
    "--vision_intermediate_size", "3420", "--max_pixels", "1003520",
]
FORWARD_KEYS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")
GIB = 2**30


@dataclass(frozen=True)
class Scale:
    recipe: str
    base_flags: tuple[str, ...]
    pages: int
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
# loss fits ~16 pairs (32 sequences) and the accumulation baseline's mini-batches are 16 pairs
FULL = Scale(recipe="recipes/th.yaml", base_flags=tuple(REAL_SIZE_FLAGS), pages=128, text_tokens=(300, 1500), queries=256,
             pretrain_batch=4, warmup_steps=1, timed_steps=3, flop_examples=4, contrast_batch=1024, contrast_steps=1,
             plain_batches=(32, 16, 8), accum_batch=32, matmul_size=8192)
TINY = Scale(recipe="recipes/tiny.yaml", base_flags=(), pages=24, text_tokens=(40, 200), queries=16,
             pretrain_batch=2, warmup_steps=1, timed_steps=2, flop_examples=2, contrast_batch=16, contrast_steps=3,
             plain_batches=(16,), accum_batch=16, matmul_size=512)
# FULL's recipe, data and batch sizes on the tiny model's dimensions: the GPU run's code paths, tried on a CPU
DRY_RUN = Scale(recipe="recipes/th.yaml", base_flags=("--max_pixels", "1003520"), pages=128, text_tokens=(300, 1500),
                queries=32, pretrain_batch=4, warmup_steps=1, timed_steps=1, flop_examples=1, contrast_batch=1024,
                contrast_steps=1, plain_batches=(32, 16, 8), accum_batch=32, matmul_size=512)
# pretraining through stages.pretrain with these flags on top of the recipe's (the optimisations tried)
PRETRAIN_VARIANTS = {
    "pretrain_ours": [],
    "pretrain_ours_no_ckpt": ["--gradient_checkpointing", "false"],
    "pretrain_ours_ckpt_every2": ["--gradient_checkpointing_kwargs", '{"every_n_layers": 2}'],
}
# seconds a case may take at most (the whole run's --budget_s caps them too), in the order they run: the
# issue's targets first (within the default budget on an H200), then the diagnostics and the variants
CASE_LIMITS = {"base_model": 180, "pages": 120, "matmul_peak": 60, "pretrain_plain": 150, "pretrain_ours": 150,
               "evaluate": 90, "contrast_plain": 120, "contrast_cached": 90, "contrast_stage": 240, "contrast_accum": 90,
               "checkpointing": 150, "pretrain_ours_no_ckpt": 150, "pretrain_ours_ckpt_every2": 150}
SETUP = ("base_model", "pages")
CASES = tuple(name for name in CASE_LIMITS if name not in SETUP)


# --- measurement helpers, run inside the case processes ---

def device_sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_memory() -> dict:
    """Peak GPU memory allocated by this process (if any) and its peak resident host memory, in GiB."""
    import torch

    figures = {"peak_host_memory_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB, 2)}
    if torch.cuda.is_available():
        figures["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 2)
    return figures


def is_out_of_memory(error: RuntimeError) -> bool:
    """torch.OutOfMemoryError, or cuBLAS failing to allocate its workspace."""
    import torch

    return isinstance(error, torch.OutOfMemoryError) or "ALLOC_FAILED" in str(error)


def example_flops(model, inputs: dict) -> tuple[int, int]:
    """(all, vision tower's) FLOPs of one forward pass on `inputs`, counted by torch.utils.flop_counter."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    # grouped-query attention (Qwen2.5-VL's 16 query heads share 2 key/value heads): the counter's formula wants
    # as many key/value heads as query heads, and the CPU's fused kernel is not in its table at all
    def attention(query, key, value, *args, out_shape=None, **kwargs):
        return sdpa_flop_count(query, (*key[:1], query[1], *key[2:]), (*value[:1], query[1], *value[2:]))

    kernels = ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
               "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention")
    mapping = {getattr(torch.ops.aten, kernel): attention for kernel in kernels}
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        model(**inputs)
    counts = counter.get_flop_counts()  # module path -> {op: flops}; "Global" holds everything
    vision = sum(sum(ops.values()) for name, ops in counts.items() if name.endswith(".visual"))
    return sum(counts["Global"].values()), vision


def training_flops_per_token(model, dataset, collate, n_examples: int) -> float:
    """Model FLOPs of a training step per non-padding token, over the first `n_examples` examples, each
    collated alone (padding is not model work): 3x forward for trained parts, 1x for a frozen vision tower."""
    vision_trained = any(p.requires_grad for name, p in model.named_parameters() if ".visual." in name)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    flops = tokens = 0
    for i in range(min(n_examples, len(dataset))):
        batch = collate([dataset[i]])
        inputs = {key: batch[key].to(device) for key in FORWARD_KEYS if key in batch}
        total, vision = example_flops(model, inputs)
        flops += 3 * (total - vision) + (3 if vision_trained else 1) * vision
        tokens += int(inputs["attention_mask"].sum())
    model.train(was_training)
    return flops / tokens


def step_figures(seconds: list[float], items_per_step: int, unit: str) -> dict:
    return {
        "timed_steps": len(seconds),
        "step_seconds_median": round(statistics.median(seconds), 4),
        f"{unit}_per_second": round(items_per_step * len(seconds) / sum(seconds), 3),
    }


def make_step_meter(warmup: int, flop_examples: int):
    """The stage's Throughput callback plus end-to-end step times (data loading included: the Trainer collates
    a batch before on_step_begin) after `warmup` steps, and the model FLOPs per token, counted at train end."""
    from stages.throughput import Throughput

    class StepMeter(Throughput):
        def __init__(self):
            super().__init__()
            self.ends, self.compute, self.tokens, self.figures = [], [], [], {}

        def on_step_end(self, args, state, control, **kwargs):
            before = self.tokens_before
            super().on_step_end(args, state, control, **kwargs)  # synchronises the GPU
            self.ends.append(time.perf_counter())
            self.compute.append(self.ends[-1] - self.step_started)
            self.tokens.append(state.num_input_tokens_seen - before)

        def on_train_end(self, args, state, control, model=None, train_dataloader=None, **kwargs):
            intervals = [b - a for a, b in zip(self.ends[warmup - 1 : -1], self.ends[warmup:])]
            samples = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
            self.figures = {
                **step_figures(intervals, samples, "samples"),
                "tokens_per_second": round(sum(self.tokens[warmup:]) / sum(intervals), 1),
                "tokens_per_step_mean": round(statistics.mean(self.tokens[warmup:]), 1),
                # share of the step spent between on_step_begin and on_step_end (the rest: fetching and collating)
                "compute_share": round(sum(self.compute[warmup:]) / sum(intervals), 3),
                "gradient_checkpointing": bool(args.gradient_checkpointing),
                **peak_memory(),
                "flops_per_token": training_flops_per_token(
                    model, train_dataloader.dataset, train_dataloader.collate_fn, flop_examples),
            }

    return StepMeter()


# --- cases; each returns a dict of figures ---

def case_matmul_peak(ctx: dict) -> dict:
    """A timed loop of large square matmuls: bf16 on a GPU, float32 on a CPU (its training dtype there)."""
    import platform

    import torch

    gpu = torch.cuda.is_available()
    n = ctx["scale"]["matmul_size"] if gpu else min(ctx["scale"]["matmul_size"], 1024)
    dtype = torch.bfloat16 if gpu else torch.float32
    a, b = (torch.randn(n, n, dtype=dtype, device="cuda" if gpu else "cpu") for _ in range(2))
    for _ in range(50 if gpu else 3):  # on a GPU, ~0.1 s: clocks up before timing
        a @ b
    repeats = 300 if gpu else 10
    device_sync()
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    device_sync()
    seconds = time.perf_counter() - started
    if gpu:
        device = torch.cuda.get_device_name()
    else:
        device = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return {"device": device, "dtype": str(dtype).removeprefix("torch."), "n": n,
            "tflops_per_second": round(2 * n**3 * repeats / seconds / 1e12, 3)}


def case_base_model(ctx: dict) -> dict:
    import torch

    from stages.base_model import main

    flags = ["--config", ctx["scale"]["recipe"], "--output_dir", ctx["base"], *ctx["scale"]["base_flags"]]
    try:
        if torch.cuda.is_available():
            with torch.device("cuda"):  # initialised on the GPU: seconds instead of minutes for 3.8B parameters
                main(flags)
    except Exception as error:  # not tried on the GPU image yet: rather the CPU's minutes than a lost session
        print(f"base_model: building on the GPU failed ({error!r}); building on the CPU", flush=True)
        shutil.rmtree(ctx["base"], ignore_errors=True)
    if not Path(ctx["base"]).is_dir():
        main(flags)
    return json.loads((Path(ctx["base"]) / "run_record.json").read_text())["results"]


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


def case_pages(ctx: dict) -> dict:
    """A pages dataset as `data_prep pages` writes it (rows of ROW_SCHEMA, datasets Image column, manifest),
    four pages per document, and the eval queries."""
    import io

    import datasets
    import pyarrow as pa
    from transformers import AutoTokenizer

    from data_prep.pages import ROW_SCHEMA
    from stages.artifacts import atomic_directory
    from stages.recipe import load_recipe

    scale, rng = ctx["scale"], random.Random(0)
    tokenizer = AutoTokenizer.from_pretrained(ctx["base"])
    source = tokenizer((REPO / "samples/udhr/th.md").read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    max_pixels = load_recipe(scale["recipe"])["pretrain"]["max_pixels"]
    width = int(math.sqrt(max_pixels / math.sqrt(2)))  # A4 portrait at the pixel budget
    height = int(width * math.sqrt(2))
    rows, lengths = [], []
    for index in range(scale["pages"]):
        n_tokens = rng.randint(*scale["text_tokens"])
        start = rng.randrange(len(source))
        text = tokenizer.decode((source * (2 + n_tokens // len(source)))[start : start + n_tokens]).strip()
        lengths.append(len(tokenizer(text, add_special_tokens=False)["input_ids"]))
        png = io.BytesIO()
        page_image(rng, width, height, lines=max(3, n_tokens // 25)).save(png, format="PNG")
        doc_id = f"doc{index // 4:03d}"
        rows.append({"doc_id": doc_id, "page": index % 4 + 1, "image": {"bytes": png.getvalue(), "path": None},
                     "text": text, "text_source": "layer", "lang": "th", "source": f"synthetic/{doc_id}.pdf"})
    features = datasets.Features.from_arrow_schema(ROW_SCHEMA)
    features["image"] = datasets.Image()
    table = pa.Table.from_pylist(rows, schema=ROW_SCHEMA)
    dataset = datasets.Dataset(table, info=datasets.DatasetInfo(features=features))
    documents = sorted({row["doc_id"] for row in rows})
    manifest = {
        "lang": "th", "settings": {"synthetic": True, "page_size": [width, height], "text_tokens": scale["text_tokens"]},
        "inputs": [{"doc_id": doc, "path": f"synthetic/{doc}.pdf", "pages": 4, "outline": []} for doc in documents],
        "skipped": [], "counts": {"inputs": len(documents), "documents": len(documents), "skipped": 0, "pages": len(rows),
                                  "pages_layer": len(rows), "pages_ocr": 0},
    }
    with atomic_directory(ctx["pages"]) as tmp:
        dataset.save_to_disk(str(tmp))
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    english = (REPO / "samples/udhr/en.md").read_text(encoding="utf-8")
    sentences = [line.strip("# ") for line in english.splitlines() if line.strip()]
    queries = [" ".join(rng.choice(sentences).split()[: rng.randint(6, 30)]) + "?" for _ in range(scale["queries"])]
    Path(ctx["queries"]).write_text(json.dumps(queries), encoding="utf-8")
    return {"pages": len(rows), "page_size": [width, height], "text_tokens_mean": round(statistics.mean(lengths), 1),
            "text_tokens_min": min(lengths), "text_tokens_max": max(lengths), "queries": len(queries)}


def pretrain_ours(ctx: dict, name: str) -> dict:
    """stages.pretrain's own main with the flags of PRETRAIN_VARIANTS[name], the bench's meter in place of its
    Throughput callback, and without writing final/ (7.5 GB at the 3B size, after the measured steps: device
    time for nothing here)."""
    import stages.pretrain
    import stages.throughput

    scale, records = ctx["scale"], []
    meter = make_step_meter(scale["warmup_steps"], scale["flop_examples"])
    stages.throughput.Throughput = lambda: meter  # main builds its throughput callback from these names
    stages.pretrain.save_final = lambda trainer, args, processor, output_dir, record: records.append(record) or output_dir
    output_dir = Path(ctx["work"]) / name
    stages.pretrain.main([
        "--config", scale["recipe"], "--model_name_or_path", ctx["base"], "--datasets", ctx["pages"],
        "--output_dir", str(output_dir), "--max_steps", str(scale["warmup_steps"] + scale["timed_steps"]),
        "--per_device_train_batch_size", str(scale["pretrain_batch"]), "--gradient_accumulation_steps", "1",
        "--eval_fraction", "0.0", "--eval_strategy", "no", "--save_strategy", "no", "--cer_pages", "0",
        "--report_to", "none", "--disable_tqdm", "true", *PRETRAIN_VARIANTS[name],
    ])
    return {**meter.figures, "batch": scale["pretrain_batch"], "flags": PRETRAIN_VARIANTS[name],
            "stage_throughput": records[0]["results"]["throughput"]}


def case_pretrain_ours(ctx: dict) -> dict:
    return pretrain_ours(ctx, "pretrain_ours")


def case_pretrain_ours_no_ckpt(ctx: dict) -> dict:
    return pretrain_ours(ctx, "pretrain_ours_no_ckpt")


def case_pretrain_ours_ckpt_every2(ctx: dict) -> dict:
    return pretrain_ours(ctx, "pretrain_ours_ckpt_every2")


def case_checkpointing(ctx: dict) -> dict:
    """Where activation checkpointing's cost goes: forward+backward steps (no optimizer) on one batch of
    pretraining examples, full fine-tuning vs a frozen vision tower, with and without checkpointing (the
    Trainer's way: model.activation_checkpointing_enable(), which also makes every input embedding's output
    require grad, the vision tower's patch embedding included)."""
    import gc

    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    from stages.pretrain import PretrainArguments, freeze, load_examples
    from stages.recipe import load_recipe

    scale = ctx["scale"]
    recipe = load_recipe(scale["recipe"])
    processor = AutoProcessor.from_pretrained(ctx["base"])
    args = PretrainArguments(model_name_or_path=ctx["base"], datasets=[ctx["pages"]],
                             max_pixels=recipe["pretrain"]["max_pixels"], eval_fraction=0.0)
    train, _, _ = load_examples(args, processor, recipe["pretrain"]["max_length"], recipe["seed"])
    count = scale["pretrain_batch"]
    collate = DataCollatorForVisionLanguageModeling(processor=processor, completion_only_loss=True)
    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    # fresh rows for each collation: the collator fills the image placeholders of the examples it is given
    batch = {key: value.to(device) for key, value in collate([train[i] for i in range(count)]).items()}
    model = AutoModelForImageTextToText.from_pretrained(ctx["base"], dtype=torch.bfloat16 if gpu else torch.float32)
    model.to(device).train()
    visual = model.model.visual
    flops = vision_flops = 0
    for i in range(count):  # model FLOPs without padding, as the pretrain cases count them
        inputs = {key: value.to(device) for key, value in collate([train[i]]).items() if key in FORWARD_KEYS}
        total, vision = example_flops(model, inputs)
        flops, vision_flops = flops + total, vision_flops + vision
    tokens = int(batch["attention_mask"].sum())

    configs = [  # (label, vision: trained | requires_grad_off | freeze, checkpointing: none | all | language)
        ("full fine-tuning, no checkpointing", "trained", "none"),
        ("full fine-tuning, checkpointing", "trained", "all"),
        ("full fine-tuning, checkpointing the language model only", "trained", "language"),
        ("vision requires_grad off, checkpointing (stages.pretrain before)", "requires_grad_off", "all"),
        ("vision frozen by stages.pretrain.freeze, checkpointing", "freeze", "all"),
        ("vision frozen by stages.pretrain.freeze, no checkpointing", "freeze", "none"),
    ]
    results = []
    for label, vision, checkpointing in configs:
        visual.__dict__.pop("forward", None)  # undo an earlier freeze()
        if vision == "freeze":
            freeze(visual)
        else:
            visual.requires_grad_(vision == "trained")
        if checkpointing == "none":
            model.activation_checkpointing_disable()
        else:
            model.activation_checkpointing_enable()
            if checkpointing == "language":
                for module in visual.modules():
                    if hasattr(module, "gradient_checkpointing"):
                        module.gradient_checkpointing = False
        model_flops = 3 * flops if vision == "trained" else 3 * (flops - vision_flops) + vision_flops
        seconds, error = [], None
        if gpu:
            torch.cuda.reset_peak_memory_stats()
        try:
            for _ in range(2):  # a warm-up step and a timed one: six configurations must fit the time budget
                started = time.perf_counter()
                model(**batch).loss.backward()
                device_sync()
                seconds.append(time.perf_counter() - started)
        except RuntimeError as exception:
            if not is_out_of_memory(exception):
                raise
            error = "out of memory"
        model.zero_grad(set_to_none=True)
        gc.collect()
        if gpu:
            torch.cuda.empty_cache()
        result = {"config": label, "vision": vision, "checkpointing": checkpointing}
        if error:
            results.append({**result, "error": error})
            continue
        step = seconds[-1]
        results.append({**result, "step_seconds": round(step, 4), "tokens_per_second": round(tokens / step, 1),
                        "model_tflops_per_second": round(model_flops / step / 1e12, 3), **peak_memory()})
    return {"batch": count, "tokens": tokens, "forward_tflops": round(flops / 1e12, 3),
            "vision_share_of_forward": round(vision_flops / flops, 3), "configs": results}


def case_pretrain_plain(ctx: dict) -> dict:
    """What a user would write: the model as saved, the same examples, TRL's SFTConfig defaults."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from trl import SFTConfig, SFTTrainer

    from stages.pretrain import PretrainArguments, load_examples
    from stages.recipe import load_recipe

    scale = ctx["scale"]
    recipe = load_recipe(scale["recipe"])
    section = recipe["pretrain"]
    processor = AutoProcessor.from_pretrained(ctx["base"])
    args = PretrainArguments(model_name_or_path=ctx["base"], datasets=[ctx["pages"]], max_pixels=section["max_pixels"],
                             eval_fraction=0.0)
    train, _, _ = load_examples(args, processor, section["max_length"], recipe["seed"])
    gpu = torch.cuda.is_available()
    config = SFTConfig(
        output_dir=str(Path(ctx["work"]) / "pretrain_plain"), per_device_train_batch_size=scale["pretrain_batch"],
        max_steps=scale["warmup_steps"] + scale["timed_steps"], bf16=gpu, use_cpu=not gpu,
        # the default 1024 would cut image tokens ("Image features and image tokens do not match")
        max_length=section["max_length"],
        include_num_input_tokens_seen="non_padding", report_to="none", disable_tqdm=True,  # measurement and quiet only
    )
    meter = make_step_meter(scale["warmup_steps"], scale["flop_examples"])
    trainer = SFTTrainer(
        model=AutoModelForImageTextToText.from_pretrained(ctx["base"]), args=config,
        train_dataset=train.select_columns(["images", "prompt", "completion"]), processing_class=processor,
        callbacks=[meter],
    )
    trainer.train()
    return {**meter.figures, "batch": scale["pretrain_batch"]}


def case_evaluate(ctx: dict) -> dict:
    """Pages/s and queries/s through the Embedder that stages.evaluate uses, with its recipe settings; and
    the share of that time spent in the processor alone (tokenising, resizing: CPU work the GPU waits for)."""
    import datasets
    import torch

    from stages.embedder import Embedder, Item, model_inputs
    from stages.evaluate import EvaluateArguments
    from stages.recipe import load_recipe

    settings = EvaluateArguments(**load_recipe(ctx["scale"]["recipe"])["evaluate"])
    embedder = Embedder(ctx["base"], max_text_tokens=settings.max_text_tokens, image_max_side=settings.image_max_side)
    pages = datasets.load_from_disk(ctx["pages"])
    started = time.perf_counter()
    images = [row["image"].convert("RGB") for row in pages]  # stages.evaluate opens every page before encoding
    decode_seconds = time.perf_counter() - started
    queries = json.loads(Path(ctx["queries"]).read_text(encoding="utf-8"))
    figures = {"batch": settings.batch_size, "pages": len(images), "queries": len(queries)}
    for name, encode, items in (("pages", embedder.encode_images, images), ("queries", embedder.encode_texts, queries)):
        encode(items[: settings.batch_size], settings.batch_size)  # warm-up
        device_sync()
        started = time.perf_counter()
        embeddings = encode(items, settings.batch_size)
        device_sync()
        seconds = time.perf_counter() - started
        started = time.perf_counter()
        wrapped = [Item(image=item) if name == "pages" else Item(text=item) for item in items]
        for i in range(0, len(items), settings.batch_size):
            model_inputs(embedder.processor, wrapped[i : i + settings.batch_size], settings.max_text_tokens,
                         settings.image_max_side)
        figures[f"{name}_per_second"] = round(len(items) / seconds, 2)
        if name == "pages":  # PNG decoding, done before encoding: time the GPU waits too
            figures["pages_decode_share"] = round(decode_seconds / seconds, 3)
        figures[f"{name}_processor_share"] = round((time.perf_counter() - started) / seconds, 3)
        figures["dimension"] = embeddings.shape[1]
    return {**figures, **peak_memory(), "dtype": str(next(embedder.model.parameters()).dtype).removeprefix("torch.")}


def parse_contrast_arguments(ctx: dict, batch: int, steps: int, name: str):
    from stages.contrast import ContrastArguments
    from stages.recipe import parse_stage_arguments

    return parse_stage_arguments("contrast", (ContrastArguments,), [
        "--config", ctx["scale"]["recipe"], "--model_name_or_path", ctx["base"], "--pages_datasets", ctx["pages"],
        "--output_dir", str(Path(ctx["work"]) / name), "--eval_fraction", "0.0", "--contrastive_batch_size", str(batch),
        "--max_steps", str(steps),
    ])


def case_contrast_stage(ctx: dict) -> dict:
    """stages.contrast's training loop (cached InfoNCE) at the stage's contrastive batch. Its pairs/s leave the
    first step out; with a single step, that step is timed (its wall time: warm-up included)."""
    from stages.contrast import load_pairs, train

    scale = ctx["scale"]
    recipe_args, args = parse_contrast_arguments(ctx, scale["contrast_batch"], scale["contrast_steps"], "contrast_stage")
    pairs, _, counts = load_pairs(args, recipe_args.seed)
    _, _, _, results = train(args, pairs, [], recipe_args.seed)
    single = results["steps"] == 1
    rate = round(args.contrastive_batch_size / results["wall_time_s"], 3) if single else results["pairs_per_second"]
    return {"batch": args.contrastive_batch_size, "mini_batch": args.mini_batch_size, "pairs_per_second": rate,
            "timed_steps": 1 if single else results["steps"] - 1, "first_step_timed": single,
            "pairs": counts, "loss": results["loss_history"][-1]["loss"], **peak_memory()}


def contrast_loop(ctx: dict, loss: str, batch_sizes: list[int], warmup: int, timed: int, mini_batch: int | None = None) -> dict:
    """LoRA contrastive steps set up as stages.contrast.train sets them up (model, LoRA, bf16 autocast through
    Accelerate, AdamW, clipping, pairs and mini-batches), with `loss`:
    - "cached": stages.contrastive_loss.cached_contrastive_step, as the stage;
    - "plain": InfoNCE over the whole batch in one graph (mini-batches encoded with a graph each, one backward);
    - "accum": the reference's gradient accumulation: InfoNCE within each mini-batch, a backward per mini-batch.
    Tries `batch_sizes` largest first and reports the first that fits in memory."""
    import gc

    import torch
    from accelerate import Accelerator
    from peft import get_peft_model
    from transformers import AutoModelForImageTextToText, AutoProcessor, set_seed

    from stages.contrast import load_pairs
    from stages.contrast_data import batches
    from stages.contrastive_loss import cached_contrastive_step, info_nce
    from stages.embedder import EmbeddingModel, model_inputs
    from stages.lora import lora_config

    recipe_args, args = parse_contrast_arguments(ctx, min(batch_sizes), warmup + timed, f"contrast_{loss}")
    args.mini_batch_size = mini_batch or args.mini_batch_size
    pairs, _, _ = load_pairs(args, recipe_args.seed)
    gpu = torch.cuda.is_available()
    bf16 = args.bf16 and gpu
    set_seed(recipe_args.seed)
    dtype = torch.bfloat16 if bf16 else torch.float32
    base = AutoModelForImageTextToText.from_pretrained(args.model_name_or_path, dtype=dtype)
    processor = AutoProcessor.from_pretrained(args.model_name_or_path)
    model = EmbeddingModel(get_peft_model(base, lora_config(args.lora_r, args.lora_alpha, args.lora_dropout)))
    accelerator = Accelerator(cpu=not gpu, mixed_precision="bf16" if bf16 else "no")
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.learning_rate)
    model, optimizer = accelerator.prepare(model, optimizer)

    def encode(inputs):
        return model(**inputs.to(accelerator.device))

    def step(group) -> None:
        chunks_by_role = [
            [model_inputs(processor, [getattr(pair, role).item() for pair in group[i : i + args.mini_batch_size]],
                          args.max_text_tokens, args.image_max_side) for i in range(0, len(group), args.mini_batch_size)]
            for role in ("anchor", "positive")
        ]
        if loss == "cached":
            cached_contrastive_step(encode, chunks_by_role, lambda surrogate: surrogate.backward(), args.temperature)
        elif loss == "plain":
            embeddings = [torch.cat([encode(inputs) for inputs in chunks]) for chunks in chunks_by_role]
            info_nce(*embeddings, temperature=args.temperature)[0].backward()
        else:
            for anchors, positives in zip(*chunks_by_role):
                part_loss = info_nce(encode(anchors), encode(positives), temperature=args.temperature)[0]
                (part_loss * anchors["input_ids"].shape[0] / len(group)).backward()
        accelerator.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad()
        device_sync()

    did_not_fit = []
    for batch in sorted(batch_sizes, reverse=True):
        if len(pairs) < batch:
            continue
        groups = batches(pairs, batch, homogeneous=False, seed=recipe_args.seed)
        seconds, out_of_memory = [], False
        if gpu:
            torch.cuda.reset_peak_memory_stats()
        try:
            for index in range(warmup + timed):
                started = time.perf_counter()
                step(groups[index % len(groups)])
                seconds.append(time.perf_counter() - started)
        except RuntimeError as error:
            if not is_out_of_memory(error):
                raise
            out_of_memory = True
        if out_of_memory:  # outside the except block, so the traceback's tensors are freed
            optimizer.zero_grad(set_to_none=True)
            gc.collect()
            torch.cuda.empty_cache()
            print(f"contrast_{loss}: a batch of {batch} does not fit; trying a smaller one", flush=True)
            did_not_fit.append(batch)
            continue
        return {"batch": batch, "mini_batch": args.mini_batch_size, "did_not_fit": did_not_fit,
                **step_figures(seconds[warmup:], batch, "pairs"), **peak_memory()}
    raise RuntimeError(f"contrast_{loss}: none of the batch sizes {batch_sizes} fits ({len(pairs)} pairs)")


def case_contrast_plain(ctx: dict) -> dict:
    scale = ctx["scale"]
    return contrast_loop(ctx, "plain", scale["plain_batches"], 1, scale["timed_steps"])


def case_contrast_cached(ctx: dict) -> dict:
    return contrast_loop(ctx, "cached", [ctx["plain_batch"]], 1, ctx["scale"]["timed_steps"])


def case_contrast_accum(ctx: dict) -> dict:
    scale = ctx["scale"]
    # two mini-batches: per pair, accumulating more of them costs the same
    return contrast_loop(ctx, "accum", [scale["accum_batch"]], 1, scale["timed_steps"], scale["accum_batch"] // 2)


# --- the parent: set-up, one process per case, JSON and table ---

def run_case(name: str, work: Path) -> None:
    """Run one case in this process and write its figures to work/results/<name>.json."""
    ctx = json.loads((work / "context.json").read_text())
    figures = globals()[f"case_{name}"](ctx)
    (work / "results").mkdir(exist_ok=True)
    (work / "results" / f"{name}.json").write_text(json.dumps(figures, indent=2))


def _forked_case(name: str, work: Path, log: Path) -> None:
    with open(log, "a") as handle:
        os.dup2(handle.fileno(), 1)
        os.dup2(handle.fileno(), 2)
    run_case(name, work)
    sys.stdout.flush()
    sys.stderr.flush()


def launch(name: str, work: Path, log: Path, timeout: float, fork: bool) -> dict:
    """Run a case in a process of its own; its figures, or {"error": ...} with the end of its log."""
    started, started_unix = time.monotonic(), round(time.time(), 1)  # the latter matches GPU utilisation samples
    with open(log, "a") as handle:
        handle.write(f"\n===== {name} =====\n")
        offset = handle.tell()
    if fork:
        import multiprocessing

        process = multiprocessing.get_context("fork").Process(target=_forked_case, args=(name, work, log))
        process.start()
        process.join(timeout)
        code = process.exitcode if not process.is_alive() else "timeout"
        if code == "timeout":
            process.kill()
            process.join()
    else:
        command = [sys.executable, str(SCRIPT), "--case", name, "--work", str(work)]
        with open(log, "a") as handle:
            try:
                code = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, timeout=timeout, cwd=REPO).returncode
            except subprocess.TimeoutExpired:
                code = "timeout"
    seconds = round(time.monotonic() - started, 1)
    result = work / "results" / f"{name}.json"
    if code == 0 and result.is_file():
        return {**json.loads(result.read_text()), "case_wall_s": seconds, "case_started_unix": started_unix}
    with open(log, "rb") as handle:
        handle.seek(offset)
        tail = handle.read().decode(errors="replace").splitlines()[-15:]
    print(f"{name}: failed ({code}) after {seconds}s; end of its log:\n  " + "\n  ".join(tail), flush=True)
    return {"error": f"exit {code} after {seconds}s", "log_tail": tail}


def ratios(cases: dict) -> dict:
    """The figures the issue's targets are about."""
    def get(case, key):
        return cases.get(case, {}).get(key)

    def quotient(numerator, denominator):
        return round(numerator / denominator, 3) if numerator and denominator else None

    peak = get("matmul_peak", "tflops_per_second")
    found = {}
    pretrain_cases = [name for name in cases if name.startswith("pretrain_")]
    for name in pretrain_cases:
        rate, flops = get(name, "tokens_per_second"), get(name, "flops_per_token")
        if rate and flops and peak:
            found[f"{name}_mfu"] = round(rate * flops / 1e12 / peak, 4)
    for name in pretrain_cases:
        if name != "pretrain_plain":
            found[f"{name}_tokens_per_s_over_plain"] = quotient(
                get(name, "tokens_per_second"), get("pretrain_plain", "tokens_per_second"))
    # time per pair is 1 / pairs per second
    found["contrast_cached_over_plain_time_per_pair"] = quotient(
        get("contrast_plain", "pairs_per_second"), get("contrast_cached", "pairs_per_second"))
    found["contrast_stage_over_accum_time_per_pair"] = quotient(
        get("contrast_accum", "pairs_per_second"), get("contrast_stage", "pairs_per_second"))
    if "contrast_stage" in cases:  # None: it failed for another reason than memory (the time budget, say)
        stage = cases["contrast_stage"]
        out_of_memory = any("OutOfMemoryError" in line for line in stage.get("log_tail", []))
        found["contrast_stage_batch_fits"] = True if "error" not in stage else False if out_of_memory else None
    return {key: value for key, value in found.items() if value is not None or key == "contrast_stage_batch_fits"}


def table(report: dict) -> str:
    rows = [("case", "batch", "throughput", "step s", "peak GPU GiB", "peak host GiB", "MFU")]
    for name, figures in report["cases"].items():
        if "error" in figures:
            rows.append((name, "", figures["error"], "", "", "", ""))
            continue
        rates = ("tokens_per_second", "pairs_per_second", "pages_per_second", "tflops_per_second")
        rate = next((f"{figures[k]:g} {k.removesuffix('_per_second')}/s" for k in rates if k in figures), "")
        if "queries_per_second" in figures:
            rate += f", {figures['queries_per_second']:g} queries/s"
        mfu = report["ratios"].get(f"{name}_mfu")
        rows.append((name, str(figures.get("batch", "")), rate, str(figures.get("step_seconds_median", "")),
                     str(figures.get("peak_gpu_memory_gib", "")), str(figures.get("peak_host_memory_gib", "")),
                     f"{100 * mfu:.2f}%" if mfu is not None else ""))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in rows]
    lines += [f"{key}: {value}" for key, value in report["ratios"].items()]
    peak = report["cases"].get("matmul_peak", {}).get("tflops_per_second")
    for config in report["cases"].get("checkpointing", {}).get("configs", []):
        if "error" in config:
            lines.append(f"checkpointing: {config['config']}: {config['error']}")
            continue
        mfu = f", MFU {100 * config['model_tflops_per_second'] / peak:.1f}%" if peak else ""
        lines.append(f"checkpointing: {config['config']}: {config['step_seconds']} s/step, "
                     f"{config['tokens_per_second']:g} tokens/s{mfu}, peak GPU {config.get('peak_gpu_memory_gib', 'n/a')} GiB")
    return "\n".join(lines)


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("torch", "transformers", "trl", "peft", "accelerate", "datasets"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="JSON file for the results; the cases' output goes beside it (.log).")
    parser.add_argument("--tiny", action="store_true", help="The tiny model and data on the CPU: a smoke run.")
    parser.add_argument("--dry_run", action="store_true",
                        help="The GPU run's recipe, data and batch sizes on the tiny model: its code paths, on a CPU.")
    parser.add_argument("--budget_s", type=float, default=None,
                        help="Start no case after this many seconds (default 420; with --tiny 300).")
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES),
                        help="Cases to run (the set-up always runs).")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case in this process
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.case:
        run_case(args.case, Path(args.work))
        return
    if not args.out:
        parser.error("--out is required")

    out = Path(args.out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    log = out.with_suffix(".log")
    log.write_text("")
    os.chdir(REPO)  # recipes and samples are named relative to the repository
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    budget = args.budget_s or (300.0 if args.tiny else 420.0)
    # a dry run's set-up and cases take a CPU longer than the GPU's limits
    limits = {name: limit * (10 if args.dry_run else 1) for name, limit in CASE_LIMITS.items()}
    started = time.monotonic()
    if args.tiny:
        # one thread: the tiny model's ops gain nothing from more, and on a busy 2-core CPU OpenMP threads that
        # wait for each other made a step 30x slower (also the thread count of the CPU matmul peak)
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        # imported once here, inherited by every forked case: each interpreter would pay ~7 s on a small CPU
        import peft  # noqa: F401
        import trl  # noqa: F401

        import stages.contrast  # noqa: F401
        import stages.pretrain  # noqa: F401
    work = Path(tempfile.mkdtemp(prefix="stages-bench-"))
    scale = TINY if args.tiny else DRY_RUN if args.dry_run else FULL
    context = {"scale": asdict(scale), "work": str(work), "base": str(work / "base"), "pages": str(work / "pages"),
               "queries": str(work / "queries.json")}
    (work / "context.json").write_text(json.dumps(context))
    report = {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "tiny": args.tiny, "dry_run": args.dry_run, "command": " ".join(sys.argv),
              "versions": versions(), "scale": asdict(scale), "setup": {}, "cases": {}, "ratios": {}}

    def save() -> None:
        report["wall_time_s"] = round(time.monotonic() - started, 1)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        tmp.rename(out)

    try:
        for name in SETUP:
            report["setup"][name] = launch(name, work, log, limits[name], args.tiny)
            if "error" in report["setup"][name]:
                save()
                sys.exit(f"set-up step {name} failed; see {log}")
        for name in [case for case in CASES if case in args.cases]:
            left = budget - (time.monotonic() - started)
            if left < 20:
                report["cases"][name] = {"error": "skipped: out of the time budget"}
                continue
            if name == "contrast_cached":  # at the batch the plain loss fitted
                context["plain_batch"] = report["cases"].get("contrast_plain", {}).get("batch") or min(scale.plain_batches)
                (work / "context.json").write_text(json.dumps(context))
            report["cases"][name] = launch(name, work, log, min(limits[name], left), args.tiny)
            if name == "matmul_peak":
                report["device"] = report["cases"][name].get("device")
            report["ratios"] = ratios(report["cases"])
            save()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(table(report))
    print(f"wrote {out} and {log} in {report['wall_time_s']}s")


if __name__ == "__main__":
    main()
