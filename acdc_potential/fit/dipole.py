"""Fitting dipole models: sparse KRR on a vector target (docs/equations.md, "Dipoles").

The dipole of structure ``A`` is the sum of atomic ``lambda = 1`` contributions (WK eq. 5 with
``lambda = 1, sigma = +1``, mixed over the orders as WK eq. E4 without its ``nu = 0`` term):

    mu_A = sum_{i in A} sum_m sum_nu omega_nu k^{nu, 1+}(A_i, M_m) / s_{a nu} w_m,   omega_nu = b^nu / nu!

A row of the regression is one spherical component ``mu`` (real ``l = 1``: ``y, z, x``) of one
structure's dipole, a column one component ``mu'`` of one sparse environment's weight, so the
design pieces ``D_nu [3 S, 3 M]`` and ``K_MM`` pieces ``[3 M, 3 M]`` are the ``3 x 3`` blocks of
:meth:`~acdc_potential.kernels.wigner.kernel.WignerKernel.equivariant_rows`, summed over each
structure's atoms; the projected-process solve is the energies' (:mod:`~acdc_potential.fit.solver`).

:func:`fit_dipole` reads as its steps: environments, sparse environments, kernel rows, the choice
of the largest order, ``b`` and the regulariser on a validation split (one SVD per order and
``b``, every regulariser from it), and the solve on every structure.
"""

import dataclasses
import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..config import FitConfig
from ..data import Labelled, species_of
from ..descriptors.acdc import power_spectrum
from ..descriptors.density import DensityExpansion, Layout
from ..descriptors.jacobian import batch_density
from ..descriptors.neighbors import batch_from_atoms
from ..kernels.wigner.iteration import WignerHypers, exponential_weights
from ..kernels.wigner.kernel import WignerKernel
from ..model.heads import DIPOLE_BLOCK
from .checkpoint import DipoleModel
from .report import FitLog
from .selection import select_sparse
from .solver import solve_projected_process, sparse_projection

# the spherical components y, z, x (real l = 1, m = -1, 0, 1) among the Cartesian x, y, z
SPHERICAL = [1, 2, 0]
# memory of one chunk of kernel blocks while the rows are built (bytes)
CHUNK_BYTES = 2.5e8


def fit_dipole(structures: Sequence[Labelled], config: FitConfig, log: FitLog = None) -> DipoleModel:
    """Fit a dipole model on ``structures`` (each with a ``dipole``), as the ``dipole`` section of ``config`` says."""
    log = log if log is not None else FitLog(verbose=False)
    options = config.dipole
    check_inputs(structures, config)
    species = species_of(structures)
    expansion = DensityExpansion(config.density, species)
    with log.stage("density"):
        coefficients, numbers, owner, layout = atom_environments(expansion, structures)
    with log.stage("sparse environments"):
        hypers = WignerHypers(nu_max=options.nu_max, lambda_max=config.kernel.lambda_max, channel_weights=config.kernel.channel_weights)
        kernel = sparse_kernel(hypers, coefficients, numbers, layout, options.sparse, config.sparse.selection)
    log(f"{kernel.n_sparse} sparse environments ({', '.join(f'{int((kernel.sparse_species == z).sum())} of Z={z}' for z in species)}); "
        f"kernel rows of {coefficients.shape[0]} atoms up to nu = {options.nu_max}")
    with log.stage("kernel rows"):
        design = structure_rows(kernel, coefficients, numbers, owner, len(structures))
        k_mm = structure_rows(kernel, kernel.sparse_coefficients, kernel.sparse_species, torch.arange(kernel.n_sparse), kernel.n_sparse)
    targets = torch.from_numpy(np.stack([s.dipole[SPHERICAL] for s in structures])).reshape(-1)
    row_weights = torch.tensor([s.weight for s in structures], dtype=torch.float64).repeat_interleave(3)
    with log.stage("choice"):
        train, validation = validation_split(len(structures), config.options.validation, config.options.seed)
        choice = choose(design, k_mm, targets, row_weights, train, validation, options.b, options.regulariser)
    log(f"chose nu_max {choice['nu_max']}, b {choice['b']:g}, regulariser {choice['regulariser']:.3g} e*A "
        f"(validation RMSE {1000 * choice['validation_rmse']:.2f} me*A on {len(validation)} structures)")
    with log.stage("solve"):
        nu = choice["nu_max"]
        omega = order_weights(nu, choice["b"])
        solution = solve_projected_process(mix(design, omega), targets, row_weights.sqrt() / choice["regulariser"], mix(k_mm, omega))
    chosen = chosen_kernel(kernel, nu)
    report = {"choice": choice, "sparse_environments": {z: int((kernel.sparse_species == z).sum()) for z in species}}
    return DipoleModel(config.density, species, chosen, solution.weights.reshape(-1, 3), choice["b"], choice["regulariser"], report, expansion)


def check_inputs(structures: Sequence[Labelled], config: FitConfig) -> None:
    """``ValueError`` for a training set or configuration a dipole fit cannot use."""
    missing = [s.index for s in structures if s.dipole is None]
    if missing:
        raise ValueError(f"structures {missing[:5]}{' ...' if len(missing) > 5 else ''} have no dipole (key '{config.keys.dipole}'): a dipole fit needs it on every structure")
    if len(structures) < 2:
        raise ValueError("a dipole fit needs at least 2 structures (one to validate the choice of hyperparameters)")
    if config.kernel.type != "wigner":
        raise ValueError(f"dipole models use Wigner kernels; kernel.type is {config.kernel.type!r}")
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


