"""Sparse kernel ridge regression (projected process) on energies, forces and stresses.

The model (design.md section 2) is ``E(A) = sum_{i in A} [e0(a_i) + sum_m w_m k(A_i, M_m)]``
with a per-species baseline ``e0`` and a :class:`~acdc_potential.sparse.SparseKernel`
against the sparse environments ``M_m``. The weights minimise

    || Lambda^{-1/2} (y - K_NM w) ||^2 + w^T K_MM w

over rows of three kinds: one per structure energy (sum over atoms, sigma_E sqrt(N_atoms)),
``3 N`` force rows (minus position derivatives, sigma_F) and 6 stress rows per periodic
structure ((1/V) strain derivatives in Voigt order xx yy zz yz xz xy, ASE sign, sigma_S);
every row of a structure is also weighted by the structure's weight.

Rows are built per batch of structures: the density coefficients' Jacobian with respect to
positions and strain, ``dc_i / d(x, eps)`` (once per structure), is contracted with the
kernel's derivatives with respect to ``c_i`` (:meth:`SparseKernel.structure_derivatives`).
The design matrix keeps one slice per kernel piece, so mixing coefficients and
regularisers are tuned without recomputing kernels.
"""

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import scipy.optimize
import torch
from ase.data import chemical_symbols
from tqdm import tqdm

from .data import Labelled, labels_of, species_of, validate
from .density import DensityExpansion
from .neighbors import AtomsBatch, batch_from_atoms
from .radial import DensityHypers
from .sparse import Layout, SparseKernel, kernel_from_dict, select_sparse, sum_by_structure

ENERGY, FORCES, STRESS = 0, 1, 2
KIND_NAMES = ("energy", "forces", "stress")
VOIGT = ((0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1))
CHECKPOINT_FORMAT = "acdc-potential/sparse-krr/1"
# floor of the eigenvalues of K_MM relative to the largest (sparse_projection): ~500 machine epsilons
DEFAULT_JITTER = 1e-13


@dataclass
class Regularisers:
    """Expected errors (noise standard deviations) of the labels.

    :param energy: per atom, eV (an energy row's sigma is ``energy * sqrt(N_atoms)``).
    :param forces: eV/A.
    :param stress: eV/A^3.
    """

    energy: float = 0.002
    forces: float = 0.04
    stress: float = 0.001

    def of_kind(self) -> torch.Tensor:
        """``[3]`` sigmas indexed by row kind."""
        return torch.tensor([self.energy, self.forces, self.stress], dtype=torch.float64)


@dataclass
class Baseline:
    """Per-species reference energies ``e0(a)`` (eV), subtracted before the fit."""

    energies: Dict[int, float]

    @classmethod
    def fit(
        cls, structures: Sequence[Labelled], species: Sequence[int], isolated: Optional[Dict[int, float]] = None
    ) -> "Baseline":
        """Given isolated-atom energies, or least squares of the energies on composition.

        Compositions that do not determine every species (one molecule type) get the
        minimum-norm solution; the kernel's species piece absorbs what remains. Without
        any energy the baseline is zero.
        """
        if isolated is not None:
            missing = sorted(set(species) - set(int(z) for z in isolated))
            if missing:
                raise ValueError(f"no isolated-atom energy given for species {missing}")
            return cls({int(z): float(isolated[z]) for z in species})
        labelled = [s for s in structures if s.energy is not None]
        if not labelled:
            return cls({int(z): 0.0 for z in species})
        counts = np.array([[np.sum(s.atoms.numbers == z) for z in species] for s in labelled], dtype=np.float64)
        energies = np.array([s.energy for s in labelled])
        solution = np.linalg.lstsq(counts, energies, rcond=None)[0]
        return cls({int(z): float(e) for z, e in zip(species, solution)})

    def structure_energy(self, numbers: np.ndarray) -> float:
        return float(sum(self.energies[int(z)] for z in numbers))

    def atom_energies(self, numbers: torch.Tensor) -> torch.Tensor:
        """``[n]`` baseline energy of each atom from its atomic number ``[n]``."""
        table = torch.zeros(max(self.energies) + 1, dtype=torch.float64, device=numbers.device)
        table[torch.tensor(list(self.energies), device=numbers.device)] = torch.tensor(
            list(self.energies.values()), dtype=torch.float64, device=numbers.device
        )
        return table[numbers]


def mix_pieces(piece_weights: torch.Tensor, pieces: torch.Tensor) -> torch.Tensor:
    """``sum_p omega_p pieces[p]`` for the pieces' weights ``[n_pieces]`` and ``[n_pieces, ...]``."""
    return torch.einsum("p,p...->...", piece_weights.to(pieces), pieces)


@dataclass
class DesignMatrix:
    """Rows of the regression, per kernel piece.

    :param pieces: ``[n_pieces, R, M]`` rows of ``K_NM`` for each kernel piece.
    :param targets: ``[R]`` labels minus the baseline (energies, forces, stress).
    :param kind: ``[R]`` ENERGY / FORCES / STRESS.
    :param structure: ``[R]`` index of the row's structure in the input list.
    :param n_atoms: ``[R]`` number of atoms of the row's structure.
    :param weight: ``[R]`` the structure's weight.
    """

    pieces: torch.Tensor
    targets: torch.Tensor
    kind: torch.Tensor
    structure: torch.Tensor
    n_atoms: torch.Tensor
    weight: torch.Tensor

    def combine(self, piece_weights: torch.Tensor, rows: Union[None, slice, torch.Tensor] = None) -> torch.Tensor:
        """``K_NM`` for the pieces' weights ``[n_pieces]``: its ``rows`` (a slice or indices;
        default all ``R``), ``[rows, M]``."""
        return mix_pieces(piece_weights, self.pieces if rows is None else self.pieces[:, rows])

    def inverse_sigma(self, regularisers: Regularisers) -> torch.Tensor:
        """``[R]`` diagonal of ``Lambda^{-1/2}``."""
        sigma = regularisers.of_kind().to(self.targets)[self.kind]
        scale = torch.where(self.kind == ENERGY, self.n_atoms.to(self.targets).sqrt(), torch.ones_like(self.targets))
        return self.weight.sqrt() / (sigma * scale)

    def subset(self, rows: Optional[torch.Tensor] = None, columns: Optional[torch.Tensor] = None) -> "DesignMatrix":
        """The rows where ``rows`` ``[R]`` is true (default: all), restricted to the sparse
        environments ``columns`` (indices; default: all), with one copy of the pieces."""
        r = torch.nonzero(rows).flatten() if rows is not None else torch.arange(self.targets.shape[0], device=self.targets.device)
        pieces = self.pieces[:, r] if columns is None else self.pieces[:, r[:, None], columns[None, :]]
        return DesignMatrix(pieces, self.targets[r], self.kind[r], self.structure[r], self.n_atoms[r], self.weight[r])

    def kinds_present(self) -> List[int]:
        return sorted(set(self.kind.tolist()))


