"""The fit, as a list of named steps (as gap_fit reads).

:func:`fit_kernel` fits one sparse-KRR potential for a given density and kernel:
validate the structures; fit the baseline; density coefficients of every atom; choose the
sparse environments; build the design matrix; tune the mixing and regularisers on
held-out structures; solve the projected process. :func:`fit` does the same from a
:class:`~acdc_potential.config.FitConfig`, after the grid of
:func:`select_on_grid` when the configuration asks for one.
"""

import contextlib
import dataclasses
import itertools
import random
import time
import warnings
from typing import Dict, List, Optional, Sequence, Tuple, Union

import ase
import torch
from ase.data import chemical_symbols
from tqdm import tqdm

from ..config import FitConfig, FitOptions, KernelConfig, Regularisers, SparseConfig, atomic_number
from ..data import Labelled, as_labelled, species_of, validate
from ..descriptors.acdc import power_spectrum
from ..descriptors.density import DensityExpansion
from ..descriptors.jacobian import batch_density
from ..descriptors.neighbors import batch_from_atoms
from ..descriptors.radial import DensityHypers
from ..errors import AccuracyWarning, BaselineWarning
from ..kernels import PolynomialKernel, SparseKernel, WignerKernel
from ..kernels.wigner.iteration import WignerHypers
from ..inference import run_module
from .baseline import Baseline, isolated_atom_energies
from .checkpoint import SparseKRRModel
from .report import FitLog
from .design import DesignMatrix, build_design_matrix, design_groups
from .selection import select_sparse, selection_prefix
from .solver import DEFAULT_JITTER, _fit_rows
from .tuning import choose_grid_point, select_hyperparameters


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


def training_coefficients(
    structures: Sequence[Labelled], expansion: DensityExpansion, batch_size: int = 64, device=None, progress: bool = False
):
    """Flat coefficients ``[N, D]``, atomic numbers ``[N]`` and layout of every atom of ``structures``
    (``progress``: a progress bar over batches of structures)."""
    coefficients, numbers, layout = [], [], None
    starts = range(0, len(structures), batch_size)
    for start in tqdm(starts, desc="density coefficients", unit="batch", disable=not progress):
        members = structures[start : start + batch_size]
        batch = batch_from_atoms([s.atoms for s in members], expansion.cutoff, device=device, first_index=start)
        c, layout = batch_density(expansion, batch)
        coefficients.append(c)
        numbers.append(batch.numbers)
    return torch.cat(coefficients), torch.cat(numbers), layout


