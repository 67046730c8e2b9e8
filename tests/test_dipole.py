"""Dipole models: symmetry of the predicted vector, recovery of a dipole of the model's own class,
the exported file against in-memory predictions, and the command line."""

import ase.io
import numpy as np
import pytest
import torch
import yaml

from acdc_potential.calculator import ACDCCalculator
from acdc_potential.cli import main
from acdc_potential.config import FitConfig
from acdc_potential.data import Labelled
from acdc_potential.descriptors.density import DensityExpansion
from acdc_potential.fit.checkpoint import DipoleModel, export_models, load_checkpoint
from acdc_potential.fit.dipole import atom_environments, centred_positions, chosen_kernel, dipole_design, fit_dipole, sparse_kernel
from acdc_potential.fit.driver import fit
from acdc_potential.kernels.wigner.iteration import WignerHypers
from acdc_potential.model.heads import CARTESIAN
from acdc_potential.model.potential import DIPOLE
from metatomic.torch import ModelOutput

from conftest import ethanol, random_rotation

SMALL = {"density": {"max_radial": 3, "max_angular": 2}, "kernel": {"lambda_max": 2}, "dipole": {"nu_max": 3, "sparse": 6, "b": [1.0]}}
B = 1.0


def small_config(**dipole) -> FitConfig:
    config = FitConfig.from_dict(SMALL)
    return config.overridden("dipole", dipole) if dipole else config


@pytest.fixture(scope="module")
def generator():
    """A dipole model of the fitted class (its sparse environments those a fit of ``sparse: 6`` selects
    on the first 24 structures), with random weights: the labels a fit should recover."""
    config = small_config()
    structures = [Labelled(ethanol(seed), index=seed) for seed in range(24)]
    expansion = DensityExpansion(config.density, [1, 6, 8])
    coefficients, numbers, _, layout = atom_environments(expansion, structures)
    hypers = WignerHypers(nu_max=3, lambda_max=2)
    kernel = sparse_kernel(hypers, coefficients, numbers, layout, 6, "fps")
    weights = torch.from_numpy(np.random.default_rng(0).normal(size=(kernel.n_sparse, 3)))
    return DipoleModel(config.density, [1, 6, 8], kernel, weights, B, 0.0, expansion=expansion)


def labelled(generator, seeds):
    structures = [Labelled(ethanol(seed), index=k) for k, seed in enumerate(seeds)]
    for structure, dipole in zip(structures, generator.predict(structures).numpy()):
        structure.dipole = dipole
    return structures


@pytest.fixture(scope="module")
def fitted(generator):
    train = labelled(generator, range(24))
    return fit_dipole(train, small_config(regulariser=1e-7))


def test_a_dipole_of_the_models_own_class_is_recovered_with_tiny_regularisation(generator, fitted):
    test = labelled(generator, range(100, 110))
    expected = np.array([s.dipole for s in test])
    predicted = fitted.predict(test).numpy()
    assert fitted.kernel.nu_max == 3 and fitted.b == B
    assert np.abs(predicted - expected).max() < 1e-5 * np.abs(expected).max()


def test_rotating_a_molecule_rotates_its_dipole_and_inversion_flips_it(fitted):
    atoms = ethanol(7)
    rotated, inverted, moved = atoms.copy(), atoms.copy(), atoms.copy()
    rotation = random_rotation(3)
    rotated.positions = atoms.positions @ rotation.T
    inverted.positions = -atoms.positions
    moved.positions = atoms.positions + [3.0, -1.0, 0.5]
    mu, mu_rotated, mu_inverted, mu_moved = fitted.predict([atoms, rotated, inverted, moved]).numpy()
    scale = np.linalg.norm(mu)
    assert scale > 1e-3
    assert np.abs(mu_rotated - rotation @ mu).max() < 1e-10 * scale
    assert np.abs(mu_inverted + mu).max() < 1e-10 * scale  # a polar vector
    assert np.abs(mu_moved - mu).max() < 1e-10 * scale


def test_permuting_the_atoms_leaves_the_dipole(fitted):
    atoms = ethanol(8)
    order = np.random.default_rng(1).permutation(len(atoms))
    mu, mu_permuted = fitted.predict([atoms, atoms[order]]).numpy()
    assert np.abs(mu_permuted - mu).max() < 1e-10 * np.linalg.norm(mu)


