"""Representation diagnostics of the paper's analyses: anisotropy within a modality and image-text
kernel alignment (mutual k-nearest neighbours, linear CKA) between paired embeddings."""

import torch
import torch.nn.functional as F


def anisotropy(embeddings: torch.Tensor) -> float:
    """Mean cosine similarity between distinct rows: about 0 for isotropic embeddings, 1 when collapsed."""
    unit = F.normalize(embeddings.double(), dim=-1)
    n = unit.shape[0]
    similarity = unit @ unit.T
    return ((similarity.sum() - similarity.diagonal().sum()) / (n * (n - 1))).item()


def mutual_knn(a: torch.Tensor, b: torch.Tensor, k: int = 10) -> float:
    """Mean share of each item's k nearest neighbours (by cosine, itself excluded) that agree between the
    two representations of the same items (Huh et al. 2024, the Platonic representation hypothesis)."""

    def neighbours(x: torch.Tensor) -> torch.Tensor:
        unit = F.normalize(x.double(), dim=-1)
        similarity = unit @ unit.T
        similarity.fill_diagonal_(float("-inf"))
        return similarity.topk(k, dim=1).indices

    first, second = neighbours(a), neighbours(b)
    overlap = [len(set(x.tolist()) & set(y.tolist())) for x, y in zip(first, second)]
    return sum(overlap) / (k * len(overlap))


def linear_cka(a: torch.Tensor, b: torch.Tensor) -> float:
    """Linear centred kernel alignment (Kornblith et al. 2019): 1 for representations equal up to rotation
    and isotropic scaling, near 0 for unrelated ones."""
    a = a.double() - a.double().mean(dim=0)
    b = b.double() - b.double().mean(dim=0)
    cross = (b.T @ a).norm() ** 2
    return (cross / ((a.T @ a).norm() * (b.T @ b).norm())).item()


def layer_states(
    model, processor, items: list, batch_size: int = 8, max_text_tokens: int = 650, image_max_side: int = 700
) -> torch.Tensor:
    """Last-token hidden states of every layer (the embedding layer first), shape (layers + 1, items, hidden),
    for inputs wrapped and left-padded as the Embedder wraps them."""
    from .embedder import model_inputs

    device = next(model.parameters()).device
    chunks = []
    with torch.no_grad():
        for start in range(0, len(items), batch_size):
            inputs = model_inputs(processor, items[start : start + batch_size], max_text_tokens, image_max_side).to(
                device
            )
            output = model.model(**inputs, output_hidden_states=True, use_cache=False)
            chunks.append(torch.stack([states[:, -1].float().cpu() for states in output.hidden_states]))
    return torch.cat(chunks, dim=1)
