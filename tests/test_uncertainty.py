"""Uncertainties: the exported quantities against dense algebra (a Wigner model's and, species by
species, a feature model's), the calibration estimator, the
calibration factor recovered on data drawn from the model's own prior, and a fitted, exported
calibration (docs/equations.md, "Uncertainties")."""

import ase
import numpy as np
import pytest
import torch

import acdc_potential.fit.calibration as calibration_module
from conftest import random_cluster
from acdc_potential.calculator import ACDCCalculator
from acdc_potential.config import Regularisers
from acdc_potential.data import Labelled
from acdc_potential.descriptors.density import DensityExpansion, Pairs
from acdc_potential.descriptors.jacobian import batch_density
from acdc_potential.descriptors.neighbors import batch_from_atoms
from acdc_potential.descriptors.radial import DensityHypers
from acdc_potential.errors import AccuracyWarning
from acdc_potential.evaluation import calibration_table, predict_with_file, uncertainties_with_file
from acdc_potential.fit.baseline import Baseline
from acdc_potential.fit.calibration import calibration_of, kept_sparse
from acdc_potential.fit.checkpoint import SparseKRRModel
from acdc_potential.fit.design import mix_pieces
from acdc_potential.fit.driver import fit_kernel
from acdc_potential.fit.solver import solve_projected_process
from acdc_potential.kernels.message_passing import MessagePassingKernel, message_hypers
from acdc_potential.kernels.polynomial import PolynomialKernel
from acdc_potential.kernels.wigner.iteration import WignerHypers
from acdc_potential.kernels.wigner.kernel import WignerKernel
from acdc_potential.model import heads
from acdc_potential.model.export import export_model
from acdc_potential.model.uncertainty import Calibration

HYPERS = DensityHypers(density="gaussian", cutoff=3.5, smoothing=0.5, max_angular=2, max_radial=3, basis="gto", width=0.4)


def cluster(seed: int, symbols: str = "Cu4") -> ase.Atoms:
    """A random compact cluster whose atoms are at least 2 A apart."""
    return random_cluster(seed, symbols)


def coefficients(expansion, frames):
    """Flat density coefficients ``[N, D]``, atomic numbers ``[N]`` and layout of every atom of ``frames``."""
    batch = batch_from_atoms(frames, expansion.cutoff)
    flat, layout = batch_density(expansion, batch)
    return flat.detach(), batch.numbers, layout


def mixed(kernel, a, species_a, b, species_b):
    """The mixed kernel ``[n_a, n_b]`` between flat coefficients (zero between species)."""
    pieces = kernel.pairs(kernel.layout.unflatten(a), species_a, kernel.layout.unflatten(b), species_b)
    return mix_pieces(kernel.piece_weights(), pieces)


@pytest.fixture(scope="module")
def fitted():
    """A Wigner model of random CH4 / Cu4 labels with a hand-set calibration."""
    frames = [cluster(k, "CH4") for k in range(6)] + [cluster(10 + k) for k in range(4)]
    rng = np.random.default_rng(0)
    structures = [Labelled(atoms=a, energy=float(rng.normal()), forces=rng.normal(size=(len(a), 3))) for a in frames]
    kernel = WignerKernel(WignerHypers(nu_max=3, lambda_max=2), mixing={"c0": 0.5, "a": 1.0, "b": 0.7})
    model = fit_kernel(structures, HYPERS, kernel, n_sparse=6, regularisers=Regularisers(0.01, 0.05, 0.005), tune=False)
    model.calibration = Calibration(0.3, {1: 2.0, 6: 5.0, 29: 3.0}, 1, 1)
    return model


def unexplained(k_xm: torch.Tensor, k_mm: torch.Tensor, k_xx: torch.Tensor) -> torch.Tensor:
    """``k_xx - k_xM K_MM^-1 k_Mx`` ``[n]`` by a dense solve."""
    return k_xx - (k_xm * torch.linalg.solve(k_mm, k_xm.T).T).sum(1)