def test_the_exported_file_and_its_checkpoint_give_the_in_memory_dipoles(fitted, tmp_path):
    path = tmp_path / "dipole.pt"
    fitted.export(str(path))
    fitted.save(str(tmp_path / "dipole.ckpt"))
    frames = [ethanol(seed) for seed in (200, 201, 202)]
    expected = fitted.predict(frames).numpy()
    calculator = ACDCCalculator(path)
    for atoms, mu in zip(frames, expected):
        atoms.calc = calculator
        assert np.abs(atoms.get_dipole_moment() - mu).max() < 1e-10 * np.linalg.norm(mu)
    reloaded = load_checkpoint(str(tmp_path / "dipole.ckpt"))
    assert isinstance(reloaded, DipoleModel)
    np.testing.assert_allclose(reloaded.predict(frames).numpy(), expected, rtol=0, atol=1e-12)
    with pytest.raises(Exception, match="does not support energy"):
        frames[0].get_potential_energy()


@pytest.mark.filterwarnings("ignore::acdc_potential.errors.BaselineWarning")
def test_one_file_with_energy_and_dipole_returns_both_from_one_call(fitted, tmp_path):
    structures = []
    for seed in range(6):
        atoms = ethanol(seed)
        structures.append(Labelled(atoms, energy=float(np.sum(atoms.positions**2)), forces=-2 * atoms.positions, index=seed))
    energy = fit(structures, FitConfig.from_dict({**SMALL, "kernel": {"nu_max": 2, "lambda_max": 2}, "sparse": {"n": 4}, "options": {"tune": False}}))
    path = tmp_path / "both.pt"
    export_models(energy, fitted, str(path))
    bare = ethanol(300)
    atoms = bare.copy()
    atoms.calc = ACDCCalculator(path, uncertainty_threshold=None)
    e = atoms.get_potential_energy()
    # the dipole came with the energy, in the same call
    assert "dipole" in atoms.calc.results
    mu = atoms.get_dipole_moment()
    assert abs(e - float(energy.predict([bare], forces=False, stress=False)["energy"][0])) < 1e-10 * abs(e)
    np.testing.assert_allclose(mu, fitted.predict([bare]).numpy()[0], rtol=0, atol=1e-12)
    # the same file through the command line, from the two checkpoints
    energy.save(str(tmp_path / "energy.ckpt"))
    fitted.save(str(tmp_path / "dipole.ckpt"))
    assert main(["export", str(tmp_path / "energy.ckpt"), "--dipole", str(tmp_path / "dipole.ckpt"), "-o", str(tmp_path / "cli.pt")]) == 0
    again = bare.copy()
    again.calc = ACDCCalculator(tmp_path / "cli.pt", uncertainty_threshold=None)
    assert again.get_potential_energy() == pytest.approx(e, rel=1e-12)
    np.testing.assert_allclose(again.get_dipole_moment(), mu, rtol=0, atol=1e-12)
    # on request only: an energy call leaves the dipole out, asking for it computes it
    other = bare.copy()
    other.calc = ACDCCalculator(path, uncertainty_threshold=None, dipole_with_energy=False)
    assert other.get_potential_energy() == pytest.approx(e, rel=1e-12)
    assert "dipole" not in other.calc.results
    np.testing.assert_allclose(other.get_dipole_moment(), mu, rtol=0, atol=1e-12)


def test_a_dipole_fit_without_dipoles_or_with_a_polynomial_kernel_is_refused():
    structures = [Labelled(ethanol(seed), index=seed) for seed in range(3)]
    with pytest.raises(ValueError, match=r"structures \[0, 1, 2\] have no dipole \(key 'dipole'\)"):
        fit_dipole(structures, small_config())
    for s in structures:
        s.dipole = np.zeros(3)
    with pytest.raises(ValueError, match="dipole models use Wigner kernels"):
        fit_dipole(structures, FitConfig.from_dict({**SMALL, "kernel": {"type": "polynomial"}}))


