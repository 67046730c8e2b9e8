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
        """Isolated-atom energies where known, least squares of the energies on composition for
        the other species.

        Isolated-atom energies are those given (``isolated``, which must cover every species),
        else those of the single-atom, non-periodic structures of ``structures`` (the other
        species are then fitted on the remaining energy). Compositions that do not determine
        every fitted species (one molecule type) get the minimum-norm solution; the kernel's
        species piece absorbs what remains. Without any energy the baseline is zero.
        """
        if isolated is not None:
            missing = sorted(set(species) - set(int(z) for z in isolated))
            if missing:
                raise ValueError(f"no isolated-atom energy given for species {missing}")
            return cls({int(z): float(isolated[z]) for z in species})
        labelled = [s for s in structures if s.energy is not None]
        known = isolated_atom_energies(structures)
        free = [int(z) for z in species if int(z) not in known]
        energies = {z: known.get(int(z), 0.0) for z in species}
        if free and labelled:
            counts = np.array([[np.sum(s.atoms.numbers == z) for z in free] for s in labelled], dtype=np.float64)
            remainder = np.array([s.energy - sum(known.get(int(z), 0.0) for z in s.atoms.numbers) for s in labelled])
            energies.update(zip(free, np.linalg.lstsq(counts, remainder, rcond=None)[0]))
        return cls({int(z): float(e) for z, e in energies.items()})

    def structure_energy(self, numbers: np.ndarray) -> float:
        return float(sum(self.energies[int(z)] for z in numbers))


def isolated_atom_energies(structures: Sequence[Labelled]) -> Dict[int, float]:
    """Energies of the single-atom, non-periodic structures of ``structures`` that have one, by atomic number."""
    return {
        int(s.atoms.numbers[0]): float(s.energy)
        for s in structures
        if s.n_atoms == 1 and not s.atoms.pbc.any() and s.energy is not None
    }
