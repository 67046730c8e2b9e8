"""Where a fit reads its structures from: a list in memory, or an extxyz file read by parts.

A fit never needs every structure at once. Its steps ask a *source* for the structures of
a list of positions (:meth:`StructureSource.read`), so that the same steps run in one process
on a list, or on the workers of a Dask cluster that each read their share of a file
(:mod:`~acdc_potential.fit.executors`). Positions are those of the file (or the list), and
they are the numbers used in error messages.
"""

import hashlib
import io
import os
from typing import List, Sequence

import ase.io
import numpy as np

from ..data import LabelKeys, Labelled, as_labelled, labels_of, read_frames
from ..errors import DataFileError


class StructureSource:
    """Labelled structures by position: ``len(source)`` of them, read ``source.read(positions)``."""

    def __len__(self) -> int:
        raise NotImplementedError

    def read(self, positions: Sequence[int]) -> List[Labelled]:
        """The structures at ``positions`` (in that order), each numbered by its position."""
        raise NotImplementedError

    def fingerprint(self) -> str:
        """A digest that changes when the structures may have changed (names stored partial results)."""
        raise NotImplementedError


class MemorySource(StructureSource):
    """Structures held in a list (``ase.Atoms`` or :class:`~acdc_potential.data.Labelled`)."""

    def __init__(self, structures: Sequence):
        self.structures = as_labelled(structures)

    def __len__(self) -> int:
        return len(self.structures)

    def read(self, positions: Sequence[int]) -> List[Labelled]:
        return [self.structures[k] for k in positions]

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for s in self.structures:
            for array in (s.atoms.numbers, s.atoms.positions, s.atoms.cell.array, s.atoms.pbc):
                digest.update(np.ascontiguousarray(array).tobytes())
            for label in (s.energy, s.forces, s.stress, s.weight):
                digest.update(b"-" if label is None else np.ascontiguousarray(label, dtype=np.float64).tobytes())
        return digest.hexdigest()


class ExtxyzSource(StructureSource):
    """The frames of an extxyz file, located once by their byte offsets and parsed on demand.

    Building the source reads the file once, line by line, and keeps one offset per frame
    (8 bytes each); :meth:`read` parses only the frames asked for. This is what lets the
    workers of a distributed fit read their own share of the training set.

    :param path: the extxyz file (plain XYZ frames with extxyz comment lines).
    :param keys: names of the labels (:class:`~acdc_potential.data.LabelKeys`).
    """

    def __init__(self, path: str, keys: LabelKeys = LabelKeys()):
        self.path = os.path.abspath(path)
        self.keys = keys
        self.offsets = frame_offsets(path)
        status = os.stat(self.path)
        self._stamp = (status.st_size, status.st_mtime_ns)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def read(self, positions: Sequence[int]) -> List[Labelled]:
        structures = []
        with open(self.path, "rb") as file:
            for k in positions:
                file.seek(int(self.offsets[k]))
                text = file.read(int(self.offsets[k + 1] - self.offsets[k])).decode()
                atoms = ase.io.read(io.StringIO(text), format="extxyz", index=0)
                structures.append(labels_of(atoms, self.keys, int(k)))
        return structures

    def fingerprint(self) -> str:
        return hashlib.sha256(repr((self.path, self._stamp, len(self))).encode()).hexdigest()


def frame_offsets(path: str) -> np.ndarray:
    """``[n_frames + 1]`` byte offsets of the frames of an XYZ/extxyz file (the last: its end).

    A :class:`~acdc_potential.errors.DataFileError` names the file when it is missing, empty,
    not XYZ, or truncated (a frame with fewer lines than its atom count says), as
    :func:`~acdc_potential.data.read_frames` does.
    """
    offsets = [0]
    try:
        with open(path, "rb") as file:
            while True:
                header = file.readline()
                if not header.strip():
                    if header and file.read().strip():
                        raise DataFileError(f"{path}: not a readable extxyz file: a blank line where frame {len(offsets) - 1} should start")
                    break
                try:
                    n_atoms = int(header.split()[0])
                except ValueError:
                    read_frames(path)  # ASE's own diagnosis of what the file is
                    raise DataFileError(f"{path}: not a readable extxyz file: frame {len(offsets) - 1} does not start with an atom count") from None
                for line in range(n_atoms + 1):
                    if not file.readline():
                        raise DataFileError(f"{path}: not a readable extxyz file: frame {len(offsets) - 1} has fewer than {n_atoms} atoms (the file may be truncated)")
                offsets.append(file.tell())
    except FileNotFoundError:
        raise DataFileError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DataFileError(f"{path}: is a directory, not a data file") from None
    if len(offsets) == 1:
        raise DataFileError(f"{path}: the file is empty")
    return np.asarray(offsets, dtype=np.int64)


def as_source(structures) -> StructureSource:
    """``structures`` as a :class:`StructureSource` (a list is wrapped in a :class:`MemorySource`)."""
    return structures if isinstance(structures, StructureSource) else MemorySource(structures)
