"""Labelled reference structures: reading extxyz files and validating their labels.

Units and signs follow ASE (docs/conventions.md, "Units" and "Stress sign and Voigt
order"): energies in eV, forces in eV/A, stress in eV/A^3 with
``stress = (1 / V) dE / d epsilon`` and ``virial = -stress * V``.
A structure may lack forces or energy; the fit then simply has no rows for them.
"""

from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import ase.io
import numpy as np
from ase.stress import voigt_6_to_full_3x3_stress

from .errors import StructureError


@dataclass
class LabelKeys:
    """Names of the labels in ``atoms.info`` / ``atoms.arrays`` (or the ASE calculator).

    ``virial`` is read only when ``stress`` is absent, and converted to a stress.
    ``weight`` names an optional per-structure weight in ``atoms.info``.
    """

    energy: str = "energy"
    forces: str = "forces"
    stress: str = "stress"
    virial: str = "virial"
    weight: str = "weight"


@dataclass
class Labelled:
    """One reference structure and its labels.

    :param atoms: the ``ase.Atoms`` (positions in A).
    :param energy: total energy (eV) or ``None``.
    :param forces: ``[n_atoms, 3]`` forces (eV/A) or ``None``.
    :param stress: ``[3, 3]`` stress (eV/A^3, ASE sign) or ``None``; only for fully periodic cells.
    :param weight: weight of all rows of this structure in the fit (multiplies ``1 / sigma^2``).
    :param index: position of the structure in its file, used in error messages.
    """

    atoms: object
    energy: Optional[float] = None
    forces: Optional[np.ndarray] = None
    stress: Optional[np.ndarray] = None
    weight: float = 1.0
    index: int = field(default=0, compare=False)

    @property
    def n_atoms(self) -> int:
        return len(self.atoms)

    @property
    def periodic(self) -> bool:
        return bool(np.all(self.atoms.pbc))


def _lookup(atoms, key: str, per_atom: bool):
    """A label from the calculator results, ``atoms.arrays`` or ``atoms.info`` (None if absent)."""
    calc = getattr(atoms, "calc", None)
    if calc is not None and key in getattr(calc, "results", {}):
        return calc.results[key]
    store = atoms.arrays if per_atom else atoms.info
    return store.get(key)


def _as_full_stress(value) -> np.ndarray:
    value = np.asarray(value, dtype=np.float64)
    if value.shape == (6,):
        return voigt_6_to_full_3x3_stress(value)
    return value.reshape(3, 3)


def labels_of(atoms, keys: LabelKeys = LabelKeys(), index: int = 0) -> Labelled:
    """Read the labels of one ``ase.Atoms`` (not validated; see :func:`validate`)."""
    energy = _lookup(atoms, keys.energy, per_atom=False)
    forces = _lookup(atoms, keys.forces, per_atom=True)
    stress = _lookup(atoms, keys.stress, per_atom=False)
    if stress is not None:
        stress = _as_full_stress(stress)
    else:
        virial = _lookup(atoms, keys.virial, per_atom=False)
        if virial is not None:
            stress = -_as_full_stress(virial) / abs(atoms.get_volume())
    weight = atoms.info.get(keys.weight, 1.0)
    return Labelled(
        atoms=atoms,
        energy=None if energy is None else float(np.asarray(energy).reshape(())),
        forces=None if forces is None else np.asarray(forces, dtype=np.float64),
        stress=stress,
        weight=float(weight),
        index=index,
    )


def _describe(structure: Labelled) -> str:
    return f"structure {structure.index} ({structure.atoms.get_chemical_formula()})"


def validate(
    structures: Sequence[Labelled],
    species: Optional[Sequence[int]] = None,
    require_energy: bool = False,
    require_forces: bool = False,
) -> None:
    """Check every structure; raise :class:`StructureError` naming the first bad one.

    Checks: finite positions and cell, labels finite and of the right shape, stress only
    on fully periodic cells with a non-zero volume, positive finite weight, every
    atomic number among ``species`` (when given), energy/forces present when required.
    """
    allowed = None if species is None else set(int(s) for s in species)
    for structure in structures:
        atoms, name = structure.atoms, _describe(structure)
        if len(atoms) == 0:
            raise StructureError(f"{name}: no atoms")
        if not np.all(np.isfinite(atoms.positions)):
            raise StructureError(f"{name}: positions contain NaN or infinity")
        if not np.all(np.isfinite(atoms.cell.array)):
            raise StructureError(f"{name}: cell contains NaN or infinity")
        if allowed is not None:
            unknown = sorted(set(int(z) for z in atoms.numbers) - allowed)
            if unknown:
                raise StructureError(f"{name}: atomic numbers {unknown} are not among the species {sorted(allowed)}")
        if structure.energy is None and require_energy:
            raise StructureError(f"{name}: missing energy")
        if structure.energy is not None and not np.isfinite(structure.energy):
            raise StructureError(f"{name}: energy is NaN or infinite")
        if structure.forces is None and require_forces:
            raise StructureError(f"{name}: missing forces")
        if structure.forces is not None:
            if structure.forces.shape != (len(atoms), 3):
                raise StructureError(f"{name}: forces have shape {structure.forces.shape}, expected ({len(atoms)}, 3)")
            if not np.all(np.isfinite(structure.forces)):
                raise StructureError(f"{name}: forces contain NaN or infinity")
        if structure.stress is not None:
            if not structure.periodic:
                raise StructureError(f"{name}: stress given for a structure that is not periodic in all directions")
            if abs(atoms.get_volume()) < 1e-12:
                raise StructureError(f"{name}: stress given but the cell has zero volume")
            if not np.all(np.isfinite(structure.stress)):
                raise StructureError(f"{name}: stress contains NaN or infinity")
        if not (np.isfinite(structure.weight) and structure.weight > 0):
            raise StructureError(f"{name}: weight {structure.weight} is not a positive number")


def read_structures(
    path: str,
    index: str = ":",
    keys: LabelKeys = LabelKeys(),
    species: Optional[Sequence[int]] = None,
    require_energy: bool = False,
    require_forces: bool = False,
) -> List[Labelled]:
    """Read and validate labelled structures from an extxyz (or any ASE-readable) file.

    Structures are numbered from 0 in file order (the numbers used in error messages).
    """
    frames = ase.io.read(path, index=index)
    if not isinstance(frames, list):
        frames = [frames]
    structures = [labels_of(atoms, keys, k) for k, atoms in enumerate(frames)]
    validate(structures, species, require_energy, require_forces)
    return structures


def species_of(structures: Sequence[Labelled]) -> List[int]:
    """Sorted atomic numbers present in ``structures``."""
    return sorted(set(int(z) for s in structures for z in s.atoms.numbers))


def as_labelled(structures: Sequence) -> List[Labelled]:
    """``structures`` (``ase.Atoms`` or :class:`Labelled`) as :class:`Labelled`, numbered by position."""
    return [s if isinstance(s, Labelled) else labels_of(s, index=k) for k, s in enumerate(structures)]