def test_exported_uncertainties_are_the_defined_quantities(fitted, tmp_path):
    """Per atom: ``alpha^2 (k_xx - k_xM K_MM^-1 k_Mx)`` with ``K_MM^-1`` by a dense solve (an atom without
    neighbours too); per structure: ``alpha^2`` times the projected-process variance of the summed rows
    (the solver's variance, checked against the closed form in test_regression) plus the energy
    regulariser squared per atom; per force component: ``beta_a`` times the atomic one; the exported
    file gives the same as the model in memory."""
    lonely = cluster(42, "CH4")
    lonely.append(ase.Atom("H", lonely.positions.mean(axis=0) + [12.0, 0.0, 0.0]))  # beyond the cutoff of every atom
    frames = [cluster(40, "CH4"), cluster(41), lonely]
    kernel, alpha = fitted.kernel, fitted.calibration.energy
    x, numbers, _ = coefficients(fitted.expansion, frames)
    k_xm = mixed(kernel, x, numbers, kernel.sparse_coefficients, kernel.sparse_species)
    k_mm = mixed(kernel, kernel.sparse_coefficients, kernel.sparse_species, kernel.sparse_coefficients, kernel.sparse_species)
    k_xx = mixed(kernel, x, numbers, x, numbers)
    atom = alpha**2 * unexplained(k_xm, k_mm, k_xx.diagonal())
    result = fitted.predict(frames, forces=False, stress=False, uncertainty=True)
    torch.testing.assert_close(result["atom_uncertainty"] ** 2, atom, rtol=1e-6, atol=1e-12)
    beta = torch.tensor([fitted.calibration.forces[int(z)] for z in numbers], dtype=torch.float64)
    torch.testing.assert_close(result["forces_uncertainty"], beta * result["atom_uncertainty"], rtol=1e-12, atol=0)
    group = torch.repeat_interleave(torch.arange(len(frames)), torch.tensor([len(a) for a in frames]))
    same = (group[:, None] == group[None, :]).to(k_xx)
    k_sm = torch.zeros(len(frames), k_xm.shape[1], dtype=k_xm.dtype).index_add(0, group, k_xm)
    k_ss = torch.stack([(k_xx * same)[group == s].sum() for s in range(len(frames))])
    n_atoms = torch.tensor([len(a) for a in frames], dtype=torch.float64)
    structure = alpha**2 * (fitted.solution.variance(k_sm, k_ss) + fitted.regularisers.energy**2 * n_atoms)
    torch.testing.assert_close(result["energy_uncertainty"] ** 2, structure, rtol=1e-6, atol=1e-12)

    path = str(tmp_path / "calibrated.pt")
    export_model(fitted.potential(), path)
    calculator = ACDCCalculator(path, uncertainty_threshold=None)
    labelled = [Labelled(atoms=a, energy=0.0, forces=np.zeros((len(a), 3))) for a in frames]
    sigmas = uncertainties_with_file(calculator, labelled, progress=False)
    table = calibration_table(labelled, predict_with_file(calculator, labelled, progress=False), sigmas)
    assert set(table) == {"energy", "forces", "atoms"} and table["forces"]["count"] == 3 * sum(len(a) for a in frames)
    assert table["forces"]["median_sigma"] == pytest.approx(float(result["forces_uncertainty"].median()), rel=1e-8)
    for k, atoms in enumerate(frames):
        rows = group == k
        np.testing.assert_allclose(calculator.get_uncertainty(atoms.copy(), per_atom=True), result["atom_uncertainty"][rows].numpy(), rtol=1e-8)
        np.testing.assert_allclose(calculator.get_forces_uncertainty(atoms.copy()), result["forces_uncertainty"][rows].numpy(), rtol=1e-8)
        assert calculator.get_uncertainty(atoms.copy()) == pytest.approx(float(result["energy_uncertainty"][k]), rel=1e-8)


