"""Fitting dipole models: sparse KRR on a vector target (docs/equations.md, "Dipoles").

The dipole of structure ``A`` is the sum of atomic ``lambda = 1`` contributions (WK eq. 5 with
``lambda = 1, sigma = +1``, mixed over the orders as WK eq. E4 without its ``nu = 0`` term):

    mu_A = sum_{i in A} sum_m sum_nu omega_nu k^{nu, 1+}(A_i, M_m) / s_{a nu} w_m,   omega_nu = b^nu / nu!

With ``dipole.charges`` the structure's dipole gains ``sum_{i in A} q_i (r_i - r_A)``, atomic charges
``q_i`` (an invariant kernel expansion with the constant ``nu = 0`` piece) times positions relative to the
structure's mean, i.e. the charges with their mean removed (a neutral molecule).

A row of the regression is one spherical component ``mu`` (real ``l = 1``: ``y, z, x``) of one
structure's dipole, a column one component ``mu'`` of one sparse environment's weight, so the
design pieces ``D_nu [3 S, 3 M]`` and ``K_MM`` pieces ``[3 M, 3 M]`` are the ``3 x 3`` blocks of
:meth:`~acdc_potential.kernels.wigner.kernel.WignerKernel.equivariant_rows`, summed over each
structure's atoms; the projected-process solve is the energies' (:mod:`~acdc_potential.fit.solver`).

:func:`fit_dipole` reads as its steps: environments, sparse environments, kernel rows, the choice
of the largest order, ``b`` (and the charges' scale) and the regulariser on a validation split (one SVD per order and
``b``, every regulariser from it), and the solve on every structure.
"""

import dataclasses
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..config import FitConfig
from ..data import Labelled, species_of
from ..descriptors.acdc import power_spectrum
from ..descriptors.density import DensityExpansion, Layout
from ..descriptors.jacobian import batch_density
from ..descriptors.neighbors import AtomsBatch, batch_from_atoms
from ..descriptors.vectors import VectorFeatures
from ..kernels.wigner.iteration import WignerHypers, exponential_weights
from ..kernels.wigner.kernel import WignerKernel
from ..model.heads import DIPOLE_BLOCK, SPHERICAL
from .checkpoint import DipoleModel, FeatureDipoleModel, WignerDipoleModel
from .report import FitLog
from .selection import select_sparse
from .solver import solve_projected_process, sparse_projection

# memory of one chunk of kernel blocks while the rows are built (bytes)
CHUNK_BYTES = 2.5e8


def fit_dipole(structures: Sequence[Labelled], config: FitConfig, log: FitLog = None) -> DipoleModel:
    """Fit a dipole model on ``structures`` (each with a ``dipole``), as the ``dipole`` section of ``config`` says."""
    log = log if log is not None else FitLog(verbose=False)
    options = config.dipole
    check_inputs(structures, config)
    if options.kernel != "wigner":
        return fit_feature_dipole(structures, config, log)
    species = species_of(structures)
    expansion = DensityExpansion(config.density, species)
    with log.stage("density"):
        coefficients, numbers, owner, layout = atom_environments(expansion, structures)
    with log.stage("sparse environments"):
        hypers = WignerHypers(nu_max=options.nu_max, lambda_max=config.kernel.lambda_max, channel_weights=config.kernel.channel_weights)
        kernel = sparse_kernel(hypers, coefficients, numbers, layout, options.sparse, config.sparse.selection)
    log(f"{kernel.n_sparse} sparse environments ({', '.join(f'{int((kernel.sparse_species == z).sum())} of Z={z}' for z in species)}); "
        f"kernel rows of {coefficients.shape[0]} atoms up to nu = {options.nu_max}" + (", with atomic charges" if options.charges else ""))
    with log.stage("kernel rows"):
        positions = centred_positions(structures) if options.charges else None
        design = dipole_design(kernel, coefficients, numbers, owner, len(structures), positions)
    candidates = [{"nu_max": nu, "b": float(b), "charge_scale": float(a)} for nu in range(1, options.nu_max + 1) for b in options.b for a in (options.charge_scale if options.charges else [0.0])]
    choice, weights = choose_and_solve(
        design, candidates, structures, config, log,
        lambda c: f"nu_max {c['nu_max']}, b {c['b']:g}" + (f", charge scale {c['charge_scale']:g}" if options.charges else "") + ", ",
    )
    m = kernel.n_sparse
    charges = weights[3 * m :] if options.charges else None
    report = {"choice": choice, "sparse_environments": {z: int((kernel.sparse_species == z).sum()) for z in species}}
    return WignerDipoleModel(
        config.density, species, chosen_kernel(kernel, choice["nu_max"]), weights[: 3 * m].reshape(m, 3), choice["b"], choice["regulariser"],
        report, expansion, charge_weights=charges, charge_scale=choice["charge_scale"],
    )


