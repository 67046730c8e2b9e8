"""The projected-process solve (subset of regressors, as in GAP), by a tall-skinny QR.

    min_w || Lambda^{-1/2} (y - K_NM w) ||^2 + w^T K_MM w

(docs/equations.md, "Sparse kernel ridge regression"), never by inverting a matrix.
"""

import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple, Union

import torch

from ..config import Regularisers
from ..model.uncertainty import DEFAULT_JITTER, projected_variance, sparse_projection
from .design import DesignMatrix, mix_pieces


@dataclass
class ProjectedProcess:
    """Solution of the projected-process regression.

    With ``K_MM = U diag(lambda) U^T`` (eigenvalues raised to at least ``jitter * lambda_max``:
    ``K_MM`` plus a small ridge where it is numerically singular), ``P = U lambda^{-1/2}``
    ``[M, r]`` (``r = M``) and ``w = P z``, the problem becomes ridge
    regression on ``Phi = K_NM P`` with ``|z|^2`` as penalty, solved by QR of
    ``[Lambda^{-1/2} Phi; I]`` = ``Q R``; no matrix is inverted.

    :param weights: ``[M]`` ``w``.
    :param projection: ``[M, r]`` ``P``.
    :param triangular: ``[r, r]`` ``R``, with ``R^T R = Phi^T Lambda^{-1} Phi + I``.
    """

    weights: torch.Tensor
    projection: torch.Tensor
    triangular: torch.Tensor

    def to(self, device: torch.device) -> "ProjectedProcess":
        """The same solution on ``device``."""
        return ProjectedProcess(self.weights.to(device), self.projection.to(device), self.triangular.to(device))

    def variance(self, k_xm: torch.Tensor, k_xx: torch.Tensor) -> torch.Tensor:
        """Predictive variance ``k_xx - k_xM K_MM^+ k_Mx + k_xM Sigma k_Mx`` of the projected process.

        :param k_xm: ``[n, M]`` kernel rows (atoms, or sums over a structure's atoms);
        :param k_xx: ``[n]`` the matching ``k(x, x)``. Returns ``[n]`` (eV^2 when the
            regularisers are in eV).
        """
        return projected_variance(k_xm, k_xx, self.projection, self.triangular)


def solve_projected_process(
    k_nm: Union[torch.Tensor, Callable[[int, int], torch.Tensor]],
    targets: torch.Tensor,
    inverse_sigma: torch.Tensor,
    k_mm: torch.Tensor,
    jitter: float = DEFAULT_JITTER,
    block_rows: Optional[int] = None,
    blocks: Optional[torch.Tensor] = None,
) -> ProjectedProcess:
    """Minimise ``|Lambda^{-1/2} (y - K_NM w)|^2 + w^T K_MM w`` (see :class:`ProjectedProcess`).

    :param k_nm: ``[R, M]``, or a function ``(start, stop)`` giving its rows ``start:stop``
        (so that the whole ``K_NM`` need not exist, :meth:`DesignMatrix.combine`).
    :param targets: ``[R]``; :param inverse_sigma: ``[R]`` ``Lambda^{-1/2}``;
    :param k_mm: ``[M, M]``.
    :param block_rows: rows of the stacked system factorised at once (default ``4 (r + 1)``).
    :param blocks: ``[M]`` labels of the blocks of a block-diagonal ``K_MM`` (:func:`sparse_projection`).

    The R of the QR of ``[Lambda^{-1/2} K_NM P, Lambda^{-1/2} y; I, 0]`` holds ``R`` and, in
    its last column, ``Q^T y``; it is accumulated block by block (the R of ``[R_previous;
    block]``, a tall-skinny QR), so neither ``Q`` nor the stacked matrix is ever held whole.
    """
    projection = sparse_projection(k_mm, jitter, blocks)
    return solution_from_triangle(stacked_triangle(k_nm, targets, inverse_sigma, projection, prior=True, block_rows=block_rows), projection)


def solution_from_triangle(augmented: torch.Tensor, projection: torch.Tensor) -> ProjectedProcess:
    """The weights from the ``[r + 1, r + 1]`` triangle of :func:`stacked_triangle` (with the prior rows)."""
    rank = projection.shape[1]
    r, rhs = augmented[:rank, :rank], augmented[:rank, rank]
    z = torch.linalg.solve_triangular(r, rhs[:, None], upper=True)[:, 0]
    return ProjectedProcess(projection @ z, projection, r)


