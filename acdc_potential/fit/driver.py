"""The fit, as a list of named steps (as gap_fit reads).

:func:`fit_kernel` fits one sparse-KRR potential for a given density and kernel:
validate the structures; fit the baseline; density coefficients of every atom; choose the
sparse environments; build the design matrix; tune the mixing and regularisers on
held-out structures; solve the projected process. :func:`fit` does the same from a
:class:`~acdc_potential.config.FitConfig`, after the grid of
:func:`select_on_grid` when the configuration asks for one.
"""

import contextlib
import copy
import dataclasses
import itertools
import os
import random
import time
import warnings
from typing import Dict, List, Optional, Sequence, Tuple, Union

import ase
import numpy as np
import torch
from ase.data import chemical_symbols

from ..config import TUNING, ClusterConfig, ConfigError, FitConfig, FitOptions, KernelConfig, Regularisers, SparseConfig, atomic_number
from ..data import Labelled
from ..descriptors.density import DensityExpansion
from ..descriptors.neighbors import batch_from_atoms
from ..descriptors.radial import DensityHypers
from ..errors import AccuracyWarning, BaselineWarning
from ..kernels import PolynomialKernel, SparseKernel, WignerKernel
from ..kernels.message_passing import MessagePassingKernel, message_hypers
from ..kernels.wigner.iteration import WignerHypers
from ..inference import run_module
from ..runtime import usable_device
from . import tasks
from .baseline import Baseline
from .calibration import calibrate, calibration_structures, held_out_solution, held_out_structures, kept_sparse
from .checkpoint import SparseKRRModel
from .design import DesignMatrix, design_groups, mix_pieces, split_group
from .executors import Executor, InProcess, make_executor
from .report import FitLog
from .selection import select_sparse, selection_prefix
from .solver import DEFAULT_JITTER, design_triangle, merge_triangles, prior_triangle, solution_from_triangle, sparse_projection
from .sources import StructureSource, as_source, digest_of
from .survey import Survey
from .tuning import choose_grid_point, select_by_evidence, select_hyperparameters


