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
from ase.data import chemical_symbols
from ase.stress import voigt_6_to_full_3x3_stress

from .descriptors.neighbors import MIN_DISTANCE, overlap
from .errors import DataFileError, StructureError



@dataclass
class LabelKeys:
    """Names of the labels in ``atoms.info`` / ``atoms.arrays`` (or the ASE calculator).

    :param energy: name of the total energy (eV) in atoms.info (or of the attached calculator's energy).
    :param forces: name of the forces (eV/A) in atoms.arrays (or of the attached calculator's forces).
    :param stress: name of the stress (eV/A^3, ASE sign) in atoms.info (or of the calculator's stress).
    :param virial: name of the virial (eV) in atoms.info, read only when the stress is absent, and
        converted to a stress.
    :param weight: name of an optional per-structure weight in atoms.info (multiplies 1 / sigma^2 of
        all rows of the structure; default 1).
    :param dipole: name of the dipole moment (e*A, 3 Cartesian components) in atoms.info (or of the
        calculator's dipole), the target of dipole models.
    """

    energy: str = "energy"
    forces: str = "forces"
    stress: str = "stress"
    virial: str = "virial"
    weight: str = "weight"
    dipole: str = "dipole"


@dataclass
class Labelled:
    """One reference structure and its labels.

    :param atoms: the ``ase.Atoms`` (positions in A).
    :param energy: total energy (eV) or ``None``.
    :param forces: ``[n_atoms, 3]`` forces (eV/A) or ``None``.
    :param stress: ``[3, 3]`` stress (eV/A^3, ASE sign) or ``None``; only for fully periodic cells.
    :param weight: weight of all rows of this structure in the fit (multiplies ``1 / sigma^2``).
    :param dipole: ``[3]`` dipole moment (e*A) or ``None``.
    :param index: position of the structure in its file, used in error messages.
    """

    atoms: object
    energy: Optional[float] = None
    forces: Optional[np.ndarray] = None
    stress: Optional[np.ndarray] = None
    weight: float = 1.0
    dipole: Optional[np.ndarray] = None
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
    dipole = _lookup(atoms, keys.dipole, per_atom=False)
    return Labelled(
        atoms=atoms,
        energy=None if energy is None else float(np.asarray(energy).reshape(())),
        forces=None if forces is None else np.asarray(forces, dtype=np.float64),
        stress=stress,
        weight=float(weight),
        dipole=None if dipole is None else np.asarray(dipole, dtype=np.float64),
        index=index,
    )


def _describe(structure: Labelled) -> str:
    return f"structure {structure.index} ({structure.atoms.get_chemical_formula()})"


