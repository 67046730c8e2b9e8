"""Active learning: the incremental update against a dense solve from scratch, the learner's force
uncertainty against the exported one, an interrupted run that resumes with every labelled
structure kept, and the command line."""

import ase
import numpy as np
import pytest
import torch
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.io import read, write
from conftest import random_cluster

from acdc_potential.active import ActiveLearner, absorb, bare, landscape_shift, learning_centres, reference_calculator, sparse_candidates
from acdc_potential.cli import main
from acdc_potential.config import FitConfig, Regularisers
from acdc_potential.data import Labelled
from acdc_potential.descriptors.jacobian import batch_density
from acdc_potential.descriptors.neighbors import batch_from_atoms
from acdc_potential.descriptors.radial import DensityHypers
from acdc_potential.fit.design import build_design_matrix, mix_pieces
from acdc_potential.fit.driver import fit_kernel
from acdc_potential.fit.incremental import IncrementalFit
from acdc_potential.kernels.wigner.iteration import WignerHypers
from acdc_potential.kernels.wigner.kernel import WignerKernel
from acdc_potential.model.uncertainty import Calibration

HYPERS = DensityHypers(density="gaussian", cutoff=3.5, smoothing=0.5, max_angular=2, max_radial=3, basis="gto", width=0.4)


def cluster(seed: int, symbols: str) -> ase.Atoms:
    """A random compact cluster whose atoms are at least 1.4 A apart."""
    return random_cluster(seed, symbols, half_width=1.6, min_distance=1.4)


def labelled(seed: int, symbols: str) -> Labelled:
    rng = np.random.default_rng(100 + seed)
    atoms = cluster(seed, symbols)
    return Labelled(atoms=atoms, energy=float(rng.normal()), forces=rng.normal(size=(len(atoms), 3)))


def dense_weights(kernel, expansion, baseline, structures, regularisers):
    """``w = (K_MM + K_NM^T Lambda^-1 K_NM)^-1 K_NM^T Lambda^-1 y`` by one dense solve on every row."""
    design = build_design_matrix(structures, expansion, kernel, baseline, True, True, False)
    weights = kernel.piece_weights()
    k_nm = design.combine(weights)
    k_mm = mix_pieces(weights, kernel.sparse_block())
    scale = design.inverse_sigma(regularisers)
    a, b = k_nm * scale[:, None], design.targets * scale
    return torch.linalg.solve(k_mm + a.T @ a, a.T @ b)


@pytest.fixture(scope="module")
def first():
    """A Wigner model of random CH4 / Cu4 labels and its structures."""
    structures = [labelled(k, "CH4") for k in range(4)] + [labelled(10 + k, "Cu4") for k in range(2)]
    kernel = WignerKernel(WignerHypers(nu_max=3, lambda_max=2), mixing={"c0": 0.5, "a": 1.0, "b": 0.7})
    model = fit_kernel(structures, HYPERS, kernel, n_sparse=5, regularisers=Regularisers(0.01, 0.05, 0.005), tune=False, stress=False)
    model.calibration = Calibration(0.7, {1: 2.0, 6: 5.0, 29: 3.0}, 1, 1)
    return model, structures


def test_incremental_updates_equal_a_solve_from_scratch(first):
    """New rows folded into the triangle, then new rows with new sparse environments (columns):
    the weights equal a dense solve on all rows with the final sparse set, to 1e-8."""
    model, structures = first
    update = IncrementalFit(model, structures, (True, True, False))
    torch.testing.assert_close(update.model().weights, model.weights, rtol=1e-10, atol=1e-12)

    rows_only = [labelled(20, "CH4"), labelled(21, "Cu4")]
    update.add(rows_only)
    expected = dense_weights(update.kernel, model.expansion, model.baseline, structures + rows_only, model.regularisers)
    assert update.kernel.n_sparse == model.kernel.n_sparse
    torch.testing.assert_close(update.model().weights, expected, rtol=1e-8, atol=1e-10 * float(expected.abs().max()))

    more = [labelled(30, "CH4"), labelled(31, "CH4")]
    update.add(more, [[0, 2], []])  # the C and an H of the first new structure become sparse environments
    assert update.kernel.n_sparse == model.kernel.n_sparse + 2 and update.sparse_owners[-2:] == [8, 8]
    batch = batch_from_atoms([more[0].atoms], HYPERS.cutoff)
    flat, _ = batch_density(model.expansion, batch)
    torch.testing.assert_close(update.kernel.sparse_coefficients[-2:], flat[[0, 2]], rtol=1e-12, atol=1e-14)
    expected = dense_weights(update.kernel, model.expansion, model.baseline, structures + rows_only + more, model.regularisers)
    torch.testing.assert_close(update.model().weights, expected, rtol=1e-8, atol=1e-10 * float(expected.abs().max()))
    # the new columns' kernel values are those of a kernel built with the whole sparse set at once
    whole = model.kernel.with_sparse(update.kernel.sparse_coefficients, update.kernel.sparse_species)
    torch.testing.assert_close(update.k_mm, whole.sparse_block(), rtol=1e-10, atol=1e-12)


