"""Sparse KRR: design-matrix rows against finite differences, exact recovery, symmetries, errors, uncertainty."""

import copy
import dataclasses
import itertools
from pathlib import Path
import warnings

import ase
import ase.build
import numpy as np
import pytest
import scipy.stats
import torch
from conftest import random_rotation

from acdc_potential.data import Labelled
from acdc_potential.descriptors.neighbors import StructureError, batch_from_atoms
from acdc_potential.descriptors.radial import DensityHypers
from acdc_potential.descriptors.density import DensityExpansion, Layout
from acdc_potential.config import Regularisers
from acdc_potential.descriptors.jacobian import batch_density, internal_columns, structure_jacobian
from acdc_potential.fit.baseline import Baseline
from acdc_potential.fit.checkpoint import SparseKRRModel
from acdc_potential.fit.design import build_design_matrix, design_groups
from acdc_potential.fit.survey import Survey
from acdc_potential.fit.driver import fit_kernel
from acdc_potential.fit.selection import selection_prefix
from acdc_potential.fit.solver import DEFAULT_JITTER, ProjectedProcess, RowFactors, scaled_regularisation_evidence, scaled_regularisation_predictions, solve_projected_process, sparse_projection, stacked_triangle
from acdc_potential.fit.targets import ENERGY, FORCES, STRESS, VOIGT
from acdc_potential.fit.tuning import amplified, select_by_evidence, select_hyperparameters
from acdc_potential.fit.checkpoint import kernel_from_dict
from acdc_potential.fit.selection import cur_selection, farthest_point_sampling, select_sparse
from acdc_potential.kernels.base import SparseKernel
from acdc_potential.kernels.message_passing import MessagePassingKernel, message_hypers
from acdc_potential.kernels.polynomial import PolynomialKernel
from acdc_potential.kernels.wigner.kernel import WignerKernel
from acdc_potential.kernels.wigner.iteration import WignerHypers
from acdc_potential.calculator import ACDCCalculator
from acdc_potential.errors import AccuracyWarning
from acdc_potential.inference import run_module
from acdc_potential.model.export import export_model

HYPERS = DensityHypers(density="gaussian", cutoff=3.5, smoothing=0.5, max_angular=2, max_radial=3, basis="gto", width=0.4)


