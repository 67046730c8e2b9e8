"""Hyperparameters on held-out structures: the kernel's mixing and the regularisers
(Nelder-Mead over one design matrix, no kernel recomputed), and the small grid over
``nu_max`` and the Wigner density's ``C, r0``."""

import dataclasses
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import scipy.optimize
import torch
from tqdm import tqdm

from ..config import FitOptions, Regularisers
from ..errors import AccuracyWarning
from ..kernels.base import SparseKernel
from .design import DesignMatrix
from .solver import DEFAULT_JITTER, RowFactors, scaled_regularisation_evidence, scaled_regularisation_predictions
from .targets import ENERGY, KIND_NAMES


def validation_errors(design: DesignMatrix, predictions: torch.Tensor) -> Dict[str, Dict[str, float]]:
    """MAE, RMSE (energies per atom) and number of values per kind of ``predictions`` ``[R]`` against ``design.targets``."""
    errors = {}
    for kind in design.kinds_present():
        mask = design.kind == kind
        residual = predictions[mask] - design.targets[mask]
        if kind == ENERGY:
            residual = residual / design.n_atoms[mask]
        errors[KIND_NAMES[kind]] = {"mae": float(residual.abs().mean()), "rmse": float(residual.pow(2).mean().sqrt()), "count": int(mask.sum())}
    return errors


@dataclass
class HyperparameterReport:
    """Chosen mixing coefficients and regularisers, with the validation loss and errors.

    ``validation_errors`` maps each kind (``energy`` per atom, ``forces``, ``stress``) to
    its ``mae``, ``rmse`` and ``count`` on the held-out structures; ``tuned`` names the parameters
    that were optimised, ``evaluations`` and ``seconds`` the cost of the search;
    ``density_grid`` the validation loss of every point (``nu_max``, ``C``, ``r0``) of the
    grid of :func:`~acdc_potential.fit.driver.select_on_grid`, if one ran;
    ``regulariser_scale`` the factor applied to every regulariser tuned on a prefix of the
    sparse set, chosen with all of it by the same criterion (1 when tuned on all of it);
    ``method`` how they were chosen: ``validation`` (:func:`select_hyperparameters`, ``loss`` the
    validation loss) or ``evidence`` (:func:`select_by_evidence`, ``loss`` minus the log marginal
    likelihood per row, no held-out errors).
    """

    mixing: Dict[str, float]
    regularisers: Regularisers
    loss: float
    validation_errors: Dict[str, Dict[str, float]]
    evaluations: int
    seconds: float
    tuned: List[str] = field(default_factory=list)
    density_grid: List[Dict[str, float]] = field(default_factory=list)
    regulariser_scale: float = 1.0
    method: str = "validation"

    def to_dict(self) -> Dict:
        return {**dataclasses.asdict(self), "regularisers": dataclasses.asdict(self.regularisers)}


def _spread(design: DesignMatrix, kind: int, rows: Optional[torch.Tensor] = None) -> float:
    """Standard deviation of the targets of ``kind`` (energies per atom) among ``rows`` ``[R]`` (default all)."""
    mask = design.kind == kind if rows is None else rows & (design.kind == kind)
    values = design.targets[mask] / (design.n_atoms[mask] if kind == ENERGY else 1)
    return float(values.std()) if values.numel() > 1 else 1.0