def test_the_learners_force_uncertainty_is_the_exported_files(first, tmp_path):
    """The MD's calculator (the model in memory, eagerly) gives the force uncertainties of the exported file."""
    from acdc_potential.active import ModelCalculator
    from acdc_potential.calculator import ACDCCalculator

    model, _ = first
    path = str(tmp_path / "model.pt")
    model.export(path)
    exported = ACDCCalculator(path, uncertainty_threshold=None)
    for atoms in [cluster(40, "CH4"), cluster(41, "Cu4")]:
        mine = ModelCalculator(model).get_property("forces_uncertainty", atoms.copy())
        np.testing.assert_allclose(mine, exported.get_forces_uncertainty(atoms.copy()), rtol=1e-8, atol=1e-14)
        assert mine.max() > 0.0


def test_new_sparse_environments_are_the_most_uncertain_centres_above_half_the_limit():
    """... and only atoms of species that carry energy (a single-centre model stays one)."""
    sigma = torch.tensor([0.1, 0.9, 0.6, 0.4, 0.8, 0.55])
    every = torch.ones(6, dtype=torch.bool)
    assert sparse_candidates(sigma, limit=1.0, most=3, centres=every) == [1, 4, 2]
    assert sparse_candidates(sigma, limit=1.0, most=10, centres=every) == [1, 4, 2, 5]
    assert sparse_candidates(sigma, limit=2.0, most=10, centres=every) == []
    centres = torch.tensor([True, False, True, True, False, True])
    assert sparse_candidates(sigma, limit=1.0, most=10, centres=centres) == [2, 5]


def test_species_whose_sparse_set_is_complete_take_no_new_sparse_environment(first):
    """A linear kernel solved in feature space spans its function space for every species: learning adds no
    sparse environment to it; a Wigner model's species all take new ones; a single-centre model's others none."""
    from acdc_potential.kernels.polynomial import PolynomialKernel

    model, structures = first
    numbers = torch.tensor([6, 1, 1, 29])
    assert learning_centres(model.kernel, numbers).tolist() == [True, True, True, True]
    linear = fit_kernel(structures, HYPERS, PolynomialKernel(zeta=1, orders=[1]), n_sparse=50, regularisers=Regularisers(0.01, 0.05, 0.005), tune=False, stress=False)
    assert linear.kernel.complete_species() == [1, 6, 29]
    assert learning_centres(linear.kernel, numbers).tolist() == [False, False, False, False]
    carbon = fit_kernel(structures, HYPERS, PolynomialKernel(zeta=1, orders=[1]), n_sparse=50, centres=[6], regularisers=Regularisers(0.01, 0.05, 0.005), tune=False, stress=False)
    assert learning_centres(carbon.kernel, numbers).tolist() == [False, False, False, False]
    assert learning_centres(model.kernel.sparse_subset(torch.nonzero(model.kernel.sparse_species == 6).flatten()), numbers).tolist() == [True, False, False, False]


def test_retuning_changes_the_regularisers_and_keeps_the_solution_exact(first):
    model, structures = first
    more = structures + [labelled(50 + k, "CH4") for k in range(6)]
    owners = [0] * model.kernel.n_sparse  # every sparse environment counted as the first structure's
    update = IncrementalFit(model, more, (True, True, False), sparse_owners=owners)
    update.retune(validation=0.3, seed=0)
    assert update.regularisers != model.regularisers and update.kernel.mixing != model.kernel.mixing
    assert update.calibration.energy != model.calibration.energy and update.calibration.structures == 4  # recalibrated on 30 % of 12
    expected = dense_weights(update.kernel, model.expansion, model.baseline, more, update.regularisers)
    torch.testing.assert_close(update.model().weights, expected, rtol=1e-8, atol=1e-10 * float(expected.abs().max()))
    # the labels are random numbers: by the evidence they are noise, the kernel's amplitude falls away and the
    # force regulariser is the labels' RMS force (unit normal components)
    update.retune(validation=0.3, seed=0, method="evidence")
    assert update.report.method == "evidence" and update.kernel.mixing["a"] < 1e-4
    rms = float(np.sqrt(np.mean(np.concatenate([s.forces.ravel() for s in more]) ** 2)))
    assert update.regularisers.forces == pytest.approx(rms, rel=1e-3)