def methane(seed: int) -> ase.Atoms:
    rng = np.random.default_rng(seed)
    directions = rng.normal(size=(4, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    positions = np.vstack([[0.0, 0.0, 0.0], directions * rng.uniform(0.9, 1.6, size=(4, 1))])
    return ase.Atoms("CH4", positions=positions)


def copper(seed: int) -> ase.Atoms:
    rng = np.random.default_rng(seed)
    atoms = ase.build.bulk("Cu", "fcc", a=3.6, cubic=True)
    strain = np.eye(3) + 0.03 * rng.normal(size=(3, 3))
    atoms.set_cell(atoms.cell.array @ (0.5 * (strain + strain.T)), scale_atoms=True)
    atoms.positions += 0.1 * rng.normal(size=atoms.positions.shape)
    return atoms


def labelled(atoms: ase.Atoms, seed: int) -> Labelled:
    """Random labels (and stress only for periodic cells): the tests need rows, not physics."""
    rng = np.random.default_rng(seed)
    return Labelled(
        atoms=atoms,
        energy=float(rng.normal()),
        forces=rng.normal(size=(len(atoms), 3)),
        stress=0.01 * np.eye(3) + 0.001 * rng.normal(size=(3, 3)) if np.all(atoms.pbc) else None,
    )


def training_set():
    frames = [methane(k) for k in range(6)] + [copper(k) for k in range(3)]
    return [labelled(a, k) for k, a in enumerate(frames)]


@pytest.fixture(scope="module")
def polynomial_model():
    kernel = PolynomialKernel(zeta=2, mixing={"c0": 0.5, "a": 1.0})
    return fit_kernel(training_set(), HYPERS, kernel, n_sparse=6, regularisers=Regularisers(0.01, 0.05, 0.005), tune=False)


@pytest.fixture(scope="module")
def wigner_model():
    kernel = WignerKernel(WignerHypers(nu_max=3, lambda_max=2), mixing={"c0": 0.5, "a": 1.0, "b": 0.7})
    return fit_kernel(training_set(), HYPERS, kernel, n_sparse=6, regularisers=Regularisers(0.01, 0.05, 0.005), tune=False)


@pytest.fixture(scope="module")
def acdc_model():
    """Linear in normalised invariants of orders 1, 2 and 3, the last contracted (eq. 24)."""
    kernel = PolynomialKernel(zeta=1, orders=[1, 2, 3], contraction=4, mixing={"c0": 0.5, "a": 1.0})
    return fit_kernel(training_set(), HYPERS, kernel, n_sparse=6, regularisers=Regularisers(0.01, 0.05, 0.005), tune=False)


@pytest.fixture(scope="module")
def mpacdc_model():
    """Quadratic in normalised [1 <- 1] and power-spectrum invariants (a message-passing model)."""
    kernel = MessagePassingKernel(message_hypers(HYPERS, 2, 1), zeta=2, orders=[2], mixing={"c0": 0.5, "a": 1.0})
    return fit_kernel(training_set(), HYPERS, kernel, n_sparse=6, regularisers=Regularisers(0.01, 0.05, 0.005), tune=False)


@pytest.fixture(scope="module")
def mpacdc2_model():
    """Quadratic in normalised [1 <- 1] and contracted [2 <- 1] invariants (eq. 24 on both factors)."""
    kernel = MessagePassingKernel(message_hypers(HYPERS, 1, 1), zeta=2, orders=[], message_orders=[1, 2], contraction=6, mixing={"c0": 0.5, "a": 1.0})
    return fit_kernel(training_set(), HYPERS, kernel, n_sparse=6, regularisers=Regularisers(0.01, 0.05, 0.005), tune=False)


@pytest.fixture(scope="module")
def mpacdc_short_model():
    """:func:`mpacdc_model` with messages of 0.7 times the density's cutoff (interaction range 1.4 r_c)."""
    kernel = MessagePassingKernel(message_hypers(HYPERS, 2, 1), zeta=2, orders=[2], mixing={"c0": 0.5, "a": 1.0}, cutoff=0.7 * HYPERS.cutoff)
    return fit_kernel(training_set(), HYPERS, kernel, n_sparse=6, regularisers=Regularisers(0.01, 0.05, 0.005), tune=False)


@pytest.fixture(params=["polynomial_model", "acdc_model", "mpacdc_model", "mpacdc2_model", "mpacdc_short_model", "wigner_model"])
def model(request):
    return request.getfixturevalue(request.param)


def energy_rows(model, frames):
    """Energy rows ``[n_pieces, S, M]`` of ``frames`` (the design matrix with energies only)."""
    structures = [Labelled(atoms=a, energy=0.0) for a in frames]
    design = build_design_matrix(structures, model.expansion, model.kernel, Baseline({1: 0.0, 6: 0.0, 29: 0.0}))
    return design.pieces


def derivative_rows(model, atoms):
    structure = Labelled(atoms=atoms, forces=np.zeros((len(atoms), 3)), stress=np.zeros((3, 3)) if np.all(atoms.pbc) else None)
    return build_design_matrix([structure], model.expansion, model.kernel, Baseline({1: 0.0, 6: 0.0, 29: 0.0}))


@pytest.mark.parametrize("atoms", [methane(11), copper(12)], ids=["methane", "copper"])
def test_force_rows_are_minus_position_derivatives_of_energy_rows(model, atoms):
    design = derivative_rows(model, atoms)
    force_rows = design.pieces[:, design.kind == FORCES]
    h = 2e-6  # pairs inside the short-message model's cutoff transition: truncation error ~6e-6 at h = 1e-5
    displaced = []
    for a in range(len(atoms)):
        for alpha in range(3):
            for sign in (1, -1):
                moved = atoms.copy()
                moved.positions[a, alpha] += sign * h
                displaced.append(moved)
    rows = energy_rows(model, displaced).reshape(model.kernel.n_pieces, -1, 2, model.kernel.n_sparse)
    finite = -(rows[:, :, 0] - rows[:, :, 1]) / (2 * h)
    assert force_rows.abs().max() > 1e-3
    torch.testing.assert_close(force_rows, finite, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("nu_max", [1, 2, 3, 4])
def test_derivative_rows_through_invariants_equal_the_per_pair_path(nu_max):
    """The per-atom-invariant path of the Wigner kernel's rows (sums over each structure
    before the sparse environments) equals the per-pair reverse passes, also when its
    budgets split the structures and the sparse set into many chunks."""
    structures = training_set()
    expansion = DensityExpansion(HYPERS, [1, 6, 29])
    batch = batch_from_atoms([s.atoms for s in structures], HYPERS.cutoff)
    c, layout = batch_density(expansion, batch)
    jacobian = structure_jacobian(expansion, batch)
    kernel = WignerKernel(WignerHypers(nu_max=nu_max, lambda_max=2))
    kernel.set_sparse(c[::3], batch.numbers[::3], layout)
    assert kernel.feature_sizes() is not None and sum(kernel.feature_sizes()) <= kernel.max_feature_dimension
    arguments = (c, batch.numbers, jacobian, batch.structure, len(structures))
    expected_values, expected_derivatives = SparseKernel.structure_derivatives(kernel, *arguments)
    assert expected_derivatives.abs().max() > 1e-3
    # the sparse invariants kept between groups: all, those of the species that fit one budget together, none
    entries = {z: int((kernel.sparse_species == z).sum()) * sum(kernel.feature_sizes()) for z in (1, 6, 29)}
    cases = ((kernel.sparse_feature_budget, sum(entries.values())), (max(entries.values()), None), (min(entries.values()) - 1, 0))
    for budget, kept in cases:
        kernel.clear_cache()
        kernel.sparse_feature_budget = budget
        if kept != cases[0][1]:  # and many chunks of structures and sparse environments
            kernel.feature_budget = 2000.0
        values, derivatives = kernel.structure_derivatives(*arguments)
        held = sum(x.numel() for cached in kernel._sparse_invariants.values() for x in cached)
        assert held <= budget and (held == kept if kept is not None else 0 < held < sum(entries.values()))
        torch.testing.assert_close(values, expected_values, rtol=1e-12, atol=1e-12 * float(expected_values.abs().max()))
        torch.testing.assert_close(derivatives, expected_derivatives, rtol=1e-11, atol=1e-11 * float(expected_derivatives.abs().max()))


def mixed_batch() -> list:
    """A bent molecule, a linear one, a single atom, a periodic cell and a slab (periodic in two
    directions): every kind of rigid motion, and structures of different sizes."""
    linear = ase.Atoms("HCH", positions=[[0.0, 0.0, 0.0], [0.4, 0.8, 0.6], [0.8, 1.6, 1.2]])
    slab = ase.build.fcc111("Cu", size=(1, 1, 3), vacuum=3.0)
    slab.rattle(0.05, seed=4)
    return [methane(21), linear, ase.Atoms("C", positions=[[0.1, 0.2, 0.3]]), copper(22), slab]


def rigid_motions(atoms: ase.Atoms, n_max: int, strain: bool) -> np.ndarray:
    """``[r, K]`` the rigid motions of ``atoms`` as columns of structure_jacobian, from their definitions."""
    width, n = 3 * n_max + (9 if strain else 0), len(atoms)
    motions = []
    for alpha in range(3):
        v = np.zeros(width)
        v[alpha : 3 * n : 3] = 1.0
        motions.append(v)
        if not atoms.pbc.any():
            v = np.zeros(width)
            v[: 3 * n] = np.cross(np.eye(3)[alpha], atoms.positions - [5.0, -2.0, 1.0]).reshape(-1)
            motions.append(v)
        if strain:
            v = np.zeros(width)
            v[3 * n_max :] = np.cross(np.eye(3)[alpha], np.eye(3)).reshape(-1)  # rotation generator about alpha
            motions.append(v)
    return np.array(motions)


@pytest.mark.parametrize("strain", [False, True])
def test_internal_columns_restore_gradients_that_vanish_along_rigid_motions(strain):
    """Each structure keeps its own columns but as many as its rigid motions' rank, and a gradient with
    no component along them (built here from the motions' definitions) is restored from its kept
    components; the padding is never kept."""
    structures = mixed_batch()
    batch = batch_from_atoms(structures, HYPERS.cutoff)
    columns = internal_columns(batch, strain)
    n_max = max(len(a) for a in structures)
    width = 3 * n_max + (9 if strain else 0)
    assert columns.width == width
    extra = 9 - 3 if strain else 0  # strain columns minus the antisymmetric strains
    slab = 3 * len(structures[4]) - 3 + extra  # no rotation of the positions is rigid for a slab
    assert columns.counts.tolist() == [3 * 5 - 6 + extra, 3 * 3 - 5 + extra, extra, 3 * len(structures[3]) - 3 + extra, slab]
    rng = np.random.default_rng(0)
    for s, atoms in enumerate(structures):
        own = list(range(3 * len(atoms))) + (list(range(3 * n_max, width)) if strain else [])
        kept = columns.kept[s, : columns.counts[s]].tolist()
        assert set(kept) <= set(own) and bool((columns.kept[s, columns.counts[s] :] == width).all())
        motions = rigid_motions(atoms, n_max, strain)
        g = np.zeros(width)
        g[own] = rng.normal(size=len(own))
        q, _ = np.linalg.qr(motions.T)
        g -= q @ (q.T @ g)  # no component along the rigid motions
        derivatives = torch.zeros((1, len(structures), 1, columns.kept.shape[1]), dtype=torch.float64)
        derivatives[0, s, 0, : len(kept)] = torch.as_tensor(g[kept])
        restored = columns.full(derivatives)[0, s, 0].numpy()
        np.testing.assert_allclose(restored, g, atol=1e-12)


@pytest.mark.parametrize("strain", [False, True])
@pytest.mark.parametrize("kind", ["wigner", "polynomial", "mpacdc"])
def test_rows_along_kept_columns_equal_rows_along_every_column(kind, strain, polynomial_model, mpacdc_model):
    """structure_rows differentiates along each structure's kept columns only, and skips the batch's
    padding; restored, its derivatives equal those along every column of the full Jacobian by another
    route (per-pair reverse passes, or autograd), stress columns included; the Wigner kernel's also
    when its budget splits the structures into many groups."""
    structures = mixed_batch() + [methane(23)]
    fitted = {"polynomial": polynomial_model, "mpacdc": mpacdc_model}.get(kind)
    expansion = DensityExpansion(HYPERS, [1, 6, 29]) if kind == "wigner" else fitted.expansion
    batch = batch_from_atoms(structures, HYPERS.cutoff)
    c, layout = batch_density(expansion, batch)
    if kind == "wigner":
        kernel = WignerKernel(WignerHypers(nu_max=3, lambda_max=2))
        kernel.set_sparse(c[::2], batch.numbers[::2], layout)
    else:
        kernel = fitted.kernel
    centres = torch.arange(batch.n_atoms)
    values, derivatives = kernel.structure_rows(expansion, batch, centres, True, strain)
    if kind == "wigner":
        arguments = (c, batch.numbers, structure_jacobian(expansion, batch), batch.structure, len(structures))
        expected_values, expected = SparseKernel.structure_derivatives(kernel, *arguments)
    elif kind == "polynomial":
        expected_values, expected = full_polynomial_rows(kernel, expansion, batch)
    else:
        expected_values, expected = full_message_passing_rows(kernel, expansion, batch)
    if not strain:
        expected = expected[..., : expected.shape[-1] - 9]
    assert expected.abs().max() > 1e-3
    torch.testing.assert_close(values, expected_values, rtol=1e-12, atol=1e-12 * float(expected_values.abs().max()))
    torch.testing.assert_close(derivatives, expected, rtol=1e-10, atol=1e-11 * float(expected.abs().max()))
    # in pieces: Wigner rows in groups of a few structures, message-passing tangents a few directions at a time
    if kind == "wigner":
        kernel.feature_budget = 2000.0 * sum(kernel.feature_sizes()) / 1000.0
    elif kind == "mpacdc":
        kernel = copy.copy(kernel)
        kernel.max_tangents = 3 * batch.n_atoms
    if kind != "polynomial":
        _, pieces = kernel.structure_rows(expansion, batch, centres, True, strain)
        torch.testing.assert_close(pieces, expected, rtol=1e-10, atol=1e-11 * float(expected.abs().max()))


@pytest.mark.parametrize("name", ["wigner_model", "polynomial_model", "mpacdc_model"])
def test_rows_of_isolated_atoms_have_no_derivatives(name, request):
    """A batch without a single pair (atoms beyond each other's cutoff) gives the self-kernel sums
    and zero derivatives."""
    fitted = request.getfixturevalue(name)
    structures = [ase.Atoms("C", positions=[[0.0, 0.0, 0.0]]), ase.Atoms("CH", positions=[[0.0, 0.0, 0.0], [9.0, 0.0, 0.0]])]
    batch = batch_from_atoms(structures, HYPERS.cutoff)
    assert batch.centers.numel() == 0
    values, derivatives = fitted.kernel.structure_rows(fitted.expansion, batch, torch.arange(batch.n_atoms), True, False)
    assert derivatives.shape[-1] == 6 and float(derivatives.abs().max()) == 0.0
    assert float(values[0].abs().max()) > 0.0


def full_polynomial_rows(kernel, expansion, batch):
    """Polynomial rows along every column of the full Jacobian, by autograd of each structure's summed
    kernel against its coefficients (no forward mode, no internal directions)."""
    c, layout = batch_density(expansion, batch)
    jacobian = structure_jacobian(expansion, batch)
    c = c.detach().requires_grad_()
    rows = kernel.rows(kernel.module(expansion)(layout.unflatten(c)), batch.numbers)
    values = torch.zeros((rows.shape[0], batch.n_structures, rows.shape[2]), dtype=rows.dtype).index_add(1, batch.structure, rows.detach())
    derivatives = torch.zeros((rows.shape[0], batch.n_structures, rows.shape[2], jacobian.shape[1]), dtype=rows.dtype)
    for p in range(rows.shape[0]):
        for m in range(rows.shape[2]):
            if not rows[p, :, m].requires_grad:
                continue
            (gradient,) = torch.autograd.grad(rows[p, :, m].sum(), c, retain_graph=True)
            derivatives[p, :, m] = torch.zeros((batch.n_structures, jacobian.shape[1]), dtype=rows.dtype).index_add(
                0, batch.structure, torch.einsum("nd,nkd->nk", gradient, jacobian)
            )
    return values, derivatives


def full_message_passing_rows(kernel, expansion, batch):
    """Message-passing rows along every position and strain column, by autograd of each structure's
    summed kernel against the batch's pair vectors ``r``: atom ``j`` moves ``r`` by ``+-1``, the strain
    ``eps_ab`` by ``r_b`` along ``a``."""
    vectors = batch.pair_vectors().detach().requires_grad_()
    rows = kernel.rows(kernel.batch_features(expansion, batch, vectors), batch.numbers)
    n_max = int(batch.atoms_per_structure().max())
    local = batch.local_index()
    owner = batch.structure[batch.centers]
    values = torch.zeros((rows.shape[0], batch.n_structures, rows.shape[2]), dtype=rows.dtype).index_add(1, batch.structure, rows.detach())
    derivatives = torch.zeros((rows.shape[0], batch.n_structures, rows.shape[2], 3 * n_max + 9), dtype=rows.dtype)
    for p in range(rows.shape[0]):
        for m in range(rows.shape[2]):
            if not rows[p, :, m].requires_grad:
                continue
            (g,) = torch.autograd.grad(rows[p, :, m].sum(), vectors, retain_graph=True)
            positions = torch.zeros((batch.n_structures, n_max, 3), dtype=g.dtype)
            positions.index_put_((owner, local[batch.neighbors]), g, accumulate=True)
            positions.index_put_((owner, local[batch.centers]), -g, accumulate=True)
            strain = torch.zeros((batch.n_structures, 9), dtype=g.dtype).index_add(0, owner, (g[:, :, None] * vectors.detach()[:, None, :]).reshape(-1, 9))
            derivatives[p, :, m] = torch.cat([positions.reshape(batch.n_structures, -1), strain], dim=1)
    return values, derivatives


def test_polynomial_derivative_rows_do_not_depend_on_the_jvp_budget(acdc_model):
    """Order-3 feature JVPs in chunks of one atom (a budget below one atom's nu = 2 blocks) give the rows
    of the default chunks."""
    kernel = acdc_model.kernel
    batch = batch_from_atoms([methane(16), copper(17)], HYPERS.cutoff)
    centres = torch.arange(batch.n_atoms)
    expected = kernel.derivative_rows(acdc_model.expansion, batch, centres, True)
    default = kernel.jvp_entries
    try:
        kernel.jvp_entries = 1
        values, derivatives = kernel.derivative_rows(acdc_model.expansion, batch, centres, True)
    finally:
        kernel.jvp_entries = default
    assert expected[1].abs().max() > 1e-3
    torch.testing.assert_close(values, expected[0], rtol=1e-13, atol=0.0)
    torch.testing.assert_close(derivatives, expected[1], rtol=1e-12, atol=1e-13 * float(expected[1].abs().max()))


def test_the_rows_memory_budget_counts_what_each_kernel_differentiates(polynomial_model, mpacdc_model):
    """Density coefficients for kernels whose rows meet their Jacobian, features for message passing."""
    batch = batch_from_atoms([methane(3), copper(4)], HYPERS.cutoff)
    assert polynomial_model.kernel.tangent_size(polynomial_model.expansion) == batch_density(polynomial_model.expansion, batch)[1].size
    assert mpacdc_model.kernel.tangent_size(mpacdc_model.expansion) == mpacdc_model.kernel.sparse_coefficients.shape[1]
    assert polynomial_model.kernel.sparse_coefficients.shape[1] != batch_density(polynomial_model.expansion, batch)[1].size


def test_coefficient_jacobian_does_not_depend_on_the_pair_chunking(polynomial_model):
    batch = batch_from_atoms([copper(14), methane(15)], HYPERS.cutoff)
    whole = structure_jacobian(polynomial_model.expansion, batch)
    chunked = structure_jacobian(polynomial_model.expansion, batch, pair_budget=1000)
    assert whole.abs().max() > 1e-3
    torch.testing.assert_close(chunked, whole, atol=1e-14, rtol=1e-12)




def test_density_and_jacobian_of_chosen_centres_are_those_rows_of_all(polynomial_model):
    """build_design_matrix differentiates one species' atoms at a time: the coefficients and
    Jacobian of a subset of centres are exactly those rows of the whole batch's."""
    expansion = polynomial_model.expansion
    batch = batch_from_atoms([copper(14), methane(15)], HYPERS.cutoff)
    c, _ = batch_density(expansion, batch)
    jacobian = structure_jacobian(expansion, batch)
    for z in (1, 6, 29):
        centres = torch.nonzero(batch.numbers == z).flatten()
        assert centres.numel() > 0
        torch.testing.assert_close(batch_density(expansion, batch, centres)[0], c[centres], atol=0, rtol=0)
        torch.testing.assert_close(structure_jacobian(expansion, batch, centres=centres), jacobian[centres], atol=1e-15, rtol=1e-13)
def test_stress_rows_are_strain_derivatives_of_energy_rows(model):
    atoms = copper(13)
    design = derivative_rows(model, atoms)
    stress_rows = design.pieces[:, design.kind == STRESS]
    h = 2e-6  # as for the force rows
    strained = []
    for a, b in VOIGT:
        for sign in (1, -1):
            eps = np.zeros((3, 3))
            eps[a, b] += sign * h
            eps[b, a] += sign * h
            deformed = atoms.copy()
            deformed.set_cell(atoms.cell.array @ (np.eye(3) + eps).T, scale_atoms=True)
            strained.append(deformed)
    rows = energy_rows(model, strained).reshape(model.kernel.n_pieces, 6, 2, model.kernel.n_sparse)
    # eps_ab and eps_ba both move by h (eps_aa by 2h): the difference is 4h times the symmetric derivative
    finite = (rows[:, :, 0] - rows[:, :, 1]) / (4 * h) / atoms.get_volume()
    assert stress_rows.abs().max() > 1e-4
    torch.testing.assert_close(stress_rows, finite, atol=1e-8, rtol=1e-6)


def test_design_rows_agree_with_autograd_predictions(model):
    """Rows built from the coefficient Jacobian reproduce the autograd energies, forces and stress."""
    structures = training_set()
    design = build_design_matrix(structures, model.expansion, model.kernel, model.baseline)
    k_nm = design.combine(model.kernel.piece_weights())
    from_rows = k_nm @ model.weights
    # the weights of nearly collinear sparse environments cancel: compare to the size of the terms
    bound = 1e-12 * (k_nm.abs() @ model.weights.abs())
    predicted = model.predict([s.atoms for s in structures])
    baseline = torch.tensor([model.baseline.structure_energy(s.atoms.numbers) for s in structures], dtype=torch.float64)
    energies = predicted["energy"] - baseline
    periodic = torch.tensor([bool(np.all(s.atoms.pbc)) for s in structures])
    voigt = torch.stack([predicted["stress"][periodic][:, a, b] for a, b in VOIGT], dim=1)
    for kind, value in ((ENERGY, energies), (FORCES, predicted["forces"].reshape(-1)), (STRESS, voigt.reshape(-1))):
        rows = design.kind == kind
        assert torch.all((from_rows[rows] - value).abs() <= bound[rows] + 1e-14)
    assert torch.isnan(predicted["stress"][~periodic]).all()


def test_target_of_the_same_kernel_class_is_recovered(model):
    """Labels from a teacher with random weights on the same sparse set are fitted to near machine precision."""
    generator = torch.Generator().manual_seed(3)
    teacher_weights = torch.randn(model.kernel.n_sparse, generator=generator, dtype=torch.float64)
    teacher = SparseKRRModel(
        HYPERS,
        model.species,
        model.kernel,
        ProjectedProcess(teacher_weights, model.solution.projection, model.solution.triangular),
        model.baseline,
        model.regularisers,
        expansion=model.expansion,
    )
    structures = training_set()
    labels = teacher.predict([s.atoms for s in structures])
    n_per = [len(s.atoms) for s in structures]
    forces = torch.split(labels["forces"], n_per)
    relabelled = [
        Labelled(atoms=s.atoms, energy=float(e), forces=f.numpy(), stress=None if s.stress is None else st.numpy())
        for s, e, f, st in zip(structures, labels["energy"], forces, labels["stress"])
    ]
    kernel = kernel_from_dict({**model.kernel.to_dict(), "sparse_coefficients": None})
    tiny = Regularisers(1e-7, 1e-7, 1e-7)
    student = fit_kernel(relabelled, HYPERS, kernel, n_sparse=6, regularisers=tiny, isolated_energies=model.baseline.energies, tune=False)
    torch.testing.assert_close(student.kernel.sparse_coefficients, model.kernel.sparse_coefficients)
    unseen = [methane(40), copper(41)]
    expected, got = teacher.predict(unseen), student.predict(unseen)
    scale = labels["forces"].abs().max()
    for key in ("energy", "forces", "stress"):
        finite = ~torch.isnan(expected[key])
        assert torch.allclose(got[key][finite], expected[key][finite], atol=1e-7 * float(scale), rtol=0)


def test_predictions_are_invariant_under_rotation_and_permutation(model):
    atoms = [methane(21), copper(22)]
    reference = model.predict(atoms, uncertainty=True)
    rotation = random_rotation(5)
    permutations = [np.array([0, 3, 1, 4, 2]), np.array([2, 0, 3, 1])]
    transformed = []
    for a, order in zip(atoms, permutations):
        b = a[order]
        b.positions = b.positions @ rotation.T
        b.set_cell(b.cell.array @ rotation.T)
        transformed.append(b)
    result = model.predict(transformed, uncertainty=True)
    # nearly collinear copper sparse environments have large, cancelling weights: roundoff ~1e-10
    torch.testing.assert_close(result["energy"], reference["energy"], atol=1e-8, rtol=0)
    torch.testing.assert_close(result["energy_uncertainty"], reference["energy_uncertainty"], atol=1e-8, rtol=1e-8)
    r = torch.tensor(rotation)
    old_forces = torch.split(reference["forces"], [5, 4])
    new_forces = torch.split(result["forces"], [5, 4])
    for old, new, order in zip(old_forces, new_forces, permutations):
        torch.testing.assert_close(new, old[torch.tensor(order)] @ r.T, atol=1e-8, rtol=0)
    torch.testing.assert_close(result["stress"][1], r @ reference["stress"][1] @ r.T, atol=1e-9, rtol=0)


def test_unknown_species_gives_a_clear_error(model):
    water = ase.Atoms("OH2", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]])
    with pytest.raises(StructureError, match=r"structure 1 \(H2O\).*\[8\]"):
        model.predict([methane(1), water])


def test_duplicated_structures_with_half_weights_give_the_same_model():
    structures = training_set()
    halves = [dataclasses.replace(s, weight=0.5) for s in structures for _ in range(2)]
    regularisers = Regularisers(0.01, 0.05, 0.005)
    single = fit_kernel(structures, HYPERS, PolynomialKernel(zeta=2), n_sparse=6, regularisers=regularisers, tune=False)
    doubled = fit_kernel(halves, HYPERS, PolynomialKernel(zeta=2), n_sparse=6, regularisers=regularisers, tune=False)
    probe = [methane(50), copper(51)]
    for key, value in single.predict(probe).items():
        torch.testing.assert_close(doubled.predict(probe)[key], value, equal_nan=True, atol=1e-9, rtol=1e-8)


def test_structures_without_forces_or_energy_and_single_kind_fits():
    structures = training_set()
    structures[0] = dataclasses.replace(structures[0], forces=None)
    structures[1] = dataclasses.replace(structures[1], energy=None)
    structures[7] = dataclasses.replace(structures[7], stress=None)
    kernel = PolynomialKernel(zeta=2)
    mixed = fit_kernel(structures, HYPERS, kernel, n_sparse=6, tune=False)
    design = build_design_matrix(structures, mixed.expansion, kernel, mixed.baseline)
    assert int((design.kind == ENERGY).sum()) == 8
    assert int((design.kind == FORCES).sum()) == 3 * (sum(len(s.atoms) for s in structures) - 5)
    assert int((design.kind == STRESS).sum()) == 12
    assert torch.isfinite(mixed.weights).all()
    for energies, forces in ((True, False), (False, True)):
        single = fit_kernel(structures, HYPERS, PolynomialKernel(zeta=2), n_sparse=6, energies=energies, forces=forces, stress=False, tune=False)
        assert torch.isfinite(single.weights).all()
        assert torch.isfinite(single.predict([methane(60)])["forces"]).all()


def test_uncertainty_is_small_on_training_environments_and_grows_away(model):
    near = model.predict([s.atoms for s in training_set()[:6]], uncertainty=True)
    far_atoms = []
    for k in range(3):
        a = methane(70 + k)
        a.positions *= 0.55
        far_atoms.append(a)
    far = model.predict(far_atoms, uncertainty=True)
    assert float(near["atom_uncertainty"].mean()) < 0.5 * float(far["atom_uncertainty"].mean())
    assert float(near["energy_uncertainty"].mean()) < 0.5 * float(far["energy_uncertainty"].mean())


def gaussian_problem(seed: int, n_test: int):
    """Sparse, training and test points in 3D (6, 40, ``n_test``) and a Gaussian kernel."""
    generator = torch.Generator().manual_seed(seed)
    x_sparse = torch.randn(6, 3, generator=generator, dtype=torch.float64)
    x_train = torch.randn(40, 3, generator=generator, dtype=torch.float64)
    x_test = torch.randn(n_test, 3, generator=generator, dtype=torch.float64)

    def k(a, b):
        return torch.exp(-0.5 * torch.cdist(a, b) ** 2)

    return x_sparse, x_train, x_test, k


@pytest.mark.parametrize("block_rows", [None, 3, 11, 1000])
def test_solver_matches_the_closed_form_and_its_variance(block_rows):
    """Also when the QR of the stacked system is accumulated in blocks of rows smaller than
    the rank, straddling the data and identity rows, or in one block."""
    x_sparse, x_train, x_test, k = gaussian_problem(0, 5)
    y = torch.sin(x_train).sum(dim=1)
    inverse_sigma = torch.linspace(5.0, 20.0, 40, dtype=torch.float64)
    solution = solve_projected_process(k(x_train, x_sparse), y, inverse_sigma, k(x_sparse, x_sparse), block_rows=block_rows)
    k_nm, k_mm = k(x_train, x_sparse), k(x_sparse, x_sparse)
    precision = k_mm + k_nm.T @ (inverse_sigma[:, None] ** 2 * k_nm)
    expected = torch.linalg.solve(precision, k_nm.T @ (inverse_sigma**2 * y))
    torch.testing.assert_close(solution.weights, expected, atol=1e-9, rtol=1e-7)
    k_xm = k(x_test, x_sparse)
    prior_explained = (k_xm * torch.linalg.solve(k_mm, k_xm.T).T).sum(1)
    variance = 1.0 - prior_explained + (k_xm * torch.linalg.solve(precision, k_xm.T).T).sum(1)
    torch.testing.assert_close(solution.variance(k_xm, torch.ones(5, dtype=torch.float64)), variance, atol=1e-9, rtol=1e-7)


def test_sparse_projection_keeps_small_eigenvalues_and_floors_the_null_space():
    """Directions of K_MM far below its largest eigenvalue (but above the jitter) are kept
    exactly (P^T K_MM P = 1 on them); an exactly singular direction is floored, not divided by zero."""
    generator = torch.Generator().manual_seed(2)
    basis = torch.linalg.qr(torch.randn(5, 5, generator=generator, dtype=torch.float64))[0]
    spectrum = torch.tensor([1.0, 1e-4, 1e-8, 1e-11, 0.0], dtype=torch.float64)
    k_mm = basis @ torch.diag(spectrum) @ basis.T
    projection = sparse_projection(k_mm, jitter=1e-13)
    assert projection.shape == (5, 5) and torch.isfinite(projection).all()
    whitened = torch.linalg.eigvalsh(projection.T @ k_mm @ projection)
    torch.testing.assert_close(whitened[1:], torch.ones(4, dtype=torch.float64), rtol=1e-4, atol=0.0)
    assert abs(float(whitened[0])) < 1e-2  # rounding of the zero eigenvalue over the floor, ~eps / jitter


def test_block_diagonal_sparse_projection_equals_the_whole_one():
    """Blocks of K_MM that vanish between labels (species) decomposed one by one give the same
    ``P P^T`` (the pseudo-inverse), and the same weights, as one decomposition of the whole."""
    x_sparse, x_train, _, k = gaussian_problem(3, 1)
    labels = torch.tensor([0, 1, 0, 2, 1, 2])
    train_labels = torch.arange(x_train.shape[0]) % 3
    k_mm = k(x_sparse, x_sparse) * (labels[:, None] == labels[None, :])
    k_nm = k(x_train, x_sparse) * (train_labels[:, None] == labels[None, :])
    whole, blocks = sparse_projection(k_mm), sparse_projection(k_mm, blocks=labels)
    torch.testing.assert_close(blocks @ blocks.T, whole @ whole.T, rtol=1e-10, atol=1e-10)
    y, inverse_sigma = torch.cos(x_train).sum(dim=1), torch.full((x_train.shape[0],), 10.0, dtype=torch.float64)
    torch.testing.assert_close(
        solve_projected_process(k_nm, y, inverse_sigma, k_mm, blocks=labels).weights, solve_projected_process(k_nm, y, inverse_sigma, k_mm).weights, rtol=1e-8, atol=1e-10
    )


def test_solver_with_a_duplicated_sparse_environment_predicts_as_without_it():
    """A duplicated sparse environment makes K_MM singular; the fit stays finite and the
    duplicate only shares the weight of the original."""
    x_sparse, x_train, x_test, k = gaussian_problem(3, 7)
    y, inverse_sigma = torch.cos(x_train).sum(dim=1), torch.full((40,), 30.0, dtype=torch.float64)
    single = solve_projected_process(k(x_train, x_sparse), y, inverse_sigma, k(x_sparse, x_sparse))
    doubled_sparse = torch.cat([x_sparse, x_sparse[:1]])
    doubled = solve_projected_process(k(x_train, doubled_sparse), y, inverse_sigma, k(doubled_sparse, doubled_sparse))
    assert torch.isfinite(doubled.weights).all()
    torch.testing.assert_close(k(x_test, doubled_sparse) @ doubled.weights, k(x_test, x_sparse) @ single.weights, rtol=1e-6, atol=1e-8)


def test_fit_with_bounded_design_memory_streams_the_rows_into_the_same_solution():
    """A design memory smaller than one structure's rows: every structure's rows are built
    and folded into the solve on their own; the weights are those of the fit holding them all."""
    structures = training_set()
    kernel = PolynomialKernel(zeta=2, mixing={"c0": 0.5, "a": 1.0})
    whole = fit_kernel(structures, HYPERS, kernel, n_sparse=6, regularisers=Regularisers(0.01, 0.05, 0.005), tune=False)
    groups = design_groups(Survey.of(structures).row_counts(True, True, True), kernel.n_pieces, kernel.n_sparse, memory=1.0, seed=3)
    assert sorted(k for g in groups for k in g) == list(range(len(structures))) and all(len(g) == 1 for g in groups)
    assert groups != [[k] for k in range(len(structures))]  # shuffled: the first group is a random sample
    kernel = PolynomialKernel(zeta=2, mixing={"c0": 0.5, "a": 1.0})
    streamed = fit_kernel(structures, HYPERS, kernel, n_sparse=6, regularisers=Regularisers(0.01, 0.05, 0.005), design_memory=1.0, tune=False)
    torch.testing.assert_close(streamed.weights, whole.weights, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(streamed.solution.triangular.T @ streamed.solution.triangular,
                               whole.solution.triangular.T @ whole.solution.triangular, rtol=1e-8, atol=1e-8)


def test_tuning_on_a_sample_of_the_structures_under_bounded_design_memory_fits():
    structures = training_set()
    kernel = PolynomialKernel(zeta=2, mixing={"c0": 0.5, "a": 1.0})
    size = kernel.n_pieces * 6 * 3 * 8.0 * (1 + 3 * 5)  # bytes of the rows of about three methanes
    groups = design_groups(Survey.of(structures).row_counts(True, True, True), kernel.n_pieces, 3 * 6, memory=size * 3, seed=0)
    assert len(groups) > 1
    model = fit_kernel(structures, HYPERS, kernel, n_sparse=6, regularisers=Regularisers(0.01, 0.05, 0.005), design_memory=size * 3,
                tune=True, tune_options={"max_evaluations": 5})
    assert model.report is not None and torch.isfinite(model.weights).all()
    predicted = model.predict(structures)["energy"]
    assert torch.isfinite(predicted).all()


def test_stacked_triangle_does_not_depend_on_the_chunking():
    generator = torch.Generator().manual_seed(1)
    k_nm = torch.randn(50, 7, generator=generator, dtype=torch.float64)
    targets, inverse_sigma = torch.randn(50, generator=generator, dtype=torch.float64), torch.rand(50, generator=generator, dtype=torch.float64)
    projection = torch.randn(7, 5, generator=generator, dtype=torch.float64)
    whole = torch.linalg.qr(torch.cat([k_nm @ projection, targets[:, None]], 1) * inverse_sigma[:, None], mode="r")[1]
    for prior in (False, True):
        reference = stacked_triangle(k_nm, targets, inverse_sigma, projection, prior, block_rows=1000, chunk_rows=1000)
        chunked = stacked_triangle(lambda a, b: k_nm[a:b], targets, inverse_sigma, projection, prior, block_rows=9, chunk_rows=4)
        # R factors are unique up to the sign of each row
        torch.testing.assert_close(chunked.T @ chunked, reference.T @ reference, rtol=1e-12, atol=1e-12)
        if not prior:
            torch.testing.assert_close(reference.T @ reference, whole.T @ whole, rtol=1e-12, atol=1e-12)


def test_hyperparameter_selection_lowers_the_validation_loss(model):
    structures = training_set()
    design = build_design_matrix(structures, model.expansion, model.kernel, model.baseline)
    k_mm = model.kernel.sparse_block()
    initial = select_hyperparameters(design, k_mm, model.kernel, Regularisers(1.0, 1.0, 1.0), folds=3, max_evaluations=1)
    tuned = select_hyperparameters(design, k_mm, model.kernel, Regularisers(1.0, 1.0, 1.0), folds=3, max_evaluations=40)
    assert tuned.loss < initial.loss
    assert set(tuned.tuned) == set(model.kernel.mixing_names) - {"a"} | {"energy", "forces", "stress"}
    assert tuned.mixing["a"] == model.kernel.mixing["a"]


def test_tuning_warns_when_the_validation_loss_leaves_the_regularisers_undetermined(polynomial_model):
    """Labels that the model's own kernel reproduces exactly: the validation loss falls as the regularisers
    do, the search drives them towards zero, and where it stops is rounding: a warning says so. On random
    labels (noise the kernel cannot fit) the regularisers stay large and nothing is said."""
    model = polynomial_model
    frames = [s.atoms for s in training_set()]
    predicted = model.predict(frames)
    exact, start = [], 0
    for k, atoms in enumerate(frames):
        n = len(atoms)
        stress = predicted["stress"][k].numpy() if np.all(atoms.pbc) else None
        exact.append(Labelled(atoms=atoms, energy=float(predicted["energy"][k]), forces=predicted["forces"][start : start + n].numpy(), stress=stress))
        start += n
    k_mm = model.kernel.sparse_block()
    for structures, undetermined in ((exact, True), (training_set(), False)):
        design = build_design_matrix(structures, model.expansion, model.kernel, model.baseline)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", AccuracyWarning)
            report = select_hyperparameters(design, k_mm, model.kernel, Regularisers(0.01, 0.05, 0.005), tune=["energy", "forces", "stress"], folds=3, max_evaluations=60)
        said = [w for w in caught if issubclass(w.category, AccuracyWarning) and "tuning drove" in str(w.message)]
        assert bool(said) == undetermined, (report.regularisers, [str(w.message) for w in said])


def test_tuning_on_a_prefix_of_the_sparse_selection(wigner_model):
    assert selection_prefix(torch.tensor([1, 1, 6, 1, 6, 6, 29]), 2).tolist() == [0, 1, 2, 4, 6]
    kernel = wigner_model.kernel
    design = build_design_matrix(training_set(), wigner_model.expansion, kernel, wigner_model.baseline)
    k_mm = kernel.sparse_block()
    prefix = selection_prefix(kernel.sparse_species, 2)
    assert 0 < len(prefix) < kernel.n_sparse
    # the search is that of a model on those sparse environments only; then every regulariser
    # is rescaled by one factor chosen with all of them
    on_prefix = select_hyperparameters(design, k_mm, kernel, Regularisers(), sparse=prefix, max_evaluations=8)
    subset = select_hyperparameters(design.subset(columns=prefix), k_mm[:, prefix][:, :, prefix], kernel, Regularisers(), max_evaluations=8)
    assert on_prefix.mixing == subset.mixing
    assert subset.regulariser_scale == 1.0
    scale = on_prefix.regulariser_scale
    for name in ("energy", "forces", "stress"):
        assert getattr(on_prefix.regularisers, name) == pytest.approx(scale * getattr(subset.regularisers, name), rel=1e-12)
    assert on_prefix.loss != pytest.approx(subset.loss, rel=1e-6)


def test_linear_kernel_solved_in_feature_space_is_the_exact_gaussian_process():
    """With ``zeta = 1`` and more sparse environments asked for than features, the sparse set of each
    species is its feature directions and the origin; the fit equals one on every training environment
    (another sparse set, which spans the kernel's function space ``[1, x^]`` on every direction these
    molecules have): both are the exact Gaussian process."""
    structures = [labelled(methane(k), k) for k in range(14)]
    probe = [methane(40), methane(41)]

    def fitted(feature_space):
        kernel = PolynomialKernel(zeta=1, orders=[1], mixing={"c0": 0.5, "a": 1.3}, feature_space=feature_space)
        return fit_kernel(structures, HYPERS, kernel, n_sparse=100, regularisers=Regularisers(0.01, 0.05, 0.005), tune=False)

    basis, every = fitted(True), fitted(False)
    n_features = basis.kernel.sparse_coefficients.shape[1]
    assert 14 > n_features + 1  # every environment spans the function space too
    assert basis.kernel.n_sparse == 2 * (n_features + 1) and bool((basis.sparse_owners == -1).all())
    assert every.kernel.n_sparse == 5 * 14 and bool((every.sparse_owners >= 0).all())
    # the basis spans the function space (active learning adds no sparse environment to these species); every
    # environment spans it for H, not for C, whose centres never see another C (zero C channels, here and in
    # the probes, so the predictions agree all the same); a basis without its last axis spans nothing
    assert basis.kernel.complete_species() == [1, 6] and every.kernel.complete_species() == [1]
    hydrogen = torch.nonzero(basis.kernel.sparse_species == 1).flatten()
    assert basis.kernel.sparse_subset(hydrogen[:-1]).complete_species() == []
    expected, got = every.predict(probe, uncertainty=True), basis.predict(probe, uncertainty=True)
    assert float(expected["forces"].abs().max()) > 1e-2
    for key in ("energy", "forces", "energy_uncertainty"):
        scale = float(expected[key].abs().max())
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-7 * scale)
    # the exported head folds the weights into one vector per species, as for any linear model
    torch.testing.assert_close(run_module(basis.scripted(), probe, True, False, False)["energy"], got["energy"], rtol=0, atol=1e-10)
    # the origin, then orthonormal directions, the most populated first
    directions = basis.kernel.sparse_coefficients[basis.kernel.sparse_species == 6]
    assert float(directions[0].abs().max()) == 0.0
    torch.testing.assert_close(directions[1:] @ directions[1:].T, torch.eye(n_features, dtype=torch.float64), rtol=0, atol=1e-12)
    environments = every.kernel.sparse_coefficients[every.kernel.sparse_species == 6]
    spread = (environments @ directions[1:].T).square().sum(dim=0)
    assert bool((spread[:-1] >= spread[1:] - 1e-12).all())
    with pytest.raises(ValueError, match="zeta = 1"):
        PolynomialKernel(zeta=2).feature_basis(environments, torch.full((len(environments),), 6), [6])


def test_regularisation_path_equals_refits(wigner_model):
    """The predictions for every scale of the regularisers from one QR and one SVD equal
    those of separate projected-process fits."""
    kernel = wigner_model.kernel
    design = build_design_matrix(training_set(), wigner_model.expansion, kernel, wigner_model.baseline)
    k_mm, weights = kernel.sparse_block(), kernel.piece_weights()
    held = torch.isin(design.structure, torch.unique(design.structure)[::3])
    train, test = torch.nonzero(~held).flatten(), torch.nonzero(held).flatten()
    scales = torch.tensor([0.1, 1.0, 7.0], dtype=torch.float64)
    regularisers = Regularisers(0.002, 0.04, 0.001)
    path = scaled_regularisation_predictions(design, k_mm, weights, regularisers, train, test, scales)
    for scale, predictions in zip(scales.tolist(), path):
        scaled = Regularisers(0.002 * scale, 0.04 * scale, 0.001 * scale)
        solution = solve_projected_process(
            design.combine(weights, train), design.targets[train], design.inverse_sigma(scaled)[train],
            torch.einsum("p,pmn->mn", weights, k_mm),
        )
        expected = design.combine(weights, test) @ solution.weights
        assert expected.abs().max() > 1e-3
        torch.testing.assert_close(predictions, expected, rtol=1e-7, atol=1e-7 * float(expected.abs().max()))


def test_row_factors_solve_as_the_rows_themselves(wigner_model):
    """The tuning's solves from the rows reduced to per-kind factors equal projected-process fits
    on the rows, for other mixings, regularisers and a prefix of the sparse set; force rows (many
    more than pieces x columns) are reduced to their R (forced here on small data), energy and stress
    rows kept as they are."""
    kernel = wigner_model.kernel
    design = build_design_matrix(training_set(), wigner_model.expansion, kernel, wigner_model.baseline)
    k_mm = kernel.sparse_block()
    train = torch.nonzero(~torch.isin(design.structure, torch.unique(design.structure)[::4])).flatten()
    columns = torch.arange(0, kernel.n_sparse, 2)
    cases = [(None, kernel.piece_weights(), Regularisers(0.002, 0.04, 0.001)),
             (columns, kernel.piece_weights({**kernel.mixing, "c0": 7.0}), Regularisers(0.3, 1e-4, 0.02))]
    for (subset, weights, regularisers), factor_rows in itertools.product(cases, (1, None)):
        factors = RowFactors.of(design, train, subset, factor_rows=factor_rows)
        shapes = {kind: factor.shape for kind, factor in zip(factors.kinds, factors.factors)}
        width = lambda kind: len(factors.pieces[factors.kinds.index(kind)]) * (kernel.n_sparse if subset is None else subset.numel()) + 1
        n_forces = int((design.kind[train] == FORCES).sum())
        assert shapes[FORCES] == ((width(FORCES), width(FORCES)) if factor_rows == 1 else (n_forces, width(FORCES)))
        assert shapes[ENERGY][0] < width(ENERGY)
        assert 0 not in factors.pieces[factors.kinds.index(FORCES)]  # the constant piece has no derivative
        rows = design.subset(torch.zeros_like(design.targets, dtype=torch.bool).index_fill(0, train, True), subset)
        solution = factors.solve(k_mm if subset is None else k_mm[:, subset][:, :, subset], weights, regularisers, DEFAULT_JITTER)
        expected = solve_projected_process(rows.combine(weights), rows.targets, rows.inverse_sigma(regularisers),
                                           torch.einsum("p,pmn->mn", weights, k_mm if subset is None else k_mm[:, subset][:, :, subset]))
        predictions, reference = rows.combine(weights) @ solution.weights, rows.combine(weights) @ expected.weights
        assert reference.abs().max() > 1e-3
        torch.testing.assert_close(predictions, reference, rtol=1e-9, atol=1e-9 * float(reference.abs().max()))
        gram = expected.triangular.T @ expected.triangular
        torch.testing.assert_close(solution.triangular.T @ solution.triangular, gram, rtol=0, atol=1e-12 * float(gram.abs().max()))


def dense_log_likelihood(design, weights, k_mm, regularisers) -> float:
    """log N(y; 0, Lambda + K_NM K_MM^-1 K_MN) by scipy's dense Gaussian density: the evidence's definition."""
    k_nm, k = design.combine(weights), torch.einsum("p,pmn->mn", weights, k_mm)
    covariance = torch.diag(design.inverse_sigma(regularisers) ** -2) + k_nm @ torch.linalg.solve(k, k_nm.T)
    return float(scipy.stats.multivariate_normal.logpdf(design.targets.numpy(), cov=covariance.numpy()))


def test_the_evidence_is_the_gaussian_likelihood_of_the_targets(wigner_model):
    """From the solve's triangle (rows as they are, or reduced to their R factor), along the
    regularisation path, and for an amplitude on the prior: scipy's multivariate normal density."""
    kernel = wigner_model.kernel
    design = build_design_matrix(training_set(), wigner_model.expansion, kernel, wigner_model.baseline)
    k_mm, weights = kernel.sparse_block(), kernel.piece_weights()
    regularisers = Regularisers(0.01, 0.05, 0.005)
    expected = dense_log_likelihood(design, weights, k_mm, regularisers)
    for factor_rows in (1, None):
        evidence = RowFactors.of(design, factor_rows=factor_rows).evidence(k_mm, weights, regularisers, DEFAULT_JITTER)
        assert evidence.rows == design.targets.numel()
        assert -evidence.minus_log() == pytest.approx(expected, rel=1e-9)
    # the amplitude multiplies the kernel and Lambda together: the same as c0, a and sigma^2 scaled
    amplitude = evidence.amplitude()
    scaled = Regularisers(*(amplitude**0.5 * value for value in dataclasses.astuple(regularisers)))
    on_scaled = dense_log_likelihood(design, kernel.piece_weights({**kernel.mixing, "c0": amplitude * kernel.mixing["c0"], "a": amplitude * kernel.mixing["a"]}), k_mm, scaled)
    assert -evidence.minus_log(amplitude) == pytest.approx(on_scaled, rel=1e-9)
    assert evidence.minus_log(amplitude) < min(evidence.minus_log(1.1 * amplitude), evidence.minus_log(amplitude / 1.1))
    scales = torch.tensor([0.1, 1.0, 7.0], dtype=torch.float64)
    for scale, on_path in zip(scales.tolist(), scaled_regularisation_evidence(design, k_mm, weights, regularisers, scales)):
        times = Regularisers(*(scale * value for value in dataclasses.astuple(regularisers)))
        assert -on_path.minus_log() == pytest.approx(dense_log_likelihood(design, weights, k_mm, times), rel=1e-8)


def test_tuning_by_evidence_recovers_the_noise_and_kernel_of_labels_drawn_from_the_prior(wigner_model):
    """Labels drawn from the projected process's own prior (``f = K_NM K_MM^-1 u``, ``u ~ N(0, K_MM)``) plus
    Gaussian noise of known regularisers: the evidence, searched from regularisers ten times too large and
    another ``b``, finds the force noise (the many rows) and ``b`` again, and the prior's amplitude
    (``a``, from one draw of 18 sparse values each, with ``c0`` and ``b`` fitted beside it) within a factor 2."""
    kernel = wigner_model.kernel
    design = build_design_matrix(training_set(), wigner_model.expansion, kernel, wigner_model.baseline)
    k_mm, weights = kernel.sparse_block(), kernel.piece_weights()
    k_nm, k = design.combine(weights), torch.einsum("p,pmn->mn", weights, k_mm)
    truth = Regularisers(0.003, 0.02, 0.002)
    found = []
    for seed in range(6):
        generator = torch.Generator().manual_seed(seed)
        u = torch.linalg.cholesky(k) @ torch.randn(k.shape[0], generator=generator, dtype=torch.float64)
        noise = torch.randn(design.targets.numel(), generator=generator, dtype=torch.float64) / design.inverse_sigma(truth)
        drawn = dataclasses.replace(design, targets=k_nm @ torch.linalg.solve(k, u) + noise)
        start = kernel.with_sparse(kernel.sparse_coefficients, kernel.sparse_species)
        start.mixing = {**kernel.mixing, "b": 2.0}
        report = select_by_evidence(drawn, k_mm, start, Regularisers(0.03, 0.2, 0.02))
        assert report.method == "evidence" and report.validation_errors == {} and set(report.tuned) == {"c0", "b", "energy", "forces", "stress"}
        found.append((report.regularisers.forces, report.mixing["b"], report.mixing["a"]))
    forces, b, a = (np.array(column) for column in zip(*found))
    assert np.all(np.abs(forces / truth.forces - 1.0) < 0.25) and abs(np.median(forces) / truth.forces - 1.0) < 0.1
    assert abs(np.median(b) / kernel.mixing["b"] - 1.0) < 0.2
    assert 0.5 < np.median(a) / kernel.mixing["a"] < 2.0


def test_tuning_by_evidence_on_a_prefix_scales_the_regularisers_by_the_evidence_of_all(wigner_model):
    """The prefix's search, then one factor on every regulariser and the amplitude, both chosen by the
    evidence with every sparse environment: the reported loss is that evidence, and the amplitude found
    is already in the mixing and regularisers (the evidence of the result wants no further one)."""
    kernel = wigner_model.kernel
    design = build_design_matrix(training_set(), wigner_model.expansion, kernel, wigner_model.baseline)
    k_mm = kernel.sparse_block()
    prefix = selection_prefix(kernel.sparse_species, 2)
    report = select_by_evidence(design, k_mm, kernel, Regularisers(), sparse=prefix, max_evaluations=30)
    assert report.regulariser_scale != 1.0
    evidence = RowFactors.of(design).evidence(k_mm, kernel.piece_weights(report.mixing), report.regularisers, DEFAULT_JITTER)
    assert evidence.amplitude() == pytest.approx(1.0, rel=1e-6)
    assert evidence.minus_log() / evidence.rows == pytest.approx(report.loss, rel=1e-9)
    for factor in (0.8, 1.25):  # beyond one step (x1.12) of the factors' grid
        nearby = Regularisers(*(factor * value for value in dataclasses.astuple(report.regularisers)))
        other = RowFactors.of(design).evidence(k_mm, kernel.piece_weights(report.mixing), nearby, DEFAULT_JITTER)
        assert other.minus_log(other.amplitude()) > evidence.minus_log()


def test_every_kernels_piece_weights_are_linear_in_c0_and_a(model):
    """What the evidence's amplitude relies on; a kernel whose weights are not is refused."""
    scaled = amplified(model.kernel, model.kernel.mixing, 3.7)
    torch.testing.assert_close(model.kernel.piece_weights(scaled), 3.7 * model.kernel.piece_weights(), rtol=1e-14, atol=0)

    class Squared(PolynomialKernel):
        def piece_weights(self, mixing=None):
            m = {**self.mixing, **(mixing or {})}
            return torch.tensor([m["c0"] ** 2, m["a"]], dtype=torch.float64)

    with pytest.raises(ValueError, match="not linear in c0 and a"):
        amplified(Squared(), {"c0": 1.0, "a": 1.0}, 3.7)


def test_checkpoint_round_trip(model, tmp_path):
    path = tmp_path / "model.pt"
    model.save(str(path))
    loaded = SparseKRRModel.load(str(path))
    probe = [methane(80), copper(81)]
    expected, got = model.predict(probe, uncertainty=True), loaded.predict(probe, uncertainty=True)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, equal_nan=True, atol=0, rtol=0)
    assert loaded.species == [1, 6, 29] and loaded.baseline == model.baseline


