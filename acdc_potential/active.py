"""On-the-fly active learning (``acdc-potential learn``), as FLARE does it: Langevin MD with the
current model; where the calibrated uncertainty of an atom's forces is too large, the structure
is labelled by a reference ASE calculator, added to the fit and the model updated without a refit
from scratch (:class:`~acdc_potential.fit.incremental.IncrementalFit`), and the MD goes on with it
(docs/equations.md, "Incremental updates and active learning").

The steps (:meth:`ActiveLearner.run`): the starting set (label the starting structures that carry
no energy and forces), the first model (:func:`~acdc_potential.fit.driver.fit` with the
configuration, tuned and calibrated), then MD from each starting structure at each temperature in
the order given (:class:`~acdc_potential.config.LearnConfig`; ``max_labels`` counts over all of
them) with a check of the uncertainties every ``interval`` steps, and the final export. The folder:

- ``labelled.extxyz``: every labelled structure, rewritten (atomically) as soon as the reference
  returns one;
- ``resume.pt``: the model, where the MD is (its frame, with momenta), which structure each sparse
  environment comes from and what the run is (starting structures, temperatures, reference),
  written atomically after every update and every tenth of a segment; ``model.ckpt`` and
  ``state.yaml`` (every labelling decision so far) beside it, for people;
- ``learn.log``: one line per uncertainty check and per update;
- ``model.pt``: the exported model, at the end.

The same run again resumes from ``resume.pt``, with the kernel rows of every labelled structure
(those labelled after it was written too), and refuses a folder of another run. The reference is
named on the command line only (``MODULE:CLASS``): nothing read from the folder chooses code to run.
"""

import dataclasses
import importlib
import math
import os
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import ase
import numpy as np
import torch
import yaml
from ase import units
from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes
from ase.calculators.singlepoint import SinglePointCalculator
from ase.stress import full_3x3_to_voigt_6_stress
from ase.io import write
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import Stationary, thermalize_momenta

from .config import FitConfig
from .data import Labelled, labels_of, read_structures, validate
from .errors import CheckpointError, StructureError
from .fit.checkpoint import SparseKRRModel
from .fit.driver import fit
from .fit.incremental import IncrementalFit
from .fit.report import FitLog
from .fit.sources import digest_of
from .inference import run_module

RESUME_VERSION = 1


def reference_calculator(spec: str, arguments: Optional[Dict] = None) -> Calculator:
    """A new instance of the ASE calculator class ``spec`` = ``MODULE:CLASS`` made with the keyword
    ``arguments`` (plain data), e.g. ``ase.calculators.emt:EMT`` or ``tblite.ase:TBLite`` (GFN2-xTB)
    with ``{"verbosity": 0}``."""
    module_name, _, name = spec.partition(":")
    if not module_name or not name:
        raise ValueError(f"--reference {spec!r}: expected MODULE:CLASS, e.g. ase.calculators.emt:EMT")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"--reference {spec}: cannot import {module_name} ({error})") from None
    factory = getattr(module, name, None)
    if factory is None or not callable(factory):
        raise ValueError(f"--reference {spec}: {module_name} has no calculator class {name}")
    try:
        return factory(**(arguments or {}))
    except TypeError as error:
        raise ValueError(f"--reference {spec}: cannot be made with the arguments {arguments or {}} ({error})") from None


def label(atoms: ase.Atoms, reference: Calculator, stress: bool, index: int = 0) -> Labelled:
    """``atoms`` (positions and cell only) labelled by ``reference``: energy, forces and, for a
    periodic cell when ``stress`` and the calculator gives it, stress."""
    frame = bare(atoms)
    frame.calc = reference
    energy, forces, value = frame.get_potential_energy(), frame.get_forces(), None
    if stress and frame.pbc.all():
        try:
            value = frame.get_stress(voigt=False)
        except (PropertyNotImplementedError, NotImplementedError):
            value = None
    frame.calc = SinglePointCalculator(frame, energy=energy, forces=forces, **({} if value is None else {"stress": value}))
    return Labelled(frame, float(energy), np.asarray(forces, dtype=np.float64), value, index=index)


def bare(atoms: ase.Atoms, momenta: bool = False) -> ase.Atoms:
    """A copy of ``atoms``' numbers, positions, cell and periodicity (and momenta) only."""
    return ase.Atoms(numbers=atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=atoms.pbc, momenta=atoms.get_momenta() if momenta else None)