class Interrupted(KeyboardInterrupt):
    """What a killed job or Ctrl-C raises inside the reference."""


class FailingEMT(EMT):
    """EMT that stops the run (as a killed job would) at its ``fail_at``-th calculation."""

    def __init__(self, fail_at: int):
        super().__init__()
        self.calls, self.fail_at = 0, fail_at

    def calculate(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.fail_at:
            raise Interrupted()
        super().calculate(*args, **kwargs)


def copper_starts(count: int):
    frames = []
    for k in range(count):
        atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 1, 1))
        atoms.rattle(0.05, seed=k)
        frames.append(atoms)
    return frames


TINY = {
    "density": {"cutoff": 3.5, "max_radial": 3, "max_angular": 2},
    "kernel": {"nu_max": 2, "lambda_max": 2},
    "sparse": {"n": 20},
    "options": {"validation": 0.34},
    "learn": {"temperatures": [600.0], "steps": 6, "timestep": 2.0, "interval": 1, "threshold": 1e-6, "max_labels": 9, "new_sparse": 2, "retune": 1.5},
}


def test_an_interrupted_run_resumes_with_every_labelled_structure(tmp_path, monkeypatch):
    """The run is killed while it updates the model with its 5th labelled structure (3 starting
    structures, 2 MD frames; the retuning that 5 >= 1.5 x 3 asks for is interrupted): the 5 labelled
    structures stay in the folder, the resume file holds the model of 4. The same run again keeps all
    5, resumes the model and the MD at the step after the last state (not from the start of the
    segment), retunes when the set has grown, and labels on up to ``max_labels``; a third run with a
    larger ``max_labels`` goes on."""
    config = FitConfig.from_dict(TINY)
    starts = copper_starts(3)
    folder = tmp_path / "run"

    def killed(*args, **kwargs):
        raise Interrupted()

    monkeypatch.setattr(IncrementalFit, "retune", killed)
    with pytest.raises(Interrupted):
        ActiveLearner(starts, EMT(), config, str(folder)).run()
    monkeypatch.undo()
    before = read(str(folder / "labelled.extxyz"), ":")
    assert len(before) == 5
    emt = EMT()
    for atoms in before:  # labelled by the reference itself
        np.testing.assert_allclose(atoms.get_forces(), _emt_forces(atoms, emt), atol=1e-6)  # positions written to 1e-8 A
    saved = torch.load(folder / "resume.pt", weights_only=True)
    assert saved["labels"] == 4 and saved["state"]["step"] > 0 and float(saved["frame"]["momenta"].abs().max()) > 0.0

    learner = ActiveLearner(starts, EMT(), config, str(folder))
    model = learner.run()
    after = read(str(folder / "labelled.extxyz"), ":")
    assert len(after) == 9 and len(learner.incremental.structures) == 9
    for old, new in zip(before, after):
        np.testing.assert_array_equal(old.positions, new.positions)
    assert model.kernel.n_sparse == len(learner.incremental.sparse_owners)
    log = (folder / "learn.log").read_text()
    assert "resuming: 5 labelled structures" in log
    first_check = log.split("resuming:")[1].split("check segment 1 step ")[1].split(":")[0]
    assert int(first_check) == saved["state"]["step"] + 1
    assert any(h["retuned"] for h in learner.state.history)
    assert [h["labels"] for h in learner.state.history][-1] == 9
    assert (folder / "model.pt").exists()

    more = FitConfig.from_dict({**TINY, "learn": {**TINY["learn"], "max_labels": 11}})
    assert len(ActiveLearner(starts, EMT(), more, str(folder)).run() and read(str(folder / "labelled.extxyz"), ":")) == 11


class Tilted(EMT):
    """EMT plus a constant and ``k |x - x0|^2``: the same landscape shifted, and made steeper away from ``x0``."""

    def __init__(self, x0, constant, k):
        super().__init__()
        self.x0, self.constant, self.k = x0, constant, k

    def calculate(self, atoms=None, properties=("energy",), system_changes=("positions",)):
        super().calculate(atoms, properties, system_changes)
        d = atoms.positions - self.x0
        self.results["energy"] += self.constant + self.k * float((d * d).sum())
        self.results["forces"] = self.results["forces"] - 2.0 * self.k * d


