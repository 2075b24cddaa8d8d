"""BLIP-2 stage-1 losses on plain tensors (ITC, ITM hard negatives, ITG), and the cross-rank gather they need.

Kept apart from the model so each formula can be checked against a naive computation on the same
tensors, and so the distributed part (who sees which negatives, how gradients cross ranks) is in one place.

Distributed contract (DDP or FSDP, any backend): every rank calls these functions on its local batch;
the in-batch negatives are all ranks' rows. With ``gather_with_grad=True`` the gathered rows carry their
gradient back to the rank that produced them (the backward all-reduces the gradient of the whole gathered
tensor and keeps this rank's slice). Each rank's loss is the mean over its LOCAL rows; DDP/FSDP average
gradients over ranks, so with equal local batch sizes N processes compute exactly the loss (the mean of
the ranks' losses) and the gradients of one process holding the whole batch. With unequal local sizes,
multiply each rank's loss by ``world_size * local_rows / global_rows`` (see :class:`ContrastiveOutput`)
for the same equality.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F


# -- gathering across ranks ---------------------------------------------------------------------------
def distributed_world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_sizes(rows: int, device: torch.device) -> list[int]:
    size = torch.tensor([rows], device=device, dtype=torch.long)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    return [int(s.item()) for s in sizes]


def _gather_padded(x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Concatenate every rank's ``x`` (row counts ``sizes``) along dim 0, padding to a common shape on the wire."""
    most = max(sizes)
    padded = x if x.shape[0] == most else torch.cat((x, x.new_zeros(most - x.shape[0], *x.shape[1:])))
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


class _GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward returns this rank's slice of the all-reduced (summed) gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: list[int], rank: int) -> torch.Tensor:
        ctx.sizes, ctx.rank = sizes, rank
        return _gather_padded(x, sizes)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad)  # every rank's loss may depend on every row
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None, None


def gather_rows(x: torch.Tensor, with_grad: bool = True) -> tuple[torch.Tensor, int]:
    """All ranks' rows of ``x`` concatenated in rank order, and the index of this rank's first row.

    ``with_grad=True``: the result is differentiable w.r.t. every rank's ``x`` (open_clip's
    ``gather_with_grad``). ``with_grad=False``: the result is detached, this rank's rows included (LAVIS's
    ``concat_all_gather``). Ranks may hold different numbers of rows. One process: ``x`` itself (detached
    when ``with_grad=False``), offset 0.
    """
    rank, world = distributed_world()
    if world == 1:
        return (x if with_grad else x.detach()), 0
    sizes = _all_sizes(x.shape[0], x.device)
    offset = sum(sizes[:rank])
    if with_grad:
        return _GatherWithGrad.apply(x, sizes, rank), offset
    with torch.no_grad():
        return _gather_padded(x.detach(), sizes), offset