def _rows_of(structure: Labelled, energies: bool, forces: bool, stress: bool) -> Tuple[bool, bool, bool]:
    return (
        energies and structure.energy is not None,
        forces and structure.forces is not None,
        stress and structure.stress is not None,
    )


def _row_count(structure: Labelled, wanted: Tuple[bool, bool, bool]) -> int:
    """Rows of ``structure`` for its ``wanted`` (energy, forces, stress) of :func:`_rows_of`."""
    use_e, use_f, use_s = wanted
    return int(use_e) + (3 * structure.n_atoms if use_f else 0) + (6 if use_s else 0)


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
    dimension = sum((2 * l + 1) * expansion.n_species * n for l, n in enumerate(expansion.n_radial))
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


def _voigt(tensor: torch.Tensor) -> torch.Tensor:
    """``[..., 3, 3]`` -> ``[..., 6]`` of the symmetric part, order xx yy zz yz xz xy."""
    symmetric = 0.5 * (tensor + tensor.transpose(-1, -2))
    return torch.stack([symmetric[..., a, b] for a, b in VOIGT], dim=-1)


def _batches(structures: Sequence[Labelled], cost, budget: float) -> List[List[int]]:
    """Consecutive groups of structure indices whose summed ``cost`` stays below ``budget``."""
    groups, current, total = [], [], 0.0
    for k, structure in enumerate(structures):
        c = cost(structure)
        if current and total + c > budget:
            groups.append(current)
            current, total = [], 0.0
        current.append(k)
        total += c
    if current:
        groups.append(current)
    return groups


def design_groups(
    structures: Sequence[Labelled], energies: bool, forces: bool, stress: bool, n_pieces: int, n_sparse: int, memory: float, seed: int = 0
) -> List[List[int]]:
    """Structure indices in groups whose design matrices (``n_pieces x rows x M`` float64) fit in
    ``memory`` bytes: all in their order if they fit together, else in a random order (``seed``)
    so that the first group, which the tuning sees, is a random sample of the data."""

    def size(s: Labelled) -> float:
        return 8.0 * n_pieces * n_sparse * _row_count(s, _rows_of(s, energies, forces, stress))

    if sum(size(s) for s in structures) <= memory:
        return [list(range(len(structures)))]
    order = torch.randperm(len(structures), generator=torch.Generator().manual_seed(seed)).tolist()
    return [[order[k] for k in group] for group in _batches([structures[k] for k in order], size, memory)]