@pytest.mark.parametrize("kind", ["polynomial", "linear", "message-passing"])
def test_feature_models_give_atoms_the_unexplained_variance_of_their_own_kernel(kind, tmp_path):
    """``alpha^2 (k_xx - k_xM K_MM^-1 k_Mx)`` for ``k = c0 + a (x . y)^zeta`` of the model's unit features,
    by a dense solve (and zero between species); ``linear``: ``zeta = 1`` on order 1, solved in feature
    space, whose sparse set is each species' origin (a zero row) and feature directions. A float32 file
    gives the same to 1e-4 (its variances are computed in float64 from float32 features)."""
    frames = [cluster(k, "CH4") for k in range(6)] + [cluster(10 + k) for k in range(4)]
    rng = np.random.default_rng(0)
    structures = [Labelled(atoms=a, energy=float(rng.normal()), forces=rng.normal(size=(len(a), 3))) for a in frames]
    mixing = {"c0": 0.5, "a": 1.3}
    zeta = 1 if kind == "linear" else 2
    if kind == "message-passing":
        kernel = MessagePassingKernel(message_hypers(HYPERS, 1, 1), zeta=zeta, orders=[2], mixing=mixing)
    elif kind == "linear":
        kernel = PolynomialKernel(zeta=zeta, orders=[1], mixing=mixing)
    else:
        kernel = PolynomialKernel(zeta=zeta, mixing=mixing)
    model = fit_kernel(structures, HYPERS, kernel, n_sparse=20 if kind == "linear" else 6, regularisers=Regularisers(0.01, 0.05, 0.005), tune=False)
    if kind == "linear":
        assert bool((kernel.sparse_coefficients.abs().sum(dim=1) == 0).any())
    model.calibration = Calibration(0.3, {1: 2.0, 6: 5.0, 29: 3.0}, 1, 1)
    test = [cluster(40, "CH4"), cluster(41)]
    batch = batch_from_atoms(test, model.expansion.cutoff)
    x, _ = kernel.environments(model.expansion, batch)

    def k(a, species_a, b, species_b):
        return (species_a[:, None] == species_b[None, :]).to(a) * (0.5 + 1.3 * (a @ b.T) ** zeta)

    xm, sm = kernel.sparse_coefficients, kernel.sparse_species
    atom = 0.3**2 * unexplained(k(x, batch.numbers, xm, sm), k(xm, sm, xm, sm), k(x, batch.numbers, x, batch.numbers).diagonal())
    result = model.predict(test, forces=False, stress=False, uncertainty=True)
    torch.testing.assert_close(result["atom_uncertainty"] ** 2, atom, rtol=1e-6, atol=1e-12)
    path = str(tmp_path / "model32.pt")
    export_model(model.potential(), path, dtype=torch.float32)
    calculator = ACDCCalculator(path, uncertainty_threshold=None)
    sigma = np.concatenate([calculator.get_uncertainty(atoms.copy(), per_atom=True) for atoms in test])
    # a linear model in feature space explains everything: zero, rounded (here 1e-6 of the prior's standard deviation)
    np.testing.assert_allclose(sigma, result["atom_uncertainty"].numpy(), rtol=1e-4, atol=1e-6 * 0.3 * (0.5 + 1.3) ** 0.5)
    structures = [calculator.get_uncertainty(atoms.copy()) for atoms in test]
    np.testing.assert_allclose(structures, result["energy_uncertainty"].numpy(), rtol=1e-4)


