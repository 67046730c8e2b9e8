"""The command line and the calculator as a user meets them: bad input, the fit's files, threads."""

import hashlib
from pathlib import Path

import ase
import ase.build
import ase.io
import numpy as np
import pytest
import torch
import yaml

from acdc_potential import __version__
from acdc_potential.calculator import ACDCCalculator
from acdc_potential.cli import main
from acdc_potential.config import FitConfig
from acdc_potential.errors import BaselineWarning, StructureError
from acdc_potential.fit.checkpoint import SparseKRRModel
from acdc_potential.fit.report import read_report

EXAMPLES = Path(__file__).parent.parent / "examples"
# small and fast: fixed body order (no grid), no tuning
SMALL = {"sparse": {"n": 8}, "kernel": {"nu_max": 2}, "density": {"max_radial": 3, "max_angular": 2}, "options": {"tune": False}}


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    directory = tmp_path_factory.mktemp("cli")
    frames = ase.io.read(str(EXAMPLES / "ethanol_train.extxyz"), ":8")
    ase.io.write(str(directory / "train.extxyz"), frames)
    ase.io.write(str(directory / "test.extxyz"), ase.io.read(str(EXAMPLES / "ethanol_test.extxyz"), ":3"))
    (directory / "small.yaml").write_text(yaml.safe_dump(SMALL))
    ase.io.write(str(directory / "renamed.extxyz"), [relabelled(a, "REF_energy", "REF_forces") for a in frames])
    unlabelled = [ase.Atoms(a.numbers, a.positions) for a in frames]
    ase.io.write(str(directory / "unlabelled.extxyz"), unlabelled)
    overlapping = [a.copy() for a in frames[:3]]
    overlapping[2].positions[3] = overlapping[2].positions[0] + [0.02, 0.0, 0.0]
    ase.io.write(str(directory / "overlapping.extxyz"), overlapping)
    (directory / "empty.extxyz").write_text("")
    text = (directory / "train.extxyz").read_text()
    (directory / "truncated.extxyz").write_text(text[: len(text) // 3])
    (directory / "garbage.extxyz").write_text("this is not\nan extxyz file\n")
    return directory


@pytest.fixture(scope="module")
def fitted(files):
    """One small fit through the command line, on one thread."""
    output = files / "model.pt"
    code = main(["fit", str(files / "train.extxyz"), "-o", str(output), "--test", str(files / "test.extxyz"),
                 "--config", str(files / "small.yaml"), "--threads", "1", "--seed", "3"])
    assert code == 0
    return output


def relabelled(atoms, energy_key, forces_key):
    """``atoms`` with its energy and forces stored under other keys."""
    other = ase.Atoms(atoms.numbers, atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
    if energy_key is not None:
        other.info[energy_key] = atoms.get_potential_energy()
    other.arrays[forces_key] = atoms.get_forces()
    return other


def run(arguments, capsys):
    code = main(arguments)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(
    "name, message",
    [
        ("empty", "empty.extxyz: the file is empty"),
        ("truncated", "truncated.extxyz: not a readable extxyz file: .*the file may be truncated"),
        ("garbage", "garbage.extxyz: not a readable extxyz file: Expected xyz header"),
        ("missing", "missing.extxyz: no such file"),
        ("overlapping", r"structure 2 \(C2H6O\): atoms 0 and 3 are 0.02 A apart \(overlapping atoms"),
        ("renamed", r"no structure has energy under the key 'energy'; the file has per-structure keys \[.*'REF_energy'.*\] and per-atom keys \[.*'REF_forces'.*\]"),
        ("unlabelled", "no structure has energy under the key 'energy'"),
    ],
)
def test_bad_training_files_are_one_line_and_write_nothing(files, capsys, tmp_path, name, message):
    output = tmp_path / "model.pt"
    code, out, err = run(["fit", str(files / f"{name}.extxyz"), "-o", str(output), "--config", str(files / "small.yaml")], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("acdc-potential fit: error: "), err
    assert pytest.importorskip("re").search(message, lines[0]), lines[0]
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_renamed_forces_are_named_too(files, capsys, tmp_path):
    code, _, err = run(["fit", str(files / "renamed.extxyz"), "-o", str(tmp_path / "m.pt"), "--energy-key", "REF_energy"], capsys)
    assert code == 2 and "no structure has forces under the key 'forces'" in err and "'REF_forces'" in err
    assert "leave out the forces (energies only) (--no-forces, or options: {forces: false})" in err


def test_renamed_keys_fit_when_named(files, capsys, tmp_path):
    code, _, _ = run(["fit", str(files / "renamed.extxyz"), "-o", str(tmp_path / "m.pt"), "--config", str(files / "small.yaml"),
                      "--energy-key", "REF_energy", "--forces-key", "REF_forces"], capsys)
    assert code == 0 and (tmp_path / "m.pt").is_file()


def test_forces_only_is_an_explicit_option(files, capsys, tmp_path):
    frames = [relabelled(a, None, "forces") for a in ase.io.read(str(files / "train.extxyz"), ":")]
    ase.io.write(str(tmp_path / "forces.extxyz"), frames)
    code, _, err = run(["fit", str(tmp_path / "forces.extxyz"), "-o", str(tmp_path / "m.pt")], capsys)
    assert code == 2 and "leave out the energy (forces only) (--no-energies, or options: {energies: false})" in err
    code, _, _ = run(["fit", str(tmp_path / "forces.extxyz"), "-o", str(tmp_path / "m.pt"), "--config", str(files / "small.yaml"),
                      "--no-energies"], capsys)
    assert code == 0


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--device", "banana"], "options.device 'banana' is not a torch device"),
        (["--device", "cuda", "--target", "dipole"], "options.device 'cuda': dipole fits run on the CPU"),
        (["--device", "cuda", "--workers", "2"], "options.device 'cuda': a fit on a Dask cluster runs on the CPU"),
        (["--device", "cuda:7"], "options.device 'cuda:7': " + ("this machine has" if torch.cuda.is_available() else "CUDA is not available")),
    ],
)
def test_a_device_the_fit_cannot_use_is_one_line_and_writes_nothing(files, capsys, tmp_path, extra, message):
    code, _, err = run(["fit", str(files / "train.extxyz"), "-o", str(tmp_path / "m.pt"), "--config", str(files / "small.yaml"), *extra], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and message in lines[0], err
    assert list(tmp_path.iterdir()) == []


def test_ill_typed_configuration_names_the_key(files, capsys, tmp_path):
    (tmp_path / "bad.yaml").write_text("options: {validation: ten}\n")
    code, _, err = run(["fit", str(files / "train.extxyz"), "-o", str(tmp_path / "m.pt"), "--config", str(tmp_path / "bad.yaml")], capsys)
    assert code == 2 and "options.validation" in err and "'ten'" in err
    assert not (tmp_path / "m.pt").exists()


def test_eval_on_unlabelled_or_renamed_files_names_the_keys(files, fitted, capsys, tmp_path):
    for name in ("unlabelled", "renamed"):
        code, _, err = run(["eval", str(fitted), str(files / f"{name}.extxyz"), "--plot", str(tmp_path / "p.png")], capsys)
        assert code == 2 and "no structure has energy under the key 'energy'" in err, err
    code, out, _ = run(["eval", str(fitted), str(files / "renamed.extxyz"), "--energy-key", "REF_energy", "--forces-key", "REF_forces",
                        "--plot", str(tmp_path / "p.png")], capsys)
    assert code == 0 and "forces" in out


def test_the_fit_writes_a_log_a_report_and_the_configuration_used(files, fitted):
    log = fitted.with_suffix(".log").read_text()
    assert "read 8 training structures" in log and "using 1 thread(s) (--threads)" in log and "solved the projected-process" in log
    report = read_report(str(fitted.with_suffix(".report.yaml")))
    assert set(report["errors_meV"]) == {"train", "test"}
    for table in report["errors_meV"].values():
        assert table["energy"]["mae"] > 0 and table["forces"]["count"] > 0
    assert report["chosen"]["kernel"] == "wigner" and report["configuration"]["kernel"]["nu_max"] == 2
    assert report["configuration"]["options"]["seed"] == 3
    assert report["data"]["train"]["sha256"] == hashlib.sha256((files / "train.extxyz").read_bytes()).hexdigest()
    assert report["data"]["train"]["structures"] == 8 and report["data"]["test"]["structures"] == 3
    assert report["versions"]["torch"] == torch.__version__.split("+")[0] or report["versions"]["torch"] == torch.__version__
    assert report["versions"]["acdc-potential"] == __version__
    assert report["threads"] == 1 and report["peak_memory_GB"] > 0
    # the peak so far after every timed step of the fit
    assert set(report["peak_memory_after_GB"]) == set(report["timings_s"]) - {"total"}
    assert min(report["peak_memory_after_GB"].values()) > 0
    # without tuning (SMALL) every row goes straight into the final solve: no tuning sample's design matrix
    assert {"survey", "radial integrals", "solve", "errors", "total"} <= set(report["timings_s"]) and "design matrix" not in report["timings_s"]
    assert any("isolated-atom energies" in w for w in report["warnings"])
    # not tuned, so not calibrated: the test set's table has energies and atoms, no force uncertainty
    assert report["uncertainties"]["calibration"] is None and set(report["uncertainties"]["test"]) == {"energy", "atoms"}
    assert 0.0 <= report["uncertainties"]["test"]["energy"]["within_1"] <= report["uncertainties"]["test"]["energy"]["within_2"] <= 1.0
    assert fitted.with_suffix(".test-calibration.png").is_file()
    # the configuration written beside the model refits the same model settings
    used = FitConfig.from_yaml(str(fitted.with_suffix(".config.yaml")))
    assert used.to_dict() == FitConfig.from_dict(report["configuration"]).to_dict()
    assert used.kernel.nu_max == 2 and used.sparse.n == 8


def test_eval_extends_the_report(files, fitted, capsys, tmp_path):
    code, out, _ = run(["eval", str(fitted), str(files / "test.extxyz"), "--plot", str(tmp_path / "p.png")], capsys)
    assert code == 0 and "added to the report" in out
    report = read_report(str(fitted.with_suffix(".report.yaml")))
    evaluation = report["evaluations"]["test"]
    assert evaluation["errors_meV"]["energy"]["mae"] == pytest.approx(report["errors_meV"]["test"]["energy"]["mae"], rel=1e-9)
    assert evaluation["data"]["sha256"] == report["data"]["test"]["sha256"]
    assert evaluation["uncertainties"] == report["uncertainties"]["test"]


def test_threads_are_honoured(files, fitted, capsys, tmp_path):
    torch.set_num_threads(2)
    code, out, _ = run(["eval", str(fitted), str(files / "test.extxyz"), "--plot", str(tmp_path / "p.png"), "--threads", "1"], capsys)
    assert code == 0 and torch.get_num_threads() == 1 and "using 1 thread(s) (--threads)" in out
    calculator = ACDCCalculator(str(fitted), uncertainty_threshold=None, threads=2)
    atoms = ase.io.read(str(files / "test.extxyz"), 0)
    atoms.calc = calculator
    atoms.get_potential_energy()
    assert torch.get_num_threads() == 2
    # the default: one thread below 100 atoms
    atoms.calc = ACDCCalculator(str(fitted), uncertainty_threshold=None)
    atoms.get_potential_energy()
    assert torch.get_num_threads() == 1


def test_version(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["--version"])
    assert exit.value.code == 0 and capsys.readouterr().out.startswith(f"acdc-potential {__version__} (torch ")


def test_config_template_is_written_and_parses_to_the_defaults(tmp_path, capsys):
    assert main(["config", "-o", str(tmp_path / "c.yaml")]) == 0
    text = (tmp_path / "c.yaml").read_text()
    assert text.count("\n  # ") > 20
    assert FitConfig.from_yaml(str(tmp_path / "c.yaml")).to_dict() == FitConfig().to_dict()


@pytest.mark.parametrize(
    "atoms, message",
    [
        (ase.Atoms(), "no atoms"),
        (ase.Atoms("OH2", positions=[[0, 0, 0], [0.96, 0, 0], [np.nan, 0, 0]]), "positions contain NaN or infinity"),
        (ase.Atoms("OH2", positions=[[0, 0, 0], [0.96, 0, 0], [0.97, 0, 0]]), r"atoms 1 and 2 are 0.01 A apart \(overlapping atoms"),
        (ase.build.molecule("CH3Cl"), r"atomic numbers \[17\] \(Cl\) are not among the model's species \[1, 6, 8\] \(H, C, O\)"),
    ],
)
def test_calculator_gives_one_clear_error_per_bad_structure(fitted, atoms, message):
    atoms.calc = ACDCCalculator(str(fitted), uncertainty_threshold=None)
    with pytest.raises(StructureError, match=message):
        atoms.get_potential_energy()


def test_the_exported_file_refuses_overlapping_and_non_finite_atoms_itself(fitted):
    from metatomic_ase import MetatomicCalculator

    calculator = MetatomicCalculator(str(fitted))
    atoms = ase.Atoms("OH2", positions=[[0, 0, 0], [0.96, 0, 0], [0.97, 0.0, 0.0]])
    atoms.calc = calculator
    with pytest.raises(Exception, match=r"system 0: two atoms are 0.01 A apart"):
        atoms.get_potential_energy()


def test_isolated_atoms_in_the_training_file_fix_the_baseline(files, capsys, tmp_path):
    frames = [relabelled(a, "energy", "forces") for a in ase.io.read(str(files / "train.extxyz"), ":")]
    isolated = {"H": -10.7, "C": -48.9, "O": -102.6}
    for symbol, energy in isolated.items():
        atom = ase.Atoms(symbol)
        atom.info["energy"] = energy
        atom.arrays["forces"] = np.zeros((1, 3))
        frames.append(atom)
    ase.io.write(str(tmp_path / "with_atoms.extxyz"), frames)
    code, _, _ = run(["fit", str(tmp_path / "with_atoms.extxyz"), "-o", str(tmp_path / "m.pt"), "--config", str(files / "small.yaml")], capsys)
    assert code == 0
    model = SparseKRRModel.load(str(tmp_path / "m.ckpt"))
    assert model.baseline.energies == pytest.approx({1: -10.7, 6: -48.9, 8: -102.6})
    assert not any("isolated-atom energies" in w for w in model.warnings)


def test_without_isolated_atoms_a_warning_gives_the_baseline_and_what_isolated_atoms_get(files):
    from acdc_potential.data import read_structures
    from acdc_potential.fit.driver import fit

    with pytest.warns(BaselineWarning, match=r"the baseline is a least-squares fit on composition \(H .* eV\) and an isolated atom gets H "):
        model = fit(read_structures(str(files / "train.extxyz")), FitConfig.from_dict(SMALL))
    isolated = model.predict([ase.Atoms("H")], forces=False, stress=False)["energy"].item()
    assert f"H {isolated:.4f}" in model.warnings[-1]


def test_atoms_moved_onto_each_other_during_a_run_are_refused(fitted):
    """After the first call, a step that only moves atoms is checked by the exported model itself."""
    atoms = ase.io.read(str(EXAMPLES / "ethanol_test.extxyz"), 0)
    atoms.calc = ACDCCalculator(str(fitted), uncertainty_threshold=None)
    atoms.get_potential_energy()
    atoms.positions[1] = atoms.positions[0] + [0.01, 0.0, 0.0]
    with pytest.raises(StructureError, match=r"^system 0: two atoms are 0.01 A apart \(overlapping atoms"):
        atoms.get_potential_energy()
    atoms.positions[1, 0] = np.nan
    with pytest.raises(StructureError, match="positions contain NaN or infinity"):
        atoms.get_potential_energy()


def test_eval_refuses_bad_structures_with_one_line(files, fitted, capsys, tmp_path):
    code, _, err = run(["eval", str(fitted), str(files / "overlapping.extxyz"), "--plot", str(tmp_path / "p.png")], capsys)
    assert code == 2 and "structure 2 (C2H6O): atoms 0 and 3 are 0.02 A apart" in err and len(err.strip().splitlines()) == 1
    chlorine = ase.build.molecule("CH3Cl")
    chlorine.info["energy"] = -1.0
    ase.io.write(str(tmp_path / "chlorine.extxyz"), [chlorine])
    code, _, err = run(["eval", str(fitted), str(tmp_path / "chlorine.extxyz"), "--no-forces", "--plot", str(tmp_path / "p.png")], capsys)
    assert code == 2 and "atomic numbers [17] (Cl) are not among the model's species [1, 6, 8] (H, C, O)" in err
    assert not (tmp_path / "p.png").exists()


def test_the_report_round_trips(fitted, tmp_path):
    from acdc_potential.fit.report import write_report

    report = read_report(str(fitted.with_suffix(".report.yaml")))
    write_report(str(tmp_path / "again.yaml"), report)
    assert read_report(str(tmp_path / "again.yaml")) == report


def test_a_bad_test_file_stops_the_fit_before_it_starts(files, capsys, tmp_path):
    code, _, err = run(["fit", str(files / "train.extxyz"), "-o", str(tmp_path / "m.pt"), "--test", str(files / "unlabelled.extxyz"),
                        "--config", str(files / "small.yaml")], capsys)
    assert code == 2 and "unlabelled.extxyz: no structure has energy" in err
    assert list(tmp_path.iterdir()) == []


def test_eval_names_the_structure_by_its_place_in_the_file(files, fitted, capsys, tmp_path):
    frames = ase.io.read(str(files / "test.extxyz"), ":")
    nitrogen = ase.build.molecule("CH3CN")
    nitrogen.info["energy"] = -1.0
    ase.io.write(str(tmp_path / "mixed.extxyz"), frames[:2] + [nitrogen])
    code, _, err = run(["eval", str(fitted), str(tmp_path / "mixed.extxyz"), "--no-forces", "--plot", str(tmp_path / "p.png")], capsys)
    assert code == 2 and "structure 2 (C2H3N): atomic numbers [7] (N)" in err


def test_eval_leaves_out_what_it_is_told_to(files, fitted, capsys, tmp_path):
    code, out, _ = run(["eval", str(fitted), str(files / "test.extxyz"), "--no-forces", "--plot", str(tmp_path / "p.png")], capsys)
    errors, calibration = out.split("uncertainties (calibrated")
    rows = [line.split()[1] for line in errors.splitlines() if line.startswith("test ")]
    assert code == 0 and rows == ["energy"]
    assert [line.split()[1] for line in calibration.splitlines() if line.startswith("test ")] == ["energy"]
    assert (tmp_path / "p-calibration.png").is_file()


def test_the_report_records_the_command_it_was_given(fitted):
    report = read_report(str(fitted.with_suffix(".report.yaml")))
    assert report["command"][:3] == ["acdc-potential", "fit", str(fitted.parent / "train.extxyz")]
    assert "--threads" in report["command"]
