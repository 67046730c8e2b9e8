"""Density coefficients of chosen centres and their Jacobian with respect to positions and strain.

Fit-time companions of :class:`~acdc_potential.descriptors.density.DensityExpansion`:
the design rows of a fit need ``dc_i / d(x, eps)`` once per structure, which forward-mode
passes over pair contributions give without a reverse pass per atom. Exported models never
call these (they differentiate the energy by autograd).
"""

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch

from .density import DensityExpansion, Layout
from .neighbors import AtomsBatch


def _pair_contributions(
    expansion: DensityExpansion, vectors: torch.Tensor, neighbor_species: torch.Tensor
) -> Tuple[torch.Tensor, Layout]:
    """``[P, D]`` flat density contribution of every pair (each pair its own "centre"), and the layout.

    :param vectors: ``[P, 3]`` pair vectors; :param neighbor_species: ``[P]`` species index of
        each neighbour.
    """
    n_pairs = vectors.shape[0]
    own = torch.arange(n_pairs, device=vectors.device)
    contributions = expansion.forward(vectors, own, neighbor_species, n_pairs)
    layout = Layout.of(contributions)
    return layout.flatten(contributions), layout


def _centre_pairs(batch: AtomsBatch, centres: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """Pairs whose centre is among ``centres`` (atom indices ``[n]``; ``None``: every atom).

    :return: ``[P']`` indices of those pairs, ``[P']`` the row of each pair's centre in
        ``centres``, and ``n``.
    """
    if centres is None:
        return torch.arange(batch.centers.shape[0], device=batch.centers.device), batch.centers, batch.n_atoms
    row = torch.full((batch.n_atoms,), -1, dtype=torch.long, device=batch.centers.device)
    row[centres] = torch.arange(centres.numel(), device=centres.device)
    pairs = torch.nonzero(row[batch.centers] >= 0).flatten()
    return pairs, row[batch.centers[pairs]], centres.numel()


def batch_density(
    expansion: DensityExpansion, batch: AtomsBatch, centres: Optional[torch.Tensor] = None
) -> Tuple[torch.Tensor, Layout]:
    """Flat coefficients ``[n, D]`` of the atoms ``centres`` of ``batch`` (default: all ``N``;
    no gradients), and their layout."""
    pairs, row, n = _centre_pairs(batch, centres)
    neighbor_species = expansion.species_index(batch.numbers)[batch.neighbors[pairs]]
    with torch.no_grad():
        phi, layout = _pair_contributions(expansion, batch.pair_vectors()[pairs], neighbor_species)
    return phi.new_zeros((n, phi.shape[1])).index_add(0, row, phi), layout


def structure_jacobian(
    expansion: DensityExpansion,
    batch: AtomsBatch,
    pair_budget: float = 1e6,
    centres: Optional[torch.Tensor] = None,
    columns: Optional["InternalColumns"] = None,
) -> torch.Tensor:
    """Derivatives of each atom's coefficients with respect to its structure's positions and strain.

    :param centres: the atoms whose coefficients are differentiated (indices ``[n]``;
        default: all ``N``).
    :param columns: only these columns of each structure (:func:`internal_columns`), in their order.
    :return: ``[n, 3 n_max + 9, D]``: column ``3 j + alpha`` is ``d c_i / d x_{j alpha}`` (``j``
        numbered within the structure, ``n_max`` the largest structure of the batch), column
        ``3 n_max + 3 alpha + beta`` is ``d c_i / d eps_{alpha beta}`` under ``x -> (1 + eps) x``
        of positions and cell, which moves every pair vector to ``(1 + eps) r``; with ``columns``,
        ``[n, k, D]``, the kept columns of each atom's structure (zero where they pad).

    Each pair contribution ``phi_p`` depends on its own vector ``r_p`` only, so three
    forward-mode passes (tangent ``e_alpha`` on every pair at once) give every
    ``d phi_p / d r_p``; pairs go in chunks of ``pair_budget / D``.
    """
    pairs, centre_row, n_centres = _centre_pairs(batch, centres)
    vectors = batch.pair_vectors()[pairs].detach()
    neighbor_species = expansion.species_index(batch.numbers)[batch.neighbors[pairs]]
    n_max = int(batch.atoms_per_structure().max())
    width = 3 * n_max + 9 if columns is None else columns.kept.shape[1]
    place = None if columns is None else columns.positions(n_max)
    local = batch.local_index()
    alpha = torch.arange(3, device=vectors.device)
    dimension = expansion.coefficient_size()
    jacobian = vectors.new_zeros((n_centres * width, dimension))
    step = max(1, int(pair_budget // dimension))
    for start in range(0, vectors.shape[0], step):
        v, species = vectors[start : start + step], neighbor_species[start : start + step]
        i, j = batch.centers[pairs[start : start + step]], batch.neighbors[pairs[start : start + step]]

        def contributions(x: torch.Tensor) -> torch.Tensor:
            return _pair_contributions(expansion, x, species)[0]

        directions = torch.eye(3, dtype=v.dtype, device=v.device)[:, None, :].expand(3, v.shape[0], 3)
        dphi = torch.func.vmap(lambda t: torch.func.jvp(contributions, (v,), (t,))[1], out_dims=2)(directions)
        # per pair: +dphi on the neighbour's columns, -dphi on the centre's, dphi_alpha r_beta on strain
        strain_columns = 3 * n_max + torch.arange(9, device=v.device).expand(len(i), 9)
        targets = torch.cat([3 * local[j, None] + alpha, 3 * local[i, None] + alpha, strain_columns], dim=1)
        strain = (dphi[:, :, :, None] * v[:, None, None, :]).reshape(v.shape[0], dimension, 9)
        values = torch.cat([dphi, -dphi, strain], dim=2).transpose(1, 2).reshape(-1, dimension)
        rows = centre_row[start : start + step, None].expand_as(targets)
        if place is not None:  # the kept columns only, at their places
            targets = place[batch.structure[i][:, None], targets]
            wanted = (targets >= 0).reshape(-1)
            rows, targets, values = rows.reshape(-1)[wanted], targets.reshape(-1)[wanted], values[wanted]
        jacobian.index_add_(0, (rows * width + targets).reshape(-1), values)
    return jacobian.view(n_centres, width, -1)


@dataclass
class InternalColumns:
    """The columns of :func:`structure_jacobian` along which each structure's rows are computed, and
    how the others follow from them (:func:`internal_columns`).

    :param kept: ``[S, k]`` column of direction ``d`` of structure ``s`` (``width``: padding, a column
        that is zero).
    :param counts: ``[S]`` the directions ``k_s`` of each structure (the rest of its row pads).
    :param dropped: ``[S, r]`` the columns left out (``width``: padding).
    :param restore: ``[S, r, k]`` ``g[dropped[s, j]] = sum_d restore[s, j, d] g[kept[s, d]]`` for a
        gradient ``g`` that vanishes along the rigid motions.
    :param width: ``K``, the Jacobian's columns (``3 n_max``, plus 9 with strain).
    """

    kept: torch.Tensor
    counts: torch.Tensor
    dropped: torch.Tensor
    restore: torch.Tensor
    width: int

    def positions(self, n_max: int) -> torch.Tensor:
        """``[S, 3 n_max + 9]`` the place of each column of :func:`structure_jacobian` among the
        structure's kept directions, ``-1`` where it is dropped, pads, or is a strain column without strain."""
        place = torch.full((self.kept.shape[0], 3 * n_max + 10), -1, dtype=torch.long, device=self.kept.device)
        directions = torch.arange(self.kept.shape[1], device=self.kept.device).expand_as(self.kept)
        place.scatter_(1, self.kept, directions)
        place[:, self.width :] = -1
        return place[:, : 3 * n_max + 9]

    def full(self, derivatives: torch.Tensor) -> torch.Tensor:
        """Derivatives ``[..., S, M, k]`` along the kept directions as derivatives ``[..., S, M, K]``
        along every column: the kept ones as they are, the dropped ones restored (zero along the
        rigid motions)."""
        lead = derivatives.shape[:-1]
        out = derivatives.new_zeros(lead + (self.width + 1,))
        out.scatter_(-1, self.kept[:, None, :].expand(lead + (self.kept.shape[1],)), derivatives)
        restored = torch.einsum("...smd,sjd->...smj", derivatives, self.restore.to(derivatives))
        out.scatter_(-1, self.dropped[:, None, :].expand(lead + (self.dropped.shape[1],)), restored)
        return out[..., : self.width]


def internal_columns(batch: AtomsBatch, strain: bool, tolerance: float = 1e-6) -> InternalColumns:
    """For each structure, the columns of :func:`structure_jacobian` its invariants' gradients are
    computed along; the others follow from them.

    Among a structure's own columns (its ``3 n_s`` positions, and the 9 strain components when
    ``strain``), the rigid motions leave every pair distance, hence every invariant of its atoms,
    unchanged: the three translations; the three rotations of the positions about their centroid
    for a structure periodic in no direction; the three antisymmetric strains (rotations of positions
    and cell together) when ``strain``. With ``U`` ``[m, r]`` an orthonormal basis of their span, a
    gradient ``g`` that vanishes along them has ``U^T g = 0``, so ``r`` of its components follow from
    the others: ``g_dropped = -(U_dropped^T)^-1 U_kept^T g_kept``, the dropped columns chosen by a
    pivoted QR of ``U^T`` so that ``U_dropped`` is well conditioned. A molecule keeps ``3 n_s - 6``
    columns (``- 5`` if linear; none for a single atom) of the batch's ``3 n_max``; a periodic
    structure ``3 n_s - 3`` (plus 6 strain columns with ``strain``). The kept columns are columns
    of the Jacobian itself, so leaving the others out costs nothing.

    :param strain: whether the 9 strain columns follow the ``3 n_max`` position columns.
    :param tolerance: singular values of a structure's rigid motions below this fraction of the
        largest are taken as zero (a linear molecule's rotation about its axis): their direction
        stays among the kept columns, where it is computed rather than assumed zero.
    """
    import scipy.linalg  # here: exported models import this module's package, and must not load scipy

    n_per = batch.atoms_per_structure().tolist()
    n_max = max(n_per)
    width = 3 * n_max + (9 if strain else 0)
    positions = batch.positions.detach().to("cpu", torch.float64).numpy()
    periodic = batch.pbc.detach().to("cpu").any(dim=1).tolist()
    structures, first = [], 0
    for s, n in enumerate(n_per):
        columns = np.array(list(range(3 * n)) + (list(range(3 * n_max, width)) if strain else []))
        rigid = np.zeros((columns.size, 9))
        for alpha in range(3):
            rigid[alpha : 3 * n : 3, alpha] = 1.0
        if not periodic[s]:
            x = positions[first : first + n] - positions[first : first + n].mean(axis=0)
            for beta in range(3):
                rigid[: 3 * n, 3 + beta] = np.cross(np.eye(3)[beta], x).reshape(-1)
        if strain:
            for k, (alpha, beta) in enumerate(((0, 1), (0, 2), (1, 2))):
                rigid[3 * n + 3 * alpha + beta, 6 + k] = 1.0
                rigid[3 * n + 3 * beta + alpha, 6 + k] = -1.0
        u, sigma, _ = np.linalg.svd(rigid, full_matrices=False)
        u = u[:, sigma > tolerance * sigma.max()]
        _, _, pivots = scipy.linalg.qr(u.T, pivoting=True)
        dropped, kept = np.sort(pivots[: u.shape[1]]), np.sort(pivots[u.shape[1] :])
        restore = -np.linalg.solve(u[dropped].T, u[kept].T)
        structures.append((columns[kept], columns[dropped], restore))
        first += n
    k = max(1, max(kept.size for kept, _, _ in structures))
    r = max(dropped.size for _, dropped, _ in structures)
    all_kept = np.full((len(n_per), k), width)
    all_dropped = np.full((len(n_per), r), width)
    all_restore = np.zeros((len(n_per), r, k))
    for s, (kept, dropped, restore) in enumerate(structures):
        all_kept[s, : kept.size], all_dropped[s, : dropped.size], all_restore[s, : dropped.size, : kept.size] = kept, dropped, restore
    device = batch.positions.device
    counts = [kept.size for kept, _, _ in structures]
    return InternalColumns(
        torch.as_tensor(all_kept, dtype=torch.long, device=device),
        torch.as_tensor(counts, dtype=torch.long, device=device),
        torch.as_tensor(all_dropped, dtype=torch.long, device=device),
        torch.as_tensor(all_restore, dtype=torch.float64, device=device),
        width,
    )


def kept_jacobian(expansion: DensityExpansion, batch: AtomsBatch, centres: torch.Tensor, strain: bool) -> Tuple[InternalColumns, torch.Tensor]:
    """Each structure's :func:`internal_columns` and the :func:`structure_jacobian` of the atoms
    ``centres`` along them (``[n, k, D]``): what a kernel's derivative rows differentiate along."""
    columns = internal_columns(batch, strain)
    return columns, structure_jacobian(expansion, batch, centres=centres, columns=columns)