def test_the_landscape_shift_ignores_constants_and_measures_the_change_relative_to_the_start():
    start = copper_starts(1)[0]
    frame = start.copy()
    frame.rattle(0.1, seed=3)
    d = frame.positions - start.positions
    assert landscape_shift(frame, start, EMT(), Tilted(start.positions, 7.0, 0.0)) == pytest.approx(0.0, abs=1e-12)
    assert landscape_shift(frame, start, EMT(), Tilted(start.positions, -3.0, 0.5)) == pytest.approx(0.5 * float((d * d).sum()), rel=1e-10)
    assert landscape_shift(frame, start, Tilted(start.positions, 2.0, 0.5), EMT()) == pytest.approx(-0.5 * float((d * d).sum()), rel=1e-10)


def test_absorbing_an_energy_changes_the_kinetic_energy_by_it_and_never_below_zero():
    atoms = copper_starts(1)[0]
    atoms.set_momenta(np.random.default_rng(0).normal(size=(len(atoms), 3)))
    kinetic = atoms.get_kinetic_energy()
    direction = atoms.get_momenta() / np.linalg.norm(atoms.get_momenta())
    absorb(atoms, 0.25 * kinetic)
    assert atoms.get_kinetic_energy() == pytest.approx(0.75 * kinetic, rel=1e-12)
    np.testing.assert_allclose(atoms.get_momenta() / np.linalg.norm(atoms.get_momenta()), direction, atol=1e-14)
    absorb(atoms, -0.25 * kinetic)
    assert atoms.get_kinetic_energy() == pytest.approx(kinetic, rel=1e-12)
    absorb(atoms, 2.0 * kinetic)
    assert atoms.get_kinetic_energy() == 0.0


def test_a_model_update_keeps_the_total_energy_of_the_md(tmp_path, monkeypatch):
    """At every switch to an updated model, the kinetic energy plus the current model's energy of the
    frame relative to the segment's start is what it was under the previous model (where the kinetic
    energy can absorb the change), and the history records the change."""
    switches = []
    original = ActiveLearner.switch

    def relative(atoms, start, calculator):
        frames = [bare(atoms), bare(start)]
        for frame in frames:
            calculator.uncertainty = False
            frame.calc = calculator
        return frames[0].get_potential_energy() - frames[1].get_potential_energy()

    def recorded(self, atoms, start):
        assert start is self.starts[self.state.segment % len(self.starts)]  # the segment's own (one temperature)
        before = atoms.get_kinetic_energy() + relative(atoms, start, atoms.calc)  # the previous model's calculator
        shift, temperature = original(self, atoms, start)
        switches.append((before, atoms.get_kinetic_energy() + relative(atoms, start, atoms.calc), shift, atoms.get_kinetic_energy()))
        return shift, temperature

    monkeypatch.setattr(ActiveLearner, "switch", recorded)
    learner = ActiveLearner(copper_starts(3), EMT(), FitConfig.from_dict(TINY), str(tmp_path / "run"))
    learner.run()
    assert len(switches) == 6 and any(abs(shift) > 1e-5 for _, _, shift, _ in switches)
    kept = [(before, after) for before, after, _, kinetic in switches if kinetic > 0.0]
    assert len(kept) == 6
    for before, after in kept:
        assert after == pytest.approx(before, abs=1e-9)
    assert [h["energy_shift"] for h in learner.state.history] == [shift for _, _, shift, _ in switches]
    retuned = [h for h in learner.state.history if h["retuned"]]
    assert retuned and all(set(h["regularisers"]) == {"energy", "forces", "stress"} and set(h["mixing"]) == {"c0", "a", "b"} for h in retuned)
    assert learner.incremental.report.method == "evidence"  # learn.tuning's default
    assert (tmp_path / "run" / "learn.log").read_text().count("retuned: regularisers {'energy': ") == len(retuned)


def test_another_runs_folder_is_refused(tmp_path):
    config = FitConfig.from_dict({**TINY, "learn": {**TINY["learn"], "max_labels": 3}})
    ActiveLearner(copper_starts(3), EMT(), config, str(tmp_path / "run")).run()
    hotter = FitConfig.from_dict({**TINY, "learn": {**TINY["learn"], "max_labels": 3, "temperatures": [900.0]}})
    with pytest.raises(ValueError, match="holds another run .*temperatures"):
        ActiveLearner(copper_starts(3), EMT(), hotter, str(tmp_path / "run")).run()


