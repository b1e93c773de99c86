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


def transcription_cer(model, processor, examples) -> float:
    """Character error rate of greedy transcriptions of `examples` (prompt/completion rows with images)."""
    import torch
    from transformers.integrations import is_deepspeed_zero3_enabled

    references, hypotheses = [], []
    was_training = model.training
    model.eval()
    for example in examples:
        text = processor.apply_chat_template(example["prompt"], add_generation_prompt=True, tokenize=False)
        inputs = processor(text=[text], images=example["images"], return_tensors="pt").to(model.device)
        reference = example["completion"][0]["content"][0]["text"]
        budget = generation_budget(len(processor.tokenizer(reference)["input_ids"]))
        with torch.no_grad():
            output = model.generate(
                **inputs, max_new_tokens=budget, do_sample=False, synced_gpus=is_deepspeed_zero3_enabled()
            )
        hypotheses.append(processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))
        references.append(reference)
    model.train(was_training)
    return jiwer.cer(references, hypotheses)


class TranscriptionCER(TrainerCallback):
    """At every evaluation, greedy-transcribe the held-out pages and keep (step, CER, eval loss)."""

    def __init__(self, processor, examples):
        self.processor = processor
        self.examples = examples
        self.history: list[dict] = []

    def on_evaluate(self, args, state, control, model=None, metrics=None, **kwargs):
        if not len(self.examples):
            return
        cer = transcription_cer(model, self.processor, self.examples)
        entry = {
            "step": state.global_step,
            "cer": round(cer, 4),
            "eval_loss": round(metrics.get("eval_loss", float("nan")), 4),
        }
        self.history.append(entry)
        metrics["eval_cer"] = entry["cer"]
        if state.is_world_process_zero:
            logger.info("held-out transcription at step %d: CER %.4f, eval loss %.4f", *entry.values())