def build_design_matrix(
    structures: Sequence[Labelled],
    expansion: DensityExpansion,
    kernel: SparseKernel,
    baseline: Baseline,
    energies: bool = True,
    forces: bool = True,
    stress: bool = True,
    budget: float = 3e7,
    progress: bool = False,
) -> DesignMatrix:
    """Rows for every label of ``structures`` (those absent are skipped).

    A structure's rows are sums over its atoms, and an atom of species ``a`` meets only the
    sparse environments of ``a`` (the kernels are zero across species), so the rows are
    built one central species at a time: the columns of ``a`` from the atoms of ``a``.
    Whatever the kernel keeps about one species' sparse environments between batches
    (:meth:`SparseKernel.clear_cache`) is then held for that species only. ``progress``
    shows a progress bar per species.

    :param budget: largest number of entries of the per-batch derivatives (``n_pieces x M x K``
        per structure, ``K = 3 n_atoms + 9`` directions) and coefficient Jacobians
        (``n_atoms x K x D``) held at once; sets the batch size (float64, 8 bytes each). The
        kernel bounds its own intermediates (``SparseKernel.max_pairs``).
    """
    wanted = [_rows_of(s, energies, forces, stress) for s in structures]
    counts = [_row_count(s, w) for s, w in zip(structures, wanted)]
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(int)
    n_rows, n_sparse, n_pieces = int(offsets[-1]), kernel.n_sparse, kernel.n_pieces
    if n_rows == 0:
        raise ValueError("no rows to fit: the structures have no energies, forces or stress to use")
    dimension = kernel.layout.size
    device = kernel.sparse_coefficients.device

    pieces = torch.zeros((n_pieces, n_rows, n_sparse), dtype=torch.float64, device=device)
    targets = torch.zeros(n_rows, dtype=torch.float64, device=device)
    kind = torch.zeros(n_rows, dtype=torch.long, device=device)
    row_structure = torch.zeros(n_rows, dtype=torch.long, device=device)
    row_atoms = torch.zeros(n_rows, dtype=torch.long, device=device)
    row_weight = torch.zeros(n_rows, dtype=torch.float64, device=device)
    for k, (s, (use_e, use_f, use_s)) in enumerate(zip(structures, wanted)):
        start, end = offsets[k], offsets[k + 1]
        row_structure[start:end], row_atoms[start:end], row_weight[start:end] = k, s.n_atoms, s.weight
        n3 = 3 * s.n_atoms if use_f else 0
        if use_e:
            targets[start] = s.energy - baseline.structure_energy(s.atoms.numbers)
            kind[start] = ENERGY
        if use_f:
            targets[start + use_e : start + use_e + n3] = torch.as_tensor(s.forces, dtype=torch.float64, device=device).reshape(-1)
            kind[start + use_e : start + use_e + n3] = FORCES
        if use_s:
            targets[end - 6 : end] = _voigt(torch.as_tensor(s.stress, dtype=torch.float64, device=device))
            kind[end - 6 : end] = STRESS

    def cost(s: Labelled) -> float:
        directions = 3 * s.n_atoms + 9
        return n_pieces * n_sparse * directions + s.n_atoms * directions * dimension

    # neighbour lists once, for every species' pass (small beside the rows)
    groups = [
        (group, batch_from_atoms([structures[k].atoms for k in group], expansion.cutoff, device=device, first_index=group[0]))
        for group in _batches(structures, cost, budget)
    ]
    for z in sorted({int(z) for s in structures for z in s.atoms.numbers}):
        columns = kernel.sparse_of(z)
        bar = tqdm(total=len(structures), desc=f"kernel rows, {chemical_symbols[z]} centres", unit="structure", disable=not progress)
        for group, batch in groups:
            centres = torch.nonzero(batch.numbers == z).flatten()
            bar.update(len(group))
            if centres.numel() == 0:
                continue
            c, _ = batch_density(expansion, batch, centres)
            owner = batch.structure[centres]
            if any(wanted[k][1] or wanted[k][2] for k in group):
                jacobian = structure_jacobian(expansion, batch, centres=centres)
                n_max = (jacobian.shape[1] - 9) // 3
                if not any(wanted[k][2] for k in group):
                    # no stress rows: the strain directions would only cost time
                    jacobian = jacobian[:, : 3 * n_max]
                values, derivatives = kernel.structure_derivatives(c, batch.numbers[centres], jacobian, owner, len(group))
            else:
                values = sum_by_structure(kernel.rows(c, batch.numbers[centres]), owner, len(group))
            values = values[:, :, columns]
            for t, k in enumerate(group):
                s, (use_e, use_f, use_s) = structures[k], wanted[k]
                start, end = offsets[k], offsets[k + 1]
                if use_e:
                    pieces[:, start, columns] = values[:, t]
                if use_f:
                    n3 = 3 * s.n_atoms
                    pieces[:, start + use_e : start + use_e + n3, columns] = -derivatives[:, t, columns, :n3].transpose(1, 2)
                if use_s:
                    strain = derivatives[:, t, columns, 3 * n_max :].reshape(n_pieces, columns.numel(), 3, 3)
                    pieces[:, end - 6 : end, columns] = _voigt(strain / abs(s.atoms.get_volume())).transpose(1, 2)
        bar.close()
        # the kernel may keep this species' sparse invariants between groups: free them
        kernel.clear_cache()
    return DesignMatrix(pieces, targets, kind, row_structure, row_atoms, row_weight)


@dataclass
class ProjectedProcess:
    """Solution of the projected-process regression.

    With ``K_MM = U diag(lambda) U^T`` (eigenvalues raised to at least ``jitter * lambda_max``:
    ``K_MM`` plus a small ridge where it is numerically singular), ``P = U lambda^{-1/2}``
    ``[M, r]`` (``r = M``) and ``w = P z``, the problem becomes ridge
    regression on ``Phi = K_NM P`` with ``|z|^2`` as penalty, solved by QR of
    ``[Lambda^{-1/2} Phi; I]`` = ``Q R``; no matrix is inverted.

    :param weights: ``[M]`` ``w``.
    :param projection: ``[M, r]`` ``P``.
    :param triangular: ``[r, r]`` ``R``, with ``R^T R = Phi^T Lambda^{-1} Phi + I``.
    """

    weights: torch.Tensor
    projection: torch.Tensor
    triangular: torch.Tensor

    def variance(self, k_xm: torch.Tensor, k_xx: torch.Tensor) -> torch.Tensor:
        """Predictive variance ``k_xx - k_xM K_MM^+ k_Mx + k_xM Sigma k_Mx`` of the projected process.

        :param k_xm: ``[n, M]`` kernel rows (atoms, or sums over a structure's atoms);
        :param k_xx: ``[n]`` the matching ``k(x, x)``. Returns ``[n]`` (eV^2 when the
            regularisers are in eV).
        """
        return projected_variance(k_xm, k_xx, self.projection, self.triangular)


def projected_variance(
    k_xm: torch.Tensor, k_xx: torch.Tensor, projection: torch.Tensor, triangular: torch.Tensor
) -> torch.Tensor:
    """``k_xx - |k_xM P|^2 + |R^-T P^T k_Mx|^2`` ``[n]`` (see :class:`ProjectedProcess`);
    TorchScript-compatible, used by exported models."""
    phi = k_xm @ projection
    posterior = torch.linalg.solve_triangular(triangular.T, phi.T, upper=False)
    return k_xx - (phi**2).sum(dim=1) + (posterior**2).sum(dim=0)


def solve_projected_process(
    k_nm: Union[torch.Tensor, Callable[[int, int], torch.Tensor]],
    targets: torch.Tensor,
    inverse_sigma: torch.Tensor,
    k_mm: torch.Tensor,
    jitter: float = DEFAULT_JITTER,
    block_rows: Optional[int] = None,
) -> ProjectedProcess:
    """Minimise ``|Lambda^{-1/2} (y - K_NM w)|^2 + w^T K_MM w`` (see :class:`ProjectedProcess`).

    :param k_nm: ``[R, M]``, or a function ``(start, stop)`` giving its rows ``start:stop``
        (so that the whole ``K_NM`` need not exist, :meth:`DesignMatrix.combine`).
    :param targets: ``[R]``; :param inverse_sigma: ``[R]`` ``Lambda^{-1/2}``;
    :param k_mm: ``[M, M]``.
    :param block_rows: rows of the stacked system factorised at once (default ``4 (r + 1)``).

    The R of the QR of ``[Lambda^{-1/2} K_NM P, Lambda^{-1/2} y; I, 0]`` holds ``R`` and, in
    its last column, ``Q^T y``; it is accumulated block by block (the R of ``[R_previous;
    block]``, a tall-skinny QR), so neither ``Q`` nor the stacked matrix is ever held whole.
    """
    projection = sparse_projection(k_mm, jitter)
    return _solution(stacked_triangle(k_nm, targets, inverse_sigma, projection, prior=True, block_rows=block_rows), projection)


