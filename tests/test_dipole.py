"""Dipole models: symmetry of the predicted vector, recovery of a dipole of the model's own class,
the exported file against in-memory predictions, and the command line."""

import dataclasses

import ase.io
import numpy as np
import pytest
import torch
import yaml

from acdc_potential.calculator import ACDCCalculator
from acdc_potential.cli import main
from acdc_potential.config import ConfigError, FitConfig
from acdc_potential.data import Labelled
from acdc_potential.errors import CheckpointError
from acdc_potential.descriptors.density import DensityExpansion
from acdc_potential.fit.checkpoint import DipoleModel, FeatureDipoleModel, WignerDipoleModel, export_models, load_checkpoint
from acdc_potential.fit.dipole import (
    atom_environments, atom_features, centred_positions, chosen_kernel, dipole_design, feature_batches, feature_rows, fit_dipole, folded_vectors,
    sparse_block, sparse_kernel, species_scales,
)
from acdc_potential.fit.selection import select_sparse
from acdc_potential.descriptors.acdc import power_spectrum
from acdc_potential.descriptors.vectors import VectorFeatures
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
    return WignerDipoleModel(config.density, [1, 6, 8], kernel, weights, B, 0.0, expansion=expansion)


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


def check_dipole_symmetries(model):
    """A rotation rotates ``model``'s dipole, inversion flips it (a polar vector), a translation and a
    permutation of the atoms leave it (1e-10 relative)."""
    atoms = ethanol(7)
    rotated, inverted, moved = atoms.copy(), atoms.copy(), atoms.copy()
    rotation = random_rotation(3)
    rotated.positions = atoms.positions @ rotation.T
    inverted.positions = -atoms.positions
    moved.positions = atoms.positions + [3.0, -1.0, 0.5]
    permuted = atoms[np.random.default_rng(1).permutation(len(atoms))]
    mu, mu_rotated, mu_inverted, mu_moved, mu_permuted = model.predict([atoms, rotated, inverted, moved, permuted]).numpy()
    scale = np.linalg.norm(mu)
    assert scale > 1e-3
    assert np.abs(mu_rotated - rotation @ mu).max() < 1e-10 * scale
    assert np.abs(mu_inverted + mu).max() < 1e-10 * scale
    assert np.abs(mu_moved - mu).max() < 1e-10 * scale
    assert np.abs(mu_permuted - mu).max() < 1e-10 * scale


def test_rotating_a_molecule_rotates_its_dipole_and_inversion_flips_it(fitted):
    check_dipole_symmetries(fitted)


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
    with pytest.raises(ValueError, match="dipole models of Wigner kernels take kernel.lambda_max"):
        fit_dipole(structures, FitConfig.from_dict({**SMALL, "kernel": {"type": "polynomial"}}))
    with pytest.raises(ValueError, match="dipole.charges needs Wigner kernels"):
        fit_dipole(structures, small_config(kernel="acdc", charges=True))
    with pytest.raises(ConfigError, match=r"dipole.order: expected an integer in \[1, 4\), got 4"):
        small_config(kernel="acdc", order=4)
    with pytest.raises(ConfigError, match="dipole.kernel: .*'soap'"):
        small_config(kernel="soap")


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
        chosen = WignerDipoleModel(model.density_hypers, model.species, chosen_kernel(wide, nu), model.weights, model.b, 0.0, expansion=model.expansion, charge_weights=model.charge_weights, charge_scale=1.0)
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
    return WignerDipoleModel(config.density, [1, 6, 8], kernel, weights, B, 0.0, expansion=expansion)


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


FEATURE_KINDS = [("acdc", 1), ("acdc", 2), ("mpacdc", 1)]


def feature_generator(kind, order):
    """A linear feature dipole model on the sparse environments a fit of ``sparse: 6`` selects on the first
    24 structures, with random weights on them (for ``acdc`` of order 1, whose 12 features those 18
    environments span, random ``v_a`` themselves): the labels a fit should recover."""
    config = small_config(kernel=kind, order=order)
    structures = [Labelled(ethanol(seed), index=seed) for seed in range(24)]
    hypers = dataclasses.replace(config.density, max_radial=config.dipole.max_radial, max_angular=config.dipole.max_angular)
    expansion = DensityExpansion(hypers, [1, 6, 8])
    module = VectorFeatures(expansion, kind, order)
    coefficients, numbers, _, layout = atom_environments(expansion, structures)
    chosen = select_sparse(power_spectrum(layout.unflatten(coefficients)), numbers, 6, "fps")
    sparse = atom_features(module, structures, chosen)
    rng = np.random.default_rng(5)
    if kind == "acdc" and order == 1:
        vectors = torch.from_numpy(rng.normal(size=(3, sparse.shape[2])))
    else:
        weights = torch.from_numpy(rng.normal(size=(chosen.numel(), 3)))
        vectors = folded_vectors(sparse, numbers[chosen], species_scales(sparse, numbers[chosen], [1, 6, 8]), [1, 6, 8], weights)
    return FeatureDipoleModel(hypers, [1, 6, 8], kind, order, vectors, 0.0, expansion=expansion)