def test_fit_eval_and_export_through_the_command_line(generator, tmp_path, capsys):
    frames = []
    for structure in labelled(generator, range(30)):
        atoms = structure.atoms.copy()
        atoms.info["mu"] = structure.dipole
        frames.append(atoms)
    ase.io.write(str(tmp_path / "train.extxyz"), frames[:24])
    ase.io.write(str(tmp_path / "test.extxyz"), frames[24:])
    (tmp_path / "small.yaml").write_text(yaml.safe_dump({**SMALL, "keys": {"dipole": "mu"}}))
    output = tmp_path / "dipole.pt"
    assert main(["fit", str(tmp_path / "train.extxyz"), "-o", str(output), "--target", "dipole", "--test", str(tmp_path / "test.extxyz"), "--config", str(tmp_path / "small.yaml")]) == 0
    for suffix in (".ckpt", ".log", ".report.yaml", ".config.yaml", ".test-parity.png"):
        assert output.with_suffix(suffix).is_file(), suffix
    report = yaml.safe_load(output.with_suffix(".report.yaml").read_text())
    assert report["target"] == "dipole" and report["errors_meA"]["test"]["dipole"]["count"] == 18
    capsys.readouterr()
    assert main(["eval", str(output), str(tmp_path / "test.extxyz"), "--dipole-key", "mu", "--plot", str(tmp_path / "p.png")]) == 0
    printed = capsys.readouterr().out
    assert "dipole" in printed and "|dipole|" in printed and (tmp_path / "p.png").is_file()
    assert main(["export", str(output.with_suffix(".ckpt")), "--dipole", str(output.with_suffix(".ckpt")), "-o", str(tmp_path / "x.pt")]) == 2
    assert "is a dipole model's checkpoint" in capsys.readouterr().err
    # without the key: one line naming the file, the key and the keys it has
    assert main(["fit", str(tmp_path / "train.extxyz"), "-o", str(tmp_path / "y.pt"), "--target", "dipole"]) == 2
    assert "train.extxyz: no structure has a dipole under the key 'dipole'; the file has per-structure keys ['mu'" in capsys.readouterr().err
    assert main(["eval", str(output), str(tmp_path / "test.extxyz")]) == 2
    assert "test.extxyz: no structure has a dipole under the key 'dipole'" in capsys.readouterr().err


def test_fixed_atomic_charges_are_recovered_by_the_charge_model_and_are_translation_invariant():
    """Dipoles of fixed charges per species (their sum over a molecule not zero: the centring removes
    it) lie close to the charge model's span (its ``nu = 0`` piece is constant per species, the others
    vary a little: measured 9e-4 relative); local dipoles alone do far worse."""
    charges = {1: 0.31, 6: -0.12, 8: -0.55}

    def labelled_by_charges(seeds):
        out = []
        for k, seed in enumerate(seeds):
            atoms = ethanol(seed)
            q = np.array([charges[z] for z in atoms.numbers])
            out.append(Labelled(atoms, dipole=q @ (atoms.positions - atoms.positions.mean(axis=0)), index=k))
        return out

    train, test = labelled_by_charges(range(24)), labelled_by_charges(range(100, 106))
    expected = np.array([s.dipole for s in test])
    # regularisers chosen on the validation split: a tiny given one leaves the local dipoles' weights
    # free to grow (6e6 at 1e-7 e*A), and their cancellation rounds at 1e-8 relative under a translation
    with_charges = fit_dipole(train, small_config(charges=True, charge_scale=[1.0]))
    local_only = fit_dipole(train, small_config())
    error = np.abs(with_charges.predict(test).numpy() - expected).max()
    assert error < 1e-2 * np.abs(expected).max()
    assert np.abs(local_only.predict(test).numpy() - expected).max() > 10 * error
    atoms = ethanol(9)
    moved, rotated = atoms.copy(), atoms.copy()
    moved.positions += [2.0, -3.0, 1.0]
    rotation = random_rotation(5)
    rotated.positions = atoms.positions @ rotation.T
    mu, mu_moved, mu_rotated = with_charges.predict([atoms, moved, rotated]).numpy()
    assert np.abs(mu_moved - mu).max() < 1e-10 * np.linalg.norm(mu)
    assert np.abs(mu_rotated - rotation @ mu).max() < 1e-10 * np.linalg.norm(mu)
    cell = atoms.copy()
    cell.cell, cell.pbc = [12.0, 12.0, 12.0], True
    with pytest.raises(Exception, match="periodic; this dipole model has atomic charges"):
        with_charges.predict([cell])
    with pytest.raises(ValueError, match="are periodic: a charge model"):
        fit_dipole([Labelled(cell, dipole=np.zeros(3), index=0)] + train, small_config(charges=True))