def _solution(augmented: torch.Tensor, projection: torch.Tensor) -> ProjectedProcess:
    """The weights from the ``[r + 1, r + 1]`` triangle of :func:`stacked_triangle` (with the prior rows)."""
    rank = projection.shape[1]
    r, rhs = augmented[:rank, :rank], augmented[:rank, rank]
    z = torch.linalg.solve_triangular(r, rhs[:, None], upper=True)[:, 0]
    return ProjectedProcess(projection @ z, projection, r)


def sparse_projection(k_mm: torch.Tensor, jitter: float = DEFAULT_JITTER) -> torch.Tensor:
    """``P = U lambda^{-1/2}`` ``[M, M]`` of ``K_MM = U diag(lambda) U^T`` ``[M, M]``, every
    eigenvalue raised to at least ``jitter * lambda_max`` (see :class:`ProjectedProcess`).

    The eigen-directions of small ``lambda`` are kept, not dropped: they are smooth in
    the sparse environments but not in the forces, and dropping those below 1e-10 of the
    largest (half of them for 1000 ethanol environments per species) cost 40% of the force
    accuracy. The floor only keeps the problem well posed where ``K_MM`` is singular to
    working precision (duplicate environments), like GAP's sparse jitter.
    """
    eigenvalues, vectors = torch.linalg.eigh(0.5 * (k_mm + k_mm.T))
    floor = jitter * eigenvalues.max().clamp_min(1e-300)
    return vectors / eigenvalues.clamp_min(floor).sqrt()


def stacked_triangle(
    k_nm: Union[torch.Tensor, Callable[[int, int], torch.Tensor]],
    targets: torch.Tensor,
    inverse_sigma: torch.Tensor,
    projection: torch.Tensor,
    prior: bool = True,
    block_rows: Optional[int] = None,
    chunk_rows: int = 2048,
) -> torch.Tensor:
    """``[r + 1, r + 1]`` R factor of ``[Lambda^{-1/2} K_NM P, Lambda^{-1/2} y; I, 0]`` (without
    the ``[I, 0]`` rows unless ``prior``): its ``[:r, :r]`` is ``R`` and its ``[:r, r]`` is ``Q^T y``.

    Accumulated block by block (the R of ``[R_previous; block]``, a tall-skinny QR), so neither
    ``Q`` nor the stacked matrix is ever held whole; ``k_nm`` is asked for at most
    ``chunk_rows`` rows at a time. Arguments as :func:`solve_projected_process`.
    """
    rank = projection.shape[1]
    n_rows = targets.shape[0]
    total = n_rows + (rank if prior else 0)
    rows_of = k_nm if callable(k_nm) else (lambda start, stop: k_nm[start:stop])
    step = block_rows or 4 * (rank + 1)
    augmented = targets.new_zeros((0, rank + 1))
    for start in range(0, total, step):
        stop = min(start + step, total)
        block = targets.new_zeros((stop - start, rank + 1))
        data = min(stop, n_rows) - start  # rows of K_NM in this block (the rest: the identity)
        for first in range(0, data, chunk_rows):
            last = min(first + chunk_rows, data)
            weight = inverse_sigma[start + first : start + last, None]
            block[first:last, :rank] = rows_of(start + first, start + last) @ projection * weight
            block[first:last, rank] = targets[start + first : start + last] * weight[:, 0]
        identity = torch.arange(max(start, n_rows), max(stop, n_rows), device=block.device)
        block[identity - start, identity - n_rows] = 1.0
        augmented = torch.linalg.qr(torch.cat([augmented, block]), mode="r")[1]
    # fewer rows than columns (tiny problems without the prior): complete with zero rows
    return torch.cat([augmented, augmented.new_zeros((rank + 1 - augmented.shape[0], rank + 1))])


def scaled_regularisation_predictions(
    design: DesignMatrix,
    k_mm_pieces: torch.Tensor,
    piece_weights: torch.Tensor,
    regularisers: Regularisers,
    train: torch.Tensor,
    held_out: torch.Tensor,
    scales: torch.Tensor,
    jitter: float = DEFAULT_JITTER,
) -> torch.Tensor:
    """Predictions ``[n_scales, n_held]`` on the rows ``held_out`` of the model fitted on the
    rows ``train`` (indices) with every regulariser multiplied by each of ``scales``.

    With ``A = Lambda^{-1/2} K_NM P = Q U diag(s_k) V^T`` (one QR of the training rows, one SVD
    of its ``R``) and ``b = Lambda^{-1/2} y``, scaling every ``sigma`` by ``s`` gives
    ``z(s) = V diag(s_k / (s_k^2 + s^2)) U^T Q^T b``: the whole path for the price of one fit.
    """
    projection = sparse_projection(mix_pieces(piece_weights, k_mm_pieces), jitter)
    rank = projection.shape[1]

    def rows_of(start: int, stop: int) -> torch.Tensor:
        return design.combine(piece_weights, train[start:stop])

    triangle = stacked_triangle(
        rows_of, design.targets[train], design.inverse_sigma(regularisers)[train], projection, prior=False
    )
    u, singular, vh = torch.linalg.svd(triangle[:rank, :rank])
    projected = singular * (u.T @ triangle[:rank, rank])
    held = design.combine(piece_weights, held_out) @ projection @ vh.T  # [n_held, r]
    return (projected / (singular**2 + scales[:, None] ** 2)) @ held.T


