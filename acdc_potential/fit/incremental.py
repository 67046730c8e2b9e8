"""A fitted model updated with new structures and new sparse environments, without refitting
from scratch: what on-the-fly active learning needs (:mod:`acdc_potential.active`).

The design matrix of every labelled structure is kept per kernel piece (``[n_pieces, R, M]``,
:class:`~acdc_potential.fit.design.DesignMatrix`) with ``K_MM`` per piece, built once when the update
starts, so that no kernel value is computed twice afterwards:

- new structures add rows: their kernel rows against every sparse environment;
- new sparse environments add columns: the rows of every labelled structure against them, and
  their blocks of ``K_MM``; the kernel's scales stay those of the first fit
  (:meth:`~acdc_potential.kernels.base.SparseKernel.with_sparse`).

The solution is the projected process of :mod:`~acdc_potential.fit.solver` on all rows and
columns, for the kernel's mixing and the regularisers of the first fit (or of the last
:meth:`IncrementalFit.retune`): rows alone fold into the triangle of the tall-skinny QR
(``R`` of ``[R_old; new rows]``, ``O(rows M^2)``); new columns change ``P`` and the kept rows are
factorised anew (``O(R M^2)``, no kernel computed). Either way the weights equal those of a
solve from scratch on the same structures, sparse set and kernel scales, to rounding. The memory held is that of
the design matrix, ``8 n_pieces R M`` bytes: sized for the hundreds of structures of active
learning, not for the data sets of :func:`~acdc_potential.fit.driver.fit`.
"""

import dataclasses
from typing import List, Optional, Sequence, Tuple

import torch

from ..data import Labelled, as_labelled
from ..descriptors.neighbors import batch_from_atoms
from .checkpoint import SparseKRRModel
from .design import DesignMatrix, build_design_matrix, mix_pieces
from .driver import calibrate_on, tune_on
from .report import FitLog
from .solver import DEFAULT_JITTER, design_triangle, merge_triangles, prior_triangle, solution_from_triangle, sparse_projection
from .sources import as_source
from .tasks import RowKinds