def test_sparse_selection_per_species():
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(30, 4, generator=generator, dtype=torch.float64)
    species = torch.tensor([1] * 20 + [6] * 10)
    for method in ("fps", "cur"):
        chosen = select_sparse(features, species, {1: 5, 6: 3}, method)
        assert len(set(chosen.tolist())) == 8
        assert species[chosen].tolist() == [1] * 5 + [6] * 3
    duplicated = torch.cat([features[:3], features[:3]])
    assert len(farthest_point_sampling(duplicated, 6)) == 3
    # FPS: the second point is the farthest from the first
    first_two = farthest_point_sampling(features, 2)
    assert int(first_two[1]) == int(torch.argmax(torch.linalg.vector_norm(features - features[0], dim=1)))
    assert len(set(cur_selection(features, 10).tolist())) == 10
    with pytest.raises(ValueError, match="species 6"):
        select_sparse(features, species, {1: 5}, "fps")


def atom_energies(model, atoms, selected=None, forces=False):
    """Per-atom energies ``[n]`` of the scripted exported module (of the atoms ``selected``, default all),
    and with ``forces`` the forces on every atom of ``atoms`` from their sum."""
    from metatensor.torch import Labels
    from metatomic.torch import ModelOutput

    from acdc_potential.inference import _systems

    module = model.scripted()
    systems, positions, _ = _systems(module, [atoms], torch.float64, torch.device("cpu"), forces, False)
    chosen = None
    if selected is not None:
        chosen = Labels(["system", "atom"], torch.tensor([[0, i] for i in selected], dtype=torch.int32))
    energies = module(systems, {"energy": ModelOutput(unit="eV", sample_kind="atom")}, chosen)["energy"].block().values[:, 0]
    if not forces:
        return energies.detach(), None
    (gradient,) = torch.autograd.grad(energies.sum(), positions)
    return energies.detach(), -gradient


