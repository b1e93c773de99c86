"""What only a GPU can show: bf16 arithmetic and CUDA's random state. Skipped where there is no CUDA device;
run with `pytest -m gpu` on a GPU machine (bench/gpu_kit.py runs it there). Imports nothing the GPU image lacks
beyond what the kit carries (tests/test_gpu_kit.py collects it so): its page is drawn, not rendered with pymupdf."""

import random

import pytest
import torch

from lco.embedder import Embedder, Item

from .conftest import KHMER, THAI
from .test_contrast import TEXTS, check_cached_step_in_bf16
from .test_packing import assert_same_training, examples, loss_and_gradients, padded_batch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("kept_graphs", [0, 1])  # every mini-batch encoded twice, or the last one's graph kept
def test_cached_loss_equals_the_plain_loss_in_bf16_with_cuda_dropout_replayed(tiny_model, kept_graphs):
    # the tolerance was measured on the CPU's bf16 (tests/test_contrast.py runs the same check there)
    check_cached_step_in_bf16(tiny_model, "cuda", kept_graphs)


def test_embeddings_do_not_depend_on_the_batch_size_in_bf16(tiny_model):
    from bench.cases import page_image

    embedder = Embedder(str(tiny_model[2]), device="cuda", dtype="bfloat16", image_max_side=224)
    page = page_image(random.Random(0), 320, 220, lines=6)
    items = [Item(text) for text in [*TEXTS, THAI, KHMER]] + [Item(image=page)] * 2
    one_by_one = embedder.encode(items, batch_size=1)
    together = embedder.encode(items, batch_size=len(items))
    # left padding keeps the last token real; bf16 kernels may still differ slightly between batch shapes
    torch.testing.assert_close(together, one_by_one, rtol=0, atol=2e-2)
    assert (together * one_by_one).sum(dim=1).min() > 0.999


def test_the_packed_batch_trains_as_the_padded_batch_with_cudas_attention_kernels(tiny_model):
    from transformers import AutoModelForImageTextToText

    from lco.packing import pack, rope_index

    processor = tiny_model[1]
    model = AutoModelForImageTextToText.from_pretrained(tiny_model[2]).cuda().train()
    batch = padded_batch(processor, examples(processor))
    packed = pack(batch, rope_index(model))

    def cuda(inputs):
        return {key: value.cuda() if torch.is_tensor(value) else value for key, value in inputs.items()}

    # float32; sdpa picks other kernels for the padded and the packed mask: summation orders differ more than on a CPU
    padded, packed = loss_and_gradients(model, cuda(batch)), loss_and_gradients(model, cuda(packed))
    assert_same_training(padded, packed, loss_rtol=1e-4, grad_rtol=1e-4)
