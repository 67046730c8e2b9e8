"""Uncertainties of a sparse-KRR model, shared by the fit and the exported heads
(docs/equations.md, "Uncertainties"):

- of a structure's energy: the projected-process predictive variance
  ``k_SS - |k_SM P|^2 + |R^-T P^T k_MS|^2`` (:func:`projected_variance`);
- of an atomic energy: the part of its prior variance that the sparse environments do not
  explain, ``k_xx - |k_xM P|^2 = k_xx - k_xM K_MM^-1 k_Mx`` (:func:`unexplained_variance`; for
  polynomial and message-passing models species by species, :class:`AtomVariance`). The
  posterior term is left out because data of structure energies and forces do not fix how
  a structure's energy is shared among its atoms: for molecules of one composition it is
  of the order of the prior (eV) for every atom, in and out of the training data alike;
- of a force component of atom ``i``: ``beta_{a_i}`` times the atom's energy uncertainty, one
  factor per species fitted on held-out structures (a model, not a derivative of the process).

Each variance is multiplied by ``alpha^2``, the calibration fitted on held-out structures
(:class:`Calibration`): the kernel's amplitude is not tuned (only the ratios of the
regularisers to it are), so uncalibrated variances are in arbitrary units of eV^2.
"""

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

# floor of the eigenvalues of K_MM relative to the largest (sparse_projection): ~500 machine epsilons
DEFAULT_JITTER = 1e-13


def projected_variance(
    k_xm: torch.Tensor, k_xx: torch.Tensor, projection: torch.Tensor, triangular: torch.Tensor
) -> torch.Tensor:
    """``k_xx - |k_xM P|^2 + |R^-T P^T k_Mx|^2`` ``[n]`` (see :class:`~acdc_potential.fit.solver.ProjectedProcess`);
    TorchScript-compatible, used by exported models."""
    return projected_variance_of(k_xm @ projection, k_xx, triangular)


def projected_variance_of(phi: torch.Tensor, k_xx: torch.Tensor, triangular: torch.Tensor) -> torch.Tensor:
    """:func:`projected_variance` from ``phi = k_xM P`` ``[n, r]``."""
    posterior = torch.linalg.solve_triangular(triangular.T, phi.T, upper=False)
    return k_xx - (phi**2).sum(dim=1) + (posterior**2).sum(dim=0)