@dataclass
class DipoleDesign:
    """The pieces of the regression, mixed by :meth:`assemble` without recomputing a kernel.

    :param local: ``[nu_max, 3 S, 3 M]``: row ``3 A + mu``, column ``3 m + mu'``, the sum over the atoms
        ``i`` of structure ``A`` of ``k^{nu, 1+}_{mu mu'}(i, m) / s_{a nu}``. :param local_mm: ``[nu_max, 3 M, 3 M]``.
    :param sparse_species: ``[M]`` central species of the sparse environments.
    :param charge: ``[nu_max + 1, 3 S, M]``: ``sum_{i in A} (r_i - r_A)_mu k^{nu, 0+}(i, m) / s_{a nu}`` (``nu = 0``
        the species delta; ``r_A`` the mean position of ``A``), or ``None`` without charges.
        :param charge_mm: ``[nu_max + 1, M, M]`` or ``None``.
    """

    local: torch.Tensor
    local_mm: torch.Tensor
    sparse_species: torch.Tensor
    charge: Optional[torch.Tensor] = None
    charge_mm: Optional[torch.Tensor] = None

    def assemble(self, nu_max: int, b: float, charge_scale: float = 0.0) -> Tuple[torch.Tensor, torch.Tensor]:
        """``K_NM [3 S, C]`` and ``K_MM [C, C]`` of the kernel with orders ``1..nu_max`` mixed by ``b`` (``C = 3 M``),
        and with ``charge_scale > 0`` the charges' columns (``C = 4 M``), their kernel ``charge_scale`` times the
        invariant one (``c0 = 1``, the same ``b``), independent of the local dipoles' a priori."""
        omega = order_weights(nu_max, b)
        k_nm, k_mm = mix(self.local, omega), mix(self.local_mm, omega)
        if charge_scale > 0:
            omega_q = charge_order_weights(nu_max, b)
            k_nm = torch.cat([k_nm, charge_scale * mix(self.charge, omega_q)], dim=1)
            k_mm = torch.block_diag(k_mm, charge_scale * mix(self.charge_mm, omega_q))
        return k_nm, k_mm

    def column_species(self, charge_scale: float = 0.0) -> torch.Tensor:
        """The central species of each column of :meth:`assemble` (``K_MM`` vanishes across species)."""
        local = self.sparse_species.repeat_interleave(3)
        return torch.cat([local, self.sparse_species]) if charge_scale > 0 else local

    def rows(self, structures: Sequence[int]) -> "DipoleDesign":
        """The pieces of the structures ``structures`` only."""
        index = torch.tensor([3 * a + mu for a in structures for mu in range(3)], dtype=torch.long)
        return dataclasses.replace(self, local=self.local[:, index], charge=None if self.charge is None else self.charge[:, index])