def _fit_rows(
    designs: Iterable[DesignMatrix],
    k_mm_pieces: torch.Tensor,
    piece_weights: torch.Tensor,
    regularisers: Regularisers,
    jitter: float,
) -> ProjectedProcess:
    """Projected-process solution on all rows of the designs, for one mixing and set of
    regularisers. Each design is folded into the triangle of the tall-skinny QR as it comes
    (the R of ``[R; R_design]``, starting from the prior rows ``[I, 0]``) and released, so
    that a generator of designs never holds two at once."""
    projection = sparse_projection(mix_pieces(piece_weights, k_mm_pieces), jitter)
    rank = projection.shape[1]
    augmented = torch.eye(rank + 1, dtype=projection.dtype, device=projection.device)
    augmented[rank, rank] = 0.0
    for rows in designs:

        def k_nm(start: int, stop: int) -> torch.Tensor:
            return rows.combine(piece_weights, slice(start, stop))

        triangle = stacked_triangle(k_nm, rows.targets, rows.inverse_sigma(regularisers), projection, prior=False)
        augmented = torch.linalg.qr(torch.cat([augmented, triangle]), mode="r")[1]
        del rows, k_nm
    return _solution(augmented, projection)


def validation_errors(design: DesignMatrix, predictions: torch.Tensor) -> Dict[str, Dict[str, float]]:
    """MAE and RMSE per kind (energies per atom) of ``predictions`` ``[R]`` against ``design.targets``."""
    errors = {}
    for kind in design.kinds_present():
        mask = design.kind == kind
        residual = predictions[mask] - design.targets[mask]
        if kind == ENERGY:
            residual = residual / design.n_atoms[mask]
        errors[KIND_NAMES[kind]] = {"mae": float(residual.abs().mean()), "rmse": float(residual.pow(2).mean().sqrt())}
    return errors


@dataclass
class HyperparameterReport:
    """Chosen mixing coefficients and regularisers, with the validation loss and errors.

    ``validation_errors`` maps each kind (``energy`` per atom, ``forces``, ``stress``) to
    its ``mae`` and ``rmse`` on the held-out structures; ``tuned`` names the parameters
    that were optimised, ``evaluations`` and ``seconds`` the cost of the search;
    ``density_grid`` the validation loss of every point (``nu_max``, ``C``, ``r0``) of the
    grid of ``acdc_potential.config.select_on_grid``, if one ran; ``regulariser_scale`` the
    factor applied to every regulariser tuned on a prefix of the sparse set, chosen on the
    same held-out structures with all of it (1 when tuned on all of it).
    """

    mixing: Dict[str, float]
    regularisers: Regularisers
    loss: float
    validation_errors: Dict[str, Dict[str, float]]
    evaluations: int
    seconds: float
    tuned: List[str] = field(default_factory=list)
    density_grid: List[Dict[str, float]] = field(default_factory=list)
    regulariser_scale: float = 1.0

    def to_dict(self) -> Dict:
        return {**dataclasses.asdict(self), "regularisers": dataclasses.asdict(self.regularisers)}


