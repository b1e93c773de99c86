"""Generation quality, the x-axis of the paper's scaling law: greedy transcription CER on held-out pages."""

import logging
import random
from collections import defaultdict

import jiwer
from transformers import TrainerCallback

logger = logging.getLogger(__name__)


def sample_across_documents(doc_ids: list[str], count: int, seed: int) -> list[int]:
    """Indices of `count` rows drawn in turn from each document (documents and their pages in a seeded order), so
    that the sample spreads over the held-out documents instead of taking the first ones in dataset order."""
    rng = random.Random(seed)
    by_document = defaultdict(list)
    for index, doc_id in enumerate(doc_ids):
        by_document[doc_id].append(index)
    queues = [rng.sample(rows, len(rows)) for rows in rng.sample(list(by_document.values()), len(by_document))]
    chosen = []
    while len(chosen) < min(count, len(doc_ids)):
        for queue in queues:
            if queue and len(chosen) < count:
                chosen.append(queue.pop())
    return chosen


def generation_budget(reference_tokens: int) -> int:
    """New tokens a transcription may take: its reference's length and a tenth more (at least 16), so that a page
    can be transcribed whole (a fixed cap gave every longer page a floor of deletions)."""
    return reference_tokens + max(16, reference_tokens // 10)


def _column(examples, name: str) -> list:
    """A column of a dataset (without decoding the others, images included) or of a list of rows."""
    return examples[name] if hasattr(examples, "column_names") else [example[name] for example in examples]


def transcription_cer(model, processor, examples, *, batch_size: int = 8, time_budget_s: float = 0.0) -> dict:
    """Character error rate of greedy transcriptions of `examples` (prompt/completion rows with images), and what
    they cost: {"cer", "hypotheses" (this process's, by example index), "pages" (scored), "left_out", "tokens"
    (generated), "batches", "seconds"}, the counts over all processes.

    Pages are generated `batch_size` at a time, left-padded, those of similar reference lengths together (sorted by
    their budget, `generation_budget`), each cut to its own budget and at its end of sequence: the hypotheses one
    page at a time gives. In a process group each process transcribes a contiguous share of the pages and the
    error counts are summed; under ZeRO-3 every process takes part in every `generate` call (`synced_gpus`: each
    forward gathers the weights from all), with a page of its own to spare where its share has fewer batches.

    `time_budget_s` (0: none) bounds the seconds spent: a batch under way stops when it is spent (`max_time`), and
    the pages it cut short and the pages not started are left out of the CER, which is then over the pages scored
    (None if none); `left_out` counts them and a warning says so."""
    import math
    import time

    import torch
    from transformers.integrations import is_deepspeed_zero3_enabled

    from .distributed import process_group, share, sum_across

    started = time.monotonic()
    synced = is_deepspeed_zero3_enabled()
    world = process_group()[0]
    references = [completion[0]["content"][0]["text"] for completion in _column(examples, "completion")]
    budgets = [generation_budget(len(processor.tokenizer(reference)["input_ids"])) for reference in references]
    mine = sorted(share(len(references)), key=lambda i: budgets[i])
    batches = [mine[start : start + batch_size] for start in range(0, len(mine), batch_size)]
    if synced:  # the most batches any share has: ceil(n / world) pages
        batches += [[]] * (math.ceil(math.ceil(len(references) / world) / batch_size) - len(batches))
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    hypotheses, counts = {}, {"tokens": 0, "batches": 0, "left_out": 0}
    was_training = model.training
    model.eval()
    for rows in batches:
        remaining = time_budget_s - (time.monotonic() - started) if time_budget_s else None
        if remaining is not None and remaining <= 0 and not synced:
            counts["left_out"] += len(rows)
            continue
        # a spare page where a ZeRO-3 share has run out: its forwards gather the weights for the others
        spare = not rows
        pages = rows or mine[:1] or [0]
        inputs = processor(
            text=[
                processor.apply_chat_template(examples[i]["prompt"], add_generation_prompt=True, tokenize=False)
                for i in pages
            ],
            images=[examples[i]["images"] for i in pages],
            padding=True,
            padding_side="left",
            return_tensors="pt",
        ).to(model.device)
        with torch.no_grad():
            output = model.generate(
                **inputs,
                max_new_tokens=1 if spare else max(budgets[i] for i in rows),
                do_sample=False,
                synced_gpus=synced,
                max_time=None if remaining is None else max(remaining, 1e-3),
            )
        if spare:
            continue
        counts["batches"] += 1
        for i, new in zip(rows, output[:, inputs["input_ids"].shape[1] :].tolist()):
            new = new[: budgets[i]]
            end = next((position for position, token in enumerate(new) if token in eos), None)
            if end is None and len(new) < budgets[i] and remaining is not None:  # cut short by the time budget
                counts["left_out"] += 1
                continue
            hypotheses[i] = processor.decode(new[:end], skip_special_tokens=True)
            counts["tokens"] += len(new) if end is None else end + 1  # the end of sequence is generated too
    model.train(was_training)
    measured = jiwer.process_characters([references[i] for i in hypotheses], list(hypotheses.values()))
    errors = measured.substitutions + measured.deletions + measured.insertions if hypotheses else 0
    characters = measured.substitutions + measured.deletions + measured.hits if hypotheses else 0
    totals = dict(
        zip(
            ["errors", "characters", "pages", *counts],
            sum_across([errors, characters, len(hypotheses), *counts.values()]),
        )
    )
    if totals["left_out"]:
        logger.warning(
            "transcription CER: %d of %d pages left out, past the time budget of %ss; raise the budget or lower "
            "cer_pages",
            totals["left_out"],
            len(references),
            time_budget_s,
        )
    return {
        "cer": totals["errors"] / totals["characters"] if totals["characters"] else None,
        "hypotheses": hypotheses,
        **{name: int(totals[name]) for name in ("pages", "left_out", "tokens", "batches")},
        "seconds": round(time.monotonic() - started, 2),
    }


class TranscriptionCER(TrainerCallback):
    """At every evaluation, greedy-transcribe the held-out pages and keep (step, CER, eval loss, and the
    transcription's cost: pages scored and left out, tokens generated, batches, seconds)."""

    def __init__(self, processor, examples, batch_size: int = 8, time_budget_s: float = 0.0):
        self.processor = processor
        self.examples = examples
        self.batch_size, self.time_budget_s = batch_size, time_budget_s
        self.history: list[dict] = []

    def on_evaluate(self, args, state, control, model=None, metrics=None, **kwargs):
        if not len(self.examples):
            return
        measured = transcription_cer(
            model, self.processor, self.examples, batch_size=self.batch_size, time_budget_s=self.time_budget_s
        )
        cost = {name: measured[name] for name in ("pages", "left_out", "tokens", "batches", "seconds")}
        entry = {
            "step": state.global_step,
            "cer": None if measured["cer"] is None else round(measured["cer"], 4),
            "eval_loss": round(metrics.get("eval_loss", float("nan")), 4),
            "transcription": cost,
        }
        self.history.append(entry)
        metrics |= {f"eval_cer_{name}": value for name, value in cost.items()}
        if entry["cer"] is not None:
            metrics["eval_cer"] = entry["cer"]
        if state.is_world_process_zero:
            logger.info(
                "held-out transcription at step %d: CER %s, eval loss %.4f (%d pages, %d tokens, %.1fs)",
                entry["step"],
                entry["cer"],
                entry["eval_loss"],
                cost["pages"],
                cost["tokens"],
                cost["seconds"],
            )