@pytest.mark.parametrize("kind", ["mpacdc_model", "mpacdc2_model", "polynomial_model"])
def test_message_passing_reaches_twice_the_cutoff_and_single_centre_models_do_not(kind, request):
    """Atom 0 at the origin, atom 1 within its cutoff, atom 2 beyond it (1.6 r_c) but within atom 1's:
    moving atom 2 changes atom 0's energy through atom 1's density, for [1 <- 1] features only."""
    model = request.getfixturevalue(kind)
    cutoff = HYPERS.cutoff
    atoms = ase.Atoms("Cu3", positions=[[0.0, 0.0, 0.0], [0.75 * cutoff, 0.2, 0.0], [1.6 * cutoff, 0.5, 0.1]])
    before = atom_energies(model, atoms)[0]
    atoms.positions[2] += [0.05, -0.04, 0.03]
    assert np.linalg.norm(atoms.positions[2]) > 1.5 * cutoff
    change = abs(float(atom_energies(model, atoms)[0][0] - before[0]))
    passing = kind.startswith("mpacdc")
    if passing:
        assert change > 1e-6
    else:
        assert change == 0.0
    assert model.scripted().interaction_range == (2.0 if passing else 1.0) * cutoff


def test_the_message_cutoff_bounds_how_far_messages_reach(mpacdc_model, mpacdc_short_model):
    """Atom 1 within 0.6 r_c of atom 0, atom 2 within r_c of atom 1 but beyond the short model's message
    cutoff (0.7 r_c) from it: moving atom 2 changes atom 0's energy through atom 1's message in the model
    whose messages reach r_c, not in the short one; with atom 2 within 0.7 r_c of atom 1 it does in both.
    The short model declares max(r_c, 2 x 0.7 r_c) as its interaction range."""
    cutoff = HYPERS.cutoff
    for far, reached in ((1.45, (True, False)), (1.22, (True, True))):
        atoms = ase.Atoms("Cu3", positions=[[0.0, 0.0, 0.0], [0.6 * cutoff, 0.1, 0.0], [far * cutoff, 0.2, 0.1]])
        separation = np.linalg.norm(atoms.positions[2] - atoms.positions[1]) / cutoff
        assert (separation < 0.7) == reached[1] and separation < 1.0
        for model, expected in zip((mpacdc_model, mpacdc_short_model), reached):
            before = atom_energies(model, atoms)[0][0]
            moved = atoms.copy()
            moved.positions[2] += [0.03, -0.02, 0.02]
            change = abs(float(atom_energies(model, moved)[0][0] - before))
            assert (change > 1e-6) if expected else (change == 0.0), (far, model.kernel.cutoff)
    assert mpacdc_short_model.scripted().interaction_range == pytest.approx(1.4 * cutoff)
    assert mpacdc_short_model.kernel.cutoff == pytest.approx(0.7 * cutoff)


