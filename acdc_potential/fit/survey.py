"""What a fit needs to know of every structure before it builds any row: a few numbers each.

The driver of a fit plans from a :class:`Survey` (species, baseline, row counts, which
structures the sparse selection and the tuning see) and never from the structures
themselves, so that it holds nothing of the size of the training set but these few numbers
(:mod:`~acdc_potential.fit.executors`).
"""

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np

from ..data import Labelled


@dataclass
class Survey:
    """Per-structure facts, ``n`` structures with ``s`` species among them.

    :param positions: ``[n]`` positions of the structures in their source.
    :param elements: ``[s]`` the atomic numbers present, ascending.
    :param counts: ``[n, s]`` atoms of each of them in each structure.
    :param energy: ``[n]`` total energies (eV), NaN where absent.
    :param labels: ``[n, 3]`` whether the energy, forces and stress are present.
    :param periodic: ``[n]`` periodic in every direction. :param isolated: ``[n]`` one atom, periodic in no direction.
    """

    positions: np.ndarray
    elements: np.ndarray
    counts: np.ndarray
    energy: np.ndarray
    labels: np.ndarray
    periodic: np.ndarray
    isolated: np.ndarray

    @classmethod
    def of(cls, structures: Sequence[Labelled], positions: Optional[Sequence[int]] = None) -> "Survey":
        """The survey of ``structures``, at ``positions`` in their source (default ``0, 1, ...``)."""
        elements = np.unique(np.concatenate([s.atoms.numbers for s in structures] or [np.zeros(0, dtype=int)]))
        counts = np.zeros((len(structures), len(elements)), dtype=np.int32)
        for row, s in enumerate(structures):
            np.add.at(counts[row], np.searchsorted(elements, s.atoms.numbers), 1)
        return cls(
            positions=np.arange(len(structures), dtype=np.int64) if positions is None else np.asarray(positions, dtype=np.int64),
            elements=elements.astype(np.int64),
            counts=counts,
            energy=np.array([np.nan if s.energy is None else s.energy for s in structures], dtype=np.float64),
            labels=np.array([[s.energy is not None, s.forces is not None, s.stress is not None] for s in structures], dtype=bool).reshape(-1, 3),
            periodic=np.array([s.periodic for s in structures], dtype=bool),
            isolated=np.array([s.n_atoms == 1 and not s.atoms.pbc.any() for s in structures], dtype=bool),
        )

    @classmethod
    def concatenate(cls, parts: Sequence["Survey"]) -> "Survey":
        """The surveys of ``parts`` one after the other (their species merged)."""
        elements = np.unique(np.concatenate([p.elements for p in parts]))
        counts = np.zeros((sum(len(p) for p in parts), len(elements)), dtype=np.int32)
        start = 0
        for p in parts:
            counts[start : start + len(p), np.searchsorted(elements, p.elements)] = p.counts
            start += len(p)
        vectors = {name: np.concatenate([getattr(p, name) for p in parts]) for name in ("positions", "energy", "labels", "periodic", "isolated")}
        return cls(elements=elements, counts=counts, **vectors)

    def __len__(self) -> int:
        return self.positions.shape[0]

    @property
    def n_atoms(self) -> np.ndarray:
        """``[n]`` atoms per structure."""
        return self.counts.sum(axis=1)

    def species(self) -> List[int]:
        """Sorted atomic numbers present."""
        return self.elements[self.counts.sum(axis=0) > 0].tolist()

    def composition(self, species: Sequence[int]) -> np.ndarray:
        """``[n, len(species)]`` atoms of each of ``species`` (0 for those absent)."""
        table = np.zeros((len(self), len(species)), dtype=np.int64)
        for column, z in enumerate(species):
            where = np.nonzero(self.elements == int(z))[0]
            if where.size:
                table[:, column] = self.counts[:, where[0]]
        return table

    def row_counts(self, energies: bool, forces: bool, stress: bool) -> np.ndarray:
        """``[n]`` rows of each structure in the design matrix (1 energy, 3 N forces, 6 stress)."""
        wanted = self.labels & np.array([energies, forces, stress])
        return wanted[:, 0] + 3 * self.n_atoms * wanted[:, 1] + 6 * wanted[:, 2]

    def isolated_energies(self) -> Dict[int, float]:
        """Energies of the single-atom, non-periodic structures that have one, by atomic number."""
        single = np.nonzero(self.isolated & self.labels[:, 0])[0]
        return {int(self.elements[np.argmax(self.counts[k])]): float(self.energy[k]) for k in single}