def test_frames_below_the_limit_are_not_labelled(tmp_path):
    """Clusters (no cell, no stress) and a limit no uncertainty reaches: every check keeps the model."""
    starts = [cluster(60 + k, "Cu4") for k in range(3)]
    config = FitConfig.from_dict({**TINY, "learn": {**TINY["learn"], "threshold": 1e6}})
    learner = ActiveLearner(starts, EMT(), config, str(tmp_path / "run"))
    learner.run()
    log = (tmp_path / "run" / "learn.log").read_text()
    assert learner.label_count() == 3 and log.count(": keep") == 3 * config.learn.steps and ": label" not in log


def test_a_failing_reference_is_one_line(tmp_path):
    class Broken(EMT):
        def calculate(self, *args, **kwargs):
            raise RuntimeError("SCF did not converge\nin 250 iterations")

    with pytest.raises(ValueError, match=r"failed on starting structure 0: RuntimeError: SCF did not converge$"):
        ActiveLearner(copper_starts(2), Broken(), FitConfig.from_dict(TINY), str(tmp_path / "run")).run()


@pytest.mark.parametrize("change, message", [
    ({"learn": {"retune": 1.0}}, "learn.retune must be 0"),
    ({"learn": {"temperatures": []}}, "temperatures is empty"),
    ({"options": {"tune": False}}, "options.tune and options.forces"),
])
def test_options_learning_cannot_use_are_refused_before_anything_runs(tmp_path, change, message):
    values = {**TINY, **{section: {**TINY.get(section, {}), **options} for section, options in change.items()}}
    with pytest.raises(ValueError, match=message):
        ActiveLearner(copper_starts(3), FailingEMT(1), FitConfig.from_dict(values), str(tmp_path / "run"))
    with pytest.raises(ValueError, match="at least two starting structures"):
        ActiveLearner(copper_starts(1), FailingEMT(1), FitConfig.from_dict(TINY), str(tmp_path / "run"))


def test_labelled_starting_structures_keep_their_labels(tmp_path):
    """Starting structures with energy and forces are not sent to the reference (it would fail)."""
    from ase.calculators.singlepoint import SinglePointCalculator

    starts = copper_starts(3)
    for atoms in starts:
        frame = atoms.copy()
        frame.calc = EMT()
        atoms.calc = SinglePointCalculator(atoms, energy=frame.get_potential_energy(), forces=frame.get_forces(), stress=frame.get_stress())
    config = FitConfig.from_dict({**TINY, "learn": {**TINY["learn"], "max_labels": 3}})
    learner = ActiveLearner(starts, FailingEMT(1), config, str(tmp_path / "run"))
    learner.run()
    assert len(learner.incremental.structures) == 3 and learner.reference.calls == 0
    assert "with its own labels" in (tmp_path / "run" / "learn.log").read_text()


def _emt_forces(atoms, emt):
    frame = ase.Atoms(numbers=atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
    frame.calc = emt
    return frame.get_forces()


def test_learn_on_the_command_line(tmp_path, capsys):
    import yaml

    write(str(tmp_path / "start.extxyz"), copper_starts(3))
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump({**TINY, "learn": {**TINY["learn"], "max_labels": 5}}))
    code = main(["learn", str(tmp_path / "start.extxyz"), "--reference", "ase.calculators.emt:EMT", "--config", str(tmp_path / "tiny.yaml"), "-o", str(tmp_path / "out")])
    assert code == 0
    assert len(read(str(tmp_path / "out" / "labelled.extxyz"), ":")) == 5
    assert "labelled structure 5" in capsys.readouterr().out
    for name in ("model.pt", "model.ckpt", "state.yaml", "learn.log"):
        assert (tmp_path / "out" / name).exists()


@pytest.mark.parametrize("spec, message", [("EMT", "expected MODULE:CLASS"), ("no_such_module:X", "cannot import"), ("ase.calculators.emt:Nope", "has no calculator class")])
def test_bad_references_are_one_line(spec, message, tmp_path, capsys):
    with pytest.raises(ValueError, match=message):
        reference_calculator(spec)
    write(str(tmp_path / "start.extxyz"), copper_starts(2))
    assert main(["learn", str(tmp_path / "start.extxyz"), "--reference", spec, "-o", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert message in error and len(error.strip().splitlines()) == 1


def test_ill_typed_learning_options_name_the_option(tmp_path, capsys):
    write(str(tmp_path / "start.extxyz"), copper_starts(2))
    assert main(["learn", str(tmp_path / "start.extxyz"), "--reference", "ase.calculators.emt:EMT", "--threshold", "-1", "-o", str(tmp_path / "out")]) == 2
    assert "learn.threshold: expected a number > 0, got -1.0" in capsys.readouterr().err
    assert "learn:" in FitConfig.template() and "  new_sparse: 8" in FitConfig.template()
