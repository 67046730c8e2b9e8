"""The design matrix: rows of ``K_NM`` per kernel piece, built in batches of structures.

Rows are built per batch of structures: the density coefficients' Jacobian with respect to
positions and strain, ``dc_i / d(x, eps)`` (once per structure), is contracted with the
kernel's derivatives with respect to ``c_i`` (:meth:`SparseKernel.structure_derivatives`).
The design matrix keeps one slice per kernel piece, so mixing coefficients and
regularisers are tuned without recomputing kernels.
"""

from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence, Union

import numpy as np
import torch
from ase.data import chemical_symbols
from tqdm import tqdm

from ..config import Regularisers
from ..data import Labelled
from ..descriptors.density import DensityExpansion
from ..descriptors.neighbors import batch_from_atoms
from ..kernels.base import SparseKernel
from .baseline import Baseline
from .targets import ENERGY, FORCES, STRESS, _row_count, _rows_of, _voigt


def mix_pieces(piece_weights: torch.Tensor, pieces: torch.Tensor) -> torch.Tensor:
    """``sum_p omega_p pieces[p]`` for the pieces' weights ``[n_pieces]`` and ``[n_pieces, ...]``."""
    return torch.einsum("p,p...->...", piece_weights.to(pieces), pieces)


@dataclass
class DesignMatrix:
    """Rows of the regression, per kernel piece.

    :param pieces: ``[n_pieces, R, M]`` rows of ``K_NM`` for each kernel piece.
    :param targets: ``[R]`` labels minus the baseline (energies, forces, stress).
    :param kind: ``[R]`` ENERGY / FORCES / STRESS.
    :param structure: ``[R]`` index of the row's structure in the input list.
    :param n_atoms: ``[R]`` number of atoms of the row's structure.
    :param weight: ``[R]`` the structure's weight.
    """

    pieces: torch.Tensor
    targets: torch.Tensor
    kind: torch.Tensor
    structure: torch.Tensor
    n_atoms: torch.Tensor
    weight: torch.Tensor

    def combine(self, piece_weights: torch.Tensor, rows: Union[None, slice, torch.Tensor] = None) -> torch.Tensor:
        """``K_NM`` for the pieces' weights ``[n_pieces]``: its ``rows`` (a slice or indices;
        default all ``R``), ``[rows, M]``."""
        return mix_pieces(piece_weights, self.pieces if rows is None else self.pieces[:, rows])

    def inverse_sigma(self, regularisers: Regularisers) -> torch.Tensor:
        """``[R]`` diagonal of ``Lambda^{-1/2}``."""
        sigma = regularisers.of_kind().to(self.targets)[self.kind]
        scale = torch.where(self.kind == ENERGY, self.n_atoms.to(self.targets).sqrt(), torch.ones_like(self.targets))
        return self.weight.sqrt() / (sigma * scale)

    def subset(self, rows: Optional[torch.Tensor] = None, columns: Optional[torch.Tensor] = None) -> "DesignMatrix":
        """The rows where ``rows`` ``[R]`` is true (default: all), restricted to the sparse
        environments ``columns`` (indices; default: all), with one copy of the pieces."""
        r = torch.nonzero(rows).flatten() if rows is not None else torch.arange(self.targets.shape[0], device=self.targets.device)
        pieces = self.pieces[:, r] if columns is None else self.pieces[:, r[:, None], columns[None, :]]
        return DesignMatrix(pieces, self.targets[r], self.kind[r], self.structure[r], self.n_atoms[r], self.weight[r])

    def kinds_present(self) -> List[int]:
        return sorted(set(self.kind.tolist()))

    @classmethod
    def gather(cls, parts: Iterable["DesignMatrix"], counts: Sequence[int], n_rows: int) -> "DesignMatrix":
        """The ``n_rows`` rows of ``parts`` in order, each built from ``counts`` structures
        (numbered from 0 in each part), their structures numbered on. The parts are copied
        into one allocation as they come, so that at most one of them exists beside it."""
        parts = iter(parts)
        first = next(parts)
        if len(counts) == 1:
            if first.targets.shape[0] != n_rows:
                raise ValueError(f"the design has {first.targets.shape[0]} rows, expected {n_rows}")
            return first
        pieces = first.pieces.new_empty((first.pieces.shape[0], n_rows, first.pieces.shape[2]))
        vectors = {name: getattr(first, name).new_empty(n_rows) for name in ("targets", "kind", "structure", "n_atoms", "weight")}
        start, offset, part = 0, 0, first
        del first
        for k, count in enumerate(counts):
            if k > 0:
                part = next(parts)
            stop = start + part.targets.shape[0]
            pieces[:, start:stop] = part.pieces
            for name, vector in vectors.items():
                vector[start:stop] = getattr(part, name) + (offset if name == "structure" else 0)
            start, offset = stop, offset + count
            del part
        if start != n_rows:
            raise ValueError(f"the parts have {start} rows, expected {n_rows}")
        return cls(pieces, **vectors)