@pytest.mark.parametrize("nu_max, kind", [(1, "CH4 Cu4"), (2, "CH4 Cu4"), (3, "CH4 Cu4"), (4, "CH4 Cu4"), (3, "Cu4"), (3, "CH4, C-centred")])
def test_wigner_variances_through_the_invariants_equal_those_through_the_kernel_rows(nu_max, kind, monkeypatch, tmp_path):
    """A collapsed Wigner head of ``nu_max <= 3`` takes its variances through the atoms' invariants
    (``FeatureVariance``), where that is cheaper; per atom and per structure they equal those of the
    ``pairs`` head, which goes through the kernel rows, and a float32 file gives the atoms' to 1e-4.
    Three species take the SVD factor of each species; one species with sparse environments ``U`` itself
    (``D >= M``), also in a C-centred model, whose H atoms carry no learned energy (no variance).
    ``nu_max = 4`` (invariants of ``D^2`` entries), and any model whose factors would exceed the budget,
    keep the kernel rows."""
    frames = [cluster(k, "CH4") for k in range(6)] * ("CH4" in kind) + [cluster(10 + k) for k in range(4)] * ("Cu4" in kind)
    rng = np.random.default_rng(1)
    structures = [Labelled(atoms=a, energy=float(rng.normal()), forces=rng.normal(size=(len(a), 3))) for a in frames]
    kernel = WignerKernel(WignerHypers(nu_max=nu_max, lambda_max=2), mixing={"c0": 0.5, "a": 1.0, "b": 0.7})
    centres = [6] if "centred" in kind else None
    model = fit_kernel(structures, HYPERS, kernel, n_sparse=6, regularisers=Regularisers(0.01, 0.05, 0.005), tune=False, centres=centres)
    model.calibration = Calibration(0.3, {}, 1, 1)
    test = {"CH4 Cu4": [cluster(50, "CH4"), cluster(51), cluster(52, "CH3Cu")], "Cu4": [cluster(51), cluster(53)], "CH4, C-centred": [cluster(50, "CH4"), cluster(54, "CH4")]}[kind]
    batch = batch_from_atoms(test, model.expansion.cutoff)
    collapsed, rows = model.potential().head, model.potential(route="pairs").head
    assert collapsed.by_features == (nu_max <= 3) and not rows.by_features
    if collapsed.by_features:  # U itself serves the atoms exactly where P has no more columns than its rank
        assert (collapsed.variances.atom_factors.shape[2] == 0) == (kind != "CH4 Cu4")  # one species with sparse environments
    species = collapsed.density.species_index(batch.numbers)
    environments = collapsed.environments(Pairs(batch.pair_vectors(), batch.centers, batch.neighbors, species))
    for per_atom in (True, False):
        got = collapsed.variance(environments, species, batch.structure, len(test), per_atom)
        expected = rows.variance(environments, species, batch.structure, len(test), per_atom)
        assert float(expected.max()) > 1e-4  # not all explained (nu_max = 1 explains the copper atoms)
        if per_atom and "centred" in kind:
            assert bool((got[batch.numbers == 1] == 0).all()) and bool((got[batch.numbers == 6] > 0).all())
        torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-14)
    if nu_max == 3 and kind == "CH4 Cu4":  # a float32 file keeps the invariants' factors in float64 and agrees to float32's rounding of its densities
        path = str(tmp_path / "wigner32.pt")
        export_model(model.potential(), path, dtype=torch.float32)
        calculator = ACDCCalculator(path, uncertainty_threshold=None)
        sigma = np.concatenate([calculator.get_uncertainty(atoms.copy(), per_atom=True) for atoms in test])
        expected = rows.variance(environments, species, batch.structure, len(test), True).sqrt().numpy()
        np.testing.assert_allclose(sigma, expected, rtol=1e-4, atol=1e-6 * float(expected.max()))
    monkeypatch.setattr(heads, "FEATURE_VARIANCE_ENTRIES", 0)
    assert not model.potential().head.by_features


def test_uncalibrated_files_declare_no_force_uncertainty(fitted, tmp_path):
    uncalibrated = SparseKRRModel(fitted.density_hypers, fitted.species, fitted.kernel, fitted.solution, fitted.baseline, fitted.regularisers, expansion=fitted.expansion)
    path = str(tmp_path / "plain.pt")
    export_model(uncalibrated.potential(), path)
    with pytest.raises(ValueError, match="no force uncertainty"):
        ACDCCalculator(path, uncertainty_threshold=None).get_forces_uncertainty(cluster(3))
    assert "forces_uncertainty" not in uncalibrated.predict([cluster(3)], uncertainty=True)