def sparse_candidates(sigma: torch.Tensor, limit: float, most: int, centres: torch.Tensor) -> List[int]:
    """The atoms to make sparse environments: at most ``most`` of those whose force uncertainty
    ``sigma [n]`` exceeds half the ``limit``, the most uncertain first, among the ``centres`` ``[n]``
    (bool: the atoms of species that carry a learned energy, so that a single-centre model stays one)."""
    sigma = torch.where(centres, sigma, torch.zeros_like(sigma))
    order = torch.argsort(sigma, descending=True)
    return order[sigma[order] > 0.5 * limit][:most].tolist()


def learning_centres(kernel, numbers: torch.Tensor) -> torch.Tensor:
    """``[n]`` bool: the atoms (atomic numbers ``numbers``) that may become sparse environments of ``kernel``:
    of a species that carries a learned energy (so that a single-centre model stays one) and whose sparse set
    does not already span the kernel's whole function space (:meth:`SparseKernel.complete_species`)."""
    complete = torch.tensor(kernel.complete_species(), dtype=numbers.dtype)
    return torch.isin(numbers, kernel.sparse_species.cpu()) & ~torch.isin(numbers, complete)


def landscape_shift(atoms: ase.Atoms, start: ase.Atoms, old: Calculator, new: Calculator) -> float:
    """How much higher (eV) the calculator ``new`` puts ``atoms`` than ``old`` does, relative to the
    structure ``start`` of the same atoms: ``[E_new(x) - E_new(x0)] - [E_old(x) - E_old(x0)]``. Taken
    relative to ``x0`` because a fit moves the energies of a composition by a constant (its baseline),
    which does not act on the dynamics. A :class:`ModelCalculator` is asked for no uncertainty."""
    energies = []
    for calculator in (old, new):
        # ``atoms`` last: the new calculator then holds its results, which the MD's next force call reuses
        for frame in (start, atoms):
            copy = bare(frame)
            calculator.uncertainty = False
            copy.calc = calculator
            energies.append(copy.get_potential_energy())
    old_start, old_x, new_start, new_x = energies
    return float((new_x - new_start) - (old_x - old_start))


def absorb(atoms: ase.Atoms, energy: float) -> None:
    """Scale the momenta of ``atoms`` so that their kinetic energy drops by ``energy`` (eV; rises where it
    is negative), down to zero at most (momenta that are all zero stay so)."""
    kinetic = atoms.get_kinetic_energy()
    if kinetic > 0.0:
        atoms.set_momenta(atoms.get_momenta() * math.sqrt(max(kinetic - energy, 0.0) / kinetic))


def thermalize(atoms: ase.Atoms, temperature: float, seed: int) -> None:
    """Maxwell-Boltzmann momenta at ``temperature`` (K), without centre-of-mass motion."""
    thermalize_momenta(atoms, temperature, rng=np.random.RandomState(seed))
    Stationary(atoms)


def langevin(atoms: ase.Atoms, temperature: float, options, seed: int) -> Langevin:
    """The Langevin dynamics of the learning (``options``: a :class:`~acdc_potential.config.LearnConfig`) at ``temperature`` (K)."""
    return Langevin(atoms, options.timestep * units.fs, temperature_K=temperature, friction=options.friction / units.fs, fixcm=False, rng=np.random.RandomState(seed))


class ModelCalculator(Calculator):
    """ASE calculator of a :class:`~acdc_potential.fit.checkpoint.SparseKRRModel` in memory:
    energy, forces and, for periodic cells, stress of its deployable module, run eagerly (the model
    changes at every update, and each scripted module would cost a compilation and TorchScript's
    slow profiling calls before it ran at speed); with ``uncertainty`` set, also the calibrated
    force uncertainty of every atom (``forces_uncertainty``, eV/A) from the same call."""

    implemented_properties = ["energy", "free_energy", "forces", "stress", "forces_uncertainty"]

    def __init__(self, model: SparseKRRModel):
        super().__init__()
        self.module = model.potential().eval()
        self.uncertainty = True

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        periodic = bool(self.atoms.pbc.all())
        wanted = self.uncertainty or "forces_uncertainty" in properties
        out = run_module(self.module, [self.atoms], forces=True, stress=periodic, uncertainty=False, forces_uncertainty=wanted)
        energy = float(out["energy"][0])
        self.results = {"energy": energy, "free_energy": energy, "forces": out["forces"].numpy()}
        if periodic:
            self.results["stress"] = full_3x3_to_voigt_6_stress(out["stress"][0].numpy())
        if wanted:
            self.results["forces_uncertainty"] = out["forces_uncertainty"].numpy()


