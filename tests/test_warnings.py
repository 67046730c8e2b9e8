"""Accuracy that could degrade silently is warned about, and a fit records the warnings."""

import dataclasses

import ase.build
import numpy as np
import pytest
import torch

from acdc_potential.config import Regularisers
from acdc_potential.descriptors.radial import DensityHypers, tabulate_radial_integrals
from acdc_potential.errors import SparseSelectionWarning, SplineAccuracyWarning
from acdc_potential.fit.checkpoint import SparseKRRModel
from acdc_potential.fit.driver import fit_kernel
from acdc_potential.fit.selection import select_sparse
from acdc_potential.kernels.polynomial import PolynomialKernel

HYPERS = DensityHypers(cutoff=3.0, max_angular=1, max_radial=2, density="gaussian", width=0.4)


def test_spline_accuracy_not_reached_is_a_warning_with_the_numbers():
    hypers = DensityHypers(cutoff=3.0, max_angular=0, max_radial=1, spline_accuracy=1e-13)
    with pytest.warns(SplineAccuracyWarning, match=r"relative error of [0-9.e+-]+, not the requested spline_accuracy 1e-13, with the finest grid \(128 intervals"):
        first, _, n_intervals, error = tabulate_radial_integrals(hypers, max_intervals=128)
    assert n_intervals == 128 and error > 1e-13
    # a kept table: the same numbers, a copy of its own, and the warning again
    first[:] = 0.0
    with pytest.warns(SplineAccuracyWarning, match="not the requested spline_accuracy 1e-13"):
        again, _, _, _ = tabulate_radial_integrals(hypers, max_intervals=128)
    assert np.abs(again).max() > 0
    with pytest.warns(SplineAccuracyWarning):
        _, step, _, _ = tabulate_radial_integrals(dataclasses.replace(hypers, cutoff=3.5), max_intervals=128)
    assert step == 3.5 / 128


def test_spline_accuracy_reached_is_silent(recwarn):
    _, _, _, error = tabulate_radial_integrals(DensityHypers(cutoff=3.0, max_angular=0, max_radial=1, spline_accuracy=1e-6))
    assert error < 1e-6
    assert not [w for w in recwarn if issubclass(w.category, SplineAccuracyWarning)]