def check_inputs(structures: Sequence[Labelled], config: FitConfig) -> None:
    """``ValueError`` for a training set or configuration a dipole fit cannot use."""
    missing = [s.index for s in structures if s.dipole is None]
    if missing:
        raise ValueError(f"structures {missing[:5]}{' ...' if len(missing) > 5 else ''} have no dipole (key '{config.keys.dipole}'): a dipole fit needs it on every structure")
    if len(structures) < 2:
        raise ValueError("a dipole fit needs at least 2 structures (one to validate the choice of hyperparameters)")
    if torch.device(config.options.device).type != "cpu":
        raise ValueError(f"options.device {config.options.device!r}: dipole fits run on the CPU")
    options = config.dipole
    if options.kernel != "wigner":
        if options.charges:
            raise ValueError(f"dipole.charges needs Wigner kernels; dipole.kernel is {options.kernel!r}")
        return
    if config.kernel.type != "wigner":
        raise ValueError(f"dipole models of Wigner kernels take kernel.lambda_max from the kernel section, whose type is {config.kernel.type!r}; set kernel.type: wigner, or dipole.kernel: acdc or mpacdc")
    if config.kernel.lambda_max < 1 or config.density.max_angular < 1:
        raise ValueError("a dipole (lambda = 1) needs kernel.lambda_max >= 1 and density.max_angular >= 1")


def atom_environments(expansion: DensityExpansion, structures: Sequence[Labelled], batch: int = 100) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Layout]:
    """Density coefficients of every atom ``[N, D]``, its atomic number ``[N]`` and structure ``[N]``, and their layout."""
    parts, numbers, owners = [], [], []
    layout = None
    for start in range(0, len(structures), batch):
        members = structures[start : start + batch]
        atoms = batch_from_atoms([s.atoms for s in members], expansion.cutoff)
        c, layout = batch_density(expansion, atoms)
        parts.append(c)
        numbers.append(atoms.numbers)
        owners.append(atoms.structure + start)
    return torch.cat(parts), torch.cat(numbers).to(torch.long), torch.cat(owners).to(torch.long), layout


def sparse_kernel(hypers: WignerHypers, coefficients: torch.Tensor, numbers: torch.Tensor, layout: Layout, count: int, selection: str) -> WignerKernel:
    """The Wigner kernel with ``count`` sparse environments per species, chosen on the normalised
    power spectrum (:func:`~acdc_potential.fit.selection.select_sparse`)."""
    chosen = select_sparse(power_spectrum(layout.unflatten(coefficients)), numbers, count, selection)
    kernel = WignerKernel(hypers)
    kernel.set_sparse(coefficients[chosen], numbers[chosen], layout)
    return kernel


def dipole_design(kernel: WignerKernel, coefficients: torch.Tensor, numbers: torch.Tensor, owner: torch.Tensor, n_structures: int, positions: Optional[torch.Tensor] = None) -> DipoleDesign:
    """The :class:`DipoleDesign` of the atoms ``coefficients [N, D]`` (atomic numbers and structures ``[N]``),
    with the charges' pieces when ``positions`` ``[N, 3]`` (centred per structure, spherical order) are given."""
    sparse = kernel.sparse_coefficients, kernel.sparse_species, torch.arange(kernel.n_sparse), kernel.n_sparse
    local = structure_rows(kernel, coefficients, numbers, owner, n_structures)
    if positions is None:
        return DipoleDesign(local, structure_rows(kernel, *sparse), kernel.sparse_species)
    charge = charge_rows(kernel, coefficients, numbers, owner, n_structures, positions)
    return DipoleDesign(local, structure_rows(kernel, *sparse), kernel.sparse_species, charge, kernel.rows(kernel.sparse_coefficients, kernel.sparse_species))