def stacked_triangle(
    k_nm: Union[torch.Tensor, Callable[[int, int], torch.Tensor]],
    targets: torch.Tensor,
    inverse_sigma: torch.Tensor,
    projection: Optional[torch.Tensor],
    prior: bool = True,
    block_rows: Optional[int] = None,
    chunk_rows: int = 2048,
) -> torch.Tensor:
    """``[r + 1, r + 1]`` R factor of ``[Lambda^{-1/2} K_NM P, Lambda^{-1/2} y; I, 0]`` (without
    the ``[I, 0]`` rows unless ``prior``): its ``[:r, :r]`` is ``R`` and its ``[:r, r]`` is ``Q^T y``.

    Accumulated block by block (the R of ``[R_previous; block]``, a tall-skinny QR), so neither
    ``Q`` nor the stacked matrix is ever held whole; ``k_nm`` is asked for at most
    ``chunk_rows`` rows at a time. Arguments as :func:`solve_projected_process`; ``projection``
    ``None`` takes ``K_NM`` as it is (``P = I``, never formed; ``r`` its number of columns).
    """
    rows_of = k_nm if callable(k_nm) else (lambda start, stop: k_nm[start:stop])
    rank = projection.shape[1] if projection is not None else rows_of(0, 0).shape[1]
    n_rows = targets.shape[0]
    total = n_rows + (rank if prior else 0)
    step = block_rows or 4 * (rank + 1)
    augmented = targets.new_zeros((0, rank + 1))
    for start in range(0, total, step):
        stop = min(start + step, total)
        block = targets.new_zeros((stop - start, rank + 1))
        data = min(stop, n_rows) - start  # rows of K_NM in this block (the rest: the identity)
        for first in range(0, data, chunk_rows):
            last = min(first + chunk_rows, data)
            weight = inverse_sigma[start + first : start + last, None]
            rows = rows_of(start + first, start + last)
            block[first:last, :rank] = (rows if projection is None else rows @ projection) * weight
            block[first:last, rank] = targets[start + first : start + last] * weight[:, 0]
        identity = torch.arange(max(start, n_rows), max(stop, n_rows), device=block.device)
        block[identity - start, identity - n_rows] = 1.0
        augmented = torch.linalg.qr(torch.cat([augmented, block]), mode="r")[1]
    # fewer rows than columns (tiny problems without the prior): complete with zero rows
    return torch.cat([augmented, augmented.new_zeros((rank + 1 - augmented.shape[0], rank + 1))])