def test_fewer_candidates_than_asked_is_a_warning_naming_the_species():
    features = torch.randn(7, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    species = torch.tensor([1, 1, 1, 1, 1, 8, 8])
    with pytest.warns(SparseSelectionWarning, match="2 sparse environments of O instead of the 4 asked: the training set has only 2"):
        chosen = select_sparse(features, species, 4)
    assert len(chosen) == 4 + 2


@pytest.mark.parametrize("method", ["fps", "cur"])
def test_duplicate_environments_stop_the_selection_with_a_warning(method):
    distinct = torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    features = distinct.repeat(4, 1)
    species = torch.full((12,), 6)
    with pytest.warns(SparseSelectionWarning, match="3 sparse environments of C instead of the 8 asked: only 3 of its 12"):
        chosen = select_sparse(features, species, 8, method)
    assert len(torch.unique(features[chosen], dim=0)) == len(chosen) == 3


def test_cur_of_rank_zero_warns_instead_of_returning_one_point_silently():
    features = torch.zeros(6, 3, dtype=torch.float64)
    with pytest.warns(SparseSelectionWarning, match="1 sparse environments of H instead of the 4 asked: only 1 of its 6"):
        chosen = select_sparse(features, torch.ones(6, dtype=torch.long), 4, "cur")
    assert len(chosen) == 1


def test_a_fit_records_its_warnings_in_the_model_and_checkpoint(tmp_path):
    structures = []
    for seed in range(3):
        atoms = ase.build.molecule("H2O")
        atoms.rattle(0.05, seed=seed)
        atoms.info["energy"] = -1.0 - 0.01 * seed
        structures.append(atoms)
    with pytest.warns(SparseSelectionWarning):
        model = fit_kernel(structures, HYPERS, PolynomialKernel(zeta=2), n_sparse=5, regularisers=Regularisers(), tune=False, forces=False)
    assert any("sparse environments of O instead of the 5 asked" in message for message in model.warnings)
    model.save(str(tmp_path / "model.ckpt"))
    assert SparseKRRModel.load(str(tmp_path / "model.ckpt")).warnings == model.warnings


def test_duplicates_among_too_few_candidates_are_named_as_duplicates():
    features = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
    with pytest.warns(SparseSelectionWarning, match="2 sparse environments of C instead of the 8 asked: only 2 of its 4"):
        select_sparse(features, torch.full((4,), 6), 8)


def test_an_energy_rounded_above_float64s_precision_is_a_warning_naming_the_cause(monkeypatch):
    """The fit's precision probe turns into a warning when an exact symmetry changes the energy by more
    than 1e-10 of it (taken between 1 meV and 1 eV per atom, so that neither a total energy far from zero
    hides rounding nor an energy near zero invents it), with the numbers and the cause (plain pair sums:
    Wigner orders nu >= 5); the command line logs it and adds it to the model's warnings."""
    import types

    from acdc_potential import cli, evaluation
    from acdc_potential.evaluation import PRECISION_TARGET, precision_warning

    clean = {"energy": 4.9, "translation": 0.0, "translation_relative": 0.0, "rotation": 4.9e-14, "rotation_relative": 1e-14,
             "permutation": 0.0, "permutation_relative": 0.0, "finite_difference": 1e-9, "finite_difference_step": 1e-4}
    assert precision_warning(clean, 32, plain_pairs=True) is None
    assert precision_warning(dict(clean, rotation=PRECISION_TARGET * 4.9), 32, plain_pairs=False) is None
    assert "please report it" in precision_warning(dict(clean, rotation=1.1 * PRECISION_TARGET * 4.9), 32, plain_pairs=False)
    # a total energy of 1e5 eV on 32 atoms: judged against 32 eV, not 1e5
    assert precision_warning(dict(clean, energy=-1e5, rotation=4e-9), 32, plain_pairs=False) is not None  # 4e-14 of it
    assert precision_warning(dict(clean, energy=-1e5, rotation=3e-9), 32, plain_pairs=False) is None
    # an energy of 1e-9 eV: judged against 32 meV, so that the rounding of its terms is no warning
    assert precision_warning(dict(clean, energy=1e-9, rotation=1e-15), 32, plain_pairs=False) is None
    noisy = dict(clean, translation=4.2e-9, translation_relative=8.6e-10, rotation=8.1e-9, rotation_relative=1.7e-9, finite_difference=5.1e-5)
    message = precision_warning(noisy, 32, plain_pairs=True)
    assert "up to 1.7e-09 of the energy" in message and "4.2e-09 eV" in message and "8.1e-09 eV" in message and "5.1e-05 eV/A" in message
    assert "pair by pair in plain float64 (Wigner orders nu >= 5)" in message and "\n" not in message

    # the command line: a compensated head sums pairs but not plainly, so it is not the plain-pairs cause
    monkeypatch.setattr(evaluation, "numerical_precision", lambda module, atoms: dict(noisy))
    lines = []
    for head, cause in ((types.SimpleNamespace(pairs_left=True, plain_pairs=True), "Wigner orders"),
                        (types.SimpleNamespace(pairs_left=True, plain_pairs=False), "please report it")):
        model = types.SimpleNamespace(scripted=lambda head=head: types.SimpleNamespace(head=head), warnings=[])
        report = cli._precision(model, [types.SimpleNamespace(atoms=ase.build.bulk("Cu", cubic=True))], lines.append)
        assert report["rotation_relative"] == 1.7e-9 and report["structure"] == "Cu4 (first of its file)"
        assert len(model.warnings) == 1 and cause in model.warnings[0] and lines[-1] == f"warning: {model.warnings[0]}"