def _splits(structures: torch.Tensor, folds: int, validation: float, seed: int) -> List[torch.Tensor]:
    """Validation masks over structures ``[S]``: ``folds`` folds, or one random split."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(structures), generator=generator)
    if folds >= 2:
        return [torch.isin(structures, structures[order[f::folds]]) for f in range(folds)]
    n_validation = max(1, int(round(validation * len(structures))))
    return [torch.isin(structures, structures[order[:n_validation]])]


def select_hyperparameters(
    design: DesignMatrix,
    k_mm_pieces: torch.Tensor,
    kernel: SparseKernel,
    regularisers: Regularisers,
    tune: Optional[Sequence[str]] = None,
    folds: int = 0,
    validation: float = 0.2,
    loss_weights: Optional[Dict[str, float]] = None,
    max_evaluations: int = 60,
    subsample: Optional[int] = None,
    sparse: Optional[torch.Tensor] = None,
    seed: int = 0,
    jitter: float = DEFAULT_JITTER,
) -> HyperparameterReport:
    """Tune mixing coefficients and regularisers on held-out structures (Nelder-Mead in log space).

    :param tune: names among ``kernel.mixing_names`` and ``energy, forces, stress``; default:
        every mixing coefficient except ``a`` (redundant with the regularisers' scale) and
        the regularisers of the kinds present.
    :param folds: ``k >= 2`` for k-fold cross-validation over structures, else one split
        with a ``validation`` fraction of the structures.
    :param loss_weights: weight of each kind's RMSE (each divided by the spread of its
        targets); default 1 for every kind present.
    :param max_evaluations: budget of the Nelder-Mead search (each evaluation is one
        projected-process solve per split, ``O(R M^2)``).
    :param subsample: tune on the rows of this many randomly chosen structures only, which
        makes each evaluation proportionally cheaper on large training sets.
    :param sparse: tune with these sparse environments only (indices into ``M``); each
        evaluation costs ``O(R M^2)``, so a subset makes tuning large models affordable
        (:func:`selection_prefix`). The regularisers found are then multiplied by the factor
        (among 121 from 10^-3 to 10^3) that minimises the same validation loss with all
        ``M`` (:func:`scaled_regularisation_predictions`: one QR and one SVD per split).
    """
    start = time.perf_counter()
    k_mm_all = k_mm_pieces
    if sparse is not None:
        k_mm_pieces = k_mm_pieces[:, sparse][:, :, sparse]
    rows = torch.ones_like(design.targets, dtype=torch.bool)
    if subsample is not None and subsample < len(torch.unique(design.structure)):
        everything = torch.unique(design.structure)
        chosen = everything[torch.randperm(len(everything), generator=torch.Generator().manual_seed(seed))[:subsample]]
        rows = torch.isin(design.structure, chosen)
    kinds = sorted(set(design.kind[rows].tolist()))
    present = [KIND_NAMES[k] for k in kinds]
    names = list(tune) if tune is not None else [n for n in kernel.mixing_names if n != "a"] + present
    weights = {name: 1.0 for name in present} if loss_weights is None else loss_weights
    structures = torch.unique(design.structure[rows])
    if len(structures) < 2:
        raise ValueError("hyperparameter selection needs at least two structures")
    held_out = [torch.isin(design.structure, structures[v]) & rows for v in _splits(structures, folds, validation, seed)]
    any_held_out = torch.stack(held_out).any(dim=0)
    # the held-out labels (no sparse column: the errors need targets and kinds only)
    labels = design.subset(any_held_out, torch.zeros(0, dtype=torch.long, device=design.targets.device))

    def split(mask: torch.Tensor) -> Tuple[DesignMatrix, DesignMatrix]:
        return design.subset(rows & ~mask, sparse), design.subset(mask, sparse)

    # one split is copied once; k folds would hold k - 1 copies of the rows, so they are copied per solve
    kept = [split(mask) for mask in held_out] if len(held_out) == 1 else None
    spread = {}
    for kind in kinds:
        mask = rows & (design.kind == kind)
        values = design.targets[mask] / (design.n_atoms[mask] if kind == ENERGY else 1)
        spread[KIND_NAMES[kind]] = float(values.std()) if values.numel() > 1 else 1.0
    initial = {**kernel.mixing, **dataclasses.asdict(regularisers)}

    def unpack(theta) -> Tuple[Dict[str, float], Regularisers]:
        values = {**initial, **{n: float(np.exp(t)) for n, t in zip(names, theta)}}
        mixing = {n: values[n] for n in kernel.mixing_names}
        return mixing, Regularisers(values["energy"], values["forces"], values["stress"])

    def loss_of(predictions: torch.Tensor) -> Tuple[float, Dict[str, Dict[str, float]]]:
        errors = validation_errors(labels, predictions[any_held_out])
        return sum(weights.get(k, 0.0) * e["rmse"] / max(spread[k], 1e-300) for k, e in errors.items()), errors

    def evaluate(theta):
        mixing, regs = unpack(theta)
        piece_weights = kernel.piece_weights(mixing)
        predictions = torch.zeros_like(design.targets)
        for k, mask in enumerate(held_out):
            train, test = kept[k] if kept is not None else split(mask)
            solution = _fit_rows([train], k_mm_pieces, piece_weights, regs, jitter)
            predictions[mask] = test.combine(piece_weights) @ solution.weights
        return loss_of(predictions)

    theta0 = np.log([initial[n] for n in names])
    # the simplex starts one factor of 3 away from the initial values in every direction
    simplex = np.vstack([theta0, theta0 + np.log(3.0) * np.eye(len(names))])
    options = {"maxfev": max_evaluations, "xatol": 1e-2, "fatol": 1e-4, "initial_simplex": simplex}
    result = scipy.optimize.minimize(lambda t: evaluate(t)[0], theta0, method="Nelder-Mead", options=options)
    loss, errors = evaluate(result.x)
    mixing, regs = unpack(result.x)
    scale = 1.0
    if sparse is not None and sparse.numel() < design.pieces.shape[2]:
        # the regularisers that suit a prefix of the sparse set are too small for all of it
        # (more sparse environments, more freedom): rescale them all, on the same split
        kept = None  # the copies of the prefix's rows are done with
        scales = torch.logspace(-3.0, 3.0, 121, dtype=torch.float64, device=design.targets.device)
        piece_weights = kernel.piece_weights(mixing)
        predictions = torch.zeros((scales.numel(), design.targets.shape[0]), dtype=torch.float64, device=design.targets.device)
        for mask in held_out:
            train, test = torch.nonzero(rows & ~mask).flatten(), torch.nonzero(mask).flatten()
            path = scaled_regularisation_predictions(design, k_mm_all, piece_weights, regs, train, test, scales, jitter)
            predictions[:, test] = path
        losses = [loss_of(p) for p in predictions]
        best = min(range(len(losses)), key=lambda k: losses[k][0])
        scale, (loss, errors) = float(scales[best]), losses[best]
        regs = Regularisers(*(scale * value for value in dataclasses.astuple(regs)))
    seconds = time.perf_counter() - start
    return HyperparameterReport(mixing, regs, float(loss), errors, int(result.nfev), seconds, names, regulariser_scale=scale)


def selection_prefix(species: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the first ``count`` sparse environments of every species ``[M]`` (in the
    order of :func:`~acdc_potential.sparse.select_sparse`, whose prefixes are themselves
    farthest-point or CUR selections)."""
    keep = torch.zeros_like(species, dtype=torch.bool)
    for z in torch.unique(species).tolist():
        keep[torch.nonzero(species == z).flatten()[:count]] = True
    return torch.nonzero(keep).flatten()


def _as_labelled(structures: Sequence) -> List[Labelled]:
    return [s if isinstance(s, Labelled) else labels_of(s, index=k) for k, s in enumerate(structures)]


def training_coefficients(structures: Sequence[Labelled], expansion: DensityExpansion, batch_size: int = 64, device=None):
    """Flat coefficients ``[N, D]``, atomic numbers ``[N]`` and layout of every atom of ``structures``."""
    coefficients, numbers, layout = [], [], None
    for start in range(0, len(structures), batch_size):
        members = structures[start : start + batch_size]
        batch = batch_from_atoms([s.atoms for s in members], expansion.cutoff, device=device, first_index=start)
        c, layout = batch_density(expansion, batch)
        coefficients.append(c)
        numbers.append(batch.numbers)
    return torch.cat(coefficients), torch.cat(numbers), layout