def structure_rows(kernel: WignerKernel, coefficients: torch.Tensor, numbers: torch.Tensor, owner: torch.Tensor, n_structures: int) -> torch.Tensor:
    """``DipoleDesign.local``: ``[nu_max, 3 S, 3 M]``, the ``lambda = 1`` blocks summed over each structure's atoms."""
    nu_max, m = kernel.nu_max, kernel.n_sparse
    out = coefficients.new_zeros((nu_max, n_structures, 3, m, 3))
    step = max(1, int(CHUNK_BYTES // (nu_max * m * 9 * 8)))
    for start in range(0, coefficients.shape[0], step):
        atoms = slice(start, start + step)
        blocks = kernel.equivariant_rows(coefficients[atoms], numbers[atoms], DIPOLE_BLOCK)
        out.index_add_(1, owner[atoms], blocks.permute(0, 1, 3, 2, 4))
    return out.reshape(nu_max, 3 * n_structures, 3 * m)


def charge_rows(kernel: WignerKernel, coefficients: torch.Tensor, numbers: torch.Tensor, owner: torch.Tensor, n_structures: int, positions: torch.Tensor) -> torch.Tensor:
    """``DipoleDesign.charge``: ``[nu_max + 1, 3 S, M]``, the invariant pieces times the atoms' centred positions."""
    pieces, m = kernel.nu_max + 1, kernel.n_sparse
    out = coefficients.new_zeros((pieces, n_structures, 3, m))
    step = max(1, int(CHUNK_BYTES // (pieces * m * 8)))
    for start in range(0, coefficients.shape[0], step):
        atoms = slice(start, start + step)
        k = kernel.rows(coefficients[atoms], numbers[atoms])
        out.index_add_(1, owner[atoms], k[:, :, None, :] * positions[atoms][None, :, :, None])
    return out.reshape(pieces, 3 * n_structures, m)


def centred_positions(structures: Sequence[Labelled]) -> torch.Tensor:
    """``[N, 3]`` positions minus their structure's mean, spherical order ``y, z, x`` (what a charge ``q_i``
    multiplies: ``sum_i q_i (r_i - r_A) = sum_i (q_i - q_A) r_i``, the total charge kept at zero)."""
    periodic = [s.index for s in structures if np.any(s.atoms.pbc)]
    if periodic:
        raise ValueError(f"structures {periodic[:5]} are periodic: a charge model's dipole (charges times positions) is defined for molecules only; set dipole.charges: false")
    return torch.from_numpy(np.concatenate([(s.atoms.positions - s.atoms.positions.mean(axis=0))[:, SPHERICAL] for s in structures]))


def order_weights(nu_max: int, b: float) -> torch.Tensor:
    """``[nu_max]`` ``b^nu / nu!``, ``nu = 1..nu_max`` (WK eq. E4 without ``c0``)."""
    return exponential_weights(nu_max, 0.0, 1.0, b, torch.zeros((), dtype=torch.float64))[1:]


def charge_order_weights(nu_max: int, b: float) -> torch.Tensor:
    """``[nu_max + 1]`` ``1, b^nu / nu!``: the charges' invariant kernel (WK eq. E4, ``c0 = a = 1``)."""
    return exponential_weights(nu_max, 1.0, 1.0, b, torch.zeros((), dtype=torch.float64))


def mix(pieces: torch.Tensor, omega: torch.Tensor) -> torch.Tensor:
    """``sum_nu omega_nu pieces[nu]`` over the first ``len(omega)`` orders."""
    return torch.tensordot(omega, pieces[: omega.shape[0]], dims=1)


def validation_split(n_structures: int, fraction: float, seed: int) -> Tuple[List[int], List[int]]:
    """Training and validation structures: ``fraction`` of them (at least one) held out at random."""
    order = torch.randperm(n_structures, generator=torch.Generator().manual_seed(seed)).tolist()
    held = min(n_structures - 1, max(1, round(fraction * n_structures)))
    return sorted(order[held:]), sorted(order[:held])


def choose(design: DipoleDesign, candidates: Sequence[Dict], targets: torch.Tensor, row_weights: torch.Tensor, train: List[int], validation: List[int], regulariser: float) -> Dict:
    """The candidate (keyword arguments of :meth:`DipoleDesign.assemble`) and regulariser of least validation RMSE.

    For each candidate: ``Phi = W^1/2 K_NM P`` on the training rows (``P`` of
    :func:`~acdc_potential.fit.solver.sparse_projection`), its SVD ``U s V^T``, and for every
    regulariser ``sigma`` (``regulariser``, or ``10^(-k/2)`` times the spread of the training
    components, ``k = 0..10``) the ridge solution ``z = V diag(s / (s^2 + sigma^2)) U^T W^1/2 y`` (the
    projected process of the solver, with ``w = P z``; ``P`` species by species, as ``K_MM`` vanishes
    across species), scored on the validation rows.
    """
    rows_of = lambda structures: torch.tensor([3 * a + mu for a in structures for mu in range(3)], dtype=torch.long)  # noqa: E731
    t, v = rows_of(train), rows_of(validation)
    root = row_weights[t].sqrt()
    y_train, y_validation = targets[t], targets[v]
    scale = float(y_train.std()) if y_train.numel() > 1 else 1.0
    sigmas = [regulariser] if regulariser > 0 else [scale * 10 ** (-k / 2) for k in range(11)]
    table = []
    for candidate in candidates:
        k_nm, k_mm = design.assemble(**candidate)
        projection = sparse_projection(k_mm, blocks=design.column_species(candidate.get("charge_scale", 0.0)))
        u, s, vh = torch.linalg.svd(root[:, None] * (k_nm[t] @ projection), full_matrices=False)
        uy = u.T @ (root * y_train)
        predict = k_nm[v] @ projection @ vh.T
        for sigma in sigmas:
            error = predict @ (s / (s**2 + sigma**2) * uy) - y_validation
            table.append({**candidate, "regulariser": float(sigma), "validation_rmse": float(error.square().mean().sqrt()), "validation_mae": float(error.abs().mean())})
    best = min(table, key=lambda row: row["validation_rmse"])
    orders = sorted({c["nu_max"] for c in candidates if "nu_max" in c})
    return {**best, "candidates": len(table), "best_of_each_order": [min((r for r in table if r["nu_max"] == nu), key=lambda r: r["validation_rmse"]) for nu in orders]}


def choose_and_solve(design, candidates: Sequence[Dict], structures: Sequence[Labelled], config: FitConfig, log: FitLog, describe) -> Tuple[Dict, torch.Tensor]:
    """The candidate (keyword arguments of ``design.assemble``) and regulariser of least validation RMSE
    (:func:`choose`; logged, the candidate as ``describe(choice)`` says), and the weights ``[C]`` solved
    with them on every structure of ``structures``."""
    targets = torch.from_numpy(np.stack([s.dipole[SPHERICAL] for s in structures])).reshape(-1)
    row_weights = torch.tensor([s.weight for s in structures], dtype=torch.float64).repeat_interleave(3)
    with log.stage("choice"):
        train, validation = validation_split(len(structures), config.options.validation, config.options.seed)
        choice = choose(design, candidates, targets, row_weights, train, validation, config.dipole.regulariser)
    log(f"chose {describe(choice)}regulariser {choice['regulariser']:.3g} e*A (validation RMSE {1000 * choice['validation_rmse']:.2f} me*A on {len(validation)} structures)")
    with log.stage("solve"):
        chosen = {key: choice[key] for key in candidates[0]}
        k_nm, k_mm = design.assemble(**chosen)
        blocks = design.column_species(chosen.get("charge_scale", 0.0))
        weights = solve_projected_process(k_nm, targets, row_weights.sqrt() / choice["regulariser"], k_mm, blocks=blocks).weights
    return choice, weights


def chosen_kernel(kernel: WignerKernel, nu_max: int) -> WignerKernel:
    """``kernel`` truncated at ``nu_max``: its sparse environments and order scales kept."""
    scales = {z: values[:nu_max] for z, values in kernel.species_scale.items()}
    chosen = WignerKernel(dataclasses.replace(kernel.wigner_hypers, nu_max=nu_max), species_scale=scales)
    chosen.set_sparse(kernel.sparse_coefficients, kernel.sparse_species, kernel.layout)
    return chosen


def fit_feature_dipole(structures: Sequence[Labelled], config: FitConfig, log: FitLog) -> FeatureDipoleModel:
    """A linear dipole model on true-vector features (``dipole.kernel`` ``acdc`` or ``mpacdc``), as a
    sparse KRR of the kernel ``k(i, m) = delta(a_i, a_m) s_a^2 x_i x_m^T`` (``[3, 3]`` blocks, ``x``
    the ``(1, +1)`` features of :class:`~acdc_potential.descriptors.vectors.VectorFeatures`, ``s_a`` a
    scale per species that gives its sparse environments unit mean ``|x_m|^2``), whose weights fold into
    ``v_a = s_a^2 sum_{m : a_m = a} x_m^T w_m``: ``mu_i = x_i v_{a_i}``.

    Steps: the features' expansion; sparse environments (farthest points of the power spectrum of that
    expansion); their features and the scales; the rows; the regulariser on a validation split; the solve.
    """
    options = config.dipole
    species = species_of(structures)
    hypers = dataclasses.replace(config.density, max_radial=options.max_radial, max_angular=options.max_angular)
    expansion = DensityExpansion(hypers, species)
    module = VectorFeatures(expansion, options.kernel, options.order)
    with log.stage("sparse environments"):
        coefficients, numbers, owner, layout = atom_environments(expansion, structures)
        chosen = select_sparse(power_spectrum(layout.unflatten(coefficients)), numbers, options.sparse, config.sparse.selection)
        sparse = atom_features(module, structures, chosen)
        sparse_species = numbers[chosen]
        scales = species_scales(sparse, sparse_species, species)
    log(f"{chosen.numel()} sparse environments ({', '.join(f'{int((sparse_species == z).sum())} of Z={z}' for z in species)}); "
        f"linear in {sparse.shape[2]} {options.kernel} (1, +1) features" + (f" of body order {options.order}" if options.kernel == "acdc" else ""))
    with log.stage("kernel rows"):
        design = LinearDipoleDesign(feature_rows(module, structures, sparse, sparse_species, scales, species), sparse_block(sparse, sparse_species, scales, species), sparse_species)
    choice, weights = choose_and_solve(design, [{}], structures, config, log, lambda c: "the ")
    report = {"choice": choice, "sparse_environments": {z: int((sparse_species == z).sum()) for z in species}}
    vectors = folded_vectors(sparse, sparse_species, scales, species, weights.reshape(-1, 3))
    return FeatureDipoleModel(hypers, species, options.kernel, options.order, vectors, choice["regulariser"], report, expansion)


@dataclass
class LinearDipoleDesign:
    """The regression of a feature dipole model: one kernel, nothing to mix (the interface of
    :class:`DipoleDesign` that :func:`choose` uses).

    :param local: ``[3 S, 3 M]`` (row ``3 A + mu``, column ``3 m + mu'``). :param local_mm: ``[3 M, 3 M]``.
    :param sparse_species: ``[M]``.
    """

    local: torch.Tensor
    local_mm: torch.Tensor
    sparse_species: torch.Tensor

    def assemble(self) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.local, self.local_mm

    def column_species(self, charge_scale: float = 0.0) -> torch.Tensor:
        return self.sparse_species.repeat_interleave(3)


def feature_batches(module: VectorFeatures, structures: Sequence[Labelled], chunk: int = 50):
    """For each chunk of ``structures``: the index of its first structure, its batch and its atoms' features ``[n, 3, Q]``."""
    for start in range(0, len(structures), chunk):
        batch = batch_from_atoms([s.atoms for s in structures[start : start + chunk]], module.expansion.cutoff)
        yield start, batch, batch_features(module, batch)


def batch_features(module: VectorFeatures, batch: AtomsBatch) -> torch.Tensor:
    """``[n, 3, Q]`` the features of every atom of ``batch``."""
    with torch.no_grad():
        return module(batch.pair_vectors(), batch.centers, batch.neighbors, module.expansion.species_index(batch.numbers))


def atom_features(module: VectorFeatures, structures: Sequence[Labelled], atoms: torch.Tensor) -> torch.Tensor:
    """``[m, 3, Q]`` the features of the atoms ``atoms`` (indices in the concatenation of ``structures``' atoms),
    computed from the structures that hold them only."""
    owner = torch.repeat_interleave(torch.tensor([len(s.atoms) for s in structures]))
    first = torch.cumsum(torch.tensor([0] + [len(s.atoms) for s in structures]), 0)
    needed = sorted(set(owner[atoms].tolist()))
    out = None
    for start in range(0, len(needed), 50):
        members = needed[start : start + 50]
        x = batch_features(module, batch_from_atoms([structures[k].atoms for k in members], module.expansion.cutoff))
        local_first = torch.cumsum(torch.tensor([0] + [len(structures[k].atoms) for k in members]), 0)
        out = x.new_zeros((atoms.numel(),) + x.shape[1:]) if out is None else out
        for position, k in enumerate(members):
            mine = torch.nonzero(owner[atoms] == k).flatten()
            out[mine] = x[local_first[position] + atoms[mine] - first[k]]
    return out


def species_scales(sparse: torch.Tensor, sparse_species: torch.Tensor, species: Sequence[int]) -> torch.Tensor:
    """``[S]`` ``s_a = (mean_{m : a_m = a} |x_m|^2)^(-1/2)`` of the sparse features ``[M, 3, Q]``."""
    squares = sparse.square().sum(dim=(1, 2))
    return torch.stack([squares[sparse_species == z].mean().clamp_min(1e-300).rsqrt() for z in species])


def feature_rows(module: VectorFeatures, structures: Sequence[Labelled], sparse: torch.Tensor, sparse_species: torch.Tensor, scales: torch.Tensor, species: Sequence[int]) -> torch.Tensor:
    """``[3 S, 3 M]``: ``sum_{i in A, a_i = a_m} s_a^2 x_i[mu] . x_m[mu']`` at row ``3 A + mu``, column ``3 m + mu'``."""
    out = sparse.new_zeros((len(structures), 3, sparse.shape[0], 3))
    for start, batch, x in feature_batches(module, structures):
        for k, z in enumerate(species):
            atoms, columns = batch.numbers == z, torch.nonzero(sparse_species == z).flatten()
            sums = x.new_zeros((batch.n_structures,) + x.shape[1:]).index_add_(0, batch.structure[atoms], x[atoms])
            block = scales[k] ** 2 * torch.einsum("sxq,myq->sxmy", sums, sparse[columns])
            out[start : start + batch.n_structures, :, columns] = block
    return out.reshape(3 * len(structures), 3 * sparse.shape[0])


def sparse_block(sparse: torch.Tensor, sparse_species: torch.Tensor, scales: torch.Tensor, species: Sequence[int]) -> torch.Tensor:
    """``K_MM`` ``[3 M, 3 M]`` of the sparse features (zero across species)."""
    m = sparse.shape[0]
    out = sparse.new_zeros((m, 3, m, 3))
    for k, z in enumerate(species):
        columns = torch.nonzero(sparse_species == z).flatten()
        out[columns[:, None], :, columns[None, :], :] = scales[k] ** 2 * torch.einsum("nxq,myq->nxmy", sparse[columns], sparse[columns]).permute(0, 2, 1, 3)
    return out.reshape(3 * m, 3 * m)


def folded_vectors(sparse: torch.Tensor, sparse_species: torch.Tensor, scales: torch.Tensor, species: Sequence[int], weights: torch.Tensor) -> torch.Tensor:
    """``[S, Q]`` ``v_a = s_a^2 sum_{m : a_m = a} x_m^T w_m`` from the weights ``[M, 3]``."""
    return torch.stack([scales[k] ** 2 * torch.einsum("myq,my->q", sparse[sparse_species == z], weights[sparse_species == z]) for k, z in enumerate(species)])