def regularisation_path_factors(
    design: DesignMatrix, k_mm_pieces: torch.Tensor, piece_weights: torch.Tensor, regularisers: Regularisers, rows: torch.Tensor, jitter: float
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """What the whole regularisation path of the rows ``rows`` (indices) of ``design`` needs: with
    ``A = Lambda^{-1/2} K_NM P = Q U diag(s_k) V^T`` (one QR of the rows, :func:`design_triangle`, and one
    SVD of its ``R``) and ``b = Lambda^{-1/2} y``: ``P`` ``[M, r]``, ``s_k`` ``[r]``, ``V^T`` ``[r, r]``,
    ``c = U^T Q^T b`` ``[r]`` and ``|b|^2``."""
    projection = sparse_projection(mix_pieces(piece_weights, k_mm_pieces), jitter)
    rank = projection.shape[1]
    triangle = design_triangle(design, piece_weights, regularisers, projection, which=rows)
    u, singular, vh = torch.linalg.svd(triangle[:rank, :rank])
    return projection, singular, vh, u.T @ triangle[:rank, rank], float(triangle[:, rank].pow(2).sum())


def scaled_regularisation_predictions(
    design: DesignMatrix,
    k_mm_pieces: torch.Tensor,
    piece_weights: torch.Tensor,
    regularisers: Regularisers,
    train: torch.Tensor,
    held_out: torch.Tensor,
    scales: torch.Tensor,
    jitter: float = DEFAULT_JITTER,
) -> torch.Tensor:
    """Predictions ``[n_scales, n_held]`` on the rows ``held_out`` of the model fitted on the
    rows ``train`` (indices) with every regulariser multiplied by each of ``scales``.

    With ``A = Lambda^{-1/2} K_NM P = Q U diag(s_k) V^T`` (one QR of the training rows, one SVD
    of its ``R``) and ``b = Lambda^{-1/2} y``, scaling every ``sigma`` by ``s`` gives
    ``z(s) = V diag(s_k / (s_k^2 + s^2)) U^T Q^T b``: the whole path for the price of one fit.
    """
    projection, singular, vh, c, _ = regularisation_path_factors(design, k_mm_pieces, piece_weights, regularisers, train, jitter)
    projected = singular * c
    held = design.combine(piece_weights, held_out) @ projection @ vh.T  # [n_held, r]
    return (projected / (singular**2 + scales[:, None] ** 2)) @ held.T


def scaled_regularisation_evidence(
    design: DesignMatrix, k_mm_pieces: torch.Tensor, piece_weights: torch.Tensor, regularisers: Regularisers, scales: torch.Tensor, jitter: float = DEFAULT_JITTER
) -> List["Evidence"]:
    """The :class:`Evidence` of all the rows of ``design`` with every regulariser multiplied by
    each of ``scales`` ``[n_scales]`` (a list of ``n_scales``), for the pieces' weights ``[n_pieces]``
    and their ``K_MM`` ``[n_pieces, M, M]``.

    With ``A = Lambda^{-1/2} K_NM P`` and ``b = Lambda^{-1/2} y`` (one QR of the rows, ``A = Q U
    diag(s_k) V^T`` by one SVD of its ``R``, ``c = U^T Q^T b``), multiplying every ``sigma`` by ``s``
    gives ``y^T C^-1 y = (|b|^2 - sum_k s_k^2 c_k^2 / (s_k^2 + s^2)) / s^2`` and ``log |C| = log |Lambda|
    + 2 N log s + sum_k log(1 + s_k^2 / s^2)``: the whole path for the price of one fit.
    """
    everything = torch.arange(design.targets.shape[0], device=design.targets.device)
    _, singular, _, c, b_squared = regularisation_path_factors(design, k_mm_pieces, piece_weights, regularisers, everything, jitter)
    log_det_noise = -2.0 * float(torch.log(design.inverse_sigma(regularisers)).sum())
    rows = design.targets.shape[0]
    evidences = []
    for s in scales.tolist():
        fit = (b_squared - float((singular**2 * c**2 / (singular**2 + s**2)).sum())) / s**2
        log_det = log_det_noise + 2.0 * rows * math.log(s) + float(torch.log1p(singular**2 / s**2).sum())
        evidences.append(Evidence(fit, log_det, rows))
    return evidences


def prior_triangle(projection: torch.Tensor) -> torch.Tensor:
    """``[r + 1, r + 1]`` triangle of the prior rows ``[I, 0]`` alone, where every fold starts."""
    rank = projection.shape[1]
    augmented = torch.eye(rank + 1, dtype=projection.dtype, device=projection.device)
    augmented[rank, rank] = 0.0
    return augmented


def design_triangle(
    rows: DesignMatrix,
    piece_weights: torch.Tensor,
    regularisers: Regularisers,
    projection: torch.Tensor,
    which: Optional[torch.Tensor] = None,
    columns: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``[r + 1, r + 1]`` triangle of the rows of one design matrix (no prior rows; :func:`stacked_triangle`):
    all of them, or the rows ``which`` (indices), restricted to the sparse environments
    ``columns`` (indices, matching ``projection``), without copying the design."""
    which = which if which is not None else torch.arange(rows.targets.shape[0], device=rows.targets.device)

    def k_nm(start: int, stop: int) -> torch.Tensor:
        k = rows.combine(piece_weights, which[start:stop])
        return k if columns is None else k[:, columns]

    return stacked_triangle(k_nm, rows.targets[which], rows.inverse_sigma(regularisers)[which], projection, prior=False)


def merge_triangles(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """The triangle of the rows of both: R of ``[first; second]``. Associative up to the sign
    of rows, which the solution does not see, so triangles of groups of rows merge in any tree."""
    return torch.linalg.qr(torch.cat([first, second]), mode="r")[1]


@dataclass
class RowFactors:
    """Rows of a design matrix reduced, kind by kind, to what the solve needs of them for any mixing
    and regularisers (the tuning's many solves on one set of rows).

    The rows of kind ``k`` enter the solve as ``sigma_k^-1 S_k B``: ``S_k`` ``[n_k, W_k]``, ``W_k = P_k M
    + 1``, holds the rows of the ``P_k`` pieces that are not zero for that kind side by side, and the
    targets, each row scaled by its fixed part of ``Lambda^{-1/2}`` (:meth:`DesignMatrix.inverse_sigma`
    with unit regularisers); ``B`` ``[W_k, r + 1]`` = ``[omega_p P ...; 0, 1]`` mixes and projects. The
    triangle of the QR depends on the rows only through ``S_k^T S_k``, so ``S_k`` is replaced by its
    ``R`` factor ``[W_k, W_k]`` where it has at least :data:`FACTOR_ROWS` ``W_k`` rows (forces: ``n_k`` =
    3 x atoms), which bounds the factorisation's memory by about the rows' own: a solve then costs
    ``O(W_k M r)`` per kind instead of ``O(n_k M r)``.

    :param kinds: the kinds present; :param pieces: per kind, the indices of its pieces;
    :param factors: per kind, ``S_k`` or its ``R``, ``[n_k or W_k, W_k]``;
    :param counts: per kind, its rows ``n_k``; :param log_scales: per kind, the sum of the logarithms
        of its rows' fixed parts of ``Lambda^{-1/2}`` (what :meth:`evidence` needs of ``log |Lambda|``).
    """

    kinds: List[int]
    pieces: List[List[int]]
    factors: List[torch.Tensor]
    counts: List[int]
    log_scales: List[float]

    @classmethod
    def of(cls, design: DesignMatrix, which: Optional[torch.Tensor] = None, columns: Optional[torch.Tensor] = None,
           chunk_rows: int = 2048, factor_rows: Optional[float] = None) -> "RowFactors":
        """The factors of the rows ``which`` ``[n]`` (indices; default all) of ``design``, restricted to
        the sparse environments ``columns`` ``[M]`` (indices; default all), reading at most ``chunk_rows``
        rows of the pieces at a time; ``factor_rows`` (default :data:`FACTOR_ROWS`): how many times
        ``W_k`` rows a kind needs to be factorised."""
        factor_rows = FACTOR_ROWS if factor_rows is None else factor_rows
        which = which if which is not None else torch.arange(design.targets.shape[0], device=design.targets.device)
        columns = columns if columns is not None else torch.arange(design.pieces.shape[2], device=design.targets.device)
        scale = design.inverse_sigma(Regularisers(1.0, 1.0, 1.0))
        kinds, pieces, factors, counts, log_scales = [], [], [], [], []
        for kind in sorted(set(design.kind[which].tolist())):
            rows = which[design.kind[which] == kind]
            chunks = [(a, min(a + chunk_rows, rows.numel())) for a in range(0, rows.numel(), chunk_rows)]
            # e.g. the constant piece has no derivative: no columns for it in the force rows
            present = [p for p in range(design.pieces.shape[0]) if any(bool(_piece_rows(design, [p], rows[a:b], columns).any()) for a, b in chunks)]
            width = len(present) * columns.numel() + 1
            if rows.numel() >= factor_rows * width:
                factor = stacked_triangle(lambda a, b: _piece_rows(design, present, rows[a:b], columns), design.targets[rows], scale[rows], None,
                                          prior=False, block_rows=2 * width, chunk_rows=chunk_rows)
            else:
                factor = torch.cat([_piece_rows(design, present, rows, columns), design.targets[rows, None]], dim=1) * scale[rows, None]
            kinds.append(kind)
            pieces.append(present)
            factors.append(factor)
            counts.append(int(rows.numel()))
            log_scales.append(float(torch.log(scale[rows]).sum()))
        return cls(kinds, pieces, factors, counts, log_scales)

    def triangle(self, k_mm_pieces: torch.Tensor, piece_weights: torch.Tensor, regularisers: Regularisers, jitter: float) -> Tuple[torch.Tensor, torch.Tensor]:
        """``[r + 1, r + 1]`` triangle of these rows with the prior's (:func:`stacked_triangle`) and
        ``P`` ``[M, r]``, for the pieces' weights ``[n_pieces]``, their ``K_MM`` ``[n_pieces, M, M]``
        and ``regularisers``."""
        projection = sparse_projection(mix_pieces(piece_weights, k_mm_pieces), jitter)
        sigma = regularisers.of_kind().to(projection)
        m = k_mm_pieces.shape[1]
        blocks = [prior_triangle(projection)]
        for kind, present, factor in zip(self.kinds, self.pieces, self.factors):
            pieces = factor[:, :-1].view(factor.shape[0], len(present), m).transpose(0, 1)
            mixed = mix_pieces(piece_weights[present], pieces)
            blocks.append(torch.cat([mixed @ projection, factor[:, -1:]], dim=1) / sigma[kind])
        return torch.linalg.qr(torch.cat(blocks), mode="r")[1], projection

    def solve(self, k_mm_pieces: torch.Tensor, piece_weights: torch.Tensor, regularisers: Regularisers, jitter: float) -> ProjectedProcess:
        """The projected-process solution on these rows (as :func:`solve_projected_process` on them;
        arguments as :meth:`triangle`)."""
        return solution_from_triangle(*self.triangle(k_mm_pieces, piece_weights, regularisers, jitter))

    def evidence(self, k_mm_pieces: torch.Tensor, piece_weights: torch.Tensor, regularisers: Regularisers, jitter: float) -> "Evidence":
        """The marginal likelihood of these rows' targets (:class:`Evidence`; arguments as :meth:`triangle`)."""
        augmented, projection = self.triangle(k_mm_pieces, piece_weights, regularisers, jitter)
        sigma = regularisers.of_kind()
        log_det_noise = sum(2.0 * n * math.log(float(sigma[kind])) - 2.0 * log_scale for kind, n, log_scale in zip(self.kinds, self.counts, self.log_scales))
        return Evidence.of(augmented, projection.shape[1], sum(self.counts), log_det_noise)


@dataclass
class Evidence:
    """The marginal likelihood of the targets ``y`` ``[N]`` under the projected process, whose prior
    makes them Gaussian with covariance ``C = Lambda + K_NM P P^T K_MN`` (docs/equations.md, "Evidence"):

        -2 log p(y) = y^T C^-1 y + log |C| + N log(2 pi)

    From the triangle ``T`` of ``[Lambda^{-1/2} K_NM P, Lambda^{-1/2} y; I, 0]`` (:func:`stacked_triangle`
    with the prior's rows), by Woodbury and the matrix determinant lemma:
    ``y^T C^-1 y = T_rr^2`` and ``log |C| = log |Lambda| + 2 sum_k log |T_kk|`` (``k < r``).

    :param fit: ``y^T C^-1 y``; :param log_det: ``log |C|``; :param rows: ``N``.
    """

    fit: float
    log_det: float
    rows: int

    @classmethod
    def of(cls, augmented: torch.Tensor, rank: int, rows: int, log_det_noise: float) -> "Evidence":
        """From the ``[r + 1, r + 1]`` triangle with the prior's rows, ``N`` and ``log |Lambda|``."""
        diagonal = torch.diagonal(augmented)
        log_det = log_det_noise + 2.0 * float(torch.log(diagonal[:rank].abs()).sum())
        return cls(float(augmented[rank, rank]) ** 2, log_det, int(rows))

    def amplitude(self) -> float:
        """The factor ``t`` on ``C`` (on the kernel and on ``Lambda`` together, which leaves the
        weights as they are) that maximises the evidence: ``y^T C^-1 y / N``."""
        return self.fit / self.rows

    def minus_log(self, amplitude: float = 1.0) -> float:
        """``-log p(y)`` with ``C`` multiplied by ``amplitude``."""
        return 0.5 * (self.fit / amplitude + self.log_det + self.rows * math.log(amplitude) + self.rows * math.log(2.0 * math.pi))


# a kind's rows are replaced by their R factor [W, W] when they are at least this many times W
FACTOR_ROWS = 4


def _piece_rows(design: DesignMatrix, pieces: List[int], rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """``[len(rows), len(pieces) M]``: the rows ``rows`` of the pieces ``pieces``, columns ``columns``
    (``M`` of them), side by side, in one gather."""
    index = torch.tensor(pieces, dtype=torch.long, device=rows.device)
    part = design.pieces[index[:, None, None], rows[None, :, None], columns[None, None, :]]
    return part.permute(1, 0, 2).reshape(rows.numel(), len(pieces) * columns.numel())