def _batches(items: Sequence, cost, budget: float) -> List[List[int]]:
    """Consecutive groups of indices of ``items`` whose summed ``cost(item)`` stays below ``budget``
    (a group of one item may exceed it)."""
    groups, current, total = [], [], 0.0
    for k, item in enumerate(items):
        c = cost(item)
        if current and total + c > budget:
            groups.append(current)
            current, total = [], 0.0
        current.append(k)
        total += c
    if current:
        groups.append(current)
    return groups


def design_bytes(rows: int, n_pieces: int, n_sparse: int) -> float:
    """Bytes of the design matrix of ``rows`` rows: ``n_pieces x rows x M`` float64."""
    return 8.0 * n_pieces * n_sparse * float(rows)


def design_groups(rows: Sequence[int], n_pieces: int, n_sparse: int, memory: float, seed: int = 0) -> List[List[int]]:
    """Structure indices in groups whose design matrices (``n_pieces x rows x M`` float64) fit in
    ``memory`` bytes, for structures of ``rows`` rows each (:meth:`Survey.row_counts
    <acdc_potential.fit.survey.Survey.row_counts>`): all in their order if they fit together,
    else in a random order (``seed``) so that the first group, which the tuning sees, is a
    random sample of the data."""
    sizes = [design_bytes(r, n_pieces, n_sparse) for r in rows]
    if sum(sizes) <= memory:
        return [list(range(len(sizes)))]
    order = torch.randperm(len(sizes), generator=torch.Generator().manual_seed(seed)).tolist()
    return [[order[k] for k in group] for group in _batches([sizes[k] for k in order], float, memory)]


def split_group(group: Sequence[int], rows: Sequence[int], n_pieces: int, n_sparse: int, memory: float) -> List[List[int]]:
    """``group`` (structure indices) cut, in its order, into consecutive parts whose design
    matrices fit in ``memory`` bytes (one part when they all do)."""
    sizes = [design_bytes(rows[k], n_pieces, n_sparse) for k in group]
    return [[group[k] for k in part] for part in _batches(sizes, float, memory)]


