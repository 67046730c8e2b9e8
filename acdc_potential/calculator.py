"""ASE calculator for exported acdc-potential models.

A thin layer over metatomic's ``MetatomicCalculator``, which does the work (neighbour
lists, energy, forces and stress by autograd, per-atom energies, the uncertainty
warning); this class adds the package's validation of structures (one clear
:class:`~acdc_potential.errors.StructureError` for an empty structure, non-finite
positions, overlapping atoms or an element the model does not know), clear errors for
missing, corrupt or foreign files, the thread choice of the command line, and the
uncertainties and the dipole as ASE results.
"""

from pathlib import Path
from typing import Optional

import numpy as np
import torch
from ase.calculators.calculator import Calculator, PropertyNotImplementedError
from metatomic.torch import ModelOutput
from metatomic_ase import MetatomicCalculator

from .data import Labelled, validate
from .errors import ModelFileError, StructureError
from .model.potential import DIPOLE, FORCES_UNCERTAINTY
from .runtime import default_threads, use_threads


class ACDCCalculator(MetatomicCalculator):
    """ASE calculator running an exported model file.

    Results: ``energy``, ``free_energy``, ``forces``, ``stress`` (periodic cells),
    ``energies`` (per atom), and after :meth:`get_uncertainty` also
    ``energy_uncertainty`` (eV, per structure) and ``energies_uncertainty`` (eV, per
    atom), after :meth:`get_forces_uncertainty` ``forces_uncertainty`` (eV/A, per atom):
    calibrated standard deviations (:mod:`acdc_potential.model.uncertainty`); ``dipole`` (e*A)
    for a file with a dipole model (``get_dipole_moment()``).

    :param path: the exported ``.pt`` file.
    :param device: torch device to run on (default: the best one the model supports).
    :param uncertainty_threshold: warn when an atomic energy uncertainty exceeds this
        (eV); ``None`` disables the check.
    :param threads: torch threads (default: :func:`~acdc_potential.runtime.default_threads`
        of each structure, one below 100 atoms, else every available core: what
        ``acdc-potential eval`` uses).
    :param dipole_with_energy: for a file with energy and dipole models, compute the dipole in the
        same model call as every energy (default): an MD step then has the dipole of its structure,
        at the dipole's cost (for ethanol at the defaults several times the energy's). ``False``:
        only when asked for.
    """

    def __init__(self, path, device=None, uncertainty_threshold=0.1, threads: Optional[int] = None, dipole_with_energy: bool = True):
        path = Path(path)
        if not path.is_file():
            raise ModelFileError(f"model file '{path}' does not exist")
        try:
            super().__init__(str(path), device=device, uncertainty_threshold=uncertainty_threshold)
        except Exception as error:
            raise ModelFileError(
                f"'{path}' is not a usable exported model ({type(error).__name__}: {str(error).splitlines()[0]}); "
                "export one with `acdc-potential export` or `acdc-potential fit`"
            ) from None
        self.threads = threads
        self.species = [int(z) for z in self._model.capabilities().atomic_types]
        outputs = self._model.capabilities().outputs
        self.has_energy = "energy" in outputs
        self.has_dipole = DIPOLE in outputs
        self.dipole_with_energy = self.has_dipole and self.has_energy and dipole_with_energy
        if self.dipole_with_energy:
            self._additional_output_requests = {DIPOLE: ModelOutput(unit="e*A", sample_kind="system")}

    def _prepare(self, atoms, positions_only: bool = False) -> None:
        """Validate ``atoms`` (one or a list) and set the threads for them. When only positions
        changed (an MD or optimisation step) only their finiteness is checked here: the
        exported model itself refuses overlapping atoms, and the full check costs about as much
        as a step of a small molecule."""
        frames = atoms if isinstance(atoms, list) else [atoms]
        if positions_only:
            for atoms in frames:
                if not np.all(np.isfinite(atoms.positions)):
                    raise StructureError(f"structure 0 ({atoms.get_chemical_formula()}): positions contain NaN or infinity")
        else:
            # the structures only: their labels, if any, are this calculator's own results
            validate([Labelled(a, index=k) for k, a in enumerate(frames)], species=self.species)
        use_threads(self.threads if self.threads is not None else default_threads(max(len(a) for a in frames)))

    def calculate(self, atoms=None, properties=None, system_changes=None):
        if atoms is not None:
            self._prepare(atoms, positions_only=system_changes is not None and set(system_changes) <= {"positions"})
        properties = list(properties or ["energy"])
        try:
            if "dipole" in properties and not self.has_dipole:
                raise PropertyNotImplementedError("this model file has no dipole model")
            energy_properties = [p for p in properties if p != "dipole"]
            if self.dipole_with_energy and not energy_properties:
                energy_properties = ["energy"]
            if energy_properties:
                super().calculate(atoms, energy_properties, system_changes)
            else:
                Calculator.calculate(self, atoms, properties, system_changes)
                if system_changes:
                    self.results = {}
            if self.dipole_with_energy:
                self.results["dipole"] = self._dipole(self.additional_outputs)
            elif "dipole" in properties:
                self.results["dipole"] = self._dipole(self.run_model(atoms, {DIPOLE: ModelOutput(unit="e*A", sample_kind="system")}))
        except torch.jit.Error as error:
            # the exported model's own checks (overlapping or non-finite atoms): its message, not the TorchScript trace
            last = str(error).strip().splitlines()[-1]
            if last.startswith("builtins.ValueError: system "):
                raise StructureError(last[len("builtins.ValueError: ") :]) from None
            raise

    @staticmethod
    def _dipole(outputs) -> np.ndarray:
        return outputs[DIPOLE].block().values.detach().cpu().numpy().reshape(3)

    def run_model(self, atoms, outputs, selected_atoms=None):
        self._prepare(atoms)
        return super().run_model(atoms, outputs, selected_atoms)

    @property
    def has_forces_uncertainty(self) -> bool:
        """Whether the file gives a force uncertainty (a calibrated model)."""
        return FORCES_UNCERTAINTY in self._model.capabilities().outputs

    def get_forces_uncertainty(self, atoms):
        """Standard deviation of each force component of each atom (eV/A, ``[n_atoms]``), in
        the ``forces_uncertainty`` result; a ``ValueError`` for a model without calibration."""
        if not self.has_forces_uncertainty:
            raise ValueError("this model gives no force uncertainty: it was fitted without a calibration (options.tune: false, "
                             "no force labels, or a version before checkpoint format 4)")
        outputs = self.run_model(atoms, {FORCES_UNCERTAINTY: ModelOutput(unit="eV/A", sample_kind="atom")})
        self.results["forces_uncertainty"] = outputs[FORCES_UNCERTAINTY].block().values.detach().cpu().numpy()[:, 0]
        return self.results["forces_uncertainty"]

    def get_uncertainty(self, atoms, per_atom: bool = False):
        """Predictive standard deviation of the energy (eV), of the structure or of each atom."""
        sample_kind = "atom" if per_atom else "system"
        outputs = self.run_model(atoms, {"energy_uncertainty": ModelOutput(unit="eV", sample_kind=sample_kind)})
        values = outputs["energy_uncertainty"].block().values.detach().cpu().numpy()[:, 0]
        key = "energies_uncertainty" if per_atom else "energy_uncertainty"
        self.results[key] = values if per_atom else float(values[0])
        return self.results[key] if per_atom else float(np.asarray(values)[0])
