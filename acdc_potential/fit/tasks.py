"""The units of work of a fit, as top-level functions of plain, picklable arguments.

Each takes a :class:`~acdc_potential.fit.sources.StructureSource`, what it needs of the fit
so far, and last the ``positions`` of the structures it works on, and returns something
small beside those structures (a survey, coefficients of a sample, rows of a sample, or the
``[r + 1, r + 1]`` triangle of a group's rows). An
:class:`~acdc_potential.fit.executors.Executor` runs them in this process or on the workers
of a Dask cluster: the same functions either way, so both give the same model.
"""

import hashlib
import os
import tempfile
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from ..config import Regularisers
from ..data import validate
from ..descriptors.density import DensityExpansion, Layout
from ..descriptors.neighbors import batch_from_atoms
from ..kernels.base import SparseKernel
from .baseline import Baseline
from .design import DesignMatrix, build_design_matrix
from .solver import design_triangle
from .sources import StructureSource
from .survey import Survey

# (energies, forces, stress): the kinds of rows the fit uses
RowKinds = Tuple[bool, bool, bool]


def survey(source: StructureSource, species: Optional[List[int]], positions: Sequence[int]) -> Survey:
    """Validate the structures (:func:`~acdc_potential.data.validate`, against ``species`` when
    given) and survey them."""
    structures = source.read(positions)
    validate(structures, species=species)
    return Survey.of(structures, positions)


def coefficients(
    source: StructureSource, expansion: DensityExpansion, kernel: SparseKernel, progress: bool, positions: Sequence[int], batch_size: int = 64
) -> Tuple[torch.Tensor, torch.Tensor, Layout]:
    """The kernel's environments (:meth:`SparseKernel.environments`, density coefficients for most)
    ``[N, D]``, atomic numbers ``[N]`` and layout of every atom of the structures (batches of
    ``batch_size``; ``progress``: a progress bar over them), on the device of ``expansion``."""
    from tqdm import tqdm

    structures = source.read(positions)
    flat, numbers, layout = [], [], None
    for start in tqdm(range(0, len(structures), batch_size), desc="environments", unit="batch", disable=not progress):
        members = structures[start : start + batch_size]
        batch = batch_from_atoms([s.atoms for s in members], expansion.cutoff, device=expansion.species_lookup.device, first_index=members[0].index)
        c, layout = kernel.environments(expansion, batch)
        flat.append(c)
        numbers.append(batch.numbers)
    return torch.cat(flat), torch.cat(numbers), layout


def design(
    source: StructureSource,
    expansion: DensityExpansion,
    kernel: SparseKernel,
    baseline: Baseline,
    kinds: RowKinds,
    progress: bool,
    positions: Sequence[int],
    budget: float = 3e7,
) -> DesignMatrix:
    """The rows of the structures (:func:`~acdc_potential.fit.design.build_design_matrix`),
    their structures numbered from 0 in the order of ``positions``."""
    energies, forces, stress = kinds
    return build_design_matrix(source.read(positions), expansion, kernel, baseline, energies, forces, stress, budget, progress=progress)


@dataclass
class FinalSolve:
    """What the triangle of a group of rows depends on beyond the rows: the mixing
    (``piece_weights`` ``[n_pieces]``), the ``regularisers``, the projection ``[M, r]`` of
    :func:`~acdc_potential.fit.solver.sparse_projection`, and where finished triangles are
    stored (``store``: a folder, or ``None``), under names derived from ``fingerprint`` (a
    digest of everything the rows depend on) and the group's positions."""

    piece_weights: torch.Tensor
    regularisers: Regularisers
    projection: torch.Tensor
    store: Optional[str] = None
    fingerprint: str = ""

    def stored(self, positions: Sequence[int]) -> Optional[str]:
        """The file of the triangle of ``positions`` in ``store`` (``None`` without a store)."""
        if self.store is None:
            return None
        key = hashlib.sha256(f"{self.fingerprint}:{','.join(map(str, positions))}".encode()).hexdigest()[:32]
        return os.path.join(self.store, f"{KEPT_PREFIX}{key}.pt")


KEPT_PREFIX = "rows-"


def triangle(
    source: StructureSource,
    expansion: DensityExpansion,
    kernel: SparseKernel,
    baseline: Baseline,
    kinds: RowKinds,
    solve: FinalSolve,
    progress: bool,
    positions: Sequence[int],
) -> torch.Tensor:
    """``[r + 1, r + 1]`` triangle of the rows of the structures for the final solve
    (:func:`~acdc_potential.fit.solver.design_triangle`). With a store, a triangle kept there
    is read instead of rebuilt (tensors only: ``weights_only``; one that does not read back
    as such a triangle is rebuilt), and a new one is written there before it is returned, so
    that a rerun of an interrupted fit resumes."""
    path = solve.stored(positions)
    size = solve.projection.shape[1] + 1
    if path is not None and os.path.exists(path):
        try:
            kept = torch.load(path, weights_only=True, map_location="cpu")
            if isinstance(kept, torch.Tensor) and kept.shape == (size, size) and kept.dtype == solve.projection.dtype:
                return kept.to(solve.projection.device)
        except Exception:  # a file cut short by a crash: rebuilt below
            pass
    rows = design(source, expansion, kernel, baseline, kinds, progress, positions)
    result = design_triangle(rows, solve.piece_weights, solve.regularisers, solve.projection)
    if path is not None:
        keep(result, path)
    return result


def keep(tensor: torch.Tensor, path: str) -> None:
    """Write ``tensor`` to ``path`` so that ``path`` is either absent or whole, whoever else
    writes it at the same time (a file of its own in the same folder, synced, then renamed)."""
    handle, partial = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".partial-")
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(tensor.cpu(), file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(partial, path)
    except BaseException:
        if os.path.exists(partial):
            os.remove(partial)
        raise


def kept_count(solve: FinalSolve, parts: Sequence[Sequence[int]]) -> int:
    """How many of ``parts`` have a triangle kept in the store of ``solve``."""
    return sum(1 for part in parts if solve.stored(part) is not None and os.path.exists(solve.stored(part)))


def discard_kept(store: str) -> None:
    """Remove the triangles kept in ``store`` (:class:`FinalSolve`), and the folder if that empties it."""
    if not os.path.isdir(store):
        return
    for name in os.listdir(store):
        if name.startswith(KEPT_PREFIX) or name.startswith(".partial-"):
            os.remove(os.path.join(store, name))
    if not os.listdir(store):
        os.rmdir(store)