def validate(
    structures: Sequence[Labelled],
    species: Optional[Sequence[int]] = None,
    require_energy: bool = False,
    require_forces: bool = False,
    require_dipole: bool = False,
) -> None:
    """Check every structure; raise :class:`StructureError` naming the first bad one.

    The one validation of every entry point (fit, eval, the calculator). Checks: at least
    one atom, finite positions and cell, every atomic number among ``species`` (when
    given), no two atoms closer than :data:`MIN_DISTANCE`, labels finite and of the right
    shape, stress only on fully periodic cells, positive finite
    weight, energy/forces present when required; the dipole present, finite and of 3 components when
    required (an energy fit ignores whatever a file stores under that key).
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
                raise StructureError(
                    f"{name}: atomic numbers {unknown} ({element_list(unknown)}) are not among the model's species "
                    f"{sorted(allowed)} ({element_list(sorted(allowed))})"
                )
        if np.any(atoms.pbc) and abs(np.linalg.det(atoms.cell.array)) < 1e-12:
            raise StructureError(f"{name}: periodic with a degenerate cell")
        overlapping = overlap(atoms, MIN_DISTANCE)
        if overlapping is not None:
            raise StructureError(f"{name}: {overlapping}")
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
            if not np.all(np.isfinite(structure.stress)):
                raise StructureError(f"{name}: stress contains NaN or infinity")
        if structure.dipole is None and require_dipole:
            raise StructureError(f"{name}: missing dipole")
        if structure.dipole is not None and require_dipole:
            if structure.dipole.shape != (3,):
                raise StructureError(f"{name}: dipole has shape {structure.dipole.shape}, expected (3,)")
            if not np.all(np.isfinite(structure.dipole)):
                raise StructureError(f"{name}: dipole contains NaN or infinity")
        if not (np.isfinite(structure.weight) and structure.weight > 0):
            raise StructureError(f"{name}: weight {structure.weight} is not a positive number")


def read_structures(
    path: str,
    index: str = ":",
    keys: LabelKeys = LabelKeys(),
    species: Optional[Sequence[int]] = None,
    require_energy: bool = False,
    require_forces: bool = False,
    require_dipole: bool = False,
) -> List[Labelled]:
    """Read and validate labelled structures from an extxyz (or any ASE-readable) file.

    Structures are numbered from 0 in file order (the numbers used in error messages).
    """
    frames = read_frames(path, index)
    structures = [labels_of(atoms, keys, k) for k, atoms in enumerate(frames)]
    validate(structures, species, require_energy, require_forces, require_dipole)
    return structures


def read_frames(path: str, index: str = ":") -> List:
    """The ``ase.Atoms`` of an extxyz (or other ASE-readable) file; a :class:`DataFileError`
    naming the file says what is wrong with it (missing, empty, truncated, not extxyz)."""
    try:
        frames = ase.io.read(path, index=index)
    except FileNotFoundError:
        raise DataFileError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DataFileError(f"{path}: is a directory, not a data file") from None
    except UnicodeDecodeError:
        raise DataFileError(f"{path}: not a text file (extxyz expected)") from None
    except StopIteration:
        raise DataFileError(f"{path}: no structure in the file") from None
    except Exception as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if message.startswith("Empty file"):
            raise DataFileError(f"{path}: the file is empty") from None
        if "Frame has" in message:
            message += " (the file may be truncated)"
        raise DataFileError(f"{path}: not a readable extxyz file: {message.replace('ase.io.extxyz: ', '')}") from None
    frames = frames if isinstance(frames, list) else [frames]
    if not frames:
        raise DataFileError(f"{path}: no structure in the file")
    return frames


def element_list(numbers: Sequence[int]) -> str:
    """``"H, O"`` for atomic numbers."""
    return ", ".join(chemical_symbols[z] if 0 < z < len(chemical_symbols) else f"element {z}" for z in numbers)


def check_labels(structures: Sequence[Labelled], path: str, keys: LabelKeys, energies: bool, forces: bool, stress: bool) -> None:
    """A :class:`DataFileError` when a kind of label that is to be used is absent from every
    structure of the file ``path`` (energies; forces; stress when the file has fully periodic
    cells), listing the keys the file does have and the option that drops that kind of row."""
    present = [any(s.energy is not None for s in structures), any(s.forces is not None for s in structures), any(s.stress is not None for s in structures)]
    check_label_counts(present, any(s.periodic for s in structures), path, keys, (energies, forces, stress), lambda: available_keys(structures))


def check_label_counts(present: Sequence[bool], periodic: bool, path: str, keys: LabelKeys, used: Sequence[bool], described) -> None:
    """:func:`check_labels` from what a file has: whether any structure has an energy, forces,
    a stress (``present``), and any fully periodic cell (``periodic``); ``described()`` lists
    the file's keys for the message."""
    wanted = [
        ("energy", "energies", used[0], present[0], " (forces only)"),
        ("forces", "forces", used[1], present[1], " (energies only)"),
        ("stress", "stress", used[2] and periodic, present[2], ""),
    ]
    for kind, plural, needed, found, only in wanted:
        if needed and not found:
            name = getattr(keys, kind) if kind != "stress" else f"{keys.stress}' or '{keys.virial}"
            raise DataFileError(
                f"{path}: no structure has {kind} under the key '{name}'; the file has {described()}. "
                f"Name the key (--{kind}-key, or keys: {{{kind}: NAME}} in the configuration) or leave out the "
                f"{kind}{only} (--no-{plural}, or options: {{{plural}: false}})"
            )


def check_dipoles(structures: Sequence[Labelled], path: str, keys: LabelKeys) -> None:
    """A :class:`DataFileError` listing the keys of the file ``path`` when no structure has a dipole, else a
    :class:`StructureError` naming the first structure without a dipole of 3 finite components (a dipole
    model needs one on every structure)."""
    if not any(s.dipole is not None for s in structures):
        raise DataFileError(
            f"{path}: no structure has a dipole under the key '{keys.dipole}'; the file has {available_keys(structures)}. "
            "Name the key (--dipole-key, or keys: {dipole: NAME} in the configuration)"
        )
    validate(structures, require_dipole=True)


def available_keys(structures: Sequence[Labelled]) -> str:
    """The per-structure (info) and per-atom (arrays) keys of ``structures`` and their calculators' results."""
    info, arrays = set(), set()
    for structure in structures:
        atoms = structure.atoms
        info.update(atoms.info)
        arrays.update(k for k in atoms.arrays if k not in ("numbers", "positions"))
        calc = getattr(atoms, "calc", None)
        info.update(k for k, v in getattr(calc, "results", {}).items() if np.ndim(v) < 2)
        arrays.update(k for k, v in getattr(calc, "results", {}).items() if np.ndim(v) == 2)
    return f"per-structure keys {sorted(info) or 'none'} and per-atom keys {sorted(arrays) or 'none'}"


def species_of(structures: Sequence[Labelled]) -> List[int]:
    """Sorted atomic numbers present in ``structures``."""
    return sorted(set(int(z) for s in structures for z in s.atoms.numbers))


def as_labelled(structures: Sequence) -> List[Labelled]:
    """``structures`` (``ase.Atoms`` or :class:`Labelled`) as :class:`Labelled`, numbered by position."""
    return [s if isinstance(s, Labelled) else labels_of(s, index=k) for k, s in enumerate(structures)]
