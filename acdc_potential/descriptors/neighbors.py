"""Batches of structures and their neighbour lists.

Everything after the neighbour list (densities, features, kernels) sees only the
pair vectors ``r_ji = x_j - x_i + S_ij . cell`` and the pair indices, whether the
pairs come from vesin (:func:`batch_from_atoms`, for fitting) or from the
neighbour lists a metatomic engine hands an exported model.
"""

from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np
import torch
import vesin

from ..errors import StructureError

# atoms closer than this (A) are overlapping: no reference method labels such a structure sensibly
MIN_DISTANCE = 0.1


@dataclass
class AtomsBatch:
    """Several structures stacked into flat tensors, with a full neighbour list.

    Atoms of all structures are numbered consecutively. Shapes: ``N`` atoms, ``S``
    structures, ``P`` ordered pairs (both ``(i, j)`` and ``(j, i)`` are present).

    :param positions: ``[N, 3]`` Cartesian positions.
    :param cells: ``[S, 3, 3]`` cell vectors as rows (zero for non-periodic).
    :param numbers: ``[N]`` atomic numbers.
    :param structure: ``[N]`` index of the structure each atom belongs to.
    :param centers: ``[P]`` index ``i`` of the centre of each pair.
    :param neighbors: ``[P]`` index ``j`` of the neighbour of each pair.
    :param shifts: ``[P, 3]`` integer cell shifts ``S_ij`` (as float, for matmul).
    :param pbc: ``[S, 3]`` periodicity of each structure.
    """

    positions: torch.Tensor
    cells: torch.Tensor
    numbers: torch.Tensor
    structure: torch.Tensor
    centers: torch.Tensor
    neighbors: torch.Tensor
    shifts: torch.Tensor
    pbc: torch.Tensor

    @property
    def n_atoms(self) -> int:
        return self.positions.shape[0]

    @property
    def n_structures(self) -> int:
        return self.cells.shape[0]

    def pair_vectors(self) -> torch.Tensor:
        """``[P, 3]`` vectors ``x_j - x_i + S_ij . cell``, differentiable in positions and cells."""
        cell_of_pair = self.cells[self.structure[self.centers]]
        offsets = torch.einsum("pa,pab->pb", self.shifts, cell_of_pair)
        return self.positions[self.neighbors] - self.positions[self.centers] + offsets

    def atoms_per_structure(self) -> torch.Tensor:
        """``[S]`` number of atoms of each structure."""
        return torch.bincount(self.structure, minlength=self.n_structures)

    def local_index(self) -> torch.Tensor:
        """``[N]`` each atom's index within its structure."""
        n_per = self.atoms_per_structure()
        return torch.arange(self.n_atoms, device=self.structure.device) - (torch.cumsum(n_per, 0) - n_per)[self.structure]


def _pairs_of(atoms, cutoff: float, index: int):
    positions = np.asarray(atoms.positions, dtype=np.float64)
    if not np.all(np.isfinite(positions)):
        raise StructureError(f"structure {index} ({atoms.get_chemical_formula()}): positions are not finite")
    pbc = np.asarray(atoms.pbc, dtype=bool)
    cell = np.asarray(atoms.cell.array, dtype=np.float64)
    if np.any(pbc) and abs(np.linalg.det(cell)) < 1e-12:
        raise StructureError(f"structure {index} ({atoms.get_chemical_formula()}): periodic with a degenerate cell")
    box = cell if np.any(pbc) else np.zeros((3, 3))
    calculator = vesin.NeighborList(cutoff=cutoff, full_list=True)
    i, j, shifts, distances = calculator.compute(positions, box, pbc, quantities="ijSd")
    return i, j, shifts, distances, cell, pbc


def _overlap_message(i: int, j: int, distance: float, min_distance: float) -> str:
    return f"atoms {i} and {j} are {distance:.3g} A apart (overlapping atoms; minimum is {min_distance} A)"


def overlap(atoms, min_distance: float) -> Optional[str]:
    """What is wrong if two atoms of ``atoms`` (``ase.Atoms`` with finite positions and, if
    periodic, a non-degenerate cell; periodic images included) are closer than
    ``min_distance`` (A), else ``None``."""
    if len(atoms) == 0:
        return None
    i, j, _, d, _, _ = _pairs_of(atoms, min_distance, 0)
    if d.size == 0:
        return None
    p = int(np.argmin(d))
    return _overlap_message(int(i[p]), int(j[p]), float(d[p]), min_distance)


def batch_from_atoms(
    frames: Sequence,
    cutoff: float,
    dtype: torch.dtype = torch.float64,
    device: Optional[torch.device] = None,
    min_distance: float = MIN_DISTANCE,
    first_index: int = 0,
) -> AtomsBatch:
    """Build an :class:`AtomsBatch` from ``ase.Atoms`` frames with vesin.

    Works for molecules, periodic and partly periodic cells of any shape, including
    cells smaller than the cutoff (pairs with many images). Atoms closer than
    ``min_distance`` (Angstrom) raise :class:`StructureError` naming the structure
    (numbered from ``first_index``) and the atoms.
    """
    positions, cells, numbers, structure = [], [], [], []
    centers, neighbors, shifts, pbcs = [], [], [], []
    offset = 0
    for k, atoms in enumerate(frames):
        index = first_index + k
        i, j, s, d, cell, pbc = _pairs_of(atoms, cutoff, index)
        too_close = d < min_distance
        if np.any(too_close):
            p = int(np.argmax(too_close))
            raise StructureError(f"structure {index} ({atoms.get_chemical_formula()}): {_overlap_message(i[p], j[p], d[p], min_distance)}")
        positions.append(np.asarray(atoms.positions, dtype=np.float64))
        cells.append(cell if np.any(pbc) else np.zeros((3, 3)))
        numbers.append(np.asarray(atoms.numbers, dtype=np.int64))
        structure.append(np.full(len(atoms), k, dtype=np.int64))
        centers.append(i.astype(np.int64) + offset)
        neighbors.append(j.astype(np.int64) + offset)
        shifts.append(s.astype(np.float64))
        pbcs.append(pbc)
        offset += len(atoms)

    def tensor(arrays: List[np.ndarray], t_dtype):
        return torch.tensor(np.concatenate(arrays), dtype=t_dtype, device=device)

    return AtomsBatch(
        positions=tensor(positions, dtype),
        cells=torch.tensor(np.stack(cells), dtype=dtype, device=device),
        numbers=tensor(numbers, torch.long),
        structure=tensor(structure, torch.long),
        centers=tensor(centers, torch.long),
        neighbors=tensor(neighbors, torch.long),
        shifts=tensor([s.reshape(-1, 3) for s in shifts], dtype),
        pbc=torch.tensor(np.stack(pbcs), device=device),
    )