class SparseKRRModel:
    """A fitted sparse KRR potential: density, kernel with sparse set, weights, baseline.

    :param density_hypers: the density expansion's hyperparameters.
    :param species: atomic numbers the model knows (density channels and central species).
    :param kernel: the kernel, with its sparse environments and mixing coefficients.
    :param solution: the projected-process solution (weights and variance factors).
    :param baseline: per-species energies.
    :param regularisers: the regularisers used.
    :param report: the hyperparameter selection report, if any.
    :param expansion: an already built ``DensityExpansion(density_hypers, species)``
        (tabulating the radial integrals takes seconds).
    """

    def __init__(
        self,
        density_hypers: DensityHypers,
        species: Sequence[int],
        kernel: SparseKernel,
        solution: ProjectedProcess,
        baseline: Baseline,
        regularisers: Regularisers,
        report: Optional[HyperparameterReport] = None,
        expansion: Optional[DensityExpansion] = None,
    ):
        self.density_hypers = density_hypers
        self.species = [int(z) for z in species]
        self.expansion = expansion if expansion is not None else DensityExpansion(density_hypers, self.species)
        self.kernel = kernel
        self.solution = solution
        self.baseline = baseline
        self.regularisers = regularisers
        self.report = report

    @property
    def weights(self) -> torch.Tensor:
        return self.solution.weights

    def predict(
        self,
        structures: Sequence,
        forces: bool = True,
        stress: bool = True,
        uncertainty: bool = False,
        batch_size: int = 16,
    ) -> Dict[str, torch.Tensor]:
        """Energies and, on request, forces, stress and uncertainties of ``ase.Atoms`` or :class:`Labelled`.

        :return: ``energy`` ``[S]`` (eV); ``forces`` ``[N, 3]`` (eV/A, atoms concatenated);
            ``stress`` ``[S, 3, 3]`` (eV/A^3, ASE sign; NaN for structures not periodic in all
            directions); ``energy_uncertainty`` ``[S]`` and ``atom_uncertainty`` ``[N]`` (eV,
            square roots of the projected-process variances).
        """
        labelled = _as_labelled(structures)
        validate(labelled, species=self.species)
        outputs: Dict[str, List[torch.Tensor]] = {}
        for start in range(0, len(labelled), batch_size):
            members = labelled[start : start + batch_size]
            for key, value in self._predict_batch(members, start, forces, stress, uncertainty).items():
                outputs.setdefault(key, []).append(value)
        return {key: torch.cat(values) for key, values in outputs.items()}

    def _predict_batch(self, members: List[Labelled], first: int, forces: bool, stress: bool, uncertainty: bool):
        device = self.weights.device
        batch = batch_from_atoms([s.atoms for s in members], self.expansion.cutoff, device=device, first_index=first)
        positions = batch.positions.clone().requires_grad_(forces)
        strain = torch.zeros((batch.n_structures, 3, 3), dtype=torch.float64, device=device, requires_grad=stress)
        deformation = torch.eye(3, dtype=torch.float64, device=device) + strain
        strained = dataclasses.replace(
            batch,
            positions=torch.einsum("iab,ib->ia", deformation[batch.structure], positions),
            cells=torch.einsum("sab,skb->ska", deformation, batch.cells),
        )
        species = self.expansion.species_index(batch.numbers)
        c = self.kernel.layout.flatten(
            self.expansion.forward(strained.pair_vectors(), batch.centers, species[batch.neighbors], batch.n_atoms)
        )
        piece_weights = self.kernel.piece_weights().to(c)
        k_nm = mix_pieces(piece_weights, self.kernel.rows(c, batch.numbers))
        atom_energy = k_nm @ self.weights + self.baseline.atom_energies(batch.numbers)
        energy = atom_energy.new_zeros(batch.n_structures).index_add(0, batch.structure, atom_energy)
        out = {"energy": energy.detach()}
        inputs = [x for x, wanted in ((positions, forces), (strain, stress)) if wanted]
        if inputs:
            gradients = list(torch.autograd.grad(energy.sum(), inputs))
            if forces:
                out["forces"] = -gradients.pop(0)
            if stress:
                volume = torch.linalg.det(batch.cells).abs()
                periodic = batch.pbc.all(dim=1)
                symmetric = 0.5 * (gradients[0] + gradients[0].transpose(1, 2))
                stress_value = symmetric / volume.clamp_min(1e-300)[:, None, None]
                out["stress"] = torch.where(periodic[:, None, None], stress_value, torch.nan)
        if uncertainty:
            out.update(self._uncertainty(c.detach(), batch, k_nm.detach(), piece_weights))
        return out

    def _uncertainty(self, c: torch.Tensor, batch: AtomsBatch, k_nm: torch.Tensor, piece_weights: torch.Tensor):
        k_ii = piece_weights @ self.kernel.self_kernel(c, batch.numbers)
        atom_variance = self.solution.variance(k_nm, k_ii)
        k_sm = k_nm.new_zeros((batch.n_structures, k_nm.shape[1])).index_add(0, batch.structure, k_nm)
        k_ss = torch.stack(
            [
                piece_weights @ self.kernel.within(c[batch.structure == s], batch.numbers[batch.structure == s])
                for s in range(batch.n_structures)
            ]
        )
        structure_variance = self.solution.variance(k_sm, k_ss)
        return {
            "atom_uncertainty": atom_variance.clamp_min(0.0).sqrt(),
            "energy_uncertainty": structure_variance.clamp_min(0.0).sqrt(),
        }

    def to_dict(self) -> Dict:
        """Plain-dict checkpoint (tensors, numbers, strings), loadable with ``weights_only=True``."""
        return {
            "format": CHECKPOINT_FORMAT,
            "density_hypers": dataclasses.asdict(self.density_hypers),
            "species": list(self.species),
            "kernel": self.kernel.to_dict(),
            "weights": self.solution.weights,
            "projection": self.solution.projection,
            "triangular": self.solution.triangular,
            "baseline": {int(z): float(e) for z, e in self.baseline.energies.items()},
            "regularisers": dataclasses.asdict(self.regularisers),
            "report": None if self.report is None else self.report.to_dict(),
        }

    def save(self, path: str) -> None:
        torch.save(self.to_dict(), path)

    @classmethod
    def from_dict(cls, state: Dict) -> "SparseKRRModel":
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"not a {CHECKPOINT_FORMAT} checkpoint (format {state.get('format')!r})")
        report = state["report"]
        if report is not None:
            report = HyperparameterReport(**{**report, "regularisers": Regularisers(**report["regularisers"])})
        return cls(
            DensityHypers(**state["density_hypers"]),
            state["species"],
            kernel_from_dict(state["kernel"]),
            ProjectedProcess(state["weights"], state["projection"], state["triangular"]),
            Baseline({int(z): e for z, e in state["baseline"].items()}),
            Regularisers(**state["regularisers"]),
            report,
        )

    @classmethod
    def load(cls, path: str, map_location=None) -> "SparseKRRModel":
        return cls.from_dict(torch.load(path, map_location=map_location, weights_only=True))


