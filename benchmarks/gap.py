"""GAP (QUIP's ``gap_fit`` and quippy's ASE calculator), the reference the benchmarks compare against.

Needs the pip package ``quippy-ase`` (0.10.3), which ships the ``quippy`` module with
the ``gap_fit`` binary inside it. The GAP settings are those of the fitting
issue: SOAP n_max=8, l_max=6, cutoff 5 A, zeta=4, delta=0.5, CUR sparse points per
species, add_species=T, default_sigma={0.002 0.04 0.04 0}, e0_method=average.

Conventions of QUIP's reader: labels under ``REF_*`` keys (so that nothing is mistaken
for a calculator result), the virial ``-stress * V`` (eV) instead of the stress, and a
lattice on every structure; molecules and clusters get a box wider than the cutoff on
every side with ``pbc`` false, which leaves their energy unchanged.
"""

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

CUTOFF = 5.0
N_SPARSE = 1000
SOAP = (
    "soap n_max=8 l_max=6 cutoff={cutoff} cutoff_transition_width=1.0 atom_sigma=0.5 "
    "zeta=4 delta=0.5 covariance_type=dot_product sparse_method=cur_points n_sparse={n_sparse} add_species=T"
)


def gap_fit_binary() -> str:
    """The ``gap_fit`` executable that ``quippy-ase`` ships inside the ``quippy`` package.

    The ``gap_fit`` on the PATH is a Python wrapper around it; calling the binary itself
    keeps the interpreter out of the measured time and memory.
    """
    import importlib.util

    spec = importlib.util.find_spec("quippy")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("quippy not found: `pip install quippy-ase` in this environment")
    binary = Path(list(spec.submodule_search_locations)[0]) / "gap_fit"
    if not binary.is_file():
        raise FileNotFoundError(f"{binary} missing: the quippy-ase installation is incomplete")
    return str(binary)


def boxed(atoms, margin: float = 2 * CUTOFF + 2.0):
    """A copy of ``atoms`` with a lattice QUIP accepts.

    Fully periodic cells are kept; otherwise the structure is centred in an orthorhombic
    box ``extent + margin`` wide with ``pbc`` false, so that no periodic image is within
    the cutoff even for a code that ignores ``pbc``.
    """
    atoms = atoms.copy()
    if all(atoms.pbc):
        return atoms
    extent = atoms.positions.max(axis=0) - atoms.positions.min(axis=0)
    atoms.set_cell(np.diag(extent + margin))
    atoms.pbc = False
    atoms.center()
    return atoms


def training_frames(structures) -> List:
    """``ase.Atoms`` for gap_fit from :class:`acdc_potential.data.Labelled` structures.

    Adds ``REF_energy`` (eV), ``REF_forces`` ``[n_atoms, 3]`` (eV/A) and, for periodic
    structures with a stress ``[3, 3]`` (eV/A^3), ``REF_virial = -stress * V`` (eV, 9
    components); drops any attached calculator and other labels.
    """
    frames = []
    for structure in structures:
        atoms = boxed(structure.atoms)
        atoms.calc = None
        atoms.info = {}
        for name in list(atoms.arrays):
            if name not in ("numbers", "positions"):
                del atoms.arrays[name]
        if structure.energy is not None:
            atoms.info["REF_energy"] = float(structure.energy)
        if structure.forces is not None:
            atoms.arrays["REF_forces"] = np.asarray(structure.forces, dtype=float)
        if structure.stress is not None:
            atoms.info["REF_virial"] = (-np.asarray(structure.stress, dtype=float) * atoms.get_volume()).ravel()
        frames.append(atoms)
    return frames


def write_training_file(structures, path: str) -> None:
    """Write ``structures`` as the extxyz file gap_fit reads (see :func:`training_frames`)."""
    import ase.io

    ase.io.write(path, training_frames(structures), format="extxyz")


def gap_fit_command(train_path: str, xml_path: str, n_sparse: int = N_SPARSE) -> List[str]:
    """The gap_fit command line with the issue's settings (``n_sparse`` per species)."""
    soap = SOAP.format(cutoff=CUTOFF, n_sparse=n_sparse)
    return [
        gap_fit_binary(),
        f"at_file={train_path}",
        f"gap={{{soap}}}",
        "default_sigma={0.002 0.04 0.04 0}",
        "e0_method=average",
        "energy_parameter_name=REF_energy",
        "force_parameter_name=REF_forces",
        "virial_parameter_name=REF_virial",
        "sparse_separate_file=F",
        "do_copy_at_file=F",
        "rnd_seed=42",
        f"gap_file={xml_path}",
    ]


