"""Per-species reference energies, subtracted from the labels before the fit."""

from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import numpy as np

from ..data import Labelled


@dataclass
class Baseline:
    """Per-species reference energies ``e0(a)`` (eV), subtracted before the fit."""

    energies: Dict[int, float]

    @classmethod
    def fit(
        cls, structures: Sequence[Labelled], species: Sequence[int], isolated: Optional[Dict[int, float]] = None
    ) -> "Baseline":
        """Given isolated-atom energies, or least squares of the energies on composition.

        Compositions that do not determine every species (one molecule type) get the
        minimum-norm solution; the kernel's species piece absorbs what remains. Without
        any energy the baseline is zero.
        """
        if isolated is not None:
            missing = sorted(set(species) - set(int(z) for z in isolated))
            if missing:
                raise ValueError(f"no isolated-atom energy given for species {missing}")
            return cls({int(z): float(isolated[z]) for z in species})
        labelled = [s for s in structures if s.energy is not None]
        if not labelled:
            return cls({int(z): 0.0 for z in species})
        counts = np.array([[np.sum(s.atoms.numbers == z) for z in species] for s in labelled], dtype=np.float64)
        energies = np.array([s.energy for s in labelled])
        solution = np.linalg.lstsq(counts, energies, rcond=None)[0]
        return cls({int(z): float(e) for z, e in zip(species, solution)})

    def structure_energy(self, numbers: np.ndarray) -> float:
        return float(sum(self.energies[int(z)] for z in numbers))