def without_floor_components(model):
    """``model`` with zero floors: its features the plain unit parts (and a zero component each)."""
    plain = copy.deepcopy(model)
    plain.kernel.floors, plain.kernel.modules, plain._scripted = [0.0] * len(model.kernel.floors), {}, None
    return plain


@pytest.mark.parametrize(
    "name, crossing",
    [("polynomial_model", "density"), ("acdc_model", "density"), ("mpacdc_model", "density"), ("mpacdc_short_model", "density"), ("mpacdc_short_model", "message")],
)
def test_feature_models_stay_smooth_where_an_atom_loses_its_last_neighbour(name, crossing, request):
    """A Cu dimer pulled through the density's cutoff r_c, where each atom loses its
    last neighbour, and through the short-message model's message cutoff (0.7 r_c), where it loses its
    last message pair: the energy on both sides within 1e-9 eV (plus the force times the distance, inside
    the density's cutoff), and forces equal to central finite
    differences of the energy over the last 0.3 A before it. With the floors set to zero (plain unit
    parts) the same models jump by more than 1 meV there."""
    model = request.getfixturevalue(name)
    r_c = HYPERS.cutoff if crossing == "density" else model.kernel.cutoff

    def dimers(distances):
        return [ase.Atoms("Cu2", positions=[[0.0, 0.0, 0.0], [r, 0.0, 0.0]]) for r in distances]

    sides = dimers([r_c - 1e-7, r_c + 1e-7])
    both = model.predict(sides, stress=False)
    energies, slope = both["energy"], float(both["forces"][1, 0].abs().max())  # inside the density: a force
    assert abs(float(energies[0] - energies[1])) < 1e-9 + 2e-7 * 1.5 * slope
    plain = without_floor_components(model).predict(sides, forces=False, stress=False)["energy"]
    assert abs(float(plain[0] - plain[1])) > 1e-3
    h = 1e-5
    distances = np.linspace(r_c - 0.3, r_c - 1e-3, 7)
    forces = model.predict(dimers(distances), stress=False)["forces"].reshape(-1, 2, 3)[:, 1, 0].numpy()
    up, down = (model.predict(dimers(distances + s), forces=False, stress=False)["energy"].numpy() for s in (h, -h))
    np.testing.assert_allclose(forces, -(up - down) / (2 * h), rtol=0, atol=1e-5 * max(1.0, float(np.abs(forces).max())))


