"""Per-species reference energies, subtracted from the labels before the fit."""

from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import numpy as np

from .survey import Survey


@dataclass
class Baseline:
    """Per-species reference energies ``e0(a)`` (eV), subtracted before the fit."""

    energies: Dict[int, float]

    @classmethod
    def fit(cls, survey: Survey, species: Sequence[int], isolated: Optional[Dict[int, float]] = None) -> "Baseline":
        """Isolated-atom energies where known, least squares of the energies on composition for
        the other species (from the :class:`~acdc_potential.fit.survey.Survey` of the structures).

        Isolated-atom energies are those given (``isolated``, which must cover every species),
        else those of the single-atom, non-periodic structures (the other species are then
        fitted on the remaining energy). Compositions that do not determine every fitted
        species (one molecule type) get the minimum-norm solution; the kernel's species
        piece absorbs what remains. Without any energy the baseline is zero.
        """
        if isolated is not None:
            missing = sorted(set(species) - set(int(z) for z in isolated))
            if missing:
                raise ValueError(f"no isolated-atom energy given for species {missing}")
            return cls({int(z): float(isolated[z]) for z in species})
        labelled = survey.labels[:, 0]
        known = survey.isolated_energies()
        free = [int(z) for z in species if int(z) not in known]
        energies = {int(z): known.get(int(z), 0.0) for z in species}
        if free and labelled.any():
            fixed = sorted(known)
            counts = survey.composition(free)[labelled].astype(np.float64)
            remainder = survey.energy[labelled] - survey.composition(fixed)[labelled] @ np.array([known[z] for z in fixed], dtype=np.float64)
            energies.update(zip(free, np.linalg.lstsq(counts, remainder, rcond=None)[0]))
        return cls({int(z): float(e) for z, e in energies.items()})

    def structure_energy(self, numbers: np.ndarray) -> float:
        return float(sum(self.energies[int(z)] for z in numbers))

