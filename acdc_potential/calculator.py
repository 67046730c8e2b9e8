"""ASE calculator for exported acdc-potential models.

A thin layer over metatomic's ``MetatomicCalculator``, which does the work (neighbour
lists, energy, forces and stress by autograd, per-atom energies, the uncertainty
warning); this class adds clear errors for missing, corrupt or foreign files and the
uncertainties as ASE results.
"""

from pathlib import Path

import numpy as np
from metatomic.torch import ModelOutput
from metatomic_ase import MetatomicCalculator

from .errors import ModelFileError


class ACDCCalculator(MetatomicCalculator):
    """ASE calculator running an exported model file.

    Results: ``energy``, ``free_energy``, ``forces``, ``stress`` (periodic cells),
    ``energies`` (per atom), and after :meth:`get_uncertainty` also
    ``energy_uncertainty`` (eV, per structure) and ``energies_uncertainty`` (eV, per
    atom): the projected-process predictive standard deviations.

    :param path: the exported ``.pt`` file.
    :param device: torch device to run on (default: the best one the model supports).
    :param uncertainty_threshold: warn when an atomic energy uncertainty exceeds this
        (eV); ``None`` disables the check.
    """

    def __init__(self, path, device=None, uncertainty_threshold=0.1):
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

    def get_uncertainty(self, atoms, per_atom: bool = False):
        """Predictive standard deviation of the energy (eV), of the structure or of each atom."""
        sample_kind = "atom" if per_atom else "system"
        outputs = self.run_model(atoms, {"energy_uncertainty": ModelOutput(unit="eV", sample_kind=sample_kind)})
        values = outputs["energy_uncertainty"].block().values.detach().cpu().numpy()[:, 0]
        key = "energies_uncertainty" if per_atom else "energy_uncertainty"
        self.results[key] = values if per_atom else float(values[0])
        return self.results[key] if per_atom else float(np.asarray(values)[0])