def test_calibration_estimator_recovers_the_scale_of_errors():
    """Errors drawn with standard deviations ``c`` times the predicted ones give factors near ``c``."""
    rng = np.random.default_rng(1)
    frames = [cluster(k, "CH4") for k in range(400)]
    sigma_s, sigma_atom = rng.uniform(0.01, 0.1, 400), rng.uniform(0.001, 0.01, 2000)
    reference_forces = [np.zeros((5, 3)) for _ in frames]
    structures = [Labelled(atoms=a, energy=0.0, forces=f) for a, f in zip(frames, reference_forces)]
    beta = np.where(np.concatenate([a.numbers for a in frames]) == 1, 4.0, 9.0)  # 1/A, for errors of 2.5 x alpha sigma
    predictions = {
        "energy": torch.tensor(2.5 * sigma_s * rng.normal(size=400)),
        "energy_uncertainty": torch.tensor(sigma_s),
        "atom_uncertainty": torch.tensor(sigma_atom),
        "forces": torch.tensor(2.5 * beta[:, None] * sigma_atom[:, None] * rng.normal(size=(2000, 3))),
    }
    calibration = calibration_of(predictions, structures)
    assert calibration.energy == pytest.approx(2.5, rel=0.1)
    assert calibration.forces[1] == pytest.approx(4.0, rel=0.1) and calibration.forces[6] == pytest.approx(9.0, rel=0.1)
    assert calibration.structures == 400 and calibration.atoms == 2000


