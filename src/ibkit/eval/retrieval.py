"""Zero-shot image-text retrieval as BLIP-2 evaluates it: recall@k from a score matrix, ITM re-ranking.

Images have several reference texts (COCO: 5). Image -> text retrieval counts an image as found at k when
any of its texts is among its k best-scored texts; text -> image, when its own image is among the text's
k best-scored images. BLIP-2 (LAVIS ``compute_sim_matrix``) first scores all pairs by ITC similarity, then
re-scores each query's top ``k`` candidates by ITM + ITC; the other pairs keep a score below every
re-scored one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def retrieval_recall(scores: torch.Tensor, text_image: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """``{"i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5", ...}`` in percent, from ``scores`` (images x texts) and
    ``text_image`` (texts,) = the image each text describes."""
    images, texts = scores.shape
    if text_image.shape != (texts,):
        raise ValueError(f"text_image has shape {tuple(text_image.shape)}, expected ({texts},)")
    if images == 0 or texts == 0:
        raise ValueError("retrieval needs at least one image and one text")
    text_image = text_image.to(scores.device)
    owns = text_image[None, :] == torch.arange(images, device=scores.device)[:, None]  # (I, T)
    # rank of the best own text of each image / of each text's image
    order_i2t = scores.argsort(dim=1, descending=True)
    own_rank_i2t = torch.where(owns.gather(1, order_i2t), torch.arange(texts, device=scores.device), texts).min(1).values
    order_t2i = scores.t().argsort(dim=1, descending=True)
    own_rank_t2i = (order_t2i == text_image[:, None]).float().argmax(dim=1)
    out = {}
    for k in ks:
        out[f"i2t_r{k}"] = 100.0 * float((own_rank_i2t < k).float().mean())
        out[f"t2i_r{k}"] = 100.0 * float((own_rank_t2i < k).float().mean())
    return out


def rerank_top_k(
    similarity: torch.Tensor, k: int, pair_scores: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(image->text scores, text->image scores), both (images x texts): each query's top ``k`` candidates by
    ``similarity`` re-scored as ``pair_scores(image_rows, text_rows) + similarity`` (BLIP-2: ITM match logit +
    ITC); every other pair gets -inf (ranked after all re-scored ones)."""
    images, texts = similarity.shape
    i2t = torch.full_like(similarity, float("-inf"))
    t2i = torch.full_like(similarity, float("-inf"))
    for image in range(images):
        top = similarity[image].topk(min(k, texts)).indices
        rows = torch.full_like(top, image)
        i2t[image, top] = pair_scores(rows, top).to(similarity.dtype) + similarity[image, top]
    for text in range(texts):
        top = similarity[:, text].topk(min(k, images)).indices
        cols = torch.full_like(top, text)
        t2i[top, text] = pair_scores(top, cols).to(similarity.dtype) + similarity[top, text]
    return i2t, t2i


def reranked_recall(
    similarity: torch.Tensor,
    text_image: torch.Tensor,
    k: int,
    pair_scores: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ks: Sequence[int] = (1, 5),
) -> dict[str, float]:
    """Recall@ks after ITM re-ranking of the top ``k`` (image->text from one matrix, text->image from the other)."""
    i2t, t2i = rerank_top_k(similarity, k, pair_scores)
    forward, backward = retrieval_recall(i2t, text_image, ks), retrieval_recall(t2i, text_image, ks)
    return {key: (forward if key.startswith("i2t") else backward)[key] for key in forward}