def fit(
    structures: Sequence,
    density_hypers: DensityHypers,
    kernel: SparseKernel,
    n_sparse: Union[int, Dict[int, int]],
    regularisers: Regularisers = Regularisers(),
    selection: str = "fps",
    energies: bool = True,
    forces: bool = True,
    stress: bool = True,
    isolated_energies: Optional[Dict[int, float]] = None,
    species: Optional[Sequence[int]] = None,
    tune: bool = False,
    tune_options: Optional[Dict] = None,
    jitter: float = DEFAULT_JITTER,
    budget: float = 3e7,
    design_memory: float = 4e9,
    device=None,
    verbose: bool = False,
) -> SparseKRRModel:
    """Fit a sparse KRR potential on labelled structures (ase.Atoms or :class:`Labelled`).

    Steps: validate; baseline; density coefficients of every atom; sparse environments per
    species (``selection`` = ``"fps"`` | ``"cur"`` on the power spectrum); design matrix
    (energies/forces/stress as enabled and present); optionally :func:`select_hyperparameters`
    (``tune_options`` are its keyword arguments, and ``sparse_per_species``: tune with the
    first that many sparse environments of each species), which updates the kernel's mixing and the
    regularisers; projected-process solve. ``verbose`` reports each step, with timings
    and a progress bar over the kernel rows.

    ``design_memory`` (bytes) bounds the design matrix held at once: beyond it the tuning
    sees the rows of a random sample of the structures that fits (:func:`design_groups`),
    and the rows of the others are built group by group after it and folded into the
    final solve one at a time (:func:`_fit_rows`), so the peak memory of a fit does not
    grow with the data.
    """
    from .correlations import power_spectrum

    start = time.perf_counter()

    def log(message: str) -> None:
        if verbose:
            print(f"[{time.perf_counter() - start:7.1f} s] {message}", flush=True)

    labelled = _as_labelled(structures)
    species = sorted(int(z) for z in species) if species is not None else species_of(labelled)
    validate(labelled, species=species)
    log(f"tabulating the radial integrals ({len(labelled)} structures, species {species})")
    expansion = DensityExpansion(density_hypers, species)
    baseline = Baseline.fit(labelled, species, isolated_energies)
    log("density coefficients of every atom")
    coefficients, numbers, layout = training_coefficients(labelled, expansion, device=device)
    chosen = select_sparse(power_spectrum(layout.unflatten(coefficients)), numbers, n_sparse, selection)
    kernel.set_sparse(coefficients[chosen], numbers[chosen], layout)
    counts = {int(z): int((numbers[chosen] == z).sum()) for z in species}
    log(f"{len(chosen)} sparse environments by {selection} ({counts} per atomic number); building the kernel rows")
    groups = design_groups(labelled, energies, forces, stress, kernel.n_pieces, kernel.n_sparse, design_memory, (tune_options or {}).get("seed", 0))

    def rows_of(group: List[int]) -> DesignMatrix:
        return build_design_matrix([labelled[k] for k in group], expansion, kernel, baseline, energies, forces, stress, budget, progress=verbose)

    design = rows_of(groups[0])
    k_mm_pieces = kernel.sparse_block()
    streamed = f" (of {len(groups[0])} of the {len(labelled)} structures; the others' rows follow in {len(groups) - 1} groups into the final solve)" if len(groups) > 1 else ""
    log(f"design matrix: {design.pieces.shape[1]} rows x {design.pieces.shape[2]} sparse environments{streamed}")
    report = None
    if tune:
        options = dict(tune_options or {})
        per_species = options.pop("sparse_per_species", None)
        if per_species is not None and per_species > 0:
            options["sparse"] = selection_prefix(kernel.sparse_species, int(per_species))
        report = select_hyperparameters(design, k_mm_pieces, kernel, regularisers, jitter=jitter, **options)
        kernel.mixing = dict(report.mixing)
        regularisers = report.regularisers
        mixing = ", ".join(f"{k} = {v:.4g}" for k, v in report.mixing.items())
        sigmas = ", ".join(f"{k} = {v:.3g}" for k, v in dataclasses.asdict(regularisers).items())
        rescaled = f" (scaled by {report.regulariser_scale:.3g} for all {kernel.n_sparse} sparse environments)" if report.regulariser_scale != 1.0 else ""
        log(f"tuned on held-out structures ({report.evaluations} solves): {mixing}; regularisers {sigmas}{rescaled}")
    held = [design]
    del design  # from here on only `held` refers to it, so the solve can free it

    def designs():
        yield held.pop()
        for group in groups[1:]:
            yield rows_of(group)

    solution = _fit_rows(designs(), k_mm_pieces, kernel.piece_weights(), regularisers, jitter)
    log("solved the projected-process regression")
    return SparseKRRModel(density_hypers, species, kernel, solution, baseline, regularisers, report, expansion)
