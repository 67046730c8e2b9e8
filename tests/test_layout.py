"""The package's structure: behaviour kept across the restructuring, the deployable model apart
from fitting, safe checkpoints, one set of defaults."""

import ast
import inspect
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import ase.io
import numpy as np
import pytest
import torch
import yaml

from acdc_potential.calculator import ACDCCalculator
from acdc_potential.cli import main
from acdc_potential.config import FitConfig, FitOptions, Regularisers, SparseConfig
from acdc_potential.descriptors.radial import DensityHypers
from acdc_potential.errors import CheckpointError
from acdc_potential.fit import driver, tuning
from acdc_potential.fit.checkpoint import SparseKRRModel
from acdc_potential.model.export import export_model, in_dtype

DATA = Path(__file__).parent / "data"
REFERENCES = ["ethanol_wigner3", "copper_wigner4", "ethanol_polynomial"]
# what only fitting needs; none of it may reach the exported file or the model package
FIT_ONLY = [
    "order_feature_sums",
    "_pair_tangent_sums",
    "_feature_tangent_sums",
    "order3_reduction",
    "order_features",
    "structure_derivatives",
    "select_hyperparameters",
    "build_design_matrix",
]


# The projected-process variance is a difference of kernel sums far larger than itself (README,
# "Known limitations"), so float64 resolves the uncertainties less well than the energies: for the
# copper nu_max = 4 reference, 1.75e-10 eV on 0.018 eV (1e-8 relative) with MKL on an AVX2 machine,
# where the machine that recorded the files agreed to 1e-10. Energies, forces and stress keep 1e-10.
UNCERTAINTY_TOLERANCE = 1e-8


def reference(stem):
    return SparseKRRModel.load(str(DATA / f"{stem}.ckpt")), ase.io.read(str(DATA / f"{stem}.extxyz"), ":"), np.load(DATA / f"{stem}.npz")


def close(got, expected, tolerance=1e-10):
    """Equal to ``tolerance`` relative to the largest value of ``expected`` (NaN where it is NaN)."""
    got, expected = np.asarray(got, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    assert got.shape == expected.shape
    assert np.array_equal(np.isnan(got), np.isnan(expected))
    if np.isnan(expected).all():
        return
    scale = max(float(np.nanmax(np.abs(expected))), 1.0)
    assert float(np.nanmax(np.abs(got - expected))) <= tolerance * scale, float(np.nanmax(np.abs(got - expected)))


@pytest.mark.parametrize("stem", REFERENCES)
def test_old_checkpoints_predict_as_the_old_exported_files(stem):
    """Checkpoints written by the first layout, loaded by this one, predict what the old
    exported files predicted (energies, forces, stress, structure uncertainties but for the label
    noise that version 4 adds) to 1e-10. Atomic
    energy uncertainties were redefined with checkpoint version 4 (the prior variance that the
    sparse environments do not explain; tests/test_uncertainty.py), so they are not compared."""
    model, frames, old = reference(stem)
    result = model.predict(frames, uncertainty=True)
    close(result["energy"], old["file_energy"])
    close(result["forces"], old["file_forces"])
    close(result["stress"], old["file_stress"])
    # version 4 adds the energy regulariser squared per atom: the predictive variance of a label
    noise = model.regularisers.energy**2 * np.array([len(a) for a in frames])
    close(np.sqrt(result["energy_uncertainty"].numpy() ** 2 - noise), old["file_energy_uncertainty"], UNCERTAINTY_TOLERANCE)
    assert model.calibration is None and "forces_uncertainty" not in result


@pytest.mark.parametrize("stem", REFERENCES)
def test_old_checkpoints_export_files_that_predict_as_before(stem, tmp_path):
    model, frames, old = reference(stem)
    path = str(tmp_path / "model.pt")
    export_model(model.potential(), path)
    calculator = ACDCCalculator(path, uncertainty_threshold=None)
    for k, atoms in enumerate(frames):
        atoms.calc = calculator
        close(atoms.get_potential_energy(), old["file_energy"][k])
        noise = model.regularisers.energy**2 * len(atoms)  # added by version 4 (above)
        close(np.sqrt(calculator.get_uncertainty(atoms) ** 2 - noise), old["file_energy_uncertainty"][k], UNCERTAINTY_TOLERANCE)
    close(np.concatenate([a.get_potential_energies() for a in frames]), old["file_energies"])
    close(np.concatenate([a.get_forces() for a in frames]), old["file_forces"])


@pytest.mark.parametrize("stem", REFERENCES)
def test_exported_fitted_models_run_without_the_package_with_consistency_checks(stem, tmp_path):
    """The files the new code exports from the old checkpoints run in a process that never imports
    acdc_potential, with metatomic's check_consistency on, and predict what the old files did."""
    model, _, old = reference(stem)
    path = str(tmp_path / "model.pt")
    model.export(path)
    script = textwrap.dedent(
        f"""
        import sys, json, ase.io, numpy as np
        from metatomic_ase import MetatomicCalculator
        calculator = MetatomicCalculator({path!r}, check_consistency=True)
        energies, forces, stress = [], [], []
        for atoms in ase.io.read({str(DATA / f"{stem}.extxyz")!r}, ":"):
            atoms.calc = calculator
            energies.append(atoms.get_potential_energy())
            forces.append(atoms.get_forces().tolist())
            stress.append(atoms.get_stress(voigt=False).tolist() if atoms.pbc.all() else None)
        imported = any(m.startswith("acdc_potential") for m in sys.modules)
        print(json.dumps({{"energy": energies, "forces": forces, "stress": stress, "imported": imported}}))
        """
    )
    output = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd="/")
    result = __import__("json").loads(output.stdout.strip().splitlines()[-1])
    assert not result["imported"]
    close(result["energy"], old["file_energy"])
    close(np.concatenate([np.asarray(f) for f in result["forces"]]), old["file_forces"])
    if all(s is not None for s in result["stress"]):
        close(np.asarray(result["stress"]), old["file_stress"])