@pytest.fixture(scope="module", params=FEATURE_KINDS, ids=[f"{kind}-{order}" for kind, order in FEATURE_KINDS])
def feature_models(request):
    generator = feature_generator(*request.param)
    fitted = fit_dipole(labelled(generator, range(24)), small_config(kernel=request.param[0], order=request.param[1], regulariser=1e-7))
    return generator, fitted


def test_a_feature_dipole_of_the_models_own_class_is_recovered_with_tiny_regularisation(feature_models):
    generator, fitted = feature_models
    test = labelled(generator, range(100, 110))
    expected = np.array([s.dipole for s in test])
    assert np.abs(expected).max() > 1e-2
    assert isinstance(fitted, FeatureDipoleModel) and fitted.vectors.shape == generator.vectors.shape
    assert np.abs(fitted.predict(test).numpy() - expected).max() < 1e-5 * np.abs(expected).max()


def test_feature_dipoles_rotate_with_the_molecule_flip_under_inversion_and_ignore_translation_and_order(feature_models):
    check_dipole_symmetries(feature_models[1])


def test_a_feature_models_rows_predict_what_its_exported_file_does(feature_models, tmp_path):
    """The fit's rows (sums of ``s_a^2 x_i x_m^T`` over each structure) times the weights equal the exported head's
    ``x_i v_a`` with ``v_a`` folded from them; the file and the checkpoint give the in-memory dipoles."""
    _, fitted = feature_models
    structures = [Labelled(ethanol(seed), index=k) for k, seed in enumerate((400, 401, 402))]
    module = fitted.feature_module()
    sparse = torch.from_numpy(np.random.default_rng(3).normal(size=(4, 3, fitted.vectors.shape[1])))
    sparse_species = torch.tensor([1, 6, 6, 8])
    scales = torch.tensor([0.5, 2.0, 1.5], dtype=torch.float64)
    weights = torch.from_numpy(np.random.default_rng(4).normal(size=(4, 3)))
    rows = feature_rows(module, structures, sparse, sparse_species, scales, [1, 6, 8])
    model = FeatureDipoleModel(fitted.density_hypers, [1, 6, 8], fitted.features, fitted.order, folded_vectors(sparse, sparse_species, scales, [1, 6, 8], weights), 0.0)
    expected = model.predict(structures)
    torch.testing.assert_close((rows @ weights.reshape(-1)).reshape(-1, 3)[:, CARTESIAN], expected, rtol=0, atol=1e-10 * float(expected.abs().max()))
    fitted.export(str(tmp_path / "dipole.pt"))
    fitted.save(str(tmp_path / "dipole.ckpt"))
    frames = [s.atoms for s in structures]
    in_memory = fitted.predict(frames).numpy()
    calculator = ACDCCalculator(tmp_path / "dipole.pt")
    for atoms, mu in zip(frames, in_memory):
        atoms.calc = calculator
        assert np.abs(atoms.get_dipole_moment() - mu).max() < 1e-10 * np.linalg.norm(mu)
    reloaded = load_checkpoint(str(tmp_path / "dipole.ckpt"))
    assert isinstance(reloaded, FeatureDipoleModel) and (reloaded.features, reloaded.order) == (fitted.features, fitted.order)
    np.testing.assert_allclose(reloaded.predict(frames).numpy(), in_memory, rtol=0, atol=1e-12)
    state = fitted.to_dict()
    for bad, message in (({"vectors": fitted.vectors[:, :-1]}, "vectors have"), ({"order": "x"}, "malformed"), ({"kind": "other"}, "unknown kind")):
        torch.save({**state, **bad}, tmp_path / "bad.ckpt")
        with pytest.raises(CheckpointError, match=message):
            load_checkpoint(str(tmp_path / "bad.ckpt"))
    if fitted.features == "mpacdc":
        assert calculator._model.capabilities().interaction_range == pytest.approx(2 * fitted.density_hypers.cutoff)


def test_version_1_dipole_checkpoints_read_as_wigner_models(fitted, tmp_path):
    state = fitted.to_dict()
    assert state["kind"] == "wigner"
    old = {key: value for key, value in state.items() if key != "kind"}
    torch.save({**old, "version": 1}, tmp_path / "old.ckpt")
    frames = [ethanol(300)]
    np.testing.assert_allclose(load_checkpoint(str(tmp_path / "old.ckpt")).predict(frames).numpy(), fitted.predict(frames).numpy(), rtol=0, atol=0)