@contextlib.contextmanager
def recording(messages: List[str]):
    """Append the message of every :class:`~acdc_potential.errors.AccuracyWarning` raised inside
    to ``messages`` (they are shown as usual, once the block is done)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", AccuracyWarning)
        yield
    for warning in caught:
        if issubclass(warning.category, AccuracyWarning):
            messages.append(str(warning.message))
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)


def fit_kernel(
    structures: Union[Sequence, StructureSource],
    density_hypers: DensityHypers,
    kernel: SparseKernel,
    n_sparse: Union[int, Dict[int, int]] = SparseConfig.n,
    regularisers: Optional[Regularisers] = None,
    selection: str = SparseConfig.selection,
    energies: bool = FitOptions.energies,
    forces: bool = FitOptions.forces,
    stress: bool = FitOptions.stress,
    isolated_energies: Optional[Dict[int, float]] = None,
    species: Optional[Sequence[int]] = None,
    centres: Optional[Sequence[int]] = None,
    tune: bool = FitOptions.tune,
    tune_options: Optional[Dict] = None,
    jitter: float = DEFAULT_JITTER,
    design_memory: float = FitOptions.design_memory * 1e9,
    candidates: int = SparseConfig.candidates,
    task_memory: float = ClusterConfig.task_memory * 1e9,
    task_structures: int = ClusterConfig.task_structures,
    executor: Optional[Executor] = None,
    checkpoint: Optional[str] = None,
    survey: Optional[Survey] = None,
    calibrate: bool = True,
    device=None,
    verbose: bool = False,
    log: Optional[FitLog] = None,
) -> SparseKRRModel:
    """Fit a sparse KRR potential for one density and kernel on labelled structures
    (ase.Atoms or :class:`Labelled`, or a :class:`~acdc_potential.fit.sources.StructureSource`).
    Defaults are those of :class:`~acdc_potential.config.FitConfig`
    (``regularisers``: :class:`~acdc_potential.config.Regularisers`).

    Steps: survey (validate every structure, count its labels: :func:`tasks.survey`); baseline;
    density coefficients of the selection's candidates (every atom, or a random sample of
    structures with at most ``candidates`` atoms) and sparse environments per species
    (``selection`` = ``"fps"`` | ``"cur"`` on the kernel's selection features); the design matrix of the
    tuning sample; optionally :func:`tune_on` (``tune_options``: ``method``, ``validation`` or
    ``evidence``, the keyword arguments of :func:`select_hyperparameters` or :func:`select_by_evidence`,
    and ``sparse_per_species``: tune with the first that many sparse environments of each species), which updates the kernel's mixing and the regularisers, and then the
    calibration of the uncertainties (:func:`calibrate_on`); the projected-process solve. ``log`` (a :class:`~acdc_potential.fit.report.FitLog`, default one
    that prints when ``verbose``) reports and times each step; progress bars show when it prints.

    ``centres``: the atomic numbers whose atoms carry a learned energy (default: all; see
    :class:`~acdc_potential.config.KernelConfig`).

    ``design_memory`` (bytes) bounds the design matrix held at once: beyond it the tuning
    sees the rows of a random sample of the structures that fits (:func:`design_groups`),
    and the rows of the others are built group by group after it and folded into the
    final solve, so the peak memory of a fit does not grow with the data.

    ``executor`` (default :class:`~acdc_potential.fit.executors.InProcess`) runs the steps
    over structures (:mod:`~acdc_potential.fit.tasks`), cut into tasks of at most
    ``task_memory`` bytes of rows and ``task_structures`` structures; a
    :class:`~acdc_potential.fit.executors.DaskExecutor` runs them on a cluster and gives the
    same weights. ``checkpoint``: a folder where the triangles of the final solve are kept
    (a rerun resumes from them). ``survey``: the survey of ``structures``, if done already.
    ``calibrate``: when tuned, calibrate the uncertainties on held-out structures of the
    tuning sample (:func:`calibrate_on`). ``device`` (default: the CPU) runs the density, selection,
    kernel rows, tuning and solve on that torch device; the returned model is on the CPU, with a copy of
    ``kernel`` (``kernel`` itself holds the sparse set on ``device``).
    """
    recorded: List[str] = []
    with recording(recorded):
        regularisers = regularisers if regularisers is not None else Regularisers()
        log = log if log is not None else FitLog(verbose)
        executor = executor if executor is not None else InProcess()
        source = as_source(structures)
        progress = log.progress and executor.in_process  # a cluster's tasks show as one bar per step
        bars = log.progress and not progress
        seed = (tune_options or {}).get("seed", 0)
        if survey is None:
            with log.stage("survey"):
                survey = survey_source(source, executor, task_structures, species, "survey" if bars else "")
        species = sorted(int(z) for z in species) if species is not None else survey.species()
        check_centres(centres, species)
        log(f"tabulating the radial integrals ({len(survey)} structures, species {species})")
        with log.stage("radial integrals"):
            expansion = DensityExpansion(density_hypers, species)
            if device is not None:
                expansion = expansion.to(device)
        baseline = Baseline.fit(survey, species, isolated_energies)
        with log.stage("density coefficients and sparse selection"):
            sparse_owners = choose_sparse(kernel, source, survey, expansion, n_sparse, selection, candidates, seed, task_structures, executor, progress, log, centres)
        rows = survey.row_counts(energies, forces, stress)
        # tasks: the groups of design_groups cut to task_memory, as sorted source positions (file order within a task)
        groups = [split_group(group, rows, kernel.n_pieces, kernel.n_sparse, task_memory) for group in design_groups(rows, kernel.n_pieces, kernel.n_sparse, design_memory, seed)]
        sample_rows = int(sum(rows[k] for part in groups[0] for k in part))
        groups = [[sorted(survey.positions[part].tolist()) for part in group] for group in groups]
        shared = (source, expansion, kernel, baseline, (energies, forces, stress))
        k_mm_pieces = kernel.sparse_block()
        report, triangle, calibration = None, None, None
        if tune:
            with log.stage("design matrix"):
                designs = executor.map(tasks.design, shared + (progress,), groups[0], "kernel rows (tuning sample)" if bars else "")
                design = DesignMatrix.gather(designs, [len(part) for part in groups[0]], sample_rows)
                del designs  # ends the generator, which would otherwise hold its last task
            sample = sum(len(part) for part in groups[0])
            streamed = f" (of {sample} of the {len(survey)} structures; the others' rows follow in {len(groups) - 1} groups into the final solve)" if len(groups) > 1 else ""
            log(f"design matrix: {design.pieces.shape[1]} rows x {design.pieces.shape[2]} sparse environments{streamed}")
            with log.stage("tuning"):
                report = tune_on(design, k_mm_pieces, kernel, regularisers, jitter, tune_options, log)
            regularisers = report.regularisers
        if tune and calibrate:
            with log.stage("calibration"):
                sample_positions = [position for part in groups[0] for position in part]
                fraction = (tune_options or {}).get("validation", FitOptions.validation)
                parts = (density_hypers, species, baseline, copy.deepcopy(expansion).to("cpu"))
                calibration = calibrate_on(design, k_mm_pieces, kernel, regularisers, jitter, source, sample_positions, sparse_owners, parts, (energies, forces, stress), fraction, seed, log)
        with log.stage("solve"):
            final = tasks.FinalSolve(kernel.piece_weights(), regularisers, sparse_projection(mix_pieces(kernel.piece_weights(), k_mm_pieces), jitter), checkpoint and os.path.abspath(checkpoint))
            triangle = prior_triangle(final.projection)
            if tune:
                triangle = merge_triangles(triangle, design_triangle(design, final.piece_weights, final.regularisers, final.projection))
                del design  # the rows of the tasks of the other groups follow
            rest = [part for group in groups[1 if tune else 0 :] for part in group]
            solution = solve(triangle, rest, shared, final, executor, progress, "kernel rows (final solve)" if bars else "", log)
        log("solved the projected-process regression")
    # the fitted model lives on the CPU, wherever it was fitted
    cpu = torch.device("cpu")
    return SparseKRRModel(density_hypers, species, kernel.to(cpu), solution.to(cpu), baseline, regularisers, report, expansion.to(cpu), recorded, calibration, sparse_owners)


def check_centres(centres: Optional[Sequence[int]], species: Sequence[int]) -> None:
    """Raise a :class:`~acdc_potential.errors.ConfigError` unless every one of ``centres`` (atomic
    numbers, or ``None``: all) is among the training set's ``species``."""
    if centres is None:
        return
    if not centres:
        raise ConfigError("kernel.centres: an empty list leaves no atom with a learned energy; give elements, or null for all")
    missing = [chemical_symbols[z] for z in centres if z not in species]
    if missing:
        raise ConfigError(f"kernel.centres: {', '.join(missing)} not in the training set (its elements: {', '.join(chemical_symbols[z] for z in species)})")


def choose_sparse(kernel, source, survey, expansion, n_sparse, selection, candidates, seed, task_structures, executor, progress, log, centres=None) -> torch.Tensor:
    """Sparse environments per species (:func:`select_sparse` on the kernel's selection features, the
    power spectrum for most) among the atoms of :func:`selection_candidates` of the species ``centres``
    (default all), whose environments (:meth:`SparseKernel.environments`) the executor computes;
    stored in ``kernel`` (:meth:`SparseKernel.set_sparse`); the species of :func:`feature_space_species`
    take the feature directions instead. Returns the source position of the structure of each sparse
    environment ``[M]`` (-1 for a feature direction)."""
    if kernel.unprepared:
        sample = covering(selection_candidates(survey.n_atoms, PREPARATION_ATOMS, seed), survey)
        log(f"fitting the kernel's contraction and floors on the atoms of {len(sample)} structures")
        structures = source.read(survey.positions[sample].tolist())
        kernel.prepare(expansion, [batch_from_atoms([s.atoms for s in part], expansion.cutoff, device=expansion.species_lookup.device) for part in split(structures, 64)])
    pool = covering(selection_candidates(survey.n_atoms, candidates, seed), survey)
    log(f"environments of {'every atom' if len(pool) == len(survey) else f'the atoms of {len(pool)} structures (a random sample)'}")
    parts = [survey.positions[part].tolist() for part in split(pool, task_structures)]
    results = list(executor.map(tasks.coefficients, (source, expansion, kernel, progress), parts, "environments" if log.progress and not progress else ""))
    coefficients, numbers, layout = torch.cat([r[0] for r in results]), torch.cat([r[1] for r in results]), results[0][2]
    del results
    eligible = torch.arange(numbers.shape[0], device=numbers.device)
    if centres is not None:
        eligible = eligible[torch.isin(numbers, torch.tensor(list(centres), device=numbers.device))]
    basis = feature_space_species(kernel, torch.unique(numbers[eligible]).tolist(), n_sparse, layout.size)
    selectable = eligible[~torch.isin(numbers[eligible], torch.tensor(basis, dtype=numbers.dtype, device=numbers.device))]
    chosen = selectable[select_sparse(kernel.selection_features(taken(coefficients, selectable), layout), numbers[selectable], n_sparse, selection)] if selectable.numel() else selectable
    owners = torch.repeat_interleave(torch.as_tensor(survey.positions[pool]), torch.as_tensor(survey.n_atoms[pool]))[chosen.cpu()]
    sparse, sparse_numbers = coefficients[chosen], numbers[chosen]
    if basis:
        directions, direction_numbers = kernel.feature_basis(taken(coefficients, eligible), numbers[eligible], basis)
        sparse, sparse_numbers = torch.cat([sparse, directions]), torch.cat([sparse_numbers, direction_numbers])
        # owned by no structure: every calibration split keeps them
        owners = torch.cat([owners, torch.full((directions.shape[0],), -1, dtype=owners.dtype)])
        log(f"solving in feature space for {', '.join(chemical_symbols[z] for z in basis)}: a linear kernel on {layout.size} features, whose sparse set is the origin and the features' principal axes")
    kernel.set_sparse(sparse, sparse_numbers, layout)
    counts = {int(z): int((kernel.sparse_species == z).sum()) for z in torch.unique(kernel.sparse_species).tolist()}
    log(f"{kernel.n_sparse} sparse environments{f' by {selection}' if selectable.numel() else ''} ({counts} per atomic number); building the kernel rows")
    return owners


def taken(values: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``values[rows]`` for ascending ``rows``, without a copy when they are every row (the candidates'
    environments may take gigabytes)."""
    return values if rows.numel() == values.shape[0] else values[rows]


def feature_space_species(kernel: SparseKernel, species: Sequence[int], n_sparse: Union[int, Dict[int, int]], n_features: int) -> List[int]:
    """The species of ``species`` whose sparse set is the feature directions (:meth:`PolynomialKernel.feature_basis`):
    those of a linear feature kernel with ``feature_space`` on and more sparse environments asked for than ``n_features``."""
    if not isinstance(kernel, PolynomialKernel) or not kernel.feature_space or kernel.zeta != 1:
        return []
    wanted = {int(z): (n_sparse.get(z, 0) if isinstance(n_sparse, dict) else n_sparse) for z in species}
    return [z for z, n in sorted(wanted.items()) if n > n_features]


def calibrate_on(design, k_mm_pieces, kernel, regularisers, jitter, source, sample_positions, sparse_owners, parts, kinds, fraction, seed, log):
    """The :class:`~acdc_potential.model.uncertainty.Calibration` of the uncertainties by a model
    fitted without a random ``fraction`` of the structures of ``design`` (source positions
    ``sample_positions``, in its numbering) and without the sparse environments taken from
    them (``sparse_owners``: the source position of each), on those structures' labels of the
    ``kinds`` (energies, forces, stress) the fit used (:mod:`~acdc_potential.fit.calibration`).
    ``parts``: density hyperparameters, species, baseline and expansion of the model."""
    held = held_out_structures(torch.unique(design.structure).cpu(), fraction, seed)
    positions = [sample_positions[k] for k in held.tolist()]
    kept = kept_sparse(sparse_owners, kernel.sparse_species.cpu(), positions)
    solution = held_out_solution(design, k_mm_pieces, kernel.piece_weights(), regularisers, jitter, held.to(design.structure.device), kept.to(k_mm_pieces.device))
    density_hypers, species, baseline, expansion = parts
    device = expansion.species_lookup.device  # the model's, which may not be the fit's
    model = SparseKRRModel(density_hypers, species, kernel.sparse_subset(kept).to(device), solution.to(device), baseline, regularisers, expansion=expansion)
    calibration = calibrate(model, calibration_structures(source.read(positions), kinds[0], kinds[1]))
    forces = ", ".join(f"{chemical_symbols[z]} {b:.3g}" for z, b in calibration.forces.items())
    log(
        f"calibrated the uncertainties on {len(positions)} held-out structures (fitted without them and their "
        f"{kernel.n_sparse - len(kept)} sparse environments): energy factor {calibration.energy:.3g}"
        + (f"; force factors (1/A) {forces}" if forces else "")
    )
    if calibration.structures < MIN_CALIBRATION:
        warnings.warn(
            f"the uncertainties are calibrated on {calibration.structures} held-out structures with energies "
            f"(fewer than {MIN_CALIBRATION}): their scale is uncertain; more training structures or a larger "
            "options.validation fraction calibrate them better", AccuracyWarning, stacklevel=2,
        )
    return calibration


# atoms of the training sample on which a kernel fits what its environments depend on (SparseKernel.prepare)
PREPARATION_ATOMS = 2000
# fewer held-out structures than this give a calibration warning
MIN_CALIBRATION = 10


def tune_on(design: DesignMatrix, k_mm_pieces: torch.Tensor, kernel: SparseKernel, regularisers: Regularisers, jitter: float, tune_options: Optional[Dict], log: FitLog):
    """:func:`select_hyperparameters` (or, with ``tune_options["method"]`` ``evidence``,
    :func:`select_by_evidence`) on ``design``; sets the kernel's mixing and returns the report (with
    the regularisers found). ``tune_options`` as :func:`fit_kernel`."""
    options = dict(tune_options or {})
    method = options.pop("method", "validation")
    per_species = options.pop("sparse_per_species", None)
    if per_species is not None and per_species > 0:
        options["sparse"] = selection_prefix(kernel.sparse_species, int(per_species))
    if method == "evidence":
        # nothing is held out: the split's options do not apply
        kept = {name: value for name, value in options.items() if name in ("tune", "max_evaluations", "sparse")}
        report = select_by_evidence(design, k_mm_pieces, kernel, regularisers, jitter=jitter, progress=log.progress, **kept)
    elif method == "validation":
        report = select_hyperparameters(design, k_mm_pieces, kernel, regularisers, jitter=jitter, progress=log.progress, **options)
    else:
        raise ConfigError(f"tuning: {method!r} is not a tuning method ({', '.join(TUNING)})")
    kernel.mixing = dict(report.mixing)
    mixing = ", ".join(f"{k} = {v:.4g}" for k, v in report.mixing.items())
    sigmas = ", ".join(f"{k} = {v:.3g}" for k, v in dataclasses.asdict(report.regularisers).items())
    rescaled = f" (scaled by {report.regulariser_scale:.3g} for all {kernel.n_sparse} sparse environments)" if report.regulariser_scale != 1.0 else ""
    how = "by the evidence of every structure" if method == "evidence" else "on held-out structures"
    log(f"tuned {how} ({report.evaluations} solves): {mixing}; regularisers {sigmas}{rescaled}")
    return report


def solve(triangle: torch.Tensor, rest: List[List[int]], shared: Tuple, final: "tasks.FinalSolve", executor: Executor, progress: bool, desc: str, log: FitLog):
    """The projected-process solution on the rows folded into ``triangle`` ``[r + 1, r + 1]``
    (the prior's, and the tuning sample's when it was tuned) and those of the structures of
    every task of ``rest`` (triangles by the executor, kept in ``final.store`` when it is set)."""
    if rest and final.store:
        os.makedirs(final.store, exist_ok=True)
        final.fingerprint = fit_fingerprint(shared, final)
        kept = tasks.kept_count(final, rest)
        log(f"{len(rest)} tasks of kernel rows for the final solve; their triangles are kept in {final.store}"
            + (f" ({kept} found there from an earlier run, read instead of rebuilt)" if kept else ""))
    others = executor.reduce(tasks.triangle, shared + (final, progress), rest, merge_triangles, desc, kept=bool(final.store))
    return solution_from_triangle(triangle if others is None else merge_triangles(triangle, others), final.projection)


def survey_source(
    source: StructureSource, executor: Executor, task_structures: int = ClusterConfig.task_structures, species: Optional[Sequence[int]] = None, desc: str = ""
) -> Survey:
    """Validate and survey every structure of ``source`` (:func:`tasks.survey`), in tasks of ``task_structures``."""
    parts = split(list(range(len(source))), task_structures)
    allowed = None if species is None else [int(z) for z in species]
    return Survey.concatenate(list(executor.map(tasks.survey, (source, allowed), parts, desc)))


def selection_candidates(n_atoms: Sequence[int], candidates: int, seed: int) -> List[int]:
    """Positions of the structures whose atoms the sparse selection chooses from: all, in order,
    when they have at most ``candidates`` atoms, else a random sample (``seed``) of at most that many."""
    if int(sum(n_atoms)) <= candidates:
        return list(range(len(n_atoms)))
    order = torch.randperm(len(n_atoms), generator=torch.Generator().manual_seed(seed)).tolist()
    chosen, total = [], 0
    for k in order:
        if total + int(n_atoms[k]) > candidates and chosen:
            continue
        chosen.append(k)
        total += int(n_atoms[k])
    return sorted(chosen)


def covering(sample: List[int], survey: Survey) -> List[int]:
    """``sample`` (indices of the survey's structures) with, for every species that none of them has,
    the first structure that has it, so that every species of the training set is represented."""
    present = survey.counts[sample].sum(axis=0) > 0 if sample else np.zeros(len(survey.elements), dtype=bool)
    extra = [int(np.nonzero(survey.counts[:, column])[0][0]) for column in np.nonzero(~present)[0]]
    return sorted(set(sample) | set(extra))


def split(positions: Sequence[int], size: int) -> List[List[int]]:
    """``positions`` in consecutive parts of at most ``size``."""
    positions = list(positions)
    return [positions[k : k + size] for k in range(0, len(positions), size)]


def fit_fingerprint(shared: Tuple, final: "tasks.FinalSolve") -> str:
    """A digest of everything the triangles of the final solve depend on (``shared``: the source,
    density expansion, kernel with its sparse set, baseline and kinds of rows; ``final``: the
    mixing, regularisers and projection): names the triangles kept in a checkpoint folder."""
    source, expansion, kernel, baseline, kinds = shared
    density = (expansion.cutoff, expansion.smoothing, expansion.species, expansion.state_dict())
    return digest_of((source.fingerprint(), density, kernel.to_dict(), baseline.energies, kinds, final.piece_weights, final.regularisers, final.projection))


def make_kernel(config: KernelConfig, density: Optional[DensityHypers] = None) -> SparseKernel:
    """The sparse kernel described by ``config`` (without sparse environments yet); ``density``, the
    model's density, is the starting point of a message-passing kernel's message expansion."""
    if config.type == "wigner":
        if not isinstance(config.nu_max, int):
            raise ValueError(f"kernel.nu_max must be an integer here, got {config.nu_max!r} (fit resolves auto)")
        hypers = WignerHypers(nu_max=config.nu_max, lambda_max=config.lambda_max, channel_weights=config.channel_weights)
        return WignerKernel(hypers, mixing=config.mixing or None)
    if config.type == "polynomial":
        return PolynomialKernel(
            zeta=config.zeta, orders=config.orders, contraction=config.contraction, mixing=config.mixing or None,
            feature_space=config.feature_space, norm_floor=config.norm_floor,
        )
    if config.type == "mpacdc":
        density = density or DensityHypers()
        check_message_cutoff(config, density)
        message = message_hypers(density, config.message_max_radial, config.message_max_angular)
        return MessagePassingKernel(
            message, config.zeta, config.orders, config.message_orders, config.contraction, mixing=config.mixing or None,
            feature_space=config.feature_space, cutoff=config.message_cutoff, norm_floor=config.norm_floor,
        )
    raise ValueError(f"unknown kernel type '{config.type}' (known: wigner, polynomial, mpacdc)")


def fit(
    structures: Union[Sequence, StructureSource],
    config: Optional[FitConfig] = None,
    verbose: bool = False,
    log: Optional[FitLog] = None,
    executor: Optional[Executor] = None,
    survey: Optional[Survey] = None,
) -> SparseKRRModel:
    """Fit a :class:`~acdc_potential.fit.checkpoint.SparseKRRModel` on labelled structures (a
    list, or a :class:`~acdc_potential.fit.sources.StructureSource` such as an
    :class:`~acdc_potential.fit.sources.ExtxyzSource`) as ``config`` (default
    :class:`~acdc_potential.config.FitConfig`, what the command line uses) says, after
    :func:`select_on_grid` when ``nu_max`` is ``auto`` or ``config.grid`` lists C or r0.
    ``log`` (default: printing when ``verbose``) reports every step on one clock.
    ``executor`` runs the steps over structures; by default the one ``config.cluster`` asks
    for (:func:`~acdc_potential.fit.executors.make_executor`: this process, or a Dask cluster
    that is closed when the fit ends). ``survey``: :func:`survey_source` of the structures, if
    done already. The triangles kept in ``config.cluster.checkpoint`` stay there until the
    caller has saved the model (:func:`~acdc_potential.fit.tasks.discard_kept` removes them)."""
    config = config if config is not None else FitConfig()
    log = log if log is not None else FitLog(verbose)
    check_config(config, executor)
    source = as_source(structures)
    owned = executor is None
    executor = make_executor(config.cluster) if owned else executor
    try:
        # validated once, numbered by position, before any trial fit of the grid
        if survey is None:
            with log.stage("survey"):
                survey = survey_source(source, executor, config.cluster.task_structures, desc="survey" if log.progress and not executor.in_process else "")
        grid = []
        automatic = config.kernel.type == "wigner" and config.kernel.nu_max == "auto"
        if automatic or (config.kernel.type == "wigner" and (config.grid.C or config.grid.r0)):
            with log.stage("grid"):
                density, nu_max, grid = select_on_grid(source, config, log)
            config = dataclasses.replace(config, density=density, kernel=dataclasses.replace(config.kernel, nu_max=nu_max))
        model = _fit(source, config, config.sparse.n, config.options.tune, log, executor, survey)
    finally:
        if owned:
            executor.close()
    if model.report is not None:
        model.report.density_grid = grid
    if config.options.isolated_energies is None:
        missing = [z for z in model.species if z not in survey.isolated_energies()]
        if missing:
            warn_isolated_atoms(model, missing)
    return model


def check_message_cutoff(kernel: KernelConfig, density: DensityHypers) -> None:
    """A :class:`~acdc_potential.errors.ConfigError` unless ``kernel.message_cutoff`` is unset or within
    ``density``'s cutoff and beyond its smoothing width."""
    cutoff = kernel.message_cutoff
    if cutoff is not None and cutoff > density.cutoff:
        raise ConfigError(f"kernel.message_cutoff ({cutoff} A) exceeds density.cutoff ({density.cutoff} A): a message reaches at most the density's neighbours")
    if cutoff is not None and cutoff <= density.smoothing:
        raise ConfigError(f"kernel.message_cutoff ({cutoff} A) must exceed density.smoothing ({density.smoothing} A), the width over which the message's cutoff function falls to zero")


def check_config(config: FitConfig, executor: Optional[Executor] = None) -> None:
    """What :func:`fit` checks before it reads any structure: the device (:func:`check_device`) and the
    message's cutoff (:func:`check_message_cutoff`)."""
    check_device(config, executor)
    check_message_cutoff(config.kernel, config.density)


def check_device(config: FitConfig, executor: Optional[Executor] = None) -> None:
    """A :class:`~acdc_potential.errors.ConfigError` unless ``options.device`` names a torch device that
    this machine has, for a fit that can run on it: an energy fit in this process (not on the Dask
    cluster of ``config.cluster`` or of ``executor``)."""
    name = config.options.device
    try:
        device = usable_device(name)
    except ValueError as error:
        problem = error
    else:
        problem = None
        if device.type == "cpu":
            return
    if config.options.target == "dipole":
        raise ConfigError(f"options.device {name!r}: dipole fits run on the CPU")
    if config.cluster.workers or config.cluster.scheduler or (executor is not None and not executor.in_process):
        raise ConfigError(f"options.device {name!r}: a fit on a Dask cluster runs on the CPU (cluster.workers, cluster.scheduler)")
    if problem is not None:
        raise ConfigError(f"options.device {problem}")


def warn_isolated_atoms(model: SparseKRRModel, species: List[int]) -> None:
    """Say what the baseline of ``species`` is and what the model gives their isolated atoms, when no
    isolated-atom energy tied them down (a :class:`~acdc_potential.errors.BaselineWarning`, recorded in the model)."""
    atoms = [ase.Atoms(chemical_symbols[z]) for z in species]
    predicted = model.predict(atoms, forces=False, stress=False)["energy"].tolist()
    baseline = ", ".join(f"{chemical_symbols[z]} {model.baseline.energies[z]:.4f}" for z in species)
    isolated = ", ".join(f"{chemical_symbols[z]} {e:.4f}" for z, e in zip(species, predicted))
    message = (
        f"no isolated-atom energies for {', '.join(chemical_symbols[z] for z in species)} (options.isolated_energies, or "
        f"single-atom structures in the training file): the baseline is a least-squares fit on composition ({baseline} eV) "
        f"and an isolated atom gets {isolated} eV, an extrapolation; give isolated-atom energies of the reference method "
        "to tie them down"
    )
    warnings.warn(message, BaselineWarning, stacklevel=3)
    model.warnings.append(message)


def _fit(structures, config: FitConfig, n_sparse, tune: bool, log: Optional[FitLog], executor: Optional[Executor] = None, survey: Optional[Survey] = None, calibrate: bool = True):
    if isinstance(n_sparse, dict):
        n_sparse = {atomic_number(element): int(n) for element, n in n_sparse.items()}
    isolated = config.options.isolated_energies
    if isolated is not None:
        isolated = {atomic_number(element): float(e) for element, e in isolated.items()}
    return fit_kernel(
        structures,
        config.density,
        make_kernel(config.kernel, config.density),
        n_sparse,
        regularisers=config.regularisers,
        selection=config.sparse.selection,
        energies=config.options.energies,
        forces=config.options.forces,
        stress=config.options.stress,
        isolated_energies=isolated,
        centres=None if config.kernel.centres is None else sorted({atomic_number(element) for element in config.kernel.centres}),
        tune=tune,
        design_memory=config.options.design_memory * 1e9,
        device=None if torch.device(config.options.device).type == "cpu" else torch.device(config.options.device),
        candidates=config.sparse.candidates,
        task_memory=config.cluster.task_memory * 1e9,
        task_structures=config.cluster.task_structures,
        executor=executor,
        checkpoint=config.cluster.checkpoint or None,
        survey=survey,
        calibrate=calibrate,
        tune_options={
            "method": config.options.tuning,
            "validation": config.options.validation,
            "seed": config.options.seed,
            "sparse_per_species": config.options.tune_sparse,
        },
        log=log,
    )


def select_on_grid(structures, config: FitConfig, log: Optional[FitLog] = None) -> Tuple[DensityHypers, int, List[Dict[str, float]]]:
    """The density and ``nu_max`` of the grid point chosen as
    :class:`~acdc_potential.config.GridConfig` says, and ``[{"nu_max", "C", "r0", "loss",
    "seconds", "step_us_per_atom"}]`` for every point: its validation loss, the time of its
    trial fit, and the time per atom of one MD step (energy and forces) of its model."""
    log = log if log is not None else FitLog(False)
    if (config.grid.C or config.grid.r0) and config.density.density != "wigner":
        raise ValueError("the C, r0 grid applies to the Wigner density (density: wigner)")
    orders = config.grid.nu_max if config.kernel.nu_max == "auto" else [config.kernel.nu_max]
    if not orders or any(not isinstance(nu, int) or nu < 1 for nu in orders):
        raise ValueError(f"grid.nu_max must list positive integers, got {orders}")
    source = as_source(structures)
    if len(source) < 2:
        # nothing to hold out: the cheapest candidate, as the tolerance rule would prefer
        return config.density, min(orders), []
    subset = source.read(random.Random(config.options.seed).sample(range(len(source)), min(config.grid.structures, len(source))))
    values = list(itertools.product(orders, config.grid.C or [config.density.C], config.grid.r0 or [config.density.r0]))
    log(f"grid: {len(values)} trial fits on {len(subset)} structures with {config.grid.sparse} sparse environments per species")
    points: List[Dict[str, float]] = []
    for k, (nu_max, C, r0) in enumerate(values):
        trial = dataclasses.replace(
            config,
            density=dataclasses.replace(config.density, C=float(C), r0=float(r0)),
            kernel=dataclasses.replace(config.kernel, nu_max=int(nu_max)),
            cluster=dataclasses.replace(config.cluster, checkpoint=""),  # small, and not to be resumed
            options=dataclasses.replace(config.options, tuning="validation"),  # the points compare validation losses
        )
        log(f"grid point {k + 1}/{len(values)}: nu_max = {nu_max}, C = {C:g}, r0 = {r0:g} A, trial fit")
        start = time.perf_counter()
        # the trial fit's own lines would drown the grid's; its progress bars show
        model = _fit(subset, trial, config.grid.sparse, True, FitLog(False, progress=log.progress), calibrate=False)
        seconds = time.perf_counter() - start
        step = step_cost(model, subset[0])
        points.append({"nu_max": int(nu_max), "C": float(C), "r0": float(r0), "loss": float(model.report.loss),
                       "seconds": round(seconds, 2), "step_us_per_atom": round(step, 1)})
        left = (len(values) - k - 1) * (log.elapsed() / (k + 1))
        log(f"grid point {k + 1}/{len(values)}: validation loss {model.report.loss:.4g}, {seconds:.0f} s, "
            f"MD step {step:.0f} us/atom (about {left:.0f} s left in the grid)")
    best = choose_grid_point(points, config.grid.tolerance)
    log(f"grid: chose {describe_choice(best, points, config.grid.tolerance, config.grid.sparse)}")
    return dataclasses.replace(config.density, C=best["C"], r0=best["r0"]), best["nu_max"], points


def step_cost(model: SparseKRRModel, structure, repeats: int = 3) -> float:
    """Microseconds per atom of energy and forces of ``structure`` with ``model``: the scripted
    module as exported, on a metatomic system with its neighbour list, as an engine runs it (the
    best of ``repeats`` calls after three warm-up calls: TorchScript profiles the first two calls
    and optimises the module on the second, which is the slowest)."""
    atoms = structure.atoms if isinstance(structure, Labelled) else structure
    module = model.scripted()
    best = float("inf")
    for call in range(3 + repeats):
        start = time.perf_counter()
        run_module(module, [atoms], forces=True, stress=False, uncertainty=False)
        if call >= 3:
            best = min(best, time.perf_counter() - start)
    return 1e6 * best / len(atoms)


def describe_choice(best: Dict[str, float], points: List[Dict[str, float]], tolerance: float, sparse: int) -> str:
    """One line: the grid point chosen, why, and what the other candidates would cost per MD step."""
    others = "; ".join(
        f"nu_max {p['nu_max']} (C {p['C']:g}, r0 {p['r0']:g}): loss {p['loss']:.4g}, MD step {p['step_us_per_atom']:.0f} us/atom"
        for p in points if p is not best
    )
    return (
        f"nu_max = {best['nu_max']}, C = {best['C']:g}, r0 = {best['r0']:g} A (validation loss {best['loss']:.4g}, "
        f"MD step {best['step_us_per_atom']:.0f} us/atom; the smallest nu_max within {100 * tolerance:g} % of the lowest loss)"
        + (f"; other points: {others}" if others else "")
        + f". MD steps measured with {sparse} sparse environments per species: a nu_max >= 4 model's step grows with "
        "its sparse set, a nu_max <= 3 model's does not"
    )