def fit_kernel(
    structures: Sequence,
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
    tune: bool = FitOptions.tune,
    tune_options: Optional[Dict] = None,
    jitter: float = DEFAULT_JITTER,
    budget: float = 3e7,
    design_memory: float = FitOptions.design_memory * 1e9,
    device=None,
    verbose: bool = False,
    log: Optional[FitLog] = None,
) -> SparseKRRModel:
    """Fit a sparse KRR potential for one density and kernel on labelled structures
    (ase.Atoms or :class:`Labelled`). Defaults are those of :class:`~acdc_potential.config.FitConfig`
    (``regularisers``: :class:`~acdc_potential.config.Regularisers`).

    Steps: validate; baseline; density coefficients of every atom; sparse environments per
    species (``selection`` = ``"fps"`` | ``"cur"`` on the power spectrum); design matrix
    (energies/forces/stress as enabled and present); optionally :func:`select_hyperparameters`
    (``tune_options`` are its keyword arguments, and ``sparse_per_species``: tune with the
    first that many sparse environments of each species), which updates the kernel's mixing and the
    regularisers; projected-process solve. ``log`` (a :class:`~acdc_potential.fit.report.FitLog`,
    default one that prints when ``verbose``) reports and times each step; progress bars over
    the kernel rows show when it prints.

    ``design_memory`` (bytes) bounds the design matrix held at once: beyond it the tuning
    sees the rows of a random sample of the structures that fits (:func:`design_groups`),
    and the rows of the others are built group by group after it and folded into the
    final solve one at a time (:func:`_fit_rows`), so the peak memory of a fit does not
    grow with the data.
    """
    recorded: List[str] = []
    with recording(recorded):
        regularisers = regularisers if regularisers is not None else Regularisers()
        log = log if log is not None else FitLog(verbose)
        labelled = as_labelled(structures)
        species = sorted(int(z) for z in species) if species is not None else species_of(labelled)
        validate(labelled, species=species)
        log(f"tabulating the radial integrals ({len(labelled)} structures, species {species})")
        with log.stage("radial integrals"):
            expansion = DensityExpansion(density_hypers, species)
        baseline = Baseline.fit(labelled, species, isolated_energies)
        log("density coefficients of every atom")
        with log.stage("density coefficients and sparse selection"):
            coefficients, numbers, layout = training_coefficients(labelled, expansion, device=device, progress=log.progress)
            chosen = select_sparse(power_spectrum(layout.unflatten(coefficients)), numbers, n_sparse, selection)
        kernel.set_sparse(coefficients[chosen], numbers[chosen], layout)
        counts = {int(z): int((numbers[chosen] == z).sum()) for z in species}
        log(f"{len(chosen)} sparse environments by {selection} ({counts} per atomic number); building the kernel rows")
        groups = design_groups(labelled, energies, forces, stress, kernel.n_pieces, kernel.n_sparse, design_memory, (tune_options or {}).get("seed", 0))

        def rows_of(group: List[int]) -> DesignMatrix:
            with log.stage("design matrix"):
                rows = [labelled[k] for k in group]
                return build_design_matrix(rows, expansion, kernel, baseline, energies, forces, stress, budget, progress=log.progress)

        design = rows_of(groups[0])
        k_mm_pieces = kernel.sparse_block()
        streamed = f" (of {len(groups[0])} of the {len(labelled)} structures; the others' rows follow in {len(groups) - 1} groups into the final solve)" if len(groups) > 1 else ""
        log(f"design matrix: {design.pieces.shape[1]} rows x {design.pieces.shape[2]} sparse environments{streamed}")
        report = None
        if tune:
            options = dict(tune_options or {})
            per_species = options.pop("sparse_per_species", None)
            if per_species is not None and per_species > 0:
                options["sparse"] = selection_prefix(kernel.sparse_species, int(per_species))
            with log.stage("tuning"):
                report = select_hyperparameters(design, k_mm_pieces, kernel, regularisers, jitter=jitter, progress=log.progress, **options)
            kernel.mixing = dict(report.mixing)
            regularisers = report.regularisers
            mixing = ", ".join(f"{k} = {v:.4g}" for k, v in report.mixing.items())
            sigmas = ", ".join(f"{k} = {v:.3g}" for k, v in dataclasses.asdict(regularisers).items())
            rescaled = f" (scaled by {report.regulariser_scale:.3g} for all {kernel.n_sparse} sparse environments)" if report.regulariser_scale != 1.0 else ""
            log(f"tuned on held-out structures ({report.evaluations} solves): {mixing}; regularisers {sigmas}{rescaled}")
        held = [design]
        del design  # from here on only `held` refers to it, so the solve can free it

        def designs():
            yield held.pop()
            for group in groups[1:]:
                yield rows_of(group)

        with log.stage("solve"):
            solution = _fit_rows(designs(), k_mm_pieces, kernel.piece_weights(), regularisers, jitter)
        log("solved the projected-process regression")
    return SparseKRRModel(density_hypers, species, kernel, solution, baseline, regularisers, report, expansion, recorded)