def test_a_feature_dipole_model_through_the_command_line(feature_models, tmp_path):
    generator, _ = feature_models
    frames = []
    for structure in labelled(generator, range(20)):
        atoms = structure.atoms.copy()
        atoms.info["dipole"] = structure.dipole
        frames.append(atoms)
    ase.io.write(str(tmp_path / "train.extxyz"), frames)
    config = {**SMALL, "dipole": {"kernel": generator.features, "order": generator.order, "sparse": 6}}
    (tmp_path / "features.yaml").write_text(yaml.safe_dump(config))
    output = tmp_path / "dipole.pt"
    assert main(["fit", str(tmp_path / "train.extxyz"), "-o", str(output), "--target", "dipole", "--config", str(tmp_path / "features.yaml")]) == 0
    used = yaml.safe_load(output.with_suffix(".config.yaml").read_text())
    assert (used["dipole"]["kernel"], used["dipole"]["order"]) == (generator.features, generator.order)
    report = yaml.safe_load(output.with_suffix(".report.yaml").read_text())
    assert report["errors_meA"]["train"]["dipole"]["count"] == 60 and report["choice"]["regulariser"] > 0
    model = load_checkpoint(str(output.with_suffix(".ckpt")))
    calculator = ACDCCalculator(output)
    atoms = ethanol(700)
    atoms.calc = calculator
    np.testing.assert_allclose(atoms.get_dipole_moment(), model.predict([atoms]).numpy()[0], rtol=0, atol=1e-12)


def test_the_feature_models_sparse_block_and_atom_features_equal_their_definitions(feature_models):
    """``K_MM`` against the kernel's definition entry by entry, ``atom_features`` against the features of
    every atom in file order (its chunks and structures need not line up), and a fit at a large
    regulariser against the closed-form projected process of those pieces."""
    _, fitted = feature_models
    module = fitted.feature_module()
    structures = [Labelled(ethanol(seed), index=k) for k, seed in enumerate(range(800, 860))]
    every = torch.cat([x for _, _, x in feature_batches(module, structures)])
    numbers = torch.cat([torch.as_tensor(s.atoms.numbers) for s in structures])
    chosen = torch.tensor([3, 0, 531, 100, 450, 9, 287, 8])
    torch.testing.assert_close(atom_features(module, structures, chosen), every[chosen], rtol=0, atol=0)
    sparse, species = every[chosen], numbers[chosen]
    scales = species_scales(sparse, species, [1, 6, 8])
    block = sparse_block(sparse, species, scales, [1, 6, 8]).reshape(8, 3, 8, 3)
    index = {1: 0, 6: 1, 8: 2}
    for m in range(8):
        for n in range(8):
            same = int(species[m]) == int(species[n])
            expected = scales[index[int(species[m])]] ** 2 * sparse[m] @ sparse[n].T if same else torch.zeros((3, 3), dtype=torch.float64)
            torch.testing.assert_close(block[m, :, n, :], expected, rtol=1e-12, atol=1e-14)
    assert float(block.abs().max()) > 0.5
    # the fit at regulariser sigma = 0.3: w = (K_MN K_NM / sigma^2 + K_MM)^+ K_MN y / sigma^2 (its sparse set and scales)
    train = labelled(feature_models[0], range(24))
    model = fit_dipole(train, small_config(kernel=fitted.features, order=fitted.order, regulariser=0.3))
    y = torch.from_numpy(np.stack([s.dipole[[1, 2, 0]] for s in train])).reshape(-1)
    config = small_config(kernel=fitted.features, order=fitted.order)
    coefficients, all_numbers, _, layout = atom_environments(model.expansion, train)
    picked = select_sparse(power_spectrum(layout.unflatten(coefficients)), all_numbers, config.dipole.sparse, "fps")
    x_m = atom_features(module, train, picked)
    s_a = species_scales(x_m, all_numbers[picked], [1, 6, 8])
    k_nm = feature_rows(module, train, x_m, all_numbers[picked], s_a, [1, 6, 8]).numpy()
    k_mm = sparse_block(x_m, all_numbers[picked], s_a, [1, 6, 8]).numpy()
    weights = np.linalg.lstsq(k_nm.T @ k_nm / 0.09 + k_mm, k_nm.T @ y.numpy() / 0.09, rcond=1e-13)[0]
    expected = folded_vectors(x_m, all_numbers[picked], s_a, [1, 6, 8], torch.from_numpy(weights).reshape(-1, 3))
    torch.testing.assert_close(model.vectors, expected, rtol=1e-6, atol=1e-8 * float(expected.abs().max()))