def _splits(structures: torch.Tensor, folds: int, validation: float, seed: int) -> List[torch.Tensor]:
    """Validation masks over structures ``[S]``: ``folds`` folds, or one random split."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(structures), generator=generator)
    if folds >= 2:
        return [torch.isin(structures, structures[order[f::folds]]) for f in range(folds)]
    n_validation = max(1, int(round(validation * len(structures))))
    return [torch.isin(structures, structures[order[:n_validation]])]


def search_space(kernel: SparseKernel, regularisers: Regularisers, names: Sequence[str]) -> Tuple[np.ndarray, np.ndarray, Callable]:
    """The Nelder-Mead search over the logarithms of ``names`` (mixing coefficients of ``kernel``,
    regulariser kinds): the starting point ``[n]`` (the kernel's mixing and ``regularisers``), the
    starting simplex ``[n + 1, n]`` (one factor of 3 away in every direction), and the function from
    a point to ``(mixing, regularisers)``, the others kept at their starting values."""
    initial = {**kernel.mixing, **dataclasses.asdict(regularisers)}
    theta0 = np.log([initial[n] for n in names])
    simplex = np.vstack([theta0, theta0 + np.log(3.0) * np.eye(len(names))])

    def unpack(theta) -> Tuple[Dict[str, float], Regularisers]:
        values = {**initial, **{n: float(np.exp(t)) for n, t in zip(names, theta)}}
        return {n: values[n] for n in kernel.mixing_names}, Regularisers(values["energy"], values["forces"], values["stress"])

    return theta0, simplex, unpack


def select_hyperparameters(
    design: DesignMatrix,
    k_mm_pieces: torch.Tensor,
    kernel: SparseKernel,
    regularisers: Regularisers,
    tune: Optional[Sequence[str]] = None,
    folds: int = 0,
    validation: float = FitOptions.validation,
    loss_weights: Optional[Dict[str, float]] = None,
    max_evaluations: int = 60,
    subsample: Optional[int] = None,
    sparse: Optional[torch.Tensor] = None,
    seed: int = FitOptions.seed,
    jitter: float = DEFAULT_JITTER,
    progress: bool = False,
) -> HyperparameterReport:
    """Tune mixing coefficients and regularisers on held-out structures (Nelder-Mead in log space).

    :param tune: names among ``kernel.mixing_names`` and ``energy, forces, stress``; default:
        every mixing coefficient except ``a`` (redundant with the regularisers' scale) and
        the regularisers of the kinds present.
    :param folds: ``k >= 2`` for k-fold cross-validation over structures, else one split
        with a ``validation`` fraction of the structures.
    :param loss_weights: weight of each kind's RMSE (each divided by the spread of its
        targets); default 1 for every kind present.
    :param max_evaluations: budget of the Nelder-Mead search (each evaluation is one
        projected-process solve per split on its training rows reduced once to their
        :class:`~acdc_potential.fit.solver.RowFactors`, ``O(min(n_k, P_k M) M r)`` per kind of rows).
    :param subsample: tune on the rows of this many randomly chosen structures only, which
        makes each evaluation proportionally cheaper on large training sets.
    :param sparse: tune with these sparse environments only (indices into ``M``); each
        evaluation costs ``O(M^3)`` at least, so a subset makes tuning large models affordable
        (:func:`~acdc_potential.fit.selection.selection_prefix`). The regularisers found are
        then multiplied by the factor (among 121 from 10^-3 to 10^3) that minimises the same
        validation loss with all ``M`` (:func:`~acdc_potential.fit.solver.scaled_regularisation_predictions`:
        one QR and one SVD per split).
    :param progress: show a progress bar over the solves.
    """
    start = time.perf_counter()
    k_mm_all = k_mm_pieces
    if sparse is not None:
        k_mm_pieces = k_mm_pieces[:, sparse][:, :, sparse]
    rows = torch.ones_like(design.targets, dtype=torch.bool)
    if subsample is not None and subsample < len(torch.unique(design.structure)):
        everything = torch.unique(design.structure)
        chosen = everything[torch.randperm(len(everything), generator=torch.Generator().manual_seed(seed))[:subsample]]
        rows = torch.isin(design.structure, chosen)
    kinds = sorted(set(design.kind[rows].tolist()))
    present = [KIND_NAMES[k] for k in kinds]
    names = list(tune) if tune is not None else [n for n in kernel.mixing_names if n != "a"] + present
    weights = {name: 1.0 for name in present} if loss_weights is None else loss_weights
    structures = torch.unique(design.structure[rows])
    if len(structures) < 2:
        raise ValueError("hyperparameter selection needs at least two structures")
    held_out = [torch.isin(design.structure, structures[v]) & rows for v in _splits(structures, folds, validation, seed)]
    any_held_out = torch.stack(held_out).any(dim=0)
    # the held-out labels (no sparse column: the errors need targets and kinds only)
    labels = design.subset(any_held_out, torch.zeros(0, dtype=torch.long, device=design.targets.device))

    # per split, its training rows reduced once to their factors (RowFactors: a solve's cost no longer
    # grows with them) and a copy of its held-out rows (one copy of the rows over all splits); k folds
    # keep k factors
    kept = [(RowFactors.of(design, torch.nonzero(rows & ~mask).flatten(), sparse), design.subset(mask, sparse)) for mask in held_out]
    spread = {KIND_NAMES[kind]: _spread(design, kind, rows) for kind in kinds}
    theta0, simplex, unpack = search_space(kernel, regularisers, names)

    def loss_of(predictions: torch.Tensor) -> Tuple[float, Dict[str, Dict[str, float]]]:
        errors = validation_errors(labels, predictions[any_held_out])
        return sum(weights.get(k, 0.0) * e["rmse"] / max(spread[k], 1e-300) for k, e in errors.items()), errors

    def evaluate(theta):
        mixing, regs = unpack(theta)
        piece_weights = kernel.piece_weights(mixing)
        predictions = torch.zeros_like(design.targets)
        for k, mask in enumerate(held_out):
            train, test = kept[k]
            solution = train.solve(k_mm_pieces, piece_weights, regs, jitter)
            predictions[mask] = test.combine(piece_weights) @ solution.weights
        return loss_of(predictions)

    options = {"maxfev": max_evaluations, "xatol": 1e-2, "fatol": 1e-4, "initial_simplex": simplex}
    bar = tqdm(total=max_evaluations, desc="tuning (at most)", unit="solve", disable=not progress)

    def objective(theta) -> float:
        bar.update(1)
        return evaluate(theta)[0]

    result = scipy.optimize.minimize(objective, theta0, method="Nelder-Mead", options=options)
    bar.close()
    loss, errors = evaluate(result.x)
    mixing, regs = unpack(result.x)
    scale = 1.0
    if sparse is not None and sparse.numel() < design.pieces.shape[2]:
        # the regularisers that suit a prefix of the sparse set are too small for all of it
        # (more sparse environments, more freedom): rescale them all, on the same split
        kept = None  # the copies of the prefix's rows are done with
        scales = torch.logspace(-3.0, 3.0, 121, dtype=torch.float64, device=design.targets.device)
        piece_weights = kernel.piece_weights(mixing)
        predictions = torch.zeros((scales.numel(), design.targets.shape[0]), dtype=torch.float64, device=design.targets.device)
        for mask in held_out:
            train, test = torch.nonzero(rows & ~mask).flatten(), torch.nonzero(mask).flatten()
            path = scaled_regularisation_predictions(design, k_mm_all, piece_weights, regs, train, test, scales, jitter)
            predictions[:, test] = path
        losses = [loss_of(p) for p in predictions]
        best = min(range(len(losses)), key=lambda k: losses[k][0])
        scale, (loss, errors) = float(scales[best]), losses[best]
        regs = Regularisers(*(scale * value for value in dataclasses.astuple(regs)))
    seconds = time.perf_counter() - start
    warn_undetermined(regs, {name: spread[name] for name in present if name in names})
    return HyperparameterReport(mixing, regs, float(loss), errors, int(result.nfev), seconds, names, regulariser_scale=scale)


def select_by_evidence(
    design: DesignMatrix,
    k_mm_pieces: torch.Tensor,
    kernel: SparseKernel,
    regularisers: Regularisers,
    tune: Optional[Sequence[str]] = None,
    max_evaluations: int = 150,
    sparse: Optional[torch.Tensor] = None,
    jitter: float = DEFAULT_JITTER,
    progress: bool = False,
) -> HyperparameterReport:
    """Tune mixing coefficients and regularisers by the marginal likelihood (evidence) of every
    row of ``design`` (Nelder-Mead in log space; docs/equations.md, "Evidence"), as Gaussian-process
    codes do: no structure is held out, so the choice does not depend on which few structures a
    small set would hold out.

    The evidence is maximised over the amplitude ``t`` of the prior as well, in closed form at each
    trial (:meth:`~acdc_potential.fit.solver.Evidence.amplitude`): at the end ``c0`` and ``a`` (the
    kernel's piece weights must be linear in them, as every kernel's are; checked) are multiplied by
    ``t`` and every regulariser, tuned or not, by ``t^(1/2)``, which leaves the weights as they are and
    makes the regularisers estimates of the labels' noise. So tuning ``a`` beside ``c0`` and every
    regulariser only adds a direction in which the evidence is flat.

    :param design, k_mm_pieces, kernel, regularisers, jitter, progress: as :func:`select_hyperparameters`
        (``kernel``'s mixing and ``regularisers`` are the starting point; the kernel's mixing is not changed).
    :param tune: names among ``kernel.mixing_names`` and ``energy, forces, stress``; default: every
        mixing coefficient except ``a`` and the regularisers of the kinds present.
    :param max_evaluations: budget of the search (each evaluation one solve, as a validation trial).
    :param sparse: search with these sparse environments only (indices into ``M``); the regularisers
        found are then multiplied by the factor (among 121 from 10^-3 to 10^3) that maximises the
        evidence with all of them (:func:`~acdc_potential.fit.solver.scaled_regularisation_evidence`).
    """
    start = time.perf_counter()
    factors = RowFactors.of(design, columns=sparse)
    k_mm = k_mm_pieces if sparse is None else k_mm_pieces[:, sparse][:, :, sparse]
    present = [KIND_NAMES[k] for k in factors.kinds]
    names = list(tune) if tune is not None else [n for n in kernel.mixing_names if n != "a"] + present
    theta0, simplex, unpack = search_space(kernel, regularisers, names)
    bar = tqdm(total=max_evaluations, desc="tuning by evidence (at most)", unit="solve", disable=not progress)

    def objective(theta) -> float:
        bar.update(1)
        mixing, regs = unpack(theta)
        evidence = factors.evidence(k_mm, kernel.piece_weights(mixing), regs, jitter)
        return evidence.minus_log(evidence.amplitude())

    # stops when the log-evidence changes by less than 0.01 (a likelihood ratio of 1 %) across the simplex
    options = {"maxfev": max_evaluations, "xatol": 1e-2, "fatol": 1e-2, "initial_simplex": simplex}
    result = scipy.optimize.minimize(objective, theta0, method="Nelder-Mead", options=options)
    bar.close()
    mixing, regs = unpack(result.x)
    scale = 1.0
    if sparse is not None and sparse.numel() < design.pieces.shape[2]:
        scales = torch.logspace(-3.0, 3.0, 121, dtype=torch.float64)
        path = scaled_regularisation_evidence(design, k_mm_pieces, kernel.piece_weights(mixing), regs, scales, jitter)
        best = min(range(len(path)), key=lambda k: path[k].minus_log(path[k].amplitude()))
        scale, evidence = float(scales[best]), path[best]
        regs = Regularisers(*(scale * value for value in dataclasses.astuple(regs)))
    else:
        evidence = factors.evidence(k_mm, kernel.piece_weights(mixing), regs, jitter)
    amplitude = evidence.amplitude()
    mixing = amplified(kernel, mixing, amplitude)
    regs = Regularisers(*(amplitude**0.5 * value for value in dataclasses.astuple(regs)))
    loss = evidence.minus_log(amplitude) / evidence.rows
    spread = {name: _spread(design, kind) for kind, name in zip(factors.kinds, present) if name in names}
    warn_undetermined(regs, spread, "evidence")
    seconds = time.perf_counter() - start
    return HyperparameterReport(mixing, regs, float(loss), {}, int(result.nfev), seconds, names, regulariser_scale=scale, method="evidence")


def amplified(kernel: SparseKernel, mixing: Dict[str, float], amplitude: float) -> Dict[str, float]:
    """``mixing`` with ``c0`` and ``a`` multiplied by ``amplitude``: the kernel times ``amplitude``,
    provided its piece weights are linear in those two (a :class:`ValueError` otherwise)."""
    scaled = {name: value * amplitude if name in ("c0", "a") else value for name, value in mixing.items()}
    if not torch.allclose(kernel.piece_weights(scaled), amplitude * kernel.piece_weights(mixing), rtol=1e-12, atol=0.0):
        raise ValueError(f"the piece weights of {type(kernel).__name__} are not linear in c0 and a: the evidence's amplitude cannot be applied")
    return scaled


# a tuned regulariser below this fraction of its labels' spread is taken as undetermined by the tuning's loss
UNDETERMINED_REGULARISER = 1e-6


def warn_undetermined(regularisers: Regularisers, spread: Dict[str, float], method: str = "validation") -> None:
    """An :class:`~acdc_potential.errors.AccuracyWarning` for each tuned regulariser (names and label
    spreads in ``spread``) that ended below :data:`UNDETERMINED_REGULARISER` of its labels' spread:
    there the loss of ``method`` (``validation`` or ``evidence``) is flat, and which value the search
    stops at, hence the fit, depends on rounding (a small message-passing fit moved by 1 % when its
    atoms moved by 1e-12 A)."""
    low = {name: getattr(regularisers, name) for name, width in spread.items() if getattr(regularisers, name) < UNDETERMINED_REGULARISER * width}
    if low:
        values = ", ".join(f"{name} {value:.2g}" for name, value in low.items())
        loss, remedy = ("validation loss", "a larger options.validation") if method == "validation" else ("evidence", "options.tuning: validation")
        warnings.warn(
            f"tuning drove the regularisers {values} below {UNDETERMINED_REGULARISER:g} of their labels' spread, where the "
            f"{loss} no longer determines them: the fit then depends on rounding (another machine or thread "
            f"count can give a fit that differs by about 1 %); more training structures, {remedy}, or "
            "regularisers set by hand (options.tune: false) give a reproducible fit", AccuracyWarning, stacklevel=3,
        )


def choose_grid_point(points: List[Dict[str, float]], tolerance: float) -> Dict[str, float]:
    """Among ``points`` whose ``loss`` is within ``tolerance`` (relative) of the lowest, the
    one with the smallest ``nu_max``, then the lowest loss."""
    lowest = min(point["loss"] for point in points)
    candidates = [point for point in points if point["loss"] <= lowest * (1.0 + tolerance)]
    return min(candidates, key=lambda point: (point["nu_max"], point["loss"]))