def structure_rows(kernel: WignerKernel, coefficients: torch.Tensor, numbers: torch.Tensor, owner: torch.Tensor, n_structures: int) -> torch.Tensor:
    """Design pieces ``[nu_max, 3 S, 3 M]``: row ``3 A + mu``, column ``3 m + mu'``, the sum over
    the atoms of structure ``A`` (``owner``) of ``k^{nu, 1+}_{mu mu'}(i, m) / s_{a nu}``."""
    nu_max, m = kernel.nu_max, kernel.n_sparse
    out = coefficients.new_zeros((nu_max, n_structures, 3, m, 3))
    step = max(1, int(CHUNK_BYTES // (nu_max * m * 9 * 8)))
    for start in range(0, coefficients.shape[0], step):
        atoms = slice(start, start + step)
        blocks = kernel.equivariant_rows(coefficients[atoms], numbers[atoms], DIPOLE_BLOCK)
        out.index_add_(1, owner[atoms], blocks.permute(0, 1, 3, 2, 4))
    return out.reshape(nu_max, 3 * n_structures, 3 * m)


def order_weights(nu_max: int, b: float) -> torch.Tensor:
    """``[nu_max]`` ``b^nu / nu!``, ``nu = 1..nu_max`` (WK eq. E4 without ``c0``)."""
    return exponential_weights(nu_max, 0.0, 1.0, b, torch.zeros((), dtype=torch.float64))[1:]


def mix(pieces: torch.Tensor, omega: torch.Tensor) -> torch.Tensor:
    """``sum_nu omega_nu pieces[nu]`` over the first ``len(omega)`` orders."""
    return torch.tensordot(omega, pieces[: omega.shape[0]], dims=1)


def validation_split(n_structures: int, fraction: float, seed: int) -> Tuple[List[int], List[int]]:
    """Training and validation structures: ``fraction`` of them (at least one) held out at random."""
    order = torch.randperm(n_structures, generator=torch.Generator().manual_seed(seed)).tolist()
    held = min(n_structures - 1, max(1, round(fraction * n_structures)))
    return sorted(order[held:]), sorted(order[:held])


def choose(
    design: torch.Tensor, k_mm: torch.Tensor, targets: torch.Tensor, row_weights: torch.Tensor, train: List[int], validation: List[int],
    b_values: Sequence[float], regulariser: float, orders: Optional[Sequence[int]] = None,
) -> Dict:
    """The largest order (among ``orders``, default ``1..`` the pieces'), ``b`` and regulariser of least validation RMSE.

    For each order and ``b``: ``Phi = W^1/2 K_NM P`` on the training rows (``P`` of
    :func:`~acdc_potential.fit.solver.sparse_projection`), its SVD ``U s V^T``, and for every
    regulariser ``sigma`` the ridge solution ``z = V diag(s / (s^2 + sigma^2)) U^T W^1/2 y``
    (the projected process of the solver, with ``w = P z``), scored on the validation rows.
    """
    rows_of = lambda structures: torch.tensor([3 * a + mu for a in structures for mu in range(3)])  # noqa: E731
    t, v = rows_of(train), rows_of(validation)
    root = row_weights[t].sqrt()
    y_train, y_validation = targets[t], targets[v]
    scale = float(y_train.std()) if y_train.numel() > 1 else 1.0
    sigmas = [regulariser] if regulariser > 0 else [scale * 10 ** (-k / 2) for k in range(11)]
    best: Dict = {"validation_rmse": math.inf}
    table = []
    orders = list(orders) if orders is not None else list(range(1, design.shape[0] + 1))
    for nu in orders:
        for b in b_values:
            omega = order_weights(nu, b)
            k_nm = mix(design, omega)
            projection = sparse_projection(mix(k_mm, omega))
            u, s, vh = torch.linalg.svd(root[:, None] * (k_nm[t] @ projection), full_matrices=False)
            uy = u.T @ (root * y_train)
            predict = k_nm[v] @ projection @ vh.T
            for sigma in sigmas:
                error = predict @ (s / (s**2 + sigma**2) * uy) - y_validation
                rmse = float(error.square().mean().sqrt())
                table.append({"nu_max": nu, "b": float(b), "regulariser": float(sigma), "validation_rmse": rmse})
                if rmse < best["validation_rmse"]:
                    best = {**table[-1], "validation_mae": float(error.abs().mean())}
    return {**best, "candidates": len(table), "best_of_each_order": [min((r for r in table if r["nu_max"] == nu), key=lambda r: r["validation_rmse"]) for nu in orders]}


def chosen_kernel(kernel: WignerKernel, nu_max: int) -> WignerKernel:
    """``kernel`` truncated at ``nu_max``: its sparse environments and order scales kept."""
    scales = {z: values[:nu_max] for z, values in kernel.species_scale.items()}
    chosen = WignerKernel(dataclasses.replace(kernel.wigner_hypers, nu_max=nu_max), species_scale=scales)
    chosen.set_sparse(kernel.sparse_coefficients, kernel.sparse_species, kernel.layout)
    return chosen