def test_message_passing_model_without_single_centre_orders_fits_and_exports(tmp_path):
    """``orders: []``: the [1 <- 1] invariants alone, scripted and exported like the others."""
    kernel = MessagePassingKernel(message_hypers(HYPERS, 1, 1), zeta=1, orders=[], mixing={"c0": 0.5, "a": 1.0})
    model = fit_kernel(training_set(), HYPERS, kernel, n_sparse=4, regularisers=Regularisers(0.01, 0.05, 0.005), tune=False)
    export_model(model.potential(), str(tmp_path / "mp.pt"))
    atoms = copper(30)
    atoms.calc = ACDCCalculator(str(tmp_path / "mp.pt"), uncertainty_threshold=None)
    assert abs(atoms.get_potential_energy() - float(model.predict([atoms], forces=False, stress=False)["energy"][0])) < 1e-10 * len(atoms)


@pytest.mark.parametrize("name", ["mpacdc_model", "mpacdc_short_model"])
def test_message_passing_model_in_domain_decomposition_gives_the_periodic_result(name, request):
    """A periodic copper cell evaluated as local atoms plus periodic images (ghosts) out to the interaction
    range (2 r_c, or 1.4 r_c with messages of 0.7 r_c), a cluster, with ``selected_atoms`` the local ones:
    the energy equals the periodic one, and the forces, once the ghosts' forces are added to the atoms they
    are images of (LAMMPS's reverse communication), equal the periodic forces."""
    mpacdc_model = request.getfixturevalue(name)
    cell = copper(21) * (2, 2, 2)
    n = len(cell)
    periodic = mpacdc_model.predict([cell], forces=True, stress=False)
    shifts = [np.array([a, b, c]) for a in (-1, 0, 1) for b in (-1, 0, 1) for c in (-1, 0, 1) if (a, b, c) != (0, 0, 0)]
    ghosts = [cell.positions + s @ cell.cell.array for s in shifts]
    cluster = ase.Atoms(cell.numbers.tolist() * (1 + len(shifts)), positions=np.vstack([cell.positions] + ghosts))
    reach = np.min(np.linalg.norm(cluster.positions[n:, None] - cell.positions[None], axis=2), axis=1)
    assert reach.max() > mpacdc_model.scripted().interaction_range  # the ghosts reach beyond the interaction range
    energies, forces = atom_energies(mpacdc_model, cluster, selected=range(n), forces=True)
    assert energies.shape == (n,)
    assert abs(float(energies.sum() - periodic["energy"][0])) < 1e-10 * abs(float(periodic["energy"][0]))
    folded = forces.reshape(1 + len(shifts), n, 3).sum(0)
    torch.testing.assert_close(folded, periodic["forces"], rtol=0, atol=1e-10)
    # ghosts out to the cutoff only, as for a single-centre model, are not enough
    near = np.concatenate([np.arange(n), n + np.flatnonzero(reach <= HYPERS.cutoff)])
    short = atom_energies(mpacdc_model, cluster[near], selected=range(n))[0]
    assert abs(float(short.sum() - periodic["energy"][0])) > 1e-6


