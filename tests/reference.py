"""Sort-based reference selection (the authors' argsort + scatter), for agreement tests."""
import torch


def ref_topk_mask(scores: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Rows of ``scores`` (2-D): keep the k largest |s| per row, ties by lower index."""
    a = scores.abs().double()
    order = torch.sort(-a, dim=1, stable=True).indices
    ranks = torch.arange(a.shape[1]).expand_as(a)
    return torch.zeros_like(a, dtype=torch.bool).scatter_(1, order, ranks < k.reshape(-1, 1))


def ref_neff(scores: torch.Tensor, dim=None) -> torch.Tensor:
    a = scores.abs().double()
    s1 = a.sum() if dim is None else a.sum(dim)
    s2 = (a * a).sum() if dim is None else (a * a).sum(dim)
    n = a.numel() if dim is None else a.shape[dim]
    return torch.where(s2 > 0, s1 * s1 / torch.where(s2 > 0, s2, 1), torch.full_like(s1, float(n)))