def unexplained_variance(k_xm: torch.Tensor, k_xx: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    """``k_xx - |k_xM P|^2`` ``[n]``: the prior variance of ``f(x)`` given ``f`` at the sparse
    environments (``P P^T = K_MM^-1``); zero at a sparse environment, the prior far from all."""
    return k_xx - ((k_xm @ projection) ** 2).sum(dim=1)


def sparse_projection(k_mm: torch.Tensor, jitter: float = DEFAULT_JITTER, blocks: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``P = U lambda^{-1/2}`` ``[M, M]`` of ``K_MM = U diag(lambda) U^T`` ``[M, M]``, every
    eigenvalue raised to at least ``jitter * lambda_max`` (see :class:`~acdc_potential.fit.solver.ProjectedProcess`).

    ``blocks`` ``[M]``: a label per column (e.g. the central species) such that ``K_MM`` vanishes
    between different labels; each block is then decomposed on its own (the same ``P`` up to the
    order of its columns, at a fraction of the cost).

    The eigen-directions of small ``lambda`` are kept, not dropped: they are smooth in
    the sparse environments but not in the forces, and dropping those below 1e-10 of the
    largest (half of them for 1000 ethanol environments per species) cost 40% of the force
    accuracy. The floor only keeps the problem well posed where ``K_MM`` is singular to
    working precision (duplicate environments), like GAP's sparse jitter.
    """
    if blocks is None:
        eigenvalues, vectors = torch.linalg.eigh(0.5 * (k_mm + k_mm.T))
        floor = jitter * eigenvalues.max().clamp_min(1e-300)
        return vectors / eigenvalues.clamp_min(floor).sqrt()
    groups = [torch.nonzero(blocks == label).flatten() for label in torch.unique(blocks)]
    parts = [torch.linalg.eigh(0.5 * (k_mm[g][:, g] + k_mm[g][:, g].T)) for g in groups]
    floor = jitter * max(float(values.max()) for values, _ in parts) if parts else 0.0
    projection = torch.zeros_like(k_mm)
    for g, (values, vectors) in zip(groups, parts):
        projection[g[:, None], g[None, :]] = vectors / values.clamp_min(max(floor, 1e-300)).sqrt()
    return projection


@dataclass
class Calibration:
    """Factors that make the uncertainties mean what they say, fitted on held-out structures
    (:func:`~acdc_potential.fit.calibration.calibrate`).

    :param energy: ``alpha``, multiplies every standard deviation of energies: the root mean
        square of (error / predicted standard deviation) of the held-out structure energies.
    :param forces: ``beta_a`` (1/A) per atomic number: a force component's standard deviation is
        ``beta_a`` times the (calibrated) atomic energy uncertainty; the root mean square of
        their ratio over the held-out atoms of species ``a``. Empty without force labels.
    :param structures: held-out structures used. :param atoms: held-out atoms used for ``forces``.
    """

    energy: float = 1.0
    forces: Dict[int, float] = field(default_factory=dict)
    structures: int = 0
    atoms: int = 0

    def force_scale(self, species: List[int]) -> torch.Tensor:
        """``[len(species)]`` ``beta_a`` (1/A) of the atomic numbers ``species``, zero where there is none."""
        return torch.tensor([float(self.forces.get(int(z), 0.0)) for z in species], dtype=torch.float64)

    def to_dict(self) -> Dict:
        return {"energy": self.energy, "forces": {int(z): float(b) for z, b in self.forces.items()}, "structures": self.structures, "atoms": self.atoms}

    @classmethod
    def from_dict(cls, state: Dict) -> "Calibration":
        return cls(float(state["energy"]), {int(z): float(b) for z, b in state["forces"].items()}, int(state["structures"]), int(state["atoms"]))


class SparseState(torch.nn.Module):
    """What a head keeps of a fitted sparse-KRR model (see :class:`~acdc_potential.fit.solver.ProjectedProcess`).

    Buffers: ``sparse [M, D]`` the flat sparse environments (density coefficients, or the unit
    features of a polynomial or message-passing kernel; sorted by species), ``sparse_species [M]`` their central species index, ``weights [M]``,
    ``piece_weights [n_pieces]``, ``projection [M, r]`` and ``triangular [r, r]`` for the
    variances; ``energy_scale`` ``[]``, the ``alpha`` of the :class:`Calibration` (1 without);
    ``energy_noise`` ``[]``, the variance of an atom's share of an energy label (the energy
    regulariser squared), added per atom to the variance of a structure's energy; ``centres``
    ``[n_species]``, 1 for the species with sparse environments and 0 for the others, whose atoms carry
    no learned energy (single-centre models), hence no prior variance.

    Its methods take kernel values in the buffers' dtype (float64 in every exported file; the heads cast
    their inputs).
    """

    def __init__(
        self,
        kernel,
        weights: torch.Tensor,
        projection: torch.Tensor,
        triangular: torch.Tensor,
        species: List[int],
        calibration: Optional[Calibration] = None,
        energy_noise: float = 0.0,
    ):
        """:param kernel: the fitted :class:`~acdc_potential.kernels.base.SparseKernel` (its
        sparse environments and mixing); :param weights: ``[M]``; :param projection: ``[M, r]``;
        :param triangular: ``[r, r]`` of the projected process; :param species: the model's
        atomic numbers (species index = position); :param calibration: default none (``alpha = 1``);
        :param energy_noise: the energy regulariser squared (eV^2 per atom)."""
        super().__init__()
        calibration = calibration if calibration is not None else Calibration()
        self.shapes: List[List[int]] = [list(shape) for shape in kernel.layout.shapes]
        index = {z: k for k, z in enumerate(species)}
        sparse_species = torch.tensor([index[int(z)] for z in kernel.sparse_species.tolist()], dtype=torch.long)
        # grouped by species, so that per-species blocks of sparse data are views
        order = torch.argsort(sparse_species, stable=True)
        self.register_buffer("sparse", kernel.sparse_coefficients.detach().to(torch.float64)[order].clone())
        self.register_buffer("sparse_species", sparse_species[order].clone())
        self.register_buffer("weights", weights.detach().to(torch.float64)[order].clone())
        self.register_buffer("piece_weights", kernel.piece_weights().to(torch.float64).clone())
        self.register_buffer("projection", projection.detach().to(torch.float64)[order].clone())
        self.register_buffer("triangular", triangular.detach().to(torch.float64).clone())
        self.register_buffer("energy_scale", torch.tensor(float(calibration.energy), dtype=torch.float64))
        self.register_buffer("energy_noise", torch.tensor(float(energy_noise), dtype=torch.float64))
        self.register_buffer("centres", torch.zeros(len(species), dtype=torch.float64).index_fill(0, sparse_species, 1.0))

    def atom_variance(self, k_xm: torch.Tensor, k_xx: torch.Tensor, species: torch.Tensor) -> torch.Tensor:
        """``[n]`` calibrated :func:`unexplained_variance` of atomic energies, from ``k_xm [n, M]``,
        ``k_xx [n]`` and the atoms' species indices ``[n]``."""
        return self.energy_scale**2 * unexplained_variance(k_xm, k_xx * self.centres[species], self.projection)

    def group_variance(self, k_xm: torch.Tensor, k_xy: torch.Tensor, species: torch.Tensor, group: torch.Tensor, n_groups: int) -> torch.Tensor:
        """``[n_groups]`` calibrated variances of the energy labels of groups of atoms (structures):
        the projected-process variance of the sum over each group, from atom rows ``k_xm [n, M]``,
        the kernel between all atoms ``k_xy [n, n]`` and their species indices ``[n]``, plus
        ``energy_noise`` per atom."""
        k_gm = torch.zeros((n_groups, k_xm.shape[1]), dtype=k_xm.dtype, device=k_xm.device).index_add(0, group, k_xm)
        carries = self.centres[species]
        same = (group.unsqueeze(1) == group.unsqueeze(0)).to(k_xy.dtype) * carries.unsqueeze(1) * carries.unsqueeze(0)
        k_gg = torch.zeros(n_groups, dtype=k_xy.dtype, device=k_xy.device).index_add(0, group, (k_xy * same).sum(dim=1))
        return self.projected_group_variance(k_gm @ self.projection, k_gg, group, n_groups)

    def projected_group_variance(self, phi: torch.Tensor, k_gg: torch.Tensor, group: torch.Tensor, n_groups: int) -> torch.Tensor:
        """:meth:`group_variance` from ``phi = k_gM P`` ``[n_groups, r]``, ``k_gg [n_groups]`` and the group of each atom."""
        atoms = torch.zeros(n_groups, dtype=phi.dtype, device=phi.device).index_add(0, group, torch.ones_like(group, dtype=phi.dtype))
        noise = self.energy_scale**2 * self.energy_noise * atoms
        return self.energy_scale**2 * projected_variance_of(phi, k_gg, self.triangular) + noise