@dataclasses.dataclass
class LearnState:
    """Where a run is: the next MD segment and step, the labelled structures' count at the last
    tuning, and every labelling decision (``history``)."""

    segment: int = 0
    step: int = 0
    tuned_at: int = 0
    history: List[Dict] = dataclasses.field(default_factory=list)


class ActiveLearner:
    """Active learning from ``starts`` (``ase.Atoms``, labelled or not) with ``reference`` (named
    ``reference_name`` in the folder, default its class), as ``config`` (the fit's sections, and
    ``config.learn``) says, in ``folder``."""

    def __init__(self, starts: Sequence[ase.Atoms], reference: Calculator, config: FitConfig, folder: str,
                 log: Optional[FitLog] = None, reference_name: Optional[str] = None):
        self.starts = list(starts)
        self.reference = reference
        self.config = config
        self.options = config.learn
        self.kinds = (config.options.energies, config.options.forces, config.options.stress)
        self.stress = config.options.stress
        check_options(self.starts, config)
        self.run_identity = {
            "starts": digest_of([(a.numbers, a.positions, np.asarray(a.cell), a.pbc) for a in self.starts]),
            "temperatures": [float(t) for t in self.options.temperatures],
            "reference": reference_name or f"{type(reference).__module__}.{type(reference).__qualname__}",
        }
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.owns_log = log is None
        self.log = log if log is not None else FitLog(True, path=str(self.folder / "learn.log"), append=True)
        self.labelled_path = self.folder / "labelled.extxyz"
        self.resume_path = self.folder / "resume.pt"
        self.incremental: Optional[IncrementalFit] = None
        self.state = LearnState()
        self.frame: Optional[ase.Atoms] = None  # the MD frame of a resumed run
        self._force_rms = None

    def run(self) -> SparseKRRModel:
        """Every step; returns the final model (also written to ``model.ckpt`` and ``model.pt``)."""
        try:
            labelled = self.starting_set()
            self.first_model(labelled)
            self.molecular_dynamics()
            return self.finish()
        finally:
            if self.owns_log:
                self.log.close()

    # ---- the steps

    def starting_set(self) -> List[Labelled]:
        """The labelled structures so far: those of ``labelled.extxyz`` (a run resumed), then the
        starting structures not yet in it, labelled by the reference unless they carry energy and forces."""
        labelled = read_structures(str(self.labelled_path)) if self.labelled_path.exists() else []
        if labelled:
            self.log(f"resuming: {len(labelled)} labelled structures in {self.labelled_path}")
        for k, atoms in enumerate(self.starts[len(labelled) :], start=len(labelled)):
            given = labels_of(atoms, self.config.keys, index=k)
            if given.energy is not None and given.forces is not None:
                stress = {} if given.stress is None else {"stress": given.stress}
                structure = label(atoms, SinglePointCalculator(atoms, energy=given.energy, forces=given.forces, **stress), self.stress, k)
                how = "with its own labels"
            else:
                structure = self.labelled_by_reference(atoms, k, f"starting structure {k}")
                how = "labelled by the reference"
            labelled.append(structure)
            self.write_labelled(labelled)
            self.log(f"starting structure {k} ({atoms.get_chemical_formula()}) {how}")
        return labelled

    def first_model(self, labelled: List[Labelled]) -> None:
        """The model of the labelled structures: that of ``resume.pt`` with the rows of every
        labelled structure (a resumed run), or a fit of the configuration (tuned and calibrated)."""
        if self.resume_path.exists():
            model, owners = self.resume(len(labelled))
            with self.log.stage("kernel rows"):
                self.incremental = IncrementalFit(model, labelled, self.kinds, owners)
            self.log(f"resumed the model of {self.resume_path} ({model.kernel.n_sparse} sparse environments) with the rows of "
                     f"{len(labelled)} structures; MD segment {self.state.segment + 1}, step {self.state.step}")
            return
        validate(labelled, require_energy=self.kinds[0], require_forces=self.kinds[1])
        with self.log.stage("first fit"):
            config = dataclasses.replace(self.config, options=dataclasses.replace(self.config.options, tuning=self.options.tuning))
            model = fit(labelled, config, log=FitLog(False))
        self.incremental = IncrementalFit(model, labelled, self.kinds)
        self.state = LearnState(tuned_at=len(labelled))
        self.log(f"first model: {len(labelled)} structures, {model.kernel.n_sparse} sparse environments, "
                 f"nu_max {getattr(model.kernel, 'nu_max', '-')}, regularisers {dataclasses.asdict(model.regularisers)}")
        self.save(bare(self.starts[0]))

    def molecular_dynamics(self) -> None:
        """Langevin MD from each starting structure at each temperature, checking the uncertainties
        every ``interval`` steps, until the steps or the labels run out."""
        options = self.options
        segments = [(temperature, k) for temperature in options.temperatures for k in range(len(self.starts))]
        for number in range(self.state.segment, len(segments)):
            if self.label_count() >= options.max_labels:
                self.log(f"stopping: {self.label_count()} labelled structures, the maximum (learn.max_labels)")
                return
            temperature, k = segments[number]
            resumed = number == self.state.segment and self.state.step > 0 and self.frame is not None
            atoms = self.frame if resumed else self.starts[k].copy()
            if not resumed:
                thermalize(atoms, temperature, options.seed + number)
                self.state.segment, self.state.step = number, 0
            self.log(f"MD segment {number + 1}/{len(segments)}: starting structure {k} at {temperature:g} K, "
                     f"{options.steps} steps of {options.timestep:g} fs" + (f", from step {self.state.step}" if resumed else ""))
            self.segment(atoms, temperature, number, self.starts[k])
        self.state.segment, self.state.step = len(segments), 0

    def segment(self, atoms: ase.Atoms, temperature: float, number: int, start: ase.Atoms) -> None:
        """The MD of segment ``number`` (from the structure ``start``) from its current step; returns
        early when the labels run out."""
        options = self.options
        atoms.calc = ModelCalculator(self.incremental.model())
        dynamics = langevin(atoms, temperature, options, options.seed + 1000 * (number + 1) + self.state.step)
        report_every = max(options.interval, options.steps // 10)
        while self.state.step < options.steps:
            atoms.calc.uncertainty = (self.state.step + 1) % options.interval == 0  # the next frame is checked
            dynamics.run(1)
            self.state.step += 1
            if self.state.step % options.interval == 0 and self.check(atoms, number, start):
                if self.label_count() >= options.max_labels:
                    self.save(atoms)
                    return
            if self.state.step % report_every == 0:
                self.save(atoms)
                self.log(f"segment {number + 1} step {self.state.step}/{options.steps}: T {atoms.get_temperature():.0f} K, "
                         f"{self.label_count()} labelled structures, {self.incremental.kernel.n_sparse} sparse environments")

    def switch(self, atoms: ase.Atoms, start: ase.Atoms) -> Tuple[float, float]:
        """Continue the MD of ``atoms`` with the updated model, its total energy kept: the kinetic energy
        absorbs the change of the frame's energy relative to the segment's ``start`` (:func:`landscape_shift`;
        down to zero where the change exceeds it). Without it every update that finds the frame higher
        than the previous model thought (the MD went where that model was too low: the reason to label
        it) heats the MD, faster than the thermostat cools it while the models are poor (ethanol with
        xTB from 3 structures at 500 K: 997 K on average over the 570 steps of its 60 labels, 642 K with it).
        Returns the change (eV) and the temperature before (K)."""
        new = ModelCalculator(self.incremental.model())
        shift = landscape_shift(atoms, start, atoms.calc, new)
        before = atoms.get_temperature()
        absorb(atoms, shift)
        atoms.calc = new
        return shift, before

    def check(self, atoms: ase.Atoms, number: int, start: ase.Atoms) -> bool:
        """Decide on the MD frame ``atoms`` of the segment from ``start``: label it and update the model
        when the largest force uncertainty of its atoms exceeds the limit (and labels are left), and go on
        with the new model (:meth:`switch`). Returns whether it did."""
        sigma = torch.as_tensor(atoms.calc.get_property("forces_uncertainty", atoms))
        limit = self.options.threshold * self.force_rms()
        worst = int(torch.argmax(sigma))
        needed = float(sigma[worst]) > limit and self.label_count() < self.options.max_labels
        self.log.write(f"check segment {number + 1} step {self.state.step}: largest force uncertainty {float(sigma[worst]):.4g} eV/A "
                       f"(atom {worst}), limit {limit:.4g}: {'label' if needed else 'keep'}")
        if needed:
            self.update(atoms, sigma, limit, number, start)
        return needed

    def update(self, atoms: ase.Atoms, sigma: torch.Tensor, limit: float, number: int, start: ase.Atoms) -> None:
        """Label ``atoms``, add it with its most uncertain atoms as sparse environments, retune when
        the labelled set has grown enough, switch the MD to the new model and record the decision."""
        predicted = atoms.get_forces()
        began = time.perf_counter()
        structure = self.labelled_by_reference(atoms, self.label_count(), f"the frame of segment {number + 1}, step {self.state.step}")
        labelled = time.perf_counter()
        self.write_labelled(self.incremental.structures + [structure])
        error = float(np.abs(predicted - structure.forces).mean())
        centres = learning_centres(self.incremental.kernel, torch.as_tensor(structure.atoms.numbers))
        chosen = sparse_candidates(sigma, limit, self.options.new_sparse, centres.to(sigma.device))
        self.incremental.add([structure], [chosen])
        tuned = self.retune_if_grown()
        updated = time.perf_counter()
        shift, before = self.switch(atoms, start)
        regularisers = dataclasses.asdict(self.incremental.regularisers)
        mixing = dict(self.incremental.kernel.mixing)
        self.state.history.append({
            "segment": number + 1, "step": self.state.step, "labels": self.label_count(), "largest_sigma": float(sigma.max()),
            "limit": limit, "force_mae_before": error, "new_sparse": len(chosen), "sparse": self.incremental.kernel.n_sparse, "retuned": tuned,
            "reference_seconds": round(labelled - began, 3), "update_seconds": round(updated - labelled, 3), "energy_shift": shift,
            **({"regularisers": regularisers, "mixing": mixing} if tuned else {}),
        })
        self.save(atoms)
        self.log(f"labelled structure {self.label_count()} (segment {number + 1}, step {self.state.step}): largest force uncertainty "
                 f"{float(sigma.max()):.3g} > {limit:.3g} eV/A; the model's force MAE on it was {error:.3g} eV/A; "
                 f"{len(chosen)} new sparse environments ({self.incremental.kernel.n_sparse} in all)" + (f"; retuned: regularisers {regularisers}, mixing {mixing}" if tuned else "")
                 + f"; the new model puts the frame {shift:+.3g} eV from where the previous one did (relative to the segment's start): "
                 f"velocities rescaled to keep the total energy (as far as the kinetic energy allows), {before:.0f} K -> {atoms.get_temperature():.0f} K")

    def labelled_by_reference(self, atoms: ase.Atoms, index: int, what: str) -> Labelled:
        """``atoms`` labelled by the reference, checked; one clear error when the reference fails."""
        try:
            structure = label(atoms, self.reference, self.stress, index)
        except Exception as error:  # any calculator's failure: one line naming the frame, not its traceback
            message = str(error).splitlines()[0] if str(error) else ""
            raise ValueError(f"the reference ({self.run_identity['reference']}) failed on {what}: {type(error).__name__}: {message}") from None
        try:
            validate([structure], require_energy=True, require_forces=True)
        except StructureError as error:
            raise StructureError(f"the reference's labels of {what} are unusable: {error}") from None
        return structure

    def retune_if_grown(self) -> bool:
        """Retune (and recalibrate) when the labelled set has grown by ``learn.retune`` since the last tuning."""
        factor = self.options.retune
        count = self.label_count()
        if factor <= 0 or count < factor * self.state.tuned_at:
            return False
        self.incremental.retune(self.config.options.validation, self.config.options.seed, FitLog(False), self.options.tuning)
        self.state.tuned_at = count
        return True

    def finish(self) -> SparseKRRModel:
        """Write the final model (checkpoint and exported file) and the state."""
        model = self.incremental.model()
        self.save(self.frame if self.frame is not None else bare(self.starts[0]))
        model.export(str(self.folder / "model.pt"))
        self.log(f"done: {self.label_count()} labelled structures ({self.labelled_path}), {model.kernel.n_sparse} sparse environments; "
                 f"model {self.folder / 'model.pt'}")
        return model

    # ---- bookkeeping and files

    def label_count(self) -> int:
        return len(self.incremental.structures) if self.incremental is not None else 0

    def force_rms(self) -> float:
        """The RMS force component of the labelled structures (eV/A), the scale of ``learn.threshold``."""
        count = self.label_count()
        if self._force_rms is None or self._force_rms[0] != count:
            forces = np.concatenate([s.forces.ravel() for s in self.incremental.structures if s.forces is not None])
            self._force_rms = (count, float(np.sqrt(np.mean(forces**2))))
        return self._force_rms[1]

    def write_labelled(self, structures: List[Labelled]) -> None:
        """Every labelled structure to ``labelled.extxyz``, replaced whole so that no interruption truncates it."""
        _atomic(self.labelled_path, lambda path: write(str(path), [s.atoms for s in structures], format="extxyz"))

    def save(self, atoms: ase.Atoms) -> None:
        """``resume.pt`` (model, state, the MD frame ``atoms`` with momenta, the run's identity), in one
        atomic write; then ``model.ckpt`` and ``state.yaml`` for people."""
        self.frame = atoms
        model = self.incremental.model()
        frame = bare(atoms, momenta=True)
        resume = {
            "version": RESUME_VERSION, "run": self.run_identity, "labels": self.label_count(), "model": model.to_dict(),
            "sparse_owners": self.incremental.sparse_owners, "state": dataclasses.asdict(self.state),
            "frame": {name: torch.as_tensor(np.asarray(value)) for name, value in
                      (("numbers", frame.numbers), ("positions", frame.positions), ("cell", np.asarray(frame.cell)), ("pbc", frame.pbc), ("momenta", frame.get_momenta()))},
        }
        _atomic(self.resume_path, lambda path: torch.save(resume, path))
        _atomic(self.folder / "model.ckpt", lambda path: model.save(str(path)))
        _atomic(self.folder / "state.yaml", lambda path: path.write_text(yaml.safe_dump({"labels": self.label_count(), **dataclasses.asdict(self.state)}, sort_keys=False)))

    def resume(self, labelled: int) -> Tuple[SparseKRRModel, Optional[List[int]]]:
        """The model (and the labelled structure of each of its sparse environments), state and MD
        frame of ``resume.pt``; refuses another run's folder."""
        try:
            saved = torch.load(self.resume_path, weights_only=True)
        except Exception as error:
            raise CheckpointError(f"{self.resume_path}: not readable ({type(error).__name__}); remove the folder to start anew") from None
        if not isinstance(saved, dict) or saved.get("version") != RESUME_VERSION:
            raise CheckpointError(f"{self.resume_path}: not a resume file of this version of acdc-potential learn")
        if saved["run"] != self.run_identity:
            differ = ", ".join(key for key in self.run_identity if saved["run"].get(key) != self.run_identity[key])
            raise ValueError(f"{self.folder} holds another run (its {differ} differ from this one's): give the same inputs, or another folder with -o")
        if labelled < saved["labels"]:
            raise ValueError(f"{self.labelled_path} has {labelled} structures, fewer than the {saved['labels']} of {self.resume_path}")
        state = saved["state"]
        self.state = LearnState(int(state["segment"]), int(state["step"]), int(state["tuned_at"]), list(state["history"]))
        owners = None if saved["sparse_owners"] is None else [int(k) for k in saved["sparse_owners"]]
        frame = saved["frame"]
        self.frame = ase.Atoms(numbers=frame["numbers"].numpy(), positions=frame["positions"].numpy(), cell=frame["cell"].numpy(),
                               pbc=frame["pbc"].numpy(), momenta=frame["momenta"].numpy())
        return SparseKRRModel.from_dict(saved["model"]), owners


def check_options(starts: Sequence[ase.Atoms], config: FitConfig) -> None:
    """What the learning needs of its inputs, said before anything runs (one line each)."""
    if len(starts) < 2:
        raise ValueError(f"learn needs at least two starting structures (the first fit tunes its regularisers on held-out ones), got {len(starts)}")
    if not config.options.tune or not config.options.forces:
        raise ValueError("learn needs calibrated force uncertainties: options.tune and options.forces must be true")
    if not config.learn.temperatures:
        raise ValueError("learn.temperatures is empty: give at least one temperature")
    if 0.0 < config.learn.retune <= 1.0:
        raise ValueError(f"learn.retune must be 0 (never) or a growth factor above 1, got {config.learn.retune}")


def _atomic(path: Path, writer) -> None:
    """``writer(temporary path)``, then the temporary file renamed to ``path`` (never half written)."""
    temporary = path.with_name(path.name + ".tmp")
    writer(temporary)
    os.replace(temporary, path)
