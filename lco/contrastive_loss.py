"""InfoNCE over in-batch positives and hard negatives gathered from every process, and its cached
(GradCache-style) computation, which makes the contrastive batch independent of per-device memory.

Cached computation (Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory
Limited Setup"): encode the whole batch in mini-batches without a graph, compute the loss and its
gradient with respect to the embeddings, then re-encode each mini-batch with a graph and backpropagate
that cached gradient through it. Dropout masks are replayed, so values and gradients equal the plain
computation's.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward hands each process the summed gradient of its own slice (gloo has no
    reduce_scatter, so: all_reduce, then slice)."""

    @staticmethod
    def forward(ctx, tensor):
        ctx.rank, ctx.size = dist.get_rank(), tensor.shape[0]
        gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, tensor.contiguous())
        return torch.cat(gathered)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.size : (ctx.rank + 1) * ctx.size]


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Every process's `tensor` concatenated in rank order; gradients flow back to each process's own rows."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    return _GatherWithGrad.apply(tensor)


def info_nce(
    anchors, positives, negatives=None, temperature: float = 0.03, matryoshka_dims: list[int] | tuple[int, ...] = ()
) -> tuple[torch.Tensor, int]:
    """Mean InfoNCE of this process's anchors against every process's positives (and negatives).

    Anchor i of rank r has its positive at r * local_batch + i in the gathered candidates. With
    `matryoshka_dims`, the loss is summed over those embedding sizes: each term is InfoNCE on the first `d`
    components of every embedding, re-normalised (Kusupati et al. 2022), so that a prefix is an embedding
    of its own; list the full size among them to keep the plain term. Returns the loss and the number of
    candidates each anchor is scored against."""
    candidates = [gather_with_grad(positives)]
    if negatives is not None:
        candidates.append(gather_with_grad(negatives))
    candidates = torch.cat(candidates)  # (candidates, dim)
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    labels = torch.arange(anchors.shape[0], device=anchors.device) + rank * anchors.shape[0]
    if not matryoshka_dims:
        return F.cross_entropy(anchors @ candidates.T / temperature, labels), candidates.shape[0]
    loss = sum(
        F.cross_entropy(
            F.normalize(anchors[:, :dim], dim=-1) @ F.normalize(candidates[:, :dim], dim=-1).T / temperature, labels
        )
        for dim in matryoshka_dims
    )
    return loss, candidates.shape[0]


class _RandomState:
    """The CPU and CUDA random states at creation, to replay dropout masks exactly."""

    def __init__(self):
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None

    def restore(self):
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)


def cached_contrastive_step(
    encode,
    chunks_by_role: list[list],
    backward_chunk,
    temperature: float,
    matryoshka_dims: list[int] | tuple = (),
    *,
    forward_chunk=None,
    backward=None,
    kept_graphs: int = 1,
) -> tuple[float, int]:
    """One cached InfoNCE step: returns (loss value, candidates per anchor).

    `chunks_by_role` holds, for anchors, positives and optionally negatives, the model inputs of each
    mini-batch; `encode(inputs)` returns their embeddings (called without a graph); `backward_chunk(inputs,
    grad)` encodes `inputs` again with a graph and backpropagates `grad`, the loss's gradient with respect to
    their embeddings, through it (see `backpropagate`). Forward and backward happen in one call so that the
    caller can put both under one context: DDP decides in the forward whether the backward all-reduces.
    `matryoshka_dims` as in `info_nce`: the truncation happens after encoding, so the cached gradients carry it.

    With `forward_chunk(inputs)` (encodes with a graph) and `backward(embeddings, grad)` (backpropagates `grad`
    through them), the step's last `kept_graphs` mini-batches are encoded with their graph in the first pass
    and backpropagated through it, first, instead of being encoded a second time: one forward fewer per kept
    mini-batch. Each kept graph is a mini-batch's activations in memory at the end of the first pass; one costs
    no more than the re-encoding does. At least one mini-batch is re-encoded, last: the one under which a caller's
    DDP all-reduces (`backward_chunk`'s context), after every other backward."""
    flat = [(r, inputs) for r, chunks in enumerate(chunks_by_role) for inputs in chunks]
    kept = min(kept_graphs, len(flat) - 1) if forward_chunk and backward else 0
    states, embeddings, graphs = [], [[] for _ in chunks_by_role], {}
    for index, (r, inputs) in enumerate(flat):
        if index >= len(flat) - kept:
            with torch.enable_grad():
                graphs[index] = forward_chunk(inputs)
            embeddings[r].append(graphs[index].detach())
            continue
        states.append(_RandomState())
        with torch.no_grad():
            embeddings[r].append(encode(inputs))
    after_first_pass = _RandomState()
    sizes = [e.shape[0] for role in embeddings for e in role]
    leaves = [torch.cat(role).detach().requires_grad_() for role in embeddings]
    loss, candidates = info_nce(*leaves, temperature=temperature, matryoshka_dims=matryoshka_dims)
    loss.backward()
    # each mini-batch's slice of its role's gradient
    grads, offsets = [], [0] * len(leaves)
    for (r, _), size in zip(flat, sizes):
        grads.append(leaves[r].grad[offsets[r] : offsets[r] + size])
        offsets[r] += size

    for index in list(graphs):
        backward(graphs.pop(index), grads[index])  # each graph freed by its backward
    for index, state in enumerate(states):
        state.restore()
        with torch.enable_grad():
            backward_chunk(flat[index][1], grads[index])
    after_first_pass.restore()  # the random stream goes on as after one encoding of each mini-batch (plain loss)
    return loss.item(), candidates


def backpropagate(embeddings: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The scalar whose backward sends `grad` (the cached gradient of the loss) into `embeddings`' graph."""
    return torch.dot(embeddings.flatten(), grad.flatten())
