"""Retrieval measures over a similarity matrix, CLIPScore and R-precision.

`similarity[i, j]` compares image i with text j; the match of image i is text i.
"""

from __future__ import annotations

import torch


def recall_at_k(similarity: torch.Tensor, k: int = 1) -> dict[str, float]:
    """Text->image and image->text recall@k when pair i matches pair i."""
    if similarity.dim() != 2 or similarity.size(0) != similarity.size(1):
        raise ValueError(f"need a square similarity matrix, got shape {tuple(similarity.shape)}")
    n = similarity.size(0)
    target = torch.arange(n)
    i2t = (similarity.topk(min(k, n), dim=1).indices == target[:, None]).any(1).float().mean()
    t2i = (similarity.t().topk(min(k, n), dim=1).indices == target[:, None]).any(1).float().mean()
    return {f"image_to_text_r@{k}": float(i2t), f"text_to_image_r@{k}": float(t2i)}


def clip_score(image_emb: torch.Tensor, text_emb: torch.Tensor, w: float = 2.5) -> float:
    """CLIPScore (Hessel et al. 2021): mean of w * max(cos(image_i, text_i), 0)."""
    cos = (image_emb * text_emb).sum(-1)
    return float((w * cos.clamp(min=0)).mean())


def r_precision(image_emb: torch.Tensor, text_emb: torch.Tensor, candidates: int = 100, seed: int = 0) -> float:
    """Share of images whose own text ranks first among itself and `candidates - 1` other texts
    drawn at random from the rest (AttnGAN's R-precision with R = 1)."""
    n = image_emb.size(0)
    if n < candidates:
        raise ValueError(f"R-precision with {candidates} candidates needs at least {candidates} pairs, got {n}")
    g = torch.Generator().manual_seed(seed)
    hits = 0
    for i in range(n):
        others = torch.randperm(n - 1, generator=g)[: candidates - 1]
        others = others + (others >= i).long()  # skip i itself
        sims = text_emb[torch.cat([torch.tensor([i]), others])] @ image_emb[i]
        hits += int(sims.argmax() == 0)
    return hits / n


def recall_with_relevance(scores: torch.Tensor, relevant: torch.Tensor, ks: tuple[int, ...] = (1, 10)) -> dict:
    """Recall@k when a query may have several right answers: `scores` (Q, N) ranks N candidates
    for each query, `relevant` (Q, N) marks the right ones; a query scores a hit at k when any
    right candidate is in its top k. `chance_r@k` is the expected recall of a random ranking (per
    query 1 - C(N - m, k) / C(N, k), with m right candidates)."""
    if scores.shape != relevant.shape or scores.dim() != 2:
        raise ValueError(f"scores {tuple(scores.shape)} and relevant {tuple(relevant.shape)} must be the same (Q, N)")
    if not bool(relevant.any(1).all()):
        raise ValueError("every query needs at least one right candidate")
    from math import comb

    n = scores.size(1)
    m = relevant.sum(1).tolist()  # right candidates per query
    out = {}
    for k in ks:
        top = scores.topk(min(k, n), dim=1).indices  # (Q, k)
        out[f"r@{k}"] = float(relevant.gather(1, top).any(1).float().mean())
        out[f"chance_r@{k}"] = sum(1 - comb(n - r, min(k, n)) / comb(n, min(k, n)) for r in m) / len(m)
    return out