class AtomVariance(torch.nn.Module):
    """Calibrated unexplained variances of atomic energies ``[n]`` for the kernel ``k(x, y) = c0 +
    a (x . y)^zeta`` of feature rows (polynomial and message-passing models), species by species: the
    kernel vanishes between species, so ``K_MM^-1`` is block-diagonal and an atom of species ``s``
    needs ``scale_s (k(x, x) - |k_{x M_s} Q_s|^2)``, ``Q_s Q_s^T = K_{M_s M_s}^-1``, at ``F M_s + M_s^2``
    multiply-adds (against ``F M + M r`` over the whole sparse set).

    Buffers: ``starts [S + 1]`` where each species' rows of the sparse environments begin (they are
    grouped by species); ``factors [M, max M_s]``, the rows of species ``s`` holding ``Q_s`` ``[M_s,
    M_s]`` in their first ``M_s`` columns (``K_{M_s M_s}`` eigen-decomposed, eigenvalues floored at
    ``jitter`` times the largest, as :func:`sparse_projection`); ``scale [S]``, ``alpha^2``, zero for a
    species without sparse environments (its atoms carry no learned energy). The feature rows of the
    sparse environments are not kept: the head that owns them passes them to :meth:`forward`.
    """

    def __init__(self, sparse: torch.Tensor, sparse_species: torch.Tensor, pieces: List[float], zeta: int, scale: torch.Tensor, jitter: float):
        """:param sparse: ``[M, F]`` the sparse environments' feature rows, grouped by species; :param
        sparse_species: ``[M]`` their species index (sorted); :param pieces: ``[c0, a]``; :param zeta: the
        exponent; :param scale: ``[S]``; :param jitter: floor of the eigenvalues of each ``K_{M_s M_s}``
        relative to its largest."""
        super().__init__()
        if bool((sparse_species[1:] < sparse_species[:-1]).any()):
            raise ValueError("the sparse environments must be grouped by species (sorted species indices)")
        n_species = scale.shape[0]
        counts = torch.bincount(sparse_species, minlength=n_species)
        starts = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        self.constant = float(pieces[0])
        self.amplitude = float(pieces[1])
        self.zeta = int(zeta)
        factors = sparse.new_zeros((sparse.shape[0], int(counts.max())))
        for s in range(n_species):
            start, stop = int(starts[s]), int(starts[s + 1])
            if stop > start:
                rows = sparse[start:stop]
                factors[start:stop, : stop - start] = sparse_projection(self.kernel(rows, rows), jitter)
        self.register_buffer("starts", starts)
        self.register_buffer("factors", factors)
        self.register_buffer("scale", scale.to(sparse.dtype) * (counts > 0).to(sparse.dtype))

    def kernel(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``c0 + a (x . y)^zeta`` ``[n_x, n_y]`` between feature rows of one species."""
        return self.constant + self.amplitude * (x @ y.T) ** self.zeta

    def forward(self, x: torch.Tensor, species: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        """``[n]`` variances of the atoms of feature rows ``x [n, F]`` and species indices ``[n]``, given the
        sparse environments' feature rows ``sparse [M, F]`` (those of the construction)."""
        variance = torch.zeros(species.shape[0], dtype=x.dtype, device=x.device)
        present = torch.unique(species)
        for index in range(present.shape[0]):
            s = int(present[index])
            start, stop = int(self.starts[s]), int(self.starts[s + 1])
            if stop == start:
                continue
            atoms = torch.nonzero(species == s).flatten()
            rows = x.index_select(0, atoms)
            k_xx = self.constant + self.amplitude * (rows * rows).sum(dim=1) ** self.zeta
            unexplained = unexplained_variance(self.kernel(rows, sparse[start:stop]), k_xx, self.factors[start:stop, : stop - start])
            variance = variance.index_add(0, atoms, self.scale[s] * unexplained)
        return variance


def atom_factor_width(d: int, largest: int, r: int) -> int:
    """Columns of :class:`FeatureVariance`'s ``atom_factors`` for ``D = d`` features, ``largest`` sparse
    environments of one species and ``r`` columns of the projection: the rank ``min(D, M_s)``, or none
    where ``U_s`` itself is no wider (``r <= min(D, M_s)``: one species with ``D >= M``)."""
    rank = min(d, largest)
    return rank if rank < r else 0


class FeatureVariance(torch.nn.Module):
    """Uncalibrated variances for a kernel that is a scalar product of per-atom feature rows within
    each species, ``k(x, y) = delta(a_x, a_y) <c_{a_x} * x, c_{a_y} * y>`` (``c_s`` column scales per
    species; e.g. a Wigner kernel of ``nu_max <= 3`` with its constant piece as a constant column).

    With ``X_s = c_s * X_{M_s}`` the scaled rows of the sparse environments of species ``s`` and ``P``
    the state's projection (``P P^T = K_MM^-1``), ``U_s = X_s^T P[M_s, :]`` ``[D, r]`` turns an atom's
    scaled row into its kernel row times ``P``: ``k_{xM} P = (c_{a_x} * x) U_{a_x}``. Hence

    - an atom's unexplained variance ``k_xx - |k_xM P|^2 = |c * x|^2 - |(c * x) A_s|^2`` with ``A_s``
      ``[D, w]`` the thin factor of ``U_s U_s^T = A_s A_s^T`` (its SVD, ``w = min(D, M_s)``, the rank),
      or ``U_s`` itself where that is no wider (``r <= w``: one species with ``D >= M``);
    - a structure's ``k_gM P = sum_s g_s U_s`` and ``k_gg = sum_s |g_s|^2``, with ``g_s`` the sum of the
      scaled rows of its atoms of species ``s`` (:meth:`structures`),

    at ``D w`` multiply-adds per atom, against ``M_s`` kernel entries and ``M r`` for ``P`` on the pairs.

    Buffers: ``column_scales [S, D]``; ``atom_factors [S, D, w]`` (``w = 0`` where ``U_s`` serves) and
    ``structure_factors [S, D, r]`` (zero for a species without sparse environments).
    """

    def __init__(self, sparse_rows: torch.Tensor, sparse_species: torch.Tensor, projection: torch.Tensor, column_scales: torch.Tensor):
        """:param sparse_rows: ``[M, D]`` unscaled feature rows of the sparse environments;
        :param sparse_species: ``[M]`` their species index; :param projection: ``[M, r]``;
        :param column_scales: ``[S, D]``."""
        super().__init__()
        n_species, d = column_scales.shape
        counts = torch.bincount(sparse_species, minlength=n_species)
        r = projection.shape[1]
        width = atom_factor_width(d, int(counts.max()), r)
        atom_factors = sparse_rows.new_zeros((n_species, d, width))
        structure_factors = sparse_rows.new_zeros((n_species, d, r))
        for s in range(n_species):
            rows = torch.nonzero(sparse_species == s).flatten()
            if rows.numel() == 0:
                continue
            u = (sparse_rows[rows] * column_scales[s]).T @ projection[rows]
            structure_factors[s] = u
            if width > 0:
                left, values, _ = torch.linalg.svd(u, full_matrices=False)
                rank = min(d, rows.numel())
                atom_factors[s, :, :rank] = left[:, :rank] * values[:rank]
        self.register_buffer("column_scales", column_scales.clone())
        self.register_buffer("atom_factors", atom_factors)
        self.register_buffer("structure_factors", structure_factors)

    def atoms(self, x: torch.Tensor, species: torch.Tensor) -> torch.Tensor:
        """``[n]`` unexplained variances of feature rows ``x [n, D]`` of species indices ``[n]``."""
        variance = torch.zeros(species.shape[0], dtype=x.dtype, device=x.device)
        present = torch.unique(species)
        for index in range(present.shape[0]):
            s = int(present[index])
            atoms = torch.nonzero(species == s).flatten()
            rows = x.index_select(0, atoms) * self.column_scales[s]
            explained = rows @ (self.atom_factors[s] if self.atom_factors.shape[2] > 0 else self.structure_factors[s])
            variance = variance.index_add(0, atoms, (rows * rows).sum(dim=1) - (explained * explained).sum(dim=1))
        return variance

    def structures(self, x: torch.Tensor, species: torch.Tensor, carries: torch.Tensor, group: torch.Tensor, n_groups: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """``k_gM P`` ``[n_groups, r]`` and ``k_gg`` ``[n_groups]`` of the sums of the feature rows ``x [n, D]``
        (species indices ``[n]``, weights ``carries [n]``) over each group (``group [n]``)."""
        phi = x.new_zeros((n_groups, self.structure_factors.shape[2]))
        k_gg = x.new_zeros(n_groups)
        present = torch.unique(species)
        for index in range(present.shape[0]):
            s = int(present[index])
            atoms = torch.nonzero(species == s).flatten()
            rows = x.index_select(0, atoms) * self.column_scales[s] * carries.index_select(0, atoms).unsqueeze(1)
            sums = x.new_zeros((n_groups, x.shape[1])).index_add(0, group.index_select(0, atoms), rows)
            phi = phi + sums @ self.structure_factors[s]
            k_gg = k_gg + (sums * sums).sum(dim=1)
        return phi, k_gg


def feature_atom_variance(state: SparseState, zeta: int) -> AtomVariance:
    """The :class:`AtomVariance` of a model whose kernel is ``c0 + a (x . y)^zeta`` on its sparse
    feature rows ``state.sparse`` (polynomial and message-passing kernels), the eigenvalues of each
    species' block floored at the fit's default jitter relative to the block's largest (the fit floors
    relative to the whole ``K_MM``'s: the same up to directions at rounding level)."""
    scale = state.energy_scale**2 * torch.ones(state.centres.shape[0], dtype=torch.float64, device=state.sparse.device)
    return AtomVariance(state.sparse, state.sparse_species, state.piece_weights[:2].tolist(), zeta, scale, DEFAULT_JITTER)