@pytest.mark.parametrize("kind", ["acdc", "mpacdc", "wigner"])
def test_single_centre_model_learns_the_energy_of_its_centres_only(kind):
    """``centres = [C]`` (MP-ACDC Fig. 6's C-centred models): sparse environments of carbon only; the
    hydrogens' exported atomic energies are their baseline, with no uncertainty; the labels of a
    C-centred teacher on the same sparse set are recovered."""
    kernels = {
        "acdc": lambda: PolynomialKernel(zeta=2, orders=[1, 2, 3], contraction=4, mixing={"c0": 0.5, "a": 1.0}),
        "mpacdc": lambda: MessagePassingKernel(message_hypers(HYPERS, 2, 1), zeta=2, orders=[2], mixing={"c0": 0.5, "a": 1.0}),
        "wigner": lambda: WignerKernel(WignerHypers(nu_max=3, lambda_max=2), mixing={"c0": 0.5, "a": 1.0, "b": 0.7}),
    }
    structures = [labelled(methane(k), k) for k in range(8)]
    model = fit_kernel(structures, HYPERS, kernels[kind](), n_sparse=5, regularisers=Regularisers(0.01, 0.05, 0.005), centres=[6], tune=False)
    assert model.kernel.sparse_species.tolist() == [6] * 5
    atoms = methane(30)
    energies, _ = atom_energies(model, atoms)
    assert torch.equal(energies[1:], torch.full((4,), model.baseline.energies[1], dtype=torch.float64))
    assert abs(float(energies[0]) - model.baseline.energies[6]) > 1e-6
    sigma = run_module(model.scripted(), [atoms], forces=False, stress=False, uncertainty=True)["atom_uncertainty"]
    assert torch.equal(sigma[1:], torch.zeros(4, dtype=torch.float64)) and float(sigma[0]) > 0.0

    teacher = SparseKRRModel(
        HYPERS, model.species, model.kernel,
        ProjectedProcess(torch.randn(5, generator=torch.Generator().manual_seed(4), dtype=torch.float64), model.solution.projection, model.solution.triangular),
        model.baseline, model.regularisers, expansion=model.expansion,
    )
    labels = teacher.predict([s.atoms for s in structures])
    relabelled = [Labelled(atoms=s.atoms, energy=float(e), forces=f.numpy()) for s, e, f in zip(structures, labels["energy"], torch.split(labels["forces"], 5))]
    kernel = kernel_from_dict({**model.kernel.to_dict(), "sparse_coefficients": None})
    student = fit_kernel(relabelled, HYPERS, kernel, n_sparse=5, regularisers=Regularisers(1e-7, 1e-7, 1e-7), isolated_energies=model.baseline.energies, centres=[6], tune=False)
    unseen = [methane(40), methane(41)]
    expected, got = teacher.predict(unseen), student.predict(unseen)
    scale = float(labels["forces"].abs().max())
    for key in ("energy", "forces"):
        assert torch.allclose(got[key], expected[key], atol=1e-7 * scale, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_fit_on_the_gpu_predicts_as_the_fit_on_the_cpu():
    """``options.device: cuda`` (``fit --device cuda``): the same polynomial model as on the CPU, handed
    back on the CPU (energies and forces to 1e-8 relative)."""
    from acdc_potential.config import FitConfig
    from acdc_potential.fit.driver import fit

    structures = [labelled(methane(k), k) for k in range(8)]
    models = [
        fit(structures, FitConfig.from_dict({"kernel": {"type": "polynomial"}, "sparse": {"n": 10}, "options": {"tune": False, "device": device}}))
        for device in ("cpu", "cuda")
    ]
    assert models[1].kernel.sparse_coefficients.device.type == "cpu"
    probe = [methane(90), methane(91)]
    cpu, gpu = (model.predict(probe, stress=False) for model in models)
    for key in ("energy", "forces"):
        torch.testing.assert_close(gpu[key], cpu[key], rtol=0, atol=1e-8 * float(cpu[key].abs().max()))


@pytest.mark.parametrize("cutoff, problem", [(5.5, "exceeds density.cutoff"), (0.4, "must exceed density.smoothing")])
def test_a_message_cutoff_beyond_the_density_or_inside_its_smoothing_is_refused(cutoff, problem):
    from acdc_potential.config import ConfigError, FitConfig
    from acdc_potential.fit.driver import fit

    config = FitConfig.from_dict({"density": {"cutoff": 5.0, "smoothing": 0.5}, "kernel": {"type": "mpacdc", "message_cutoff": cutoff}, "options": {"tune": False}})
    with pytest.raises(ConfigError, match=f"kernel.message_cutoff \\({cutoff} A\\) {problem}"):
        fit([labelled(methane(k), k) for k in range(3)], config)


def test_centres_outside_the_training_set_are_refused():
    from acdc_potential.config import ConfigError, FitConfig
    from acdc_potential.fit.driver import fit

    config = FitConfig.from_dict({"kernel": {"type": "polynomial", "centres": ["C", "Au"]}, "options": {"tune": False}})
    with pytest.raises(ConfigError, match="kernel.centres: Au not in the training set"):
        fit([labelled(methane(k), k) for k in range(3)], config)


VERSION_7 = Path(__file__).parent / "data"


def test_the_components_of_zero_floors_are_no_dimensions_of_a_linear_model():
    """A feature-space basis of a model fitted before floors, read with its floors' components appended
    (zero): still complete (active learning adds nothing to it); the same rows with nonzero floors are not,
    since the floors' components then vary."""
    n_features = 5
    basis = torch.cat([torch.zeros((1, n_features)), torch.eye(n_features)]).to(torch.float64)
    rows = torch.cat([basis, torch.zeros((n_features + 1, 2), dtype=torch.float64)], dim=1)
    for floors, complete in (([0.0, 0.0], [29]), ([0.4, 0.7], [])):
        kernel = PolynomialKernel(zeta=1, orders=[1, 2], floors=floors)
        kernel.set_sparse(rows, torch.full((n_features + 1,), 29), Layout([(1, n_features + 2)]))
        assert kernel.complete_species() == complete, floors


@pytest.mark.parametrize("name", ["polynomial", "mpacdc"])
def test_version_7_checkpoints_predict_as_the_code_that_wrote_them(name):
    """Format 7 had no floors (and the density's cutoff for messages): files written by that code
    (tests/data/README.md) read as models with zero floors and predict what it predicted."""
    model = SparseKRRModel.load(str(VERSION_7 / f"version7_{name}.ckpt"))
    assert model.kernel.floors == [0.0] * len(model.kernel.floors) and model.kernel.norm_floor == 0.0
    expected = np.load(VERSION_7 / f"version7_{name}.npz")
    got = model.predict([methane(82), copper(83)])
    # the constant piece is now the correctly rounded sum of the weights, where that code summed plainly
    # (2.6e-12 eV apart here); forces do not see it
    np.testing.assert_allclose(got["energy"].numpy(), expected["energy"], rtol=0, atol=1e-10 * np.abs(expected["energy"]).max())
    np.testing.assert_allclose(got["forces"].numpy(), expected["forces"], rtol=0, atol=1e-12 * np.abs(expected["forces"]).max())


def test_version_5_message_passing_checkpoints_read_as_one_from_one_models(tmp_path):
    """Format 5 had [1 <- 1] message-passing invariants only, uncontracted: read as such (here the
    version 7 file of a [1 <- 1] model without the keys format 6 added)."""
    state = torch.load(VERSION_7 / "version7_mpacdc.ckpt", weights_only=True)
    assert state["kernel"]["hypers"]["message_orders"] == [1] and state["kernel"]["hypers"]["contraction"] == 0
    for key in ("message_orders", "contraction", "projections", "feature_space"):
        del state["kernel"]["hypers"][key]
    torch.save({**state, "version": 5}, tmp_path / "version5.ckpt")
    loaded = SparseKRRModel.load(str(tmp_path / "version5.ckpt"))
    expected = np.load(VERSION_7 / "version7_mpacdc.npz")
    np.testing.assert_allclose(loaded.predict([methane(82), copper(83)])["energy"].numpy(), expected["energy"], rtol=0, atol=1e-10 * np.abs(expected["energy"]).max())


def test_two_from_one_model_from_the_configuration_fits_its_contraction_first():
    """``kernel: {type: mpacdc, message_orders: [1, 2]}``: the fit contracts the factors of [1 <- 1] and
    [2 <- 1] by a PCA fitted on training structures before the sparse selection, stores it, and exports
    a file that uses it."""
    from acdc_potential.config import FitConfig
    from acdc_potential.fit.driver import fit

    config = FitConfig.from_dict({
        "density": {"cutoff": 3.5, "max_radial": 3, "max_angular": 2},
        "kernel": {"type": "mpacdc", "message_orders": [1, 2], "message_max_radial": 1, "message_max_angular": 1, "contraction": 3, "zeta": 2},
        "sparse": {"n": 5},
        "options": {"tune": False},
    })
    structures = [labelled(methane(k), k) for k in range(5)]
    model = fit(structures, config)
    assert model.kernel.message_orders == [1, 2] and len(model.kernel.projections) == 2
    assert all(p.shape[1] <= 3 for centre, message in model.kernel.projections for p in centre + message)
    passing = model.potential().head.features.passing
    assert [p.centre_projections.active and p.message_projections.active for p in passing] == [True, True]
    probe = [methane(60)]
    torch.testing.assert_close(run_module(model.scripted(), probe, False, False, False)["energy"], model.predict(probe, forces=False, stress=False)["energy"], rtol=0, atol=1e-12)


def test_farthest_point_sampling_keeps_near_duplicates_that_are_not_duplicates():
    """Points 1e-9 from a selected one are distinct environments: all are taken; exact copies stop it."""
    generator = torch.Generator().manual_seed(2)
    distinct = torch.randn(5, 40, generator=generator, dtype=torch.float64)
    near = distinct[0] + 1e-9 * torch.randn(20, 40, generator=generator, dtype=torch.float64)
    assert farthest_point_sampling(torch.cat([distinct, near]), 30).numel() == 25
    assert farthest_point_sampling(torch.cat([distinct, distinct]), 10).numel() == 5


def test_the_selection_candidates_cover_every_species():
    """A random sample of structures lacking a species gains the first structure that has it."""
    from acdc_potential.fit.driver import covering

    structures = [labelled(methane(k), k) for k in range(4)] + [labelled(copper(0), 0)]
    survey = Survey.of(structures)
    assert covering([0, 2], survey) == [0, 2, 4] and covering([1, 4], survey) == [1, 4]


def _tensors(value, path="kernel"):
    """Every tensor held by ``value`` (an object's attributes, lists, tuples, dicts), with where it is."""
    if isinstance(value, torch.Tensor):
        yield path, value
    elif isinstance(value, (list, tuple)):
        for k, item in enumerate(value):
            yield from _tensors(item, f"{path}[{k}]")
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _tensors(item, f"{path}[{key!r}]")
    elif isinstance(value, SparseKernel):
        for name, item in vars(value).items():
            yield from _tensors(item, f"{path}.{name}")


def test_kernel_and_solution_move_whole_to_another_device(model):
    """A fit on a GPU hands its model to the CPU by ``kernel.to`` and ``solution.to``: every tensor they
    hold moves (here to the meta device), the contractions' projections included, and no cached module
    of the old device is kept."""
    meta = torch.device("meta")
    moved = model.kernel.to(meta)
    held = list(_tensors(moved))
    assert len(held) >= 2
    assert [path for path, tensor in held if tensor.device != meta] == []
    assert getattr(moved, "modules", {}) == {}
    if getattr(model.kernel, "projections", None) is not None:
        assert any("projections" in path for path, _ in held)
    solution = model.solution.to(meta)
    assert all(t.device == meta for t in (solution.weights, solution.projection, solution.triangular))
    assert model.kernel.sparse_coefficients.device.type == "cpu"  # the original stays