def make_kernel(config: KernelConfig) -> SparseKernel:
    """The sparse kernel described by ``config`` (without sparse environments yet)."""
    if config.type == "wigner":
        if not isinstance(config.nu_max, int):
            raise ValueError(f"kernel.nu_max must be an integer here, got {config.nu_max!r} (fit resolves auto)")
        hypers = WignerHypers(nu_max=config.nu_max, lambda_max=config.lambda_max, channel_weights=config.channel_weights)
        return WignerKernel(hypers, mixing=config.mixing or None)
    if config.type == "polynomial":
        return PolynomialKernel(zeta=config.zeta, mixing=config.mixing or None)
    raise ValueError(f"unknown kernel type '{config.type}' (known: wigner, polynomial)")


def fit(structures: Sequence, config: Optional[FitConfig] = None, verbose: bool = False, log: Optional[FitLog] = None) -> SparseKRRModel:
    """Fit a :class:`~acdc_potential.fit.checkpoint.SparseKRRModel` on labelled structures as
    ``config`` (default :class:`~acdc_potential.config.FitConfig`, what the command line uses)
    says, after :func:`select_on_grid` when ``nu_max`` is ``auto`` or ``config.grid`` lists C or r0.
    ``log`` (default: printing when ``verbose``) reports every step on one clock."""
    config = config if config is not None else FitConfig()
    log = log if log is not None else FitLog(verbose)
    # validated once, numbered by position, before any trial fit of the grid
    labelled = as_labelled(structures)
    validate(labelled)
    grid = []
    automatic = config.kernel.type == "wigner" and config.kernel.nu_max == "auto"
    if automatic or (config.kernel.type == "wigner" and (config.grid.C or config.grid.r0)):
        with log.stage("grid"):
            density, nu_max, grid = select_on_grid(labelled, config, log)
        config = dataclasses.replace(config, density=density, kernel=dataclasses.replace(config.kernel, nu_max=nu_max))
    model = _fit(labelled, config, config.sparse.n, config.options.tune, log)
    if model.report is not None:
        model.report.density_grid = grid
    if config.options.isolated_energies is None:
        missing = [z for z in model.species if z not in isolated_atom_energies(labelled)]
        if missing:
            warn_isolated_atoms(model, missing)
    return model


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


def _fit(structures, config: FitConfig, n_sparse, tune: bool, log: Optional[FitLog]):
    if isinstance(n_sparse, dict):
        n_sparse = {atomic_number(element): int(n) for element, n in n_sparse.items()}
    isolated = config.options.isolated_energies
    if isolated is not None:
        isolated = {atomic_number(element): float(e) for element, e in isolated.items()}
    return fit_kernel(
        structures,
        config.density,
        make_kernel(config.kernel),
        n_sparse,
        regularisers=config.regularisers,
        selection=config.sparse.selection,
        energies=config.options.energies,
        forces=config.options.forces,
        stress=config.options.stress,
        isolated_energies=isolated,
        tune=tune,
        design_memory=config.options.design_memory * 1e9,
        tune_options={
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
    structures = list(structures)
    if len(structures) < 2:
        # nothing to hold out: the cheapest candidate, as the tolerance rule would prefer
        return config.density, min(orders), []
    subset = random.Random(config.options.seed).sample(structures, min(config.grid.structures, len(structures)))
    values = list(itertools.product(orders, config.grid.C or [config.density.C], config.grid.r0 or [config.density.r0]))
    log(f"grid: {len(values)} trial fits on {len(subset)} structures with {config.grid.sparse} sparse environments per species")
    points: List[Dict[str, float]] = []
    for k, (nu_max, C, r0) in enumerate(values):
        trial = dataclasses.replace(
            config,
            density=dataclasses.replace(config.density, C=float(C), r0=float(r0)),
            kernel=dataclasses.replace(config.kernel, nu_max=int(nu_max)),
        )
        log(f"grid point {k + 1}/{len(values)}: nu_max = {nu_max}, C = {C:g}, r0 = {r0:g} A, trial fit")
        start = time.perf_counter()
        # the trial fit's own lines would drown the grid's; its progress bars show
        model = _fit(subset, trial, config.grid.sparse, True, FitLog(False, progress=log.progress))
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