def test_the_fits_design_rows_predict_what_the_exported_module_does(fitted):
    """The rows the fit solves with (``WignerKernel.equivariant_rows`` summed per structure) times the
    weights equal the module's weighted sums over the sparse environments (``equivariant_weighted_sum``)."""
    structures = [Labelled(ethanol(seed), index=k) for k, seed in enumerate((400, 401, 402))]
    coefficients, numbers, owner, _ = atom_environments(fitted.expansion, structures)
    k_nm, _ = dipole_design(fitted.kernel, coefficients, numbers, owner, len(structures)).assemble(fitted.kernel.nu_max, fitted.b)
    from_rows = (k_nm @ fitted.weights.reshape(-1)).reshape(-1, 3)[:, CARTESIAN]
    expected = fitted.predict(structures)
    torch.testing.assert_close(from_rows, expected, rtol=0, atol=1e-10 * float(expected.abs().max()))


def test_a_charge_models_design_rows_predict_what_the_exported_module_does():
    """As above with atomic charges, and with the model's order below the fit's largest (the exported
    kernel is the fit's pieces: ``k^nu`` does not depend on ``nu_max``)."""
    train = labelled(small_generator(), range(12))
    config = small_config(charges=True, charge_scale=[1.0], nu_max=4, b=[2.0])
    model = fit_dipole(train, config)
    structures = [Labelled(ethanol(seed), index=k) for k, seed in enumerate((500, 501))]
    coefficients, numbers, owner, layout = atom_environments(model.expansion, structures)
    wide = sparse_kernel(WignerHypers(nu_max=4, lambda_max=2), *atom_environments(model.expansion, train)[:2], layout, 6, "fps")
    design = dipole_design(wide, coefficients, numbers, owner, len(structures), centred_positions(structures))
    for nu in (2, 3):
        chosen = DipoleModel(model.density_hypers, model.species, chosen_kernel(wide, nu), model.weights, model.b, 0.0, expansion=model.expansion, charge_weights=model.charge_weights, charge_scale=1.0)
        k_nm, _ = design.assemble(nu, model.b, 1.0)
        from_rows = (k_nm @ torch.cat([model.weights.reshape(-1), model.charge_weights])).reshape(-1, 3)[:, CARTESIAN]
        expected = chosen.predict(structures)
        torch.testing.assert_close(from_rows, expected, rtol=0, atol=1e-10 * float(expected.abs().max()))


def small_generator():
    config = small_config()
    structures = [Labelled(ethanol(seed), index=seed) for seed in range(12)]
    expansion = DensityExpansion(config.density, [1, 6, 8])
    coefficients, numbers, _, layout = atom_environments(expansion, structures)
    kernel = sparse_kernel(WignerHypers(nu_max=2, lambda_max=2), coefficients, numbers, layout, 6, "fps")
    weights = torch.from_numpy(np.random.default_rng(1).normal(size=(kernel.n_sparse, 3)))
    return DipoleModel(config.density, [1, 6, 8], kernel, weights, B, 0.0, expansion=expansion)


@pytest.mark.filterwarnings("ignore::acdc_potential.errors.BaselineWarning")
def test_energy_and_dipole_models_of_different_cutoffs_in_one_file(fitted, tmp_path):
    """The dipole model's own neighbour list when its cutoff differs from the energy model's; per-atom
    output: the atoms' contributions, whose sum is the dipole."""
    structures = [Labelled(ethanol(seed), energy=float(seed), forces=np.zeros((9, 3)), index=seed) for seed in range(6)]
    energy = fit(structures, FitConfig.from_dict({**SMALL, "density": {**SMALL["density"], "cutoff": 3.5}, "kernel": {"nu_max": 2, "lambda_max": 2}, "sparse": {"n": 4}, "options": {"tune": False}}))
    export_models(energy, fitted, str(tmp_path / "both.pt"))
    atoms = ethanol(600)
    calculator = ACDCCalculator(tmp_path / "both.pt", uncertainty_threshold=None)
    lists = calculator._model.requested_neighbor_lists()
    assert sorted(round(o.cutoff, 6) for o in lists) == [3.5, 5.0]
    expected = fitted.predict([atoms]).numpy()[0]
    atoms.calc = calculator
    np.testing.assert_allclose(atoms.get_dipole_moment(), expected, rtol=0, atol=1e-12)
    per_atom = calculator.run_model(atoms, {DIPOLE: ModelOutput(unit="e*A", sample_kind="atom")})[DIPOLE].block().values[:, :, 0].numpy()
    assert per_atom.shape == (9, 3)
    np.testing.assert_allclose(per_atom.sum(axis=0), expected, rtol=0, atol=1e-12)
