"""Sparse environments: farthest point sampling and CUR per central species."""

import warnings
from typing import Dict, Union

import scipy.linalg
import torch
from ase.data import chemical_symbols

from ..descriptors.acdc import unit_rows
from ..errors import SparseSelectionWarning


def farthest_point_sampling(features: torch.Tensor, n_select: int, first: int = 0) -> torch.Tensor:
    """Greedy farthest point sampling in Euclidean feature space.

    :param features: ``[n, F]``.
    :return: ``[k]`` indices, ``k <= n_select``; stops early when the remaining points
        duplicate selected ones (distance below ``1e-12`` of the largest), since duplicate
        sparse environments only make ``K_MM`` singular.

    Squared distances to each new point come from one matrix-vector product,
    ``|x|^2 + |x_b|^2 - 2 x . x_b`` (a pass over the features, without an ``[n, F]`` temporary:
    wide feature sets make this step memory-bound). That form rounds at about ``1e-16 |x|^2``: once
    the farthest remaining point is closer than ``1e-12 |x|^2`` (squared), the distances are
    recomputed as ``|x - x_b|^2`` and kept so from then on.
    """
    n = features.shape[0]
    n_select = min(n_select, n)
    squares = (features * features).sum(dim=1)
    resolution = 1e-12 * float(squares.max()) if n else 0.0
    exact = False

    def to(b: int) -> torch.Tensor:
        if exact:
            return torch.linalg.vector_norm(features - features[b], dim=1) ** 2
        return (squares + squares[b] - 2.0 * (features @ features[b])).clamp_min(0.0)

    selected = [first]
    distance = to(first)
    distance[first] = 0.0
    nearest = torch.full((n,), first, dtype=torch.long, device=features.device)
    scale = float(distance.max()) if n > 1 else 0.0
    while len(selected) < n_select:
        best = int(torch.argmax(distance))
        if not exact and float(distance[best]) <= resolution:
            exact = True
            distance = torch.linalg.vector_norm(features - features[nearest], dim=1) ** 2
            best = int(torch.argmax(distance))
        if float(distance[best]) <= 1e-24 * max(scale, 1e-300):
            break
        selected.append(best)
        new = to(best)
        nearest = torch.where(new < distance, best, nearest)
        distance = torch.minimum(distance, new)
        distance[best] = 0.0  # not the rounding of its distance to itself
    return torch.tensor(selected, dtype=torch.long, device=features.device)


def cur_selection(features: torch.Tensor, n_select: int) -> torch.Tensor:
    """Deterministic CUR row selection: column-pivoted QR of the top-``k`` left singular vectors.

    The pivots follow the statistical leverage of the rows while avoiding redundant ones
    (Golub, Klema, Stewart's subset selection); beyond the numerical rank the remaining
    rows are added by farthest point sampling from the chosen ones.
    """
    n = features.shape[0]
    n_select = min(n_select, n)
    u, s, _ = torch.linalg.svd(features, full_matrices=False)
    rank = int((s > s[0] * 1e-10).sum()) if s.numel() else 0
    k = min(n_select, rank)
    if k == 0:
        return torch.zeros(1, dtype=torch.long, device=features.device)
    _, _, pivots = scipy.linalg.qr(u[:, :k].T.cpu().numpy(), pivoting=True, mode="economic")
    chosen = torch.tensor(pivots[:k], dtype=torch.long, device=features.device)
    if k == n_select:
        return chosen
    distance = torch.cdist(features, features[chosen]).min(dim=1).values ** 2
    extra = []
    while len(chosen) + len(extra) < n_select and float(distance.max()) > 0.0:
        best = int(torch.argmax(distance))
        extra.append(best)
        distance = torch.minimum(distance, torch.linalg.vector_norm(features - features[best], dim=1) ** 2)
    return torch.cat([chosen, torch.tensor(extra, dtype=torch.long, device=features.device)])


def select_sparse(
    features: torch.Tensor,
    species: torch.Tensor,
    n_sparse: Union[int, Dict[int, int]],
    method: str = "fps",
) -> torch.Tensor:
    """Sparse environments per central species, on normalised features.

    :param features: ``[n, F]`` invariant features of candidate environments (e.g. the
        power spectrum).
    :param species: ``[n]`` central atomic numbers.
    :param n_sparse: number per species, or a dict ``{atomic number: number}``.
    :param method: ``"fps"`` or ``"cur"``.
    :return: indices into the candidates, grouped by species (ascending atomic number).
    """
    if method not in ("fps", "cur"):
        raise ValueError(f"unknown sparse selection method {method!r}; use 'fps' or 'cur'")
    unit = unit_rows(features)
    chosen = []
    for z in torch.unique(species).tolist():
        candidates = torch.nonzero(species == z).flatten()
        count = n_sparse.get(z, 0) if isinstance(n_sparse, dict) else n_sparse
        if count <= 0:
            raise ValueError(f"no sparse environments requested for species {z}, which is in the training set")
        x = unit[candidates]
        local = farthest_point_sampling(x, count) if method == "fps" else cur_selection(x, count)
        if local.numel() < count:
            warnings.warn(shortfall(chemical_symbols[z], x, local.numel(), count, method), SparseSelectionWarning, stacklevel=2)
        chosen.append(candidates[local])
    return torch.cat(chosen)


def shortfall(symbol: str, features: torch.Tensor, selected: int, count: int, method: str) -> str:
    """Why ``selected`` sparse environments of ``symbol`` were chosen instead of ``count``,
    from the candidates' unit ``features`` ``[n, F]``."""
    n = features.shape[0]
    if n < count and selected == n:
        why = f"the training set has only {n} environments of {symbol}, all used"
    else:
        distinct = torch.unique(features, dim=0).shape[0]
        if distinct <= selected:
            why = f"only {distinct} of its {n} environments of {symbol} are distinct in feature space"
        else:
            why = f"{method} stopped where the remaining environments of {symbol} duplicate selected ones (numerical rank of the features)"
    return f"{selected} sparse environments of {symbol} instead of the {count} asked: {why}"


def selection_prefix(species: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the first ``count`` sparse environments of every species ``[M]`` (in the
    order of :func:`select_sparse`, whose prefixes are themselves
    farthest-point or CUR selections; or of a feature-space basis, the principal axes first)."""
    keep = torch.zeros_like(species, dtype=torch.bool)
    for z in torch.unique(species).tolist():
        keep[torch.nonzero(species == z).flatten()[:count]] = True
    return torch.nonzero(keep).flatten()