class IncrementalFit:
    """A sparse-KRR model and the rows of its labelled structures, updated by :meth:`add`.

    :param model: the fitted model (its density, kernel with sparse set, baseline,
        regularisers, calibration); not changed.
    :param structures: the labelled structures it was fitted on (``ase.Atoms`` or
        :class:`~acdc_potential.data.Labelled`); their rows are built once here.
    :param kinds: (energies, forces, stress): the labels used, as in the fit.
    :param sparse_owners: ``[M]`` position in ``structures`` of the structure of each sparse
        environment (default: ``model.sparse_owners``); needed by :meth:`retune` to calibrate.
    """

    def __init__(
        self,
        model: SparseKRRModel,
        structures: Sequence,
        kinds: RowKinds = (True, True, True),
        sparse_owners: Optional[Sequence[int]] = None,
        jitter: float = DEFAULT_JITTER,
    ):
        self.density_hypers, self.species, self.expansion = model.density_hypers, list(model.species), model.expansion
        self.baseline, self.regularisers, self.calibration, self.report = model.baseline, model.regularisers, model.calibration, model.report
        self.warnings = list(model.warnings)
        self.kernel = model.kernel.with_sparse(model.kernel.sparse_coefficients, model.kernel.sparse_species)
        self.kinds, self.jitter = tuple(kinds), jitter
        owners = sparse_owners if sparse_owners is not None else model.sparse_owners
        self.sparse_owners: Optional[List[int]] = None if owners is None else [int(k) for k in owners]
        self.structures: List[Labelled] = list(as_labelled(structures))
        self.design = self._rows(self.structures, self.kernel)
        self.k_mm = self.kernel.sparse_block()
        self._factorise()

    def _rows(self, structures: List[Labelled], kernel) -> DesignMatrix:
        """The rows of ``structures`` against the sparse environments of ``kernel``."""
        return build_design_matrix(structures, self.expansion, kernel, self.baseline, *self.kinds)

    def _factorise(self) -> None:
        """``P`` of ``K_MM`` and the triangle of the prior and every kept row."""
        weights = self.kernel.piece_weights()
        self.projection = sparse_projection(mix_pieces(weights, self.k_mm), self.jitter)
        self.triangle = merge_triangles(prior_triangle(self.projection), design_triangle(self.design, weights, self.regularisers, self.projection))

    def add(self, structures: Sequence = (), sparse_atoms: Sequence[Sequence[int]] = ()) -> None:
        """Add labelled ``structures`` and, for the ``k``-th of them, its atoms ``sparse_atoms[k]``
        (indices) as sparse environments."""
        new = [dataclasses.replace(s, index=len(self.structures) + k) for k, s in enumerate(as_labelled(list(structures)))]
        chosen = [(k, [int(i) for i in atoms]) for k, atoms in enumerate(sparse_atoms) if len(atoms)]
        if chosen:
            coefficients, species = self._environments([new[k].atoms for k, _ in chosen], [atoms for _, atoms in chosen])
            self._add_columns(coefficients, species)
            if self.sparse_owners is not None:
                self.sparse_owners += [len(self.structures) + k for k, atoms in chosen for _ in atoms]
        if new:
            rows = self._rows(new, self.kernel)
            rows.structure += len(self.structures)
            self.structures += new
            self.design = _stacked(self.design, rows)
            if not chosen:
                weights = self.kernel.piece_weights()
                self.triangle = merge_triangles(self.triangle, design_triangle(rows, weights, self.regularisers, self.projection))
        if chosen:
            self._factorise()

    def _environments(self, frames: List, atoms: List[List[int]]) -> Tuple[torch.Tensor, torch.Tensor]:
        """The kernel's environments ``[m, D]`` (density coefficients, or features) and atomic numbers ``[m]`` of the atoms ``atoms[k]`` of each of ``frames``."""
        batch = batch_from_atoms(frames, self.expansion.cutoff, device=self.kernel.sparse_coefficients.device)
        offsets = torch.cumsum(torch.tensor([0] + [len(f) for f in frames[:-1]]), 0)
        centres = torch.cat([offsets[k] + torch.tensor(indices) for k, indices in enumerate(atoms)]).to(batch.numbers.device)
        coefficients, _ = self.kernel.environments(self.expansion, batch, centres)
        return coefficients, batch.numbers[centres]

    def _add_columns(self, coefficients: torch.Tensor, species: torch.Tensor) -> None:
        """The kept rows and ``K_MM`` extended by the sparse environments ``coefficients [m, D]``."""
        species = species.to(torch.long)
        columns = build_design_matrix(self.structures, self.expansion, self.kernel.with_sparse(coefficients, species), self.baseline, *self.kinds).pieces
        extended = self.kernel.with_sparse(torch.cat([self.kernel.sparse_coefficients, coefficients]), torch.cat([self.kernel.sparse_species, species]))
        with torch.no_grad():
            block = extended.rows(coefficients, species)  # [n_pieces, m, M + m]
        m_old = self.k_mm.shape[1]
        self.k_mm = torch.cat([torch.cat([self.k_mm, block[:, :, :m_old].transpose(1, 2)], dim=2), block], dim=1)
        self.design = dataclasses.replace(self.design, pieces=torch.cat([self.design.pieces, columns], dim=2))
        self.kernel = extended

    def retune(self, validation: float, seed: int = 0, log: Optional[FitLog] = None, method: str = "validation", folds: int = 0) -> None:
        """Tune the mixing and regularisers on the kept rows (:func:`~acdc_potential.fit.driver.tune_on`
        by ``method``, ``validation`` (a held-out ``validation`` fraction, or ``folds``-fold
        cross-validation when ``folds >= 2``) or ``evidence``, with every sparse environment; no kernel
        row is computed) and, when the sparse environments' structures are known, calibrate the
        uncertainties anew (:func:`~acdc_potential.fit.driver.calibrate_on`, which predicts a held-out
        ``validation`` fraction of the structures)."""
        log = log if log is not None else FitLog(False)
        options = {"method": method, "validation": validation, "seed": seed, "folds": folds}
        self.report = tune_on(self.design, self.k_mm, self.kernel, self.regularisers, self.jitter, options, log)
        self.regularisers = self.report.regularisers
        if self.sparse_owners is not None:
            parts = (self.density_hypers, self.species, self.baseline, self.expansion)
            positions = list(range(len(self.structures)))
            owners = torch.tensor(self.sparse_owners, dtype=torch.long)
            self.calibration = calibrate_on(self.design, self.k_mm, self.kernel, self.regularisers, self.jitter, as_source(self.structures), positions, owners, parts, self.kinds, validation, seed, log)
        self._factorise()

    def model(self) -> SparseKRRModel:
        """The model of the current structures and sparse set (a snapshot: later updates leave it as it is)."""
        solution = solution_from_triangle(self.triangle, self.projection)
        kernel = self.kernel.with_sparse(self.kernel.sparse_coefficients, self.kernel.sparse_species)
        owners = None if self.sparse_owners is None else torch.tensor(self.sparse_owners, dtype=torch.long)
        return SparseKRRModel(
            self.density_hypers, self.species, kernel, solution, self.baseline, self.regularisers, self.report,
            self.expansion, self.warnings, self.calibration, owners,
        )


def _stacked(first: DesignMatrix, second: DesignMatrix) -> DesignMatrix:
    """The rows of ``first`` then ``second`` (same columns)."""
    return DesignMatrix(*(torch.cat([getattr(first, f.name), getattr(second, f.name)], dim=1 if f.name == "pieces" else 0) for f in dataclasses.fields(DesignMatrix)))