def pad_to_global_length(ids: torch.Tensor, mask: torch.Tensor, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad (B, L) token ids and mask to the longest L over all ranks, so they can be gathered."""
    _, world = distributed_world()
    length = ids.shape[1]
    if world > 1:
        most = torch.tensor([length], device=ids.device)
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        length = int(most.item())
    if length > ids.shape[1]:
        extra = length - ids.shape[1]
        ids = F.pad(ids, (0, extra), value=pad_id)
        mask = F.pad(mask, (0, extra), value=0)
    return ids, mask


# -- ITC ------------------------------------------------------------------------------------------------
@dataclass
class ContrastiveOutput:
    """BLIP-2's image-text contrastive loss and the similarities it was computed from.

    ``sim_i2t``: (local images, global texts) and ``sim_t2i``: (local texts, global images), both divided
    by the temperature; the positive of local row ``i`` is global column ``offset + i``.
    ``local_rows / global_rows`` gives the factor for unequal batch sizes (module docstring).
    """

    loss: torch.Tensor
    sim_i2t: torch.Tensor
    sim_t2i: torch.Tensor
    offset: int
    local_rows: int
    global_rows: int


def max_query_similarity(image_feats: torch.Tensor, text_feats: torch.Tensor) -> torch.Tensor:
    """(I, Q, D) query features x (T, D) text features -> (I, T): the best query's dot product per pair."""
    return torch.einsum("iqd,td->itq", image_feats, text_feats).amax(-1)


def itc_loss(
    image_feats: torch.Tensor,
    text_feats: torch.Tensor,
    temperature: torch.Tensor | float,
    label_smoothing: float = 0.1,
    gather_with_grad: bool = True,
) -> ContrastiveOutput:
    """BLIP-2's ITC on this rank's rows against every rank's rows.

    ``image_feats``: (B, Q, D) L2-normalised projected query outputs; ``text_feats``: (B, D) L2-normalised
    projected text [CLS]; pair i is (image i, text i). similarity(image, text) = max over queries of the
    dot product, divided by ``temperature``; loss = (CE(image -> texts) + CE(text -> images)) / 2 with
    ``label_smoothing``, averaged over the local rows. ``gather_with_grad=False`` reproduces LAVIS: the
    gathered features (this rank's included) carry no gradient, so each direction trains one side only.
    """
    image_all, offset = gather_rows(image_feats, gather_with_grad)
    text_all, _ = gather_rows(text_feats, gather_with_grad)
    sim_i2t = max_query_similarity(image_feats, text_all) / temperature
    sim_t2i = max_query_similarity(image_all, text_feats).t() / temperature
    rows = image_feats.shape[0]
    targets = torch.arange(offset, offset + rows, device=image_feats.device)
    loss = (
        F.cross_entropy(sim_i2t.float(), targets, label_smoothing=label_smoothing)
        + F.cross_entropy(sim_t2i.float(), targets, label_smoothing=label_smoothing)
    ) / 2
    return ContrastiveOutput(loss, sim_i2t, sim_t2i, offset, rows, image_all.shape[0])


# -- ITM hard negatives ---------------------------------------------------------------------------------
def same_caption(ids: torch.Tensor, mask: torch.Tensor, ids_all: torch.Tensor, mask_all: torch.Tensor) -> torch.Tensor:
    """(B, B_all) True where local caption i and caption j have the same tokens (padding ignored)."""
    if ids.shape[1] != ids_all.shape[1]:
        raise ValueError("pad the local and the gathered ids to one length first (pad_to_global_length)")
    a = ids.masked_fill(mask == 0, -1)
    b = ids_all.masked_fill(mask_all == 0, -1)
    return (a[:, None, :] == b[None, :, :]).all(-1)


def negative_exclusion(
    offset: int,
    local_rows: int,
    global_rows: int,
    image_ids: torch.Tensor | None = None,
    image_ids_all: torch.Tensor | None = None,
    caption_equal: torch.Tensor | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """(B, B_all) True where global pair j must not be a negative for local pair i.

    Excluded: the positive (j = offset + i); every pair with the same image id (the same image, or a
    caption of it); every pair whose caption is identical (``caption_equal``, from :func:`same_caption`).
    The same mask serves both directions: a text of pair j for image i, an image of pair j for text i.
    """
    if device is None:
        device = caption_equal.device if caption_equal is not None else image_ids.device if image_ids is not None else None
    local = torch.arange(local_rows, device=device)
    exclude = torch.zeros(local_rows, global_rows, dtype=torch.bool, device=device)
    exclude[local, offset + local] = True
    if image_ids is not None:
        exclude |= image_ids[:, None] == image_ids_all[None, :]
    if caption_equal is not None:
        exclude |= caption_equal
    return exclude


def sample_hard_negatives(
    similarity: torch.Tensor, exclude: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One negative column per row, drawn from softmax(similarity) over the allowed columns.

    Returns (indices (B,), valid (B,)). Excluded columns have probability exactly 0. A row with no allowed
    column (all its candidates are positives or duplicates, e.g. a batch of one image) gets ``valid=False``
    and index 0: its negative pair must be left out of the ITM loss (:meth:`Blip2Stage1` does so).
    LAVIS instead adds 1e-4 to every weight, which can pick a positive; here a positive is never picked.
    """
    with torch.no_grad():
        logits = similarity.detach().float().masked_fill(exclude, float("-inf"))
        valid = ~exclude.all(dim=1)
        weights = torch.softmax(logits, dim=1)
        weights = torch.where(valid[:, None], weights, torch.ones_like(weights))  # placeholder rows
        weights = weights.nan_to_num(0.0)
        picked = torch.multinomial(weights, 1, generator=generator).squeeze(1)
        return torch.where(valid, picked, torch.zeros_like(picked)), valid


# -- ITM and ITG losses ---------------------------------------------------------------------------------
def itm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the 2-way ITM logits (rows: pairs, already averaged over the queries)."""
    return F.cross_entropy(logits.float(), labels)


def itg_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.1) -> torch.Tensor:
    """Next-token cross-entropy: text position t predicts ``labels[t + 1]``; -100 labels (padding) are ignored.

    ``label_smoothing`` 0.1 is LAVIS's BERT LM head; 0 gives the plain cross-entropy.
    """
    return F.cross_entropy(
        logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100, label_smoothing=label_smoothing
    )
