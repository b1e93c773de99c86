"""The cached InfoNCE step against the plain one on the CPU, the model's work alone (issue 22): inputs prepared once,
the three steps timed in interleaved rounds so that a shared CPU's load falls on each alike.

    .venv/bin/python bench/cached_loss_cpu.py --out bench/results/cached_loss_cpu2.json

On the tiny model (recipes/tiny.yaml's size) with LoRA on its language model, a contrastive batch of 16 pairs of
~100-token passages: plain (every mini-batch's graph kept, one backward), cached re-encoding every mini-batch
(`kept_graphs` 0, the step measured on the H200 of 2026-11-26) and cached keeping the last one's graph (1, the
default). At mini-batches of 16 (one per role, as the H200 run's 16-pair batch in mini-batches of 32) and of 4.
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="JSON file for the figures.")
    parser.add_argument("--rounds", type=int, default=12, help="Timed rounds (after two warm-up rounds).")
    args = parser.parse_args(argv)

    import torch
    from peft import get_peft_model

    from lco.contrastive_loss import backpropagate, cached_contrastive_step, info_nce
    from lco.embedder import EmbeddingModel, Item, model_inputs
    from lco.lora import lora_config
    from stages.base_model import BaseModelArguments, build_tiny_base_model

    torch.set_num_threads(1)  # one core: less exposed to the other jobs of a shared CPU
    base, processor = build_tiny_base_model(BaseModelArguments(tokenizer_corpus=[str(REPO / "samples/udhr")]), 0)
    torch.manual_seed(0)
    model = EmbeddingModel(get_peft_model(base, lora_config(base.config, 16, 32, 0.05))).train()
    words = (REPO / "samples/udhr/th.md").read_text(encoding="utf-8").split()
    anchors = [" ".join(words[i * 7 : i * 7 + 25]) for i in range(16)]
    positives = [" ".join(words[i * 7 + 3 : i * 7 + 30]) for i in range(16)]

    def step(chunks, kept):
        if kept is None:  # plain
            embeddings = [torch.cat([model(**inputs) for inputs in role]) for role in chunks]
            info_nce(*embeddings, temperature=0.05)[0].backward()
        else:

            def backward(embeddings, grad):
                backpropagate(embeddings, grad).backward()

            def encode(inputs):
                return model(**inputs)

            cached_contrastive_step(
                encode,
                chunks,
                lambda inputs, grad: backward(encode(inputs), grad),
                0.05,
                forward_chunk=encode,
                backward=backward,
                kept_graphs=kept,
            )
        model.zero_grad()

    load_before = os.getloadavg()
    figures = {}
    for mini_batch in (16, 4):
        chunks = [
            [
                model_inputs(processor, [Item(t) for t in texts[i : i + mini_batch]], 256, 448)
                for i in range(0, 16, mini_batch)
            ]
            for texts in (anchors, positives)
        ]
        variants = {"plain": None, "cached_reencode_all": 0, "cached_kept_1": 1}
        seconds = {name: [] for name in variants}
        for round_ in range(2 + args.rounds):
            for name, kept in variants.items():
                started = time.perf_counter()
                step(chunks, kept)
                if round_ >= 2:
                    seconds[name].append(time.perf_counter() - started)
        median = {name: statistics.median(values) for name, values in seconds.items()}
        chunk_count = 2 * len(chunks[0])
        figures[f"mini_batch_{mini_batch}"] = {
            "mini_batches_per_step": chunk_count,
            "tokens_per_sequence_max": int(chunks[0][0]["input_ids"].shape[1]),
            "step_seconds_median": {name: round(value, 4) for name, value in median.items()},
            "forwards_per_step": {"plain": chunk_count, "cached_reencode_all": 2 * chunk_count},
            "cached_reencode_all_over_plain": round(median["cached_reencode_all"] / median["plain"], 3),
            "cached_kept_1_over_plain": round(median["cached_kept_1"] / median["plain"], 3),
        }
        figures[f"mini_batch_{mini_batch}"]["forwards_per_step"]["cached_kept_1"] = 2 * chunk_count - 1
    report = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(sys.argv),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "pairs_per_step": 16,
        "timed_rounds": args.rounds,
        **figures,
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    sys.path[0] = str(REPO)  # run as a script: the repository root, not bench/, on the path
    main()