def run_gap_fit(train_path: str, xml_path: str, n_sparse: int = N_SPARSE, log_path: Optional[str] = None) -> Dict:
    """Run gap_fit and measure it.

    :return: ``{"fit_time": wall seconds, "peak_memory": peak resident set of the
        gap_fit process in MB, "command": the command as one shell line}``.
    :raises RuntimeError: gap_fit failed (the end of its log is in the message).
    """
    command = gap_fit_command(train_path, xml_path, n_sparse)
    shell_line = " ".join(f"'{part}'" if " " in part else part for part in command)
    print(shell_line, file=sys.stderr, flush=True)
    log_path = log_path or str(xml_path) + ".log"
    start = time.perf_counter()
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        # wait4 gives the resource usage of this child alone, whatever else the caller ran
        _, status, usage = os.wait4(process.pid, 0)
    elapsed = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0 or not Path(xml_path).is_file():
        tail = Path(log_path).read_text().splitlines()[-15:]
        raise RuntimeError(f"gap_fit failed (log {log_path}):\n" + "\n".join(tail))
    return {"fit_time": elapsed, "peak_memory": usage.ru_maxrss / 1024.0, "command": shell_line}


def fit_or_reuse(train_structures, gap_dir: str, tag: str, n_sparse: int = N_SPARSE) -> Dict:
    """The GAP ``{gap_dir}/{tag}.xml``, fitted now unless a fit of the same data is there.

    A fit stores its measurements in ``{tag}.json`` beside the xml file; a later call with
    the same number of training structures and sparse points reuses both, so the table
    still shows the fit time and memory of the original fit.

    :return: :func:`run_gap_fit`'s dict plus ``"xml"`` (path), ``"n_train"``,
        ``"n_sparse"`` and ``"reused"`` (bool).
    """
    import json

    directory = Path(gap_dir)
    directory.mkdir(parents=True, exist_ok=True)
    xml_path, record_path = directory / f"{tag}.xml", directory / f"{tag}.json"
    wanted = {"n_train": len(train_structures), "n_sparse": n_sparse}
    if xml_path.is_file() and record_path.is_file():
        record = json.loads(record_path.read_text())
        if all(record.get(key) == value for key, value in wanted.items()):
            return {**record, "reused": True}
    train_path = directory / f"{tag}_train.xyz"
    write_training_file(train_structures, str(train_path))
    record = {**run_gap_fit(str(train_path), str(xml_path), n_sparse), **wanted, "xml": str(xml_path)}
    record_path.write_text(json.dumps(record, indent=1))
    return {**record, "reused": False}


def calculator(xml_path: str):
    """quippy's ASE calculator for a fitted GAP xml file."""
    from quippy.potential import Potential

    return Potential(param_filename=str(xml_path))


def predict(xml_path: str, structures) -> Dict[str, List[np.ndarray]]:
    """GAP predictions for :class:`~acdc_potential.data.Labelled` structures.

    :return: ``{"energy": [()] eV, "forces": [[n_atoms, 3]] eV/A, "stress": [[3, 3]]
        eV/A^3}``, one entry per structure (the stress is NaN for non-periodic ones),
        the form :func:`acdc_potential.evaluation.pairs_of` takes.
    """
    gap = calculator(xml_path)
    predictions: Dict[str, List[np.ndarray]] = {"energy": [], "forces": [], "stress": []}
    for structure in structures:
        atoms = boxed(structure.atoms)
        atoms.calc = gap
        predictions["energy"].append(np.array(atoms.get_potential_energy()))
        predictions["forces"].append(np.array(atoms.get_forces()))
        stress = atoms.get_stress(voigt=False) if structure.periodic else np.full((3, 3), np.nan)
        predictions["stress"].append(np.array(stress))
    return predictions


def time_md(atoms, calc, steps: int = 30, blocks: int = 3, warmup: int = 3, timestep_fs: float = 0.5, temperature: float = 300.0) -> Dict:
    """Cost of velocity-Verlet MD with ``calc`` (one energy + forces evaluation per step).

    ``blocks`` blocks of ``steps`` steps are timed one after the other; on a shared
    machine the fastest block is the least disturbed measurement.

    :return: ``{"us_per_atom_step": microseconds per atom per step in the fastest block,
        "median_us_per_atom_step": the median over blocks, "steps": steps per block,
        "n_atoms": atoms}``; the ``warmup`` steps before timing are not counted.
    """
    from ase import units
    from ase.md.velocitydistribution import thermalize_momenta
    from ase.md.verlet import VelocityVerlet

    atoms = atoms.copy()
    atoms.calc = calc
    thermalize_momenta(atoms, temperature_K=temperature, rng=np.random.default_rng(0))
    dynamics = VelocityVerlet(atoms, timestep=timestep_fs * units.fs)
    dynamics.run(warmup)
    per_atom_step = []
    for _ in range(blocks):
        # each step moves the atoms, so the calculator's cache never spares an evaluation
        start = time.perf_counter()
        dynamics.run(steps)
        per_atom_step.append(1e6 * (time.perf_counter() - start) / (steps * len(atoms)))
    return {
        "us_per_atom_step": min(per_atom_step),
        "median_us_per_atom_step": float(np.median(per_atom_step)),
        "steps": steps,
        "n_atoms": len(atoms),
    }


def subsample(structures: Sequence, count: Optional[int], seed: int = 0) -> List:
    """``count`` structures drawn without replacement in file order (all when ``count`` is None)."""
    if count is None or count >= len(structures):
        return list(structures)
    chosen = np.sort(np.random.default_rng(seed).choice(len(structures), count, replace=False))
    return [structures[k] for k in chosen]