def build_design_matrix(
    structures: Sequence[Labelled],
    expansion: DensityExpansion,
    kernel: SparseKernel,
    baseline: Baseline,
    energies: bool = True,
    forces: bool = True,
    stress: bool = True,
    budget: float = 3e7,
    progress: bool = False,
) -> DesignMatrix:
    """Rows for every label of ``structures`` (those absent are skipped).

    A structure's rows are sums over its atoms, and an atom of species ``a`` meets only the
    sparse environments of ``a`` (the kernels are zero across species), so the rows are
    built one central species at a time: the columns of ``a`` from the atoms of ``a``.
    Whatever the kernel keeps about one species' sparse environments between batches
    (:meth:`SparseKernel.clear_cache`) is then held for that species only. A kernel that
    computes the features of a whole batch at once (``rows_by_species`` false) builds every
    species' columns in one pass instead. ``progress`` shows a progress bar per pass.

    Atoms of a species without sparse environments add nothing (the kernel is zero across
    species): the other atoms of a single-centre model (``kernel.centres``), or the species
    without new environments in an update's new columns (:mod:`~acdc_potential.fit.incremental`).

    :param budget: largest number of entries of the per-batch derivatives (``n_pieces x M x K``
        per structure, ``K = 3 n_atoms + 9`` directions) and coefficient Jacobians
        (``n_atoms x K x D``) held at once; sets the batch size (float64, 8 bytes each). The
        kernel bounds its own intermediates (``SparseKernel.max_pairs``).
    """
    wanted = [_rows_of(s, energies, forces, stress) for s in structures]
    counts = [_row_count(s, w) for s, w in zip(structures, wanted)]
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(int)
    n_rows, n_sparse, n_pieces = int(offsets[-1]), kernel.n_sparse, kernel.n_pieces
    if n_rows == 0:
        raise ValueError("no rows to fit: the structures have no energies, forces or stress to use")
    dimension = kernel.tangent_size(expansion)
    device = kernel.sparse_coefficients.device

    pieces = torch.zeros((n_pieces, n_rows, n_sparse), dtype=torch.float64, device=device)
    targets = torch.zeros(n_rows, dtype=torch.float64, device=device)
    kind = torch.zeros(n_rows, dtype=torch.long, device=device)
    row_structure = torch.zeros(n_rows, dtype=torch.long, device=device)
    row_atoms = torch.zeros(n_rows, dtype=torch.long, device=device)
    row_weight = torch.zeros(n_rows, dtype=torch.float64, device=device)
    for k, (s, (use_e, use_f, use_s)) in enumerate(zip(structures, wanted)):
        start, end = offsets[k], offsets[k + 1]
        row_structure[start:end], row_atoms[start:end], row_weight[start:end] = k, s.n_atoms, s.weight
        n3 = 3 * s.n_atoms if use_f else 0
        if use_e:
            targets[start] = s.energy - baseline.structure_energy(s.atoms.numbers)
            kind[start] = ENERGY
        if use_f:
            targets[start + use_e : start + use_e + n3] = torch.as_tensor(s.forces, dtype=torch.float64, device=device).reshape(-1)
            kind[start + use_e : start + use_e + n3] = FORCES
        if use_s:
            targets[end - 6 : end] = _voigt(torch.as_tensor(s.stress, dtype=torch.float64, device=device))
            kind[end - 6 : end] = STRESS

    def cost(s: Labelled) -> float:
        directions = 3 * s.n_atoms + 9
        return n_pieces * n_sparse * directions + s.n_atoms * directions * dimension

    # neighbour lists once, for every species' pass (small beside the rows)
    groups = [
        (group, batch_from_atoms([structures[k].atoms for k in group], expansion.cutoff, device=device, first_index=group[0]))
        for group in _batches(structures, cost, budget)
    ]
    centred = [z for z in sorted({int(z) for s in structures for z in s.atoms.numbers}) if bool((kernel.sparse_species == z).any())]
    passes = [[z] for z in centred] if kernel.rows_by_species else ([centred] if centred else [])
    for species in passes:
        columns = torch.cat([kernel.sparse_of(z) for z in species])
        label = "".join(chemical_symbols[z] for z in species)
        bar = tqdm(total=len(structures), desc=f"kernel rows, {label} centres", unit="structure", disable=not progress)
        for group, batch in groups:
            centres = torch.nonzero(torch.isin(batch.numbers, torch.tensor(species, device=batch.numbers.device))).flatten()
            bar.update(len(group))
            if centres.numel() == 0:
                continue
            forces_or_stress = any(wanted[k][1] or wanted[k][2] for k in group)
            with_stress = any(wanted[k][2] for k in group)
            values, derivatives = kernel.structure_rows(expansion, batch, centres, forces_or_stress, with_stress)
            n_max = int(batch.atoms_per_structure().max())
            values = values[:, :, columns]
            for t, k in enumerate(group):
                s, (use_e, use_f, use_s) = structures[k], wanted[k]
                start, end = offsets[k], offsets[k + 1]
                if use_e:
                    pieces[:, start, columns] = values[:, t]
                if use_f:
                    n3 = 3 * s.n_atoms
                    pieces[:, start + use_e : start + use_e + n3, columns] = -derivatives[:, t, columns, :n3].transpose(1, 2)
                if use_s:
                    strain = derivatives[:, t, columns, 3 * n_max :].reshape(n_pieces, columns.numel(), 3, 3)
                    pieces[:, end - 6 : end, columns] = _voigt(strain / abs(s.atoms.get_volume())).transpose(1, 2)
        bar.close()
        # the kernel may keep these species' sparse invariants between groups: free them
        kernel.clear_cache()
    return DesignMatrix(pieces, targets, kind, row_structure, row_atoms, row_weight)