def test_calibration_recovers_the_amplitude_of_data_drawn_from_the_prior():
    """Energies of random Cu4 clusters drawn from ``s^2`` times the model's own kernel (and a small
    noise): the projected process fitted with the regulariser of the noise in units of the prior,
    on 150 clusters with every atom of them a sparse environment, predicts 100 others, and the
    calibration finds ``alpha`` = ``s``."""
    s, noise, n_train = 0.05, 1e-3, 150
    frames = [cluster(100 + k) for k in range(n_train + 100)]
    kernel = WignerKernel(WignerHypers(nu_max=2, lambda_max=2), mixing={"c0": 0.2, "a": 1.0, "b": 0.5})
    expansion = DensityExpansion(HYPERS, [29])
    x, numbers, layout = coefficients(expansion, frames)
    n_atoms_train = 4 * n_train
    kernel.set_sparse(x[:n_atoms_train], numbers[:n_atoms_train], layout)
    k_all = mixed(kernel, x, numbers, x, numbers)
    # K has the rank of the (finite) nu <= 2 features: a Cholesky factor with a tiny ridge
    factor = torch.linalg.cholesky(k_all + 1e-10 * k_all.diagonal().max() * torch.eye(k_all.shape[0], dtype=torch.float64))
    draw = torch.randn(k_all.shape[0], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    atomic = s * factor @ draw
    energies = atomic.reshape(-1, 4).sum(dim=1) + s * noise * 2.0 * torch.randn(len(frames), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    k_nm = mixed(kernel, x[:n_atoms_train], numbers[:n_atoms_train], kernel.sparse_coefficients, kernel.sparse_species).reshape(n_train, 4, -1).sum(dim=1)
    k_mm = mixed(kernel, kernel.sparse_coefficients, kernel.sparse_species, kernel.sparse_coefficients, kernel.sparse_species)
    inverse_sigma = torch.full((n_train,), 1.0 / (noise * 2.0), dtype=torch.float64)  # an energy row's sigma in units of the prior
    solution = solve_projected_process(k_nm, energies[:n_train], inverse_sigma, k_mm, jitter=1e-10)
    model = SparseKRRModel(HYPERS, [29], kernel, solution, Baseline({29: 0.0}), Regularisers(noise, 0.05, 0.005), expansion=expansion)
    held_out = [Labelled(atoms=a, energy=float(e)) for a, e in zip(frames[n_train:], energies[n_train:])]
    calibration = calibration_of(model.predict(held_out, forces=True, stress=False, uncertainty=True), held_out)
    assert calibration.energy == pytest.approx(s, rel=0.25)
    assert calibration.structures == 100 and calibration.forces == {}


def test_a_tuned_fit_calibrates_and_keeps_its_calibration(tmp_path, monkeypatch):
    """A tuned fit holds out structures of its tuning sample (and their sparse environments: every C
    atom is one, so a held-out C left among them would have an unexplained variance at rounding
    level) for the calibration, stores it in the checkpoint and exports the force uncertainty."""
    rng = np.random.default_rng(2)
    frames = [cluster(200 + k, "CH4") for k in range(30)]
    structures = [Labelled(atoms=a, energy=float(rng.normal()), forces=rng.normal(size=(5, 3))) for a in frames]
    kernel = WignerKernel(WignerHypers(nu_max=2, lambda_max=2), mixing={"c0": 0.5, "a": 1.0, "b": 0.7})
    seen = {}

    def recording(predictions, held_out, species=()):
        seen.update(predictions=predictions, held_out=held_out)
        return calibration_of(predictions, held_out, species)

    monkeypatch.setattr(calibration_module, "calibration_of", recording)
    with pytest.warns(AccuracyWarning, match="calibrated on 6 held-out structures"):
        model = fit_kernel(structures, HYPERS, kernel, n_sparse=40, regularisers=Regularisers(0.01, 0.05, 0.005), tune=True,
                           tune_options={"max_evaluations": 4, "validation": 0.2})
    sigma = seen["predictions"]["atom_uncertainty"]
    assert len(seen["held_out"]) == 6 and float(sigma.min()) > 1e-3 * float(sigma.median())
    calibration = model.calibration
    assert calibration is not None and calibration.structures == 6 and calibration.atoms == 30
    assert calibration.energy > 0 and set(calibration.forces) == {1, 6} and all(b > 0 for b in calibration.forces.values())
    model.save(str(tmp_path / "model.ckpt"))
    again = SparseKRRModel.load(str(tmp_path / "model.ckpt"))
    assert again.calibration == calibration
    result = again.predict([cluster(300, "CH4"), cluster(301, "CH4")], uncertainty=True)  # atoms that are no sparse environment
    assert torch.all(result["forces_uncertainty"] > 0)


def test_sparse_environments_of_held_out_structures_are_left_out_unless_a_species_would_have_none():
    owners = torch.tensor([0, 1, 2, 2, 3, 4])
    species = torch.tensor([1, 1, 1, 6, 6, 8])
    assert kept_sparse(owners, species, [2]).tolist() == [0, 1, 4, 5]
    # both C environments come from held-out structures, and O's only one: they stay
    assert kept_sparse(owners, species, [2, 3]).tolist() == [0, 1, 3, 4, 5]
    assert kept_sparse(owners, species, [2, 4]).tolist() == [0, 1, 4, 5]


def test_a_species_without_held_out_atoms_gets_the_pooled_force_factor():
    frames = [cluster(k, "CH4") for k in range(50)]
    structures = [Labelled(atoms=a, energy=0.0, forces=np.zeros((5, 3))) for a in frames]
    rng = np.random.default_rng(3)
    predictions = {"energy": torch.tensor(rng.normal(size=50)), "energy_uncertainty": torch.ones(50, dtype=torch.float64),
                   "atom_uncertainty": torch.ones(250, dtype=torch.float64), "forces": torch.tensor(rng.normal(size=(250, 3)))}
    calibration = calibration_of(predictions, structures, species=[1, 6, 8])
    errors = predictions["forces"].numpy() / calibration.energy
    assert calibration.forces[8] == pytest.approx(float(np.sqrt(np.mean(errors**2))), rel=1e-12)
    assert set(calibration.forces) == {1, 6, 8}