def test_the_model_package_imports_without_fitting_code():
    """A fresh interpreter that imports what ships in the .pt file loads no fitting module,
    nor ase, scipy or tqdm. metatomic itself imports ase and tqdm, so what counts is what the
    model package adds to what metatomic, metatensor and vesin load."""
    code = textwrap.dedent(
        """
        import sys
        import metatensor.torch, metatomic.torch, vesin
        before = set(sys.modules)
        import acdc_potential.model.export, acdc_potential.model.heads, acdc_potential.model.potential
        import acdc_potential.model.uncertainty
        added = set(sys.modules) - before
        assert "acdc_potential.model.heads" in added
        print(",".join(sorted(m for m in added if m.startswith("acdc_potential.fit") or m.split(".")[0] in ("ase", "scipy", "tqdm"))))
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "", result.stdout


def test_model_descriptor_and_kernel_sources_never_import_fit():
    package = Path(__file__).parent.parent / "acdc_potential"
    sources = [*(package / "model").glob("*.py"), *(package / "descriptors").glob("*.py"), *(package / "kernels").rglob("*.py")]
    assert len(sources) > 10
    for path in sources:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                module = "." * node.level + (node.module or "")
                assert not module.lstrip(".").startswith("fit") and not module.startswith("acdc_potential.fit"), (path, module)
            if isinstance(node, ast.Import):
                assert not any(alias.name.startswith("acdc_potential.fit") for alias in node.names), path


@pytest.mark.parametrize("stem", REFERENCES)
def test_exported_code_holds_no_fit_only_function(stem, tmp_path):
    model, _, _ = reference(stem)
    path = tmp_path / "model.pt"
    export_model(model.potential(), str(path))
    with zipfile.ZipFile(path) as archive:
        code = "\n".join(archive.read(name).decode() for name in archive.namelist() if name.endswith(".py"))
    assert "WignerKernels" in code or "PolynomialHead" in code  # the archive's code was read
    for name in FIT_ONLY:
        assert f"def {name}(" not in code, name
    assert "acdc_potential.fit" not in code


def crafted_checkpoint(tmp_path, change):
    state = torch.load(DATA / "ethanol_wigner3.ckpt", weights_only=True)
    change(state)
    path = tmp_path / "crafted.ckpt"
    torch.save(state, path)
    return str(path)


def write_marker(path="marker"):
    """Would leave a file behind if a checkpoint could make the loader call it."""
    Path(path).write_text("called")


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s: s["kernel"]["hypers"].update({"class": "subprocess:run"}), "unknown class 'subprocess:run'"),
        (lambda s: s["kernel"]["hypers"].update({"class": "test_layout:write_marker"}), "unknown class"),
        (lambda s: s["kernel"].update({"kind": "test_layout:write_marker"}), "unknown kernel"),
        (lambda s: s.update({"format": "acdc-potential/sparse-krr", "version": 99}), "known version"),
    ],
)
def test_crafted_checkpoints_are_refused_and_run_nothing(tmp_path, monkeypatch, change, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match=message):
        SparseKRRModel.load(crafted_checkpoint(tmp_path, change))
    assert not (tmp_path / "marker").exists()


def test_crafted_checkpoints_naming_features_are_refused(tmp_path):
    """A version-4 file names its polynomial kernel's features by a name (only ``power_spectrum``
    exists); a current one by body orders (1, 2, 3)."""
    state = SparseKRRModel.load(str(DATA / "ethanol_polynomial.ckpt")).to_dict()
    old = {**state, "version": 4, "kernel": {**state["kernel"], "hypers": {"zeta": 4, "features": "os:system"}}}
    torch.save(old, tmp_path / "crafted.ckpt")
    with pytest.raises(CheckpointError, match="unknown features 'os:system'"):
        SparseKRRModel.load(str(tmp_path / "crafted.ckpt"))
    state["kernel"]["hypers"]["orders"] = [2, 4]
    torch.save(state, tmp_path / "orders.ckpt")
    with pytest.raises(ValueError, match=r"invariant orders must be a non-empty subset of \[1, 2, 3\], got \[2, 4\]"):
        SparseKRRModel.load(str(tmp_path / "orders.ckpt"))


class Payload:
    def __reduce__(self):
        return (write_marker, (str(Path.cwd() / "marker"),))


def test_pickled_objects_in_a_checkpoint_are_not_unpickled(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"format": "acdc-potential/sparse-krr", "version": 2, "payload": Payload()}, tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        SparseKRRModel.load(str(tmp_path / "evil.ckpt"))
    assert not (tmp_path / "marker").exists()


def test_checkpoints_round_trip_in_the_current_version(tmp_path):
    model, frames, _ = reference("copper_wigner4")
    model.save(str(tmp_path / "again.ckpt"))
    state = torch.load(tmp_path / "again.ckpt", weights_only=True)
    assert (state["format"], state["version"]) == ("acdc-potential/sparse-krr", 8)
    again = SparseKRRModel.load(str(tmp_path / "again.ckpt"))
    for key, value in model.predict(frames[:1], uncertainty=True).items():
        torch.testing.assert_close(again.predict(frames[:1], uncertainty=True)[key], value, equal_nan=True, rtol=0, atol=0)


def test_version_2_checkpoints_keep_the_channel_weights_they_were_fitted_with(tmp_path):
    """Format 2 had no ``channel_weights``: its Wigner models used ``8 pi^2 / (2l + 1)``."""
    model, frames, old = reference("copper_wigner4")
    assert model.kernel.wigner_hypers.channel_weights == "inverse_dimension"  # from format 1
    model.save(str(tmp_path / "current.ckpt"))
    state = torch.load(tmp_path / "current.ckpt", weights_only=True)
    del state["kernel"]["hypers"]["wigner"]["channel_weights"]
    torch.save({**state, "version": 2}, tmp_path / "version2.ckpt")
    loaded = SparseKRRModel.load(str(tmp_path / "version2.ckpt"))
    assert loaded.kernel.wigner_hypers.channel_weights == "inverse_dimension"
    torch.testing.assert_close(loaded.predict(frames[:1])["energy"], model.predict(frames[:1])["energy"], rtol=0, atol=0)
    # the same model read with today's default weights would predict something else
    state["kernel"]["hypers"]["wigner"]["channel_weights"] = "uniform"
    torch.save(state, tmp_path / "uniform.ckpt")
    uniform = SparseKRRModel.load(str(tmp_path / "uniform.ckpt"))
    assert abs(float(uniform.predict(frames[:1])["energy"][0] - model.predict(frames[:1])["energy"][0])) > 1e-3


def test_library_defaults_are_the_command_line_defaults(tmp_path, capsys):
    config = FitConfig()
    assert config.density == DensityHypers()
    assert config.regularisers == Regularisers()
    signature = inspect.signature(driver.fit_kernel).parameters
    options, sparse = FitOptions(), SparseConfig()
    for name in ("energies", "forces", "stress", "tune"):
        assert signature[name].default == getattr(options, name), name
    assert signature["design_memory"].default == options.design_memory * 1e9
    assert signature["n_sparse"].default == sparse.n and signature["selection"].default == sparse.selection
    tuning_signature = inspect.signature(tuning.select_hyperparameters).parameters
    assert tuning_signature["validation"].default == options.validation and tuning_signature["seed"].default == options.seed
    assert inspect.signature(driver.fit).parameters["config"].default is None  # None means FitConfig()
    # what `acdc-potential config` prints is the same configuration
    assert main(["config"]) == 0
    assert FitConfig.from_dict(yaml.safe_load(capsys.readouterr().out)).to_dict() == config.to_dict()


def test_exported_metadata_names_the_package_and_the_methods(tmp_path):
    from metatomic.torch import load_atomistic_model

    for stem, method in [("ethanol_wigner3", "Wigner kernels"), ("ethanol_polynomial", "On representing chemical environments")]:
        model, _, _ = reference(stem)
        path = str(tmp_path / f"{stem}.pt")
        model.export(path)
        metadata = load_atomistic_model(path).metadata()
        assert metadata.name == "acdc-potential"
        assert any(method in r for r in metadata.references["architecture"])
        assert any("Gaussian Approximation Potentials" in r for r in metadata.references["architecture"])
        assert any("acdc-potential" in r for r in metadata.references["implementation"])


def test_float32_export_gives_energies_and_uncertainties(tmp_path):
    """A float32 file's energy to float32's precision, and its uncertainties as the float64 file's: they
    are computed in float64 (in float32 the unexplained variance of these environments rounded to zero)."""
    model, frames, old = reference("ethanol_wigner3")
    paths = {dtype: str(tmp_path / f"model-{dtype}.pt") for dtype in ("float64", "float32")}
    for name, path in paths.items():
        export_model(model.potential(), path, dtype=getattr(torch, name))
    calculator = ACDCCalculator(paths["float32"])  # requests the uncertainty at every call (the warning)
    atoms = frames[0]
    atoms.calc = calculator
    assert abs(atoms.get_potential_energy() - old["file_energy"][0]) < 1e-4 * abs(old["file_energy"][0])
    double = ACDCCalculator(paths["float64"], uncertainty_threshold=None)
    for each in (calculator, double):
        each.threads = 1
    for per_atom in (False, True):
        expected = double.get_uncertainty(atoms.copy(), per_atom=per_atom)
        np.testing.assert_allclose(calculator.get_uncertainty(atoms.copy(), per_atom=per_atom), expected, rtol=1e-4)
        assert np.all(np.asarray(expected) > 0)


@pytest.mark.parametrize("name", ["ethanol_wigner3", "ethanol_polynomial"])
def test_a_float32_copy_keeps_the_parts_of_the_variances_in_float64(name):
    """``in_dtype``: the buffers named by the head's ``variance_parts()`` stay float64 (and a tensor two of
    them share stays one tensor), every other floating buffer takes float32; the original is untouched."""
    model, _, _ = reference(name)
    potential = model.potential()
    single = in_dtype(potential, torch.float32)
    parts = potential.head.variance_parts()
    assert parts
    for full_name, buffer in single.named_buffers():
        if not buffer.is_floating_point():
            continue
        inside = any(full_name.startswith(f"head.{part}.") or full_name == f"head.{part}" for part in parts)
        assert buffer.dtype == (torch.float64 if inside else torch.float32), full_name
    if "sparse_features" in parts:
        assert single.head.sparse_features.data_ptr() == single.head.state.sparse.data_ptr()
    assert all(b.dtype == torch.float64 for b in potential.buffers() if b.is_floating_point())


def test_a_molecule_in_a_box_without_periodicity_is_predicted_as_without_the_box():
    """Cluster files often carry a box with pbc false (the gold set does): metatomic refuses a
    cell vector along a non-periodic direction, so the box must not reach the model."""
    model, frames, _ = reference("ethanol_wigner3")
    boxed = frames[0].copy()
    boxed.cell = [12.0, 13.0, 14.0]
    boxed.pbc = False
    bare = frames[0].copy()
    bare.cell = None
    bare.pbc = False
    got, expected = model.predict([boxed]), model.predict([bare])
    for key in ("energy", "forces"):
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0)
