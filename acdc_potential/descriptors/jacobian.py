"""Density coefficients of chosen centres and their Jacobian with respect to positions and strain.

Fit-time companions of :class:`~acdc_potential.descriptors.density.DensityExpansion`:
the design rows of a fit need ``dc_i / d(x, eps)`` once per structure, which forward-mode
passes over pair contributions give without a reverse pass per atom. Exported models never
call these (they differentiate the energy by autograd).
"""

from typing import Optional, Tuple

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
    expansion: DensityExpansion, batch: AtomsBatch, pair_budget: float = 1e6, centres: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Derivatives of each atom's coefficients with respect to its structure's positions and strain.

    :param centres: the atoms whose coefficients are differentiated (indices ``[n]``;
        default: all ``N``).
    :return: ``[n, 3 n_max + 9, D]``: column ``3 j + alpha`` is ``d c_i / d x_{j alpha}`` (``j``
        numbered within the structure, ``n_max`` the largest structure of the batch), column
        ``3 n_max + 3 alpha + beta`` is ``d c_i / d eps_{alpha beta}`` under ``x -> (1 + eps) x``
        of positions and cell, which moves every pair vector to ``(1 + eps) r``.

    Each pair contribution ``phi_p`` depends on its own vector ``r_p`` only, so three
    forward-mode passes (tangent ``e_alpha`` on every pair at once) give every
    ``d phi_p / d r_p``; pairs go in chunks of ``pair_budget / D``.
    """
    pairs, centre_row, n_centres = _centre_pairs(batch, centres)
    vectors = batch.pair_vectors()[pairs].detach()
    neighbor_species = expansion.species_index(batch.numbers)[batch.neighbors[pairs]]
    n_per = batch.atoms_per_structure()
    first = torch.cumsum(n_per, 0) - n_per
    n_max = int(n_per.max())
    width = 3 * n_max + 9
    local = torch.arange(batch.n_atoms, device=vectors.device) - first[batch.structure]
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
        columns = torch.cat([3 * local[j, None] + alpha, 3 * local[i, None] + alpha, strain_columns], dim=1)
        strain = (dphi[:, :, :, None] * v[:, None, None, :]).reshape(v.shape[0], dimension, 9)
        values = torch.cat([dphi, -dphi, strain], dim=2).transpose(1, 2).reshape(-1, dimension)
        rows = centre_row[start : start + step]
        jacobian.index_add_(0, (rows[:, None] * width + columns).reshape(-1), values)
    return jacobian.view(n_centres, width, -1)


def internal_directions(batch: AtomsBatch, strain: bool, tolerance: float = 1e-6) -> Tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal bases of the directions along which a structure's invariants can change.

    Among a structure's columns of :func:`structure_jacobian` (its ``3 n_s`` positions, and the 9
    strain components when ``strain``), the rigid motions leave every pair distance, hence every
    invariant of its atoms, unchanged: the three translations; the three rotations of the
    positions about their centroid for a structure periodic in no direction; the three
    antisymmetric strains (rotations of positions and cell together) when ``strain``. A gradient
    ``g`` that vanishes along them is ``g = B^T (B g)`` for the rows ``B`` ``[k_s, K]`` of an
    orthonormal basis of their complement, so its ``k_s`` components ``B g`` carry all of it:
    ``3 n_s - 6`` for a molecule (``- 5`` if linear) against ``3 n_max`` columns.

    :param strain: whether the 9 strain columns follow the ``3 n_max`` position columns.
    :param tolerance: singular values of a structure's rigid motions below this fraction of the
        largest are taken as zero (a linear molecule's rotation about its axis): their direction
        stays in the basis, where its derivative is computed rather than assumed zero.
    :return: ``basis`` ``[S, k_max, K]`` (``K = 3 n_max``, plus 9 with ``strain``; rows ``k >= k_s``
        of structure ``s`` zero) and ``counts`` ``[S]`` (``k_s``), in the batch's dtype and device.
    """
    n_per = batch.atoms_per_structure().tolist()
    n_max = max(n_per)
    width = 3 * n_max + (9 if strain else 0)
    positions = batch.positions.detach().to("cpu", torch.float64)
    periodic = batch.pbc.detach().to("cpu").any(dim=1).tolist()
    complements = []
    first = 0
    for s, n in enumerate(n_per):
        columns = list(range(3 * n)) + (list(range(3 * n_max, 3 * n_max + 9)) if strain else [])
        rigid = torch.zeros((len(columns), 9), dtype=torch.float64)
        for alpha in range(3):
            rigid[alpha : 3 * n : 3, alpha] = 1.0
        if not periodic[s]:
            x = positions[first : first + n]
            x = x - x.mean(dim=0)
            for beta in range(3):
                rigid[: 3 * n, 3 + beta] = torch.linalg.cross(torch.eye(3, dtype=torch.float64)[beta].expand(n, 3), x).reshape(-1)
        if strain:
            for k, (alpha, beta) in enumerate(((0, 1), (0, 2), (1, 2))):
                rigid[3 * n + 3 * alpha + beta, 6 + k] = 1.0
                rigid[3 * n + 3 * beta + alpha, 6 + k] = -1.0
        u, sigma, _ = torch.linalg.svd(rigid, full_matrices=True)
        rank = int((sigma > tolerance * sigma.max()).sum())
        complements.append((columns, u[:, rank:].T))
        first += n
    counts = [block.shape[0] for _, block in complements]
    # one row at least: single atoms have no internal direction, and empty blocks help no kernel
    basis = torch.zeros((len(n_per), max(1, max(counts)), width), dtype=torch.float64)
    for s, (columns, block) in enumerate(complements):
        basis[s, : block.shape[0], columns] = block
    like = batch.positions
    return basis.to(like.device, like.dtype), torch.tensor(counts, device=like.device)
