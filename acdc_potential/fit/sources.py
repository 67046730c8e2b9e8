"""Where a fit reads its structures from: a list in memory, or an extxyz file read by parts.

A fit never needs every structure at once. Its steps ask a *source* for the structures of
a list of positions (:meth:`StructureSource.read`), so that the same steps run in one process
on a list, or on the workers of a Dask cluster that each read their share of a file
(:mod:`~acdc_potential.fit.executors`). Positions are those of the file (or the list), and
they are the numbers used in error messages.
"""

import dataclasses
import hashlib
import io
import os
import socket
from typing import List, Sequence

import ase.io
import numpy as np
import torch

from ..data import LabelKeys, Labelled, as_labelled, labels_of
from ..errors import DataFileError


class StructureSource:
    """Labelled structures by position: ``len(source)`` of them, read ``source.read(positions)``."""

    def __len__(self) -> int:
        raise NotImplementedError

    def read(self, positions: Sequence[int]) -> List[Labelled]:
        """The structures at ``positions`` (in that order), each numbered as its source numbers it
        in error messages (its position in the file; for a list, its own ``index``)."""
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
        return digest_of([(s.atoms.numbers, s.atoms.positions, s.atoms.cell.array, s.atoms.pbc, s.energy, s.forces, s.stress, s.weight) for s in self.structures])


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
        """As :meth:`StructureSource.read`; a :class:`~acdc_potential.errors.DataFileError` names
        the file, the machine and the frame when the file is not there or not as it was located."""
        where = f"{self.path} (read on {socket.gethostname()})"
        try:
            status = os.stat(self.path)
        except OSError as error:
            raise DataFileError(f"{where}: cannot be read ({error.strerror}); every worker must reach the training file under the same path") from None
        if (status.st_size, status.st_mtime_ns) != self._stamp:
            raise DataFileError(f"{where}: the file changed after the fit located its frames (or this machine has another copy of it)")
        structures = []
        with open(self.path, "rb") as file:
            for k in positions:
                file.seek(int(self.offsets[k]))
                try:
                    text = file.read(int(self.offsets[k + 1] - self.offsets[k])).decode()
                    atoms = ase.io.read(io.StringIO(text), format="extxyz", index=0)
                except Exception as error:
                    raise DataFileError(f"{where}: frame {k} is not readable extxyz ({' '.join(str(error).split()) or type(error).__name__})") from None
                structures.append(labels_of(atoms, self.keys, int(k)))
        return structures

    def fingerprint(self) -> str:
        return digest_of((self.path, self._stamp, len(self), dataclasses.astuple(self.keys)))


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
                    if header and any(line.strip() for line in file):
                        raise DataFileError(f"{path}: not a readable extxyz file: a blank line where frame {len(offsets) - 1} should start")
                    break
                try:
                    n_atoms = int(header.split()[0])
                except (ValueError, UnicodeDecodeError):
                    shown = header[:40].decode(errors="replace").strip()
                    raise DataFileError(f"{path}: not a readable extxyz file: frame {len(offsets) - 1} does not start with an atom count ({shown!r})") from None
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


def digest_of(item) -> str:
    """SHA-256 of nested tuples, lists and dicts of arrays, tensors, numbers and strings, each
    entry tagged by its type, shape and dtype (so that no two different items read alike)."""
    digest = hashlib.sha256()

    def update(x) -> None:
        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().numpy()
        if isinstance(x, np.ndarray):
            digest.update(f"array{x.shape}{x.dtype}:".encode() + np.ascontiguousarray(x).tobytes())
        elif isinstance(x, dict):
            digest.update(f"dict{len(x)}:".encode())
            for key in sorted(x, key=repr):
                update(key)
                update(x[key])
        elif isinstance(x, (list, tuple)):
            digest.update(f"{type(x).__name__}{len(x)}:".encode())
            for entry in x:
                update(entry)
        elif dataclasses.is_dataclass(x):
            update((type(x).__name__, dataclasses.asdict(x)))
        else:
            text = repr(x).encode()
            digest.update(f"{type(x).__name__}{len(text)}:".encode() + text)

    update(item)
    return digest.hexdigest()


def as_source(structures) -> StructureSource:
    """``structures`` as a :class:`StructureSource` (a list is wrapped in a :class:`MemorySource`)."""
    return structures if isinstance(structures, StructureSource) else MemorySource(structures)
