"""Everything ``acdc-potential fit`` can be told, with its defaults, in one place.

A YAML file given with ``--config`` overrides any subset; unknown names are errors::

    density:        # DensityHypers: radial basis and neighbour density
      cutoff: 5.0
      max_radial: 8
    kernel:         # KernelConfig
      type: wigner
      nu_max: 4     # default auto: 3 or 4, chosen on held-out structures
    sparse:         # SparseConfig
      n: 500        # or per element: {H: 300, C: 200, O: 100}
    regularisers:   # Regularisers: expected errors of the labels
      energy: 0.002
    grid:           # GridConfig: small grid over the Wigner density's C and r0
      C: [0.1, 0.3, 1.0]
    options:        # FitOptions
      tune: true
    keys:           # LabelKeys: names of the labels in the extxyz file
      energy: REF_energy

The defaults aim at a good model of a molecular or condensed-phase data set in
minutes on a laptop; none is tuned to a particular data set. :meth:`FitConfig.template`
(``acdc-potential config``) writes every option with its default and its meaning; a value
of the wrong type or out of range is a :class:`ConfigError` naming the option.
"""

import dataclasses
import math
import re
import textwrap
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union

import ase.data
import torch
import yaml

from .data import LabelKeys
from .descriptors.invariants import NORM_FLOOR
from .descriptors.radial import DensityHypers

# an element as YAML may give it: a symbol or an atomic number (see :func:`atomic_number`)
Element = Union[str, int]


class ConfigError(ValueError):
    """A configuration that names an unknown section or option, or gives an option a value
    of the wrong type or range; the message names the option (``section.option``)."""


@dataclass
class Regularisers:
    """Expected errors (noise standard deviations) of the labels.

    :param energy: per atom, eV (an energy row's sigma is ``energy * sqrt(N_atoms)``).
    :param forces: eV/A.
    :param stress: eV/A^3.
    """

    energy: float = 0.002
    forces: float = 0.04
    stress: float = 0.001

    def of_kind(self) -> torch.Tensor:
        """``[3]`` sigmas indexed by row kind."""
        return torch.tensor([self.energy, self.forces, self.stress], dtype=torch.float64)


@dataclass
class KernelConfig:
    """The kernel.

    :param type: ``wigner`` (exponential body-ordered Wigner kernel, WK eq. E4),
        ``polynomial`` (``(x . x')^zeta`` on normalised invariant ACDC features of the orders
        ``orders``; by default ``zeta = 2`` on orders 1 and 2, which collapses exactly at export;
        ``zeta: 4`` on ``orders: [2]`` is GAP's SOAP kernel; ``zeta: 1`` is a linear model) or
        ``mpacdc`` (the same on the message-passing ``[1 <- 1]`` invariants, MP-ACDC eq. 12, beside the
        single-centre ``orders``, a subset of 1 and 2; an atom's energy then depends on atoms up to
        ``max(density.cutoff, 2 message_cutoff)`` away).
    :param nu_max: largest correlation order of the Wigner kernel (body order ``nu_max + 1``),
        or ``auto`` (default): the candidates of ``grid.nu_max`` (3 and 4) are compared on
        held-out structures (:func:`~acdc_potential.fit.driver.select_on_grid`) and the
        cheapest within ``grid.tolerance`` of the best is kept. Up to 4, an exported model evaluates
        every order at a cost independent of the number of sparse environments
        (:meth:`~acdc_potential.kernels.wigner.features.OrderFeatures.collapse`; docs/equations.md,
        "Collapsed energies"); orders above 4 cost, per MD step, in proportion to that number, and
        their energies are rounded at about 1e-10 relative (docs/equations.md, "Numerical precision").
    :param lambda_max: angular truncation of the Wigner iterations.
    :param channel_weights: scale of each angular channel ``l`` of the ``nu = 1`` Wigner
        kernel: ``uniform`` (default; the kernels of WK eq. 5, B1) or ``inverse_dimension``
        (``8 pi^2 / (2l + 1)``, what models of earlier versions were fitted with: weights low
        ``l`` more at every ``nu >= 2``; see :class:`~acdc_potential.kernels.wigner.iteration.WignerHypers`).
    :param zeta: exponent of the polynomial kernel: 1 and 2 fold into per-species tensors at export (exact
        energies, a cost per atom that stops growing with the sparse environments); larger values sum over
        the sparse environments at every step (docs/equations.md, "Numerical precision").
    :param orders: body orders ``nu`` of the polynomial kernel's invariant features, any of 1
        (the ``l = 0`` density coefficients), 2 (the power spectrum) and 3 (the bispectrum),
        concatenated with equal weights (docs/equations.md, "Polynomial kernel").
    :param message_max_radial: ``max_radial`` of the ``mpacdc`` message's expansion (the density's
        otherwise, cutoff included): its features number about ``(n_species (max_radial + 1))^3`` per coupling.
    :param message_max_angular: ``max_angular`` of the message's expansion.
    :param message_cutoff: the ``mpacdc`` message's cutoff in A, at most ``density.cutoff`` and above
        ``density.smoothing``: the pairs that carry a message and the reach of the neighbour densities it
        carries, so that an atomic energy depends on atoms up to ``max(density.cutoff, 2 message_cutoff)``
        away (the interaction range the exported model declares, hence the ghost shell of a domain
        decomposition); ``null`` (default): the density's cutoff.
    :param message_orders: the ``nu`` of the ``mpacdc`` kernel's ``[nu <- 1]`` invariants, any of 1 and 2
        (``[1 <- 1]`` has about ``Q^3`` invariants per coupling, ``Q`` the message's density channels;
        ``[2 <- 1]``, which couples the centre's ``nu = 2`` blocks with the message, about ``Q^4``).
    :param contraction: with order 3, the number of components kept of each ``nu = 2`` equivariant
        block before the last coupling; for ``mpacdc``, of each block of the two factors of every
        ``[nu <- 1]`` coupling; by a PCA (MP-ACDC eq. 24) on the atoms of a sample of about 2000
        training atoms, before the sparse selection; 0 keeps them all (the nu = 3 invariants number
        about the cube of the density channels per coupling).
    :param norm_floor: for ``polynomial`` and ``mpacdc``, the floor of each part of the features (each
        order, each message order), relative to the median norm of that part over training atoms: the
        floor joins the part as one more component before it is scaled to unit norm, so that the features
        of an atom that loses its last neighbour (or its last message pair) change smoothly instead of
        jumping, and a part carries its size (a metal's local density, a surface atom's coordination) as
        well as its direction (docs/equations.md, "Polynomial kernel"). 0 gives plain unit parts
        (checkpoints before version 8).
    :param feature_space: for ``polynomial`` and ``mpacdc`` with ``zeta: 1`` (a linear model on the
        features): when a species' features are fewer than its sparse environments (``sparse.n``), its
        sparse set is the origin and the principal axes of its features instead of selected environments,
        so the fit is the exact ridge regression in feature space, with ``F + 1`` rather than ``sparse.n``
        columns (default true; ``false`` always selects environments).
    :param centres: the central species whose atoms carry a learned energy: ``null`` (default) for
        every species (a multi-centre model), or a list of elements, e.g. ``[C]`` (a single-centre
        model, MP-ACDC Fig. 6: the other atoms enter as neighbours only, and their energy is their
        baseline). Sparse environments are chosen among the centres' atoms only.
    :param mixing: starting values of the mixing coefficients (``c0``, ``a``, ``b`` for
        ``wigner``; ``c0``, ``a`` for ``polynomial`` and ``mpacdc``); tuned when ``options.tune``.
    """

    type: str = "wigner"
    nu_max: Union[int, str] = "auto"
    lambda_max: int = 3
    channel_weights: str = "uniform"
    zeta: int = 2
    orders: List[int] = field(default_factory=lambda: [1, 2])
    contraction: int = 64
    message_max_radial: int = 3
    message_max_angular: int = 2
    message_cutoff: Optional[float] = None
    message_orders: List[int] = field(default_factory=lambda: [1])
    norm_floor: float = NORM_FLOOR
    feature_space: bool = True
    centres: Optional[List[Element]] = None
    mixing: Dict[str, float] = field(default_factory=dict)


@dataclass
class SparseConfig:
    """Sparse environments.

    :param n: number per central species; an integer for all, or a map from element
        symbol (or atomic number) to a number. Species with fewer atoms keep them all.
        The default, 1000, is what GAP fits commonly use; the fitting cost grows linearly
        with it (and the memory of the design matrix), the cost of a collapsed exported
        model per MD step does not (every order up to 4; docs/equations.md, "Collapsed energies").
    :param selection: ``fps`` (farthest point sampling) or ``cur``, on the power spectrum (Wigner
        kernels) or on the kernel's own features (``polynomial``, ``mpacdc``).
    :param candidates: atoms among which the selection chooses: every atom of the training set
        when it has at most this many, else those of a random sample of its structures (seed
        ``options.seed``) with at most this many atoms, so that the memory of the selection
        (their environments: density coefficients and power spectra, or a feature kernel's
        features) does not grow with the data.
    """

    n: Union[int, Dict[Element, int]] = 1000
    selection: str = "fps"
    candidates: int = 50000


@dataclass
class FitOptions:
    """What to fit and how.

    :param target: what the model predicts: ``energy`` (a potential: energy rows, forces and
        stress by derivatives) or ``dipole`` (the ``dipole`` section; the energy options do not apply).
    :param energies: use energy rows. :param forces: use force rows.
    :param stress: use stress rows (periodic structures that have a stress).
    :param tune: select the mixing coefficients and regularisers on held-out structures
        (no kernel is recomputed), then calibrate the uncertainties on the ``validation``
        fraction of the tuning sample (at most 200 structures; docs/equations.md,
        "Uncertainties"); without tuning the model is not calibrated.
    :param validation: fraction of the training structures held out while tuning.
    :param tuning: how ``tune`` chooses: ``validation`` (the errors on the held-out ``validation``
        fraction) or ``evidence`` (the marginal likelihood of every structure of the tuning sample,
        as Gaussian-process codes such as FLARE choose: nothing held out, so the choice does not
        hinge on which few structures a small set holds out; the regularisers then estimate the
        labels' noise; docs/equations.md, "Evidence"). The ``nu_max`` grid compares validation
        losses either way, and the calibration always holds out the ``validation`` fraction. For
        energy fits: a dipole fit chooses on its validation split.
    :param tune_sparse: sparse environments per species used while tuning (the first of
        the selection order, itself a farthest-point or CUR selection; 0: all). Each trial
        solve costs ``O(rows x M^2)``, so tuning on a subset keeps large sparse sets
        affordable; the final solve uses them all. More sparse environments leave the model
        more freedom than the subset had, so the regularisers found are then multiplied by the
        one factor that minimises the same validation loss with all of them (one QR and one
        SVD, :func:`~acdc_potential.fit.solver.scaled_regularisation_predictions`).
    :param isolated_energies: per-element energies of isolated atoms (eV) to use as the
        baseline instead of a least-squares fit on composition.
    :param seed: seed of the validation split (and of the tuning sample, below).
    :param design_memory: largest design matrix held in memory, in GB (``(nu_max + 1) x
        rows x M`` float64 numbers). A training set whose rows need more is tuned on a random
        sample of its structures that fits, and the rows of the others are built group by
        group afterwards and folded into the final solve: the peak memory of a fit then
        stays bounded as the data grow (:func:`~acdc_potential.fit.design.design_groups`).
    :param device: the torch device on which an energy fit computes densities, kernel rows, tuning and
        solve, e.g. ``cuda`` for a GPU (the fitted model is written from the CPU either way; README, "On a
        GPU", and "Known limitations" for what was run there). Fits on a Dask cluster and dipole fits run
        on the CPU.
    """

    target: str = "energy"
    energies: bool = True
    forces: bool = True
    stress: bool = True
    tune: bool = True
    validation: float = 0.1
    tuning: str = "validation"
    tune_sparse: int = 300
    isolated_energies: Optional[Dict[Element, float]] = None
    seed: int = 0
    design_memory: float = 4.0
    device: str = "cpu"


@dataclass
class GridConfig:
    """A small grid over the Wigner kernel's body order (``nu_max``, when ``kernel.nu_max``
    is ``auto``) and the radial scaling of its density (``C``, ``r0``; WK eq. E1, E2).

    Each combination of ``nu_max``, ``C`` (or the density's ``C`` if the list is empty)
    and ``r0`` (likewise) is fitted and tuned on a random subset of ``structures``
    training structures with ``sparse`` sparse environments per species. Among the points
    whose validation loss (of the tuning, same held-out structures for all) is within
    ``tolerance`` (relative) of the lowest, the one with the smallest ``nu_max`` wins
    (the cheapest to run; then the lowest loss); it is used for the final fit, and every
    point's loss is stored in the model's report (``density_grid``). By default only
    ``nu_max`` 3 and 4 are compared (two small fits).

    :param nu_max: candidates for ``kernel.nu_max: auto``.
    :param C: values of ``C`` to try. :param r0: values of ``r0`` (A) to try.
    :param structures: training structures per grid point. :param sparse: sparse
        environments per species per grid point.
    :param tolerance: relative validation-loss margin within which the cheaper point wins.
    """

    nu_max: List[int] = field(default_factory=lambda: [3, 4])
    C: List[float] = field(default_factory=list)
    r0: List[float] = field(default_factory=list)
    structures: int = 200
    sparse: int = 100
    tolerance: float = 0.05


@dataclass
class ClusterConfig:
    """Where the kernel rows are built: in this process (the default), or by the workers of a
    Dask cluster (``dask.distributed``; docs/cluster.md).

    On a cluster, each worker reads its share of the training file itself (the file must be
    reachable from every worker under the same path), and returns only small results: the
    structures' label counts, the sample's density coefficients and rows (for the sparse
    selection and the tuning), and the ``[M + 1, M + 1]`` triangles of the final solve,
    merged on the workers. The weights equal those of the fit in one process.

    :param workers: worker processes of a local Dask cluster on this machine (0: no cluster).
    :param scheduler: address of a running Dask scheduler (``tcp://HOST:8786``; e.g. started
        by dask-jobqueue on SLURM or PBS); used instead of ``workers`` when given.
    :param threads_per_worker: torch threads of each worker (of the local cluster, or of the
        scheduler's: set on every worker when the fit starts).
    :param task_memory: design rows one task may build, in GB (the memory of a worker grows
        with it; the tuning sample's rows stay bounded by ``options.design_memory``). The rows
        are cut into such tasks, and their triangles merged in one fixed tree, in this process
        too: how a fit is cut decides how its sums are rounded, so that with the same cut every
        executor gives the same weights.
    :param task_structures: structures per task while surveying the file and computing the
        density coefficients of the sparse selection's candidates.
    :param checkpoint: folder where the triangle of every finished task of the final solve is
        stored, so that a fit interrupted (or whose cluster failed) resumes when run again with
        the same data and settings (empty: none; the command line uses ``MODEL.partial``
        beside the model and removes it once the model is written).
    """

    workers: int = 0
    scheduler: str = ""
    threads_per_worker: int = 1
    task_memory: float = 1.0
    task_structures: int = 200
    checkpoint: str = ""


@dataclass
class LearnConfig:
    """On-the-fly active learning (``acdc-potential learn``; the other sections set the fits).

    Langevin MD runs from each starting structure at each temperature in turn (temperatures in
    the order given, each with every starting structure; at least two starting structures), with the current
    model; every ``interval`` steps the calibrated uncertainty of every atom's force components
    (:mod:`~acdc_potential.model.uncertainty`) is computed, and where the largest exceeds
    ``threshold`` times the RMS force component of the labelled structures, the structure is
    labelled by the reference calculator and added to the fit, with the ``new_sparse`` most
    uncertain of its atoms above half the threshold as new sparse environments
    (:class:`~acdc_potential.fit.incremental.IncrementalFit`: no refit from scratch); the MD goes on
    with the new model at the same total energy (:meth:`~acdc_potential.active.ActiveLearner.switch`).

    :param temperatures: of the Langevin thermostat, K; each starting structure runs at each.
    :param steps: MD steps per starting structure and temperature.
    :param timestep: of the MD, fs.
    :param friction: of the Langevin thermostat, 1/fs.
    :param interval: MD steps between uncertainty checks: at most one label per this many steps
        (consecutive frames are nearly the same structure, and labelling each spends the reference
        calls on one region), and the uncertainty is computed on those steps only.
    :param threshold: label a structure when the uncertainty of an atom's force components
        exceeds this fraction of the RMS force component of the labelled structures (a relative
        accuracy, the same for any system and units of the data).
    :param new_sparse: most atoms of a labelled structure made sparse environments (the most
        uncertain first, among those above half the threshold).
    :param max_labels: labelled structures in all, the starting ones included; learning
        stops there.
    :param retune: tune the regularisers and mixing, and calibrate the uncertainties, on the
        labelled structures whenever their number has grown by this factor (above 1) since the
        last tuning (on the kept kernel rows: no kernel row is computed); 0: never.
    :param tuning: how the first fit and every retuning choose the mixing and regularisers
        (``options.tuning`` for the learning's fits): ``evidence`` by default, because a held-out
        tenth of a few dozen labelled structures chooses by which structures it holds out (README,
        "Active learning").
    :param seed: of the initial velocities and the thermostat's noise.
    """

    temperatures: List[float] = field(default_factory=lambda: [300.0])
    steps: int = 1000
    timestep: float = 0.5
    friction: float = 0.01
    interval: int = 10
    threshold: float = 0.01
    new_sparse: int = 8
    max_labels: int = 100
    retune: float = 2.0
    tuning: str = "evidence"
    seed: int = 0


@dataclass
class DipoleConfig:
    """Dipole models (``fit --target dipole``; docs/equations.md, "Dipoles").

    The dipole of a structure is the sum of atomic ``lambda = 1`` contributions. With ``kernel:
    wigner`` (default) each is a sparse kernel expansion with the symmetry-adapted Wigner kernels
    ``k^{nu, 1+}`` (WK eq. 5) mixed over the body orders as WK eq. E4 (``b^nu / nu!``; no ``nu = 0``
    piece), on the ``density`` section's environments and ``kernel.lambda_max``; on a held-out
    ``options.validation`` fraction the fit chooses the largest order (``1..nu_max``), ``b`` and the
    regulariser. With ``kernel: acdc`` or ``mpacdc`` it is a linear model on true-vector features
    (MP-ACDC Fig. 10), ``mu_i = x_i v_a``: the ``(1, +1)`` ACDC of body order ``order``, or the
    ``[1 <- 1]`` features, of a density expansion with the ``density`` section's cutoff and density but
    the basis ``max_radial``, ``max_angular``; the fit chooses the regulariser. Then it solves on every
    structure.

    :param kernel: ``wigner`` (Wigner kernels), ``acdc`` or ``mpacdc`` (linear on ``(1, +1)`` features).
    :param nu_max: largest body order considered by Wigner kernels (the choice costs nothing more:
        lower orders come with the highest's iterations).
    :param order: the body order ``nu`` of ``acdc`` features: 1 (the ``l = 1`` density coefficients), 2
        (lambda-SOAP) or 3 (the features number about ``Q^3``, ``Q`` the density channels).
    :param max_radial: ``max_radial`` of the feature models' density (the seed's ``n_max = 4``).
    :param max_angular: ``max_angular`` of the feature models' density (the seed's ``l_max = 2``).
    :param sparse: sparse environments per species (farthest points of the power spectrum; a feature
        model's weights live in the span of their features).
    :param b: candidate values of the order mixing ``b``.
    :param regulariser: expected error of a dipole component, e*A; 0: chosen on the validation
        split among ``10^(-k/2)`` times the standard deviation of the components, ``k = 0..10``.
    :param charges: add atomic charges times positions to the local dipoles, the charges an
        invariant kernel expansion (same orders and ``b``, with the constant ``nu = 0`` piece) and
        their sum over a molecule kept at zero (the charge model the seeds compare with; molecules
        only; Wigner kernels only).
    :param charge_scale: candidate scales of the charges' kernel relative to the local dipoles'
        (the a priori share of the dipole each explains), chosen on the validation split.
    """

    kernel: str = "wigner"
    nu_max: int = 4
    order: int = 2
    max_radial: int = 3
    max_angular: int = 2
    sparse: int = 300
    b: List[float] = field(default_factory=lambda: [0.25, 0.5, 1.0, 2.0, 4.0, 8.0])
    regulariser: float = 0.0
    charges: bool = False
    charge_scale: List[float] = field(default_factory=lambda: [0.1, 1.0, 10.0])


@dataclass
class FitConfig:
    """Every option of a fit, in sections; :meth:`template` writes them all with their
    defaults and meanings, :meth:`from_yaml` reads a file that overrides any subset."""

    density: DensityHypers = field(default_factory=DensityHypers)
    kernel: KernelConfig = field(default_factory=KernelConfig)
    sparse: SparseConfig = field(default_factory=SparseConfig)
    regularisers: Regularisers = field(default_factory=Regularisers)
    grid: GridConfig = field(default_factory=GridConfig)
    options: FitOptions = field(default_factory=FitOptions)
    keys: LabelKeys = field(default_factory=LabelKeys)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    learn: LearnConfig = field(default_factory=LearnConfig)
    dipole: DipoleConfig = field(default_factory=DipoleConfig)

    @classmethod
    def from_dict(cls, values: Optional[Dict]) -> "FitConfig":
        """The defaults with the overrides ``{section: {option: value}}`` of ``values``
        (as YAML reads them); a :class:`ConfigError` names the first unknown or ill-typed one."""
        config = cls()
        for name, overrides in _mapping(values, "the configuration", "sections").items():
            setattr(config, name, _overridden(_section(config, name), name, _mapping(overrides, name, "options")))
        return config

    def overridden(self, section: str, values: Dict) -> "FitConfig":
        """A copy with the options ``values`` of ``section`` replaced, checked as :meth:`from_dict` checks them."""
        return dataclasses.replace(self, **{section: _overridden(_section(self, section), section, values)})

    @classmethod
    def from_yaml(cls, path: Optional[str]) -> "FitConfig":
        if path is None:
            return cls()
        try:
            with open(path) as file:
                values = yaml.safe_load(file)
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such configuration file") from None
        except OSError as error:
            raise ConfigError(f"{path}: cannot be read ({error.strerror})") from None
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML ({' '.join(str(error).split())})") from None
        return cls.from_dict(values)

    def to_dict(self) -> Dict:
        return dataclasses.asdict(self)

    @classmethod
    def template(cls) -> str:
        """The whole configuration as commented YAML (what ``acdc-potential config`` prints):
        each section and option with its default and, in comments, its meaning from the
        docstrings of the sections' dataclasses. It reads back as the defaults."""
        defaults = cls()
        sections = [_section_template(f.name, getattr(defaults, f.name)) for f in dataclasses.fields(cls)]
        return "\n".join([_TEMPLATE_HEADER, *sections])


# ---- type and range checks of from_dict


@dataclass(frozen=True)
class Bounds:
    """The numbers ``low < x < high``, or ``low <= x < high`` when ``inclusive``."""

    low: float
    high: float = math.inf
    inclusive: bool = False

    def __contains__(self, x: float) -> bool:
        return (x >= self.low if self.inclusive else x > self.low) and x < self.high

    def __str__(self) -> str:
        if self.high < math.inf:
            return f"in {'[' if self.inclusive else '('}{self.low:g}, {self.high:g})"
        return f"{'>=' if self.inclusive else '>'} {self.low:g}"


POSITIVE = Bounds(0.0)
NON_NEGATIVE = Bounds(0.0, inclusive=True)
FRACTION = Bounds(0.0, 1.0)
AT_LEAST_ONE = Bounds(1.0, inclusive=True)


@dataclass(frozen=True)
class Rule:
    """What an option's value must be beyond its type: its strings among ``choices``, its
    numbers (also those in its lists and mappings) within ``bounds``."""

    choices: Tuple[str, ...] = ()
    bounds: Optional[Bounds] = None


ANY = Rule()
# how a fit chooses its mixing and regularisers (options.tuning, learn.tuning)
TUNING = ("validation", "evidence")

# the strings and ranges the fit accepts (the code checks the same choices where it uses
# them: DensityHypers.validate, fit.driver.make_kernel, fit.selection.select_sparse);
# mixing coefficients are tuned in log space, hence positive
RULES: Dict[Tuple[str, str], Rule] = {
    ("density", "cutoff"): Rule(bounds=POSITIVE),
    ("density", "smoothing"): Rule(bounds=NON_NEGATIVE),
    ("density", "max_angular"): Rule(bounds=NON_NEGATIVE),
    ("density", "max_radial"): Rule(bounds=NON_NEGATIVE),
    ("density", "basis"): Rule(choices=("le", "gto")),
    ("density", "density"): Rule(choices=("gaussian", "wigner")),
    ("density", "width"): Rule(bounds=POSITIVE),
    ("density", "C"): Rule(bounds=POSITIVE),
    ("density", "r0"): Rule(bounds=POSITIVE),
    ("density", "spline_accuracy"): Rule(bounds=POSITIVE),
    ("kernel", "type"): Rule(choices=("wigner", "polynomial", "mpacdc")),
    ("kernel", "nu_max"): Rule(choices=("auto",), bounds=NON_NEGATIVE),
    ("kernel", "lambda_max"): Rule(bounds=NON_NEGATIVE),
    ("kernel", "channel_weights"): Rule(choices=("uniform", "inverse_dimension")),
    ("kernel", "zeta"): Rule(bounds=POSITIVE),
    ("kernel", "orders"): Rule(bounds=Bounds(1.0, 4.0, inclusive=True)),
    ("kernel", "contraction"): Rule(bounds=NON_NEGATIVE),
    ("kernel", "message_max_radial"): Rule(bounds=NON_NEGATIVE),
    ("kernel", "message_max_angular"): Rule(bounds=NON_NEGATIVE),
    ("kernel", "message_cutoff"): Rule(bounds=POSITIVE),
    ("kernel", "norm_floor"): Rule(bounds=NON_NEGATIVE),
    ("kernel", "message_orders"): Rule(bounds=Bounds(1.0, 3.0, inclusive=True)),
    ("kernel", "mixing"): Rule(bounds=POSITIVE),
    ("sparse", "n"): Rule(bounds=POSITIVE),
    ("sparse", "selection"): Rule(choices=("fps", "cur")),
    ("sparse", "candidates"): Rule(bounds=POSITIVE),
    ("regularisers", "energy"): Rule(bounds=POSITIVE),
    ("regularisers", "forces"): Rule(bounds=POSITIVE),
    ("regularisers", "stress"): Rule(bounds=POSITIVE),
    ("grid", "nu_max"): Rule(bounds=AT_LEAST_ONE),
    ("grid", "C"): Rule(bounds=POSITIVE),
    ("grid", "r0"): Rule(bounds=POSITIVE),
    ("grid", "structures"): Rule(bounds=POSITIVE),
    ("grid", "sparse"): Rule(bounds=POSITIVE),
    ("grid", "tolerance"): Rule(bounds=NON_NEGATIVE),
    ("options", "target"): Rule(choices=("energy", "dipole")),
    ("options", "validation"): Rule(bounds=FRACTION),
    ("options", "tuning"): Rule(choices=TUNING),
    ("options", "tune_sparse"): Rule(bounds=NON_NEGATIVE),
    ("options", "design_memory"): Rule(bounds=POSITIVE),
    ("cluster", "workers"): Rule(bounds=NON_NEGATIVE),
    ("cluster", "threads_per_worker"): Rule(bounds=AT_LEAST_ONE),
    ("cluster", "task_memory"): Rule(bounds=POSITIVE),
    ("cluster", "task_structures"): Rule(bounds=POSITIVE),
    ("learn", "temperatures"): Rule(bounds=NON_NEGATIVE),
    ("learn", "steps"): Rule(bounds=NON_NEGATIVE),
    ("learn", "timestep"): Rule(bounds=POSITIVE),
    ("learn", "friction"): Rule(bounds=NON_NEGATIVE),
    ("learn", "interval"): Rule(bounds=AT_LEAST_ONE),
    ("learn", "threshold"): Rule(bounds=POSITIVE),
    ("learn", "new_sparse"): Rule(bounds=NON_NEGATIVE),
    ("learn", "max_labels"): Rule(bounds=AT_LEAST_ONE),
    ("learn", "retune"): Rule(bounds=NON_NEGATIVE),
    ("learn", "tuning"): Rule(choices=TUNING),
    ("dipole", "kernel"): Rule(choices=("wigner", "acdc", "mpacdc")),
    ("dipole", "nu_max"): Rule(bounds=AT_LEAST_ONE),
    ("dipole", "order"): Rule(bounds=Bounds(1.0, 4.0, inclusive=True)),
    ("dipole", "max_radial"): Rule(bounds=NON_NEGATIVE),
    ("dipole", "max_angular"): Rule(bounds=AT_LEAST_ONE),
    ("dipole", "sparse"): Rule(bounds=AT_LEAST_ONE),
    ("dipole", "b"): Rule(bounds=POSITIVE),
    ("dipole", "regulariser"): Rule(bounds=NON_NEGATIVE),
    ("dipole", "charge_scale"): Rule(bounds=POSITIVE),
}


def _mapping(value: Any, where: str, of: str) -> Dict:
    """``value`` if it is a mapping (``{}`` for ``None``, an empty YAML section)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping of {of}, got {value!r}")
    return value


def _section(config: FitConfig, name: Any):
    known = [f.name for f in dataclasses.fields(config)]
    if name not in known:
        raise ConfigError(f"unknown configuration section '{name}' (known: {', '.join(known)})")
    return getattr(config, name)


def _overridden(current, section: str, overrides: Dict):
    """The dataclass ``current`` of ``section`` with ``overrides``, each checked against
    the annotation of its field and its :data:`RULES`."""
    names = [f.name for f in dataclasses.fields(current)]
    unknown = set(overrides) - set(names)
    if unknown:
        raise ConfigError(f"unknown option(s) {sorted(unknown, key=str)} in section '{section}' (known: {sorted(names)})")
    hints = typing.get_type_hints(type(current))
    checked = {
        name: _checked(value, hints[name], f"{section}.{name}", RULES.get((section, name), ANY))
        for name, value in overrides.items()
    }
    return dataclasses.replace(current, **checked)


def _checked(value: Any, annotation, where: str, rule: Rule = ANY) -> Any:
    """``value`` if it fits ``annotation`` and ``rule`` (an int made a float where a float is
    expected, lists and mappings checked item by item), else a :class:`ConfigError` at ``where``."""
    arm = _matching_arm(value, annotation)
    if arm is None:
        raise ConfigError(f"{where}: expected {_phrase(annotation, rule)}, got {value!r}{_hint(value, annotation)}")
    origin = typing.get_origin(arm)
    if origin is list:
        (item,) = typing.get_args(arm)
        return [_checked(x, item, f"{where}[{i}]", rule) for i, x in enumerate(value)]
    if origin is dict:
        key, item = typing.get_args(arm)
        return {_checked(k, key, f"{where} (key {k!r})"): _checked(v, item, f"{where}.{k}", rule) for k, v in value.items()}
    if not _obeys(value, arm, rule):
        raise ConfigError(f"{where}: expected {_phrase(annotation, rule)}, got {value!r}")
    return float(value) if arm is float else value


def _matching_arm(value: Any, annotation):
    """The first type of the union ``annotation`` (or ``annotation`` itself) that ``value``
    has the shape of, without looking into lists and mappings; ``None`` if none."""
    arms = typing.get_args(annotation) if typing.get_origin(annotation) is Union else (annotation,)
    return next((arm for arm in arms if _has_shape(value, arm)), None)


def _has_shape(value: Any, annotation) -> bool:
    """Whether ``value`` is of the (unparametrised) type of ``annotation``: YAML's ``true``
    and ``false`` are neither integers nor numbers, and an integer is a number."""
    kind = typing.get_origin(annotation) or annotation
    if kind in (int, float) and isinstance(value, bool):
        return False
    return isinstance(value, (int, float) if kind is float else kind)


def _obeys(value: Any, kind: type, rule: Rule) -> bool:
    """Whether the scalar ``value`` of type ``kind`` is among the choices or bounds of ``rule``."""
    if kind is str and rule.choices:
        return value in rule.choices
    if kind in (int, float) and rule.bounds is not None:
        return value in rule.bounds
    return True


_NOUNS = {
    bool: ("true or false", "true or false"),
    int: ("an integer", "integers"),
    float: ("a number", "numbers"),
    str: ("a string", "strings"),
    type(None): ("null", "null"),
}


def _phrase(annotation, rule: Rule = ANY, plural: bool = False) -> str:
    """What ``annotation`` under ``rule`` accepts, in words: "an integer >= 0 or 'auto'"."""
    origin = typing.get_origin(annotation)
    if origin is Union:
        arms = sorted(typing.get_args(annotation), key=lambda arm: arm is not type(None))  # "null or ..."
        return " or ".join(_phrase(arm, rule, plural) for arm in arms)
    if origin is list:
        (item,) = typing.get_args(annotation)
        return f"{'lists' if plural else 'a list'} of {_phrase(item, rule, plural=True)}"
    if origin is dict:
        key, item = typing.get_args(annotation)
        keys = "elements" if key == Element else _phrase(key, plural=True)  # the mappings' only Union[str, int]
        return f"{'mappings' if plural else 'a mapping'} from {keys} to {_phrase(item, rule, plural=True)}"
    if annotation is str and rule.choices:
        quoted = ", ".join(repr(choice) for choice in rule.choices)
        return quoted if len(rule.choices) == 1 else f"one of {quoted}"
    noun = _NOUNS[annotation][plural]
    return f"{noun} {rule.bounds}" if annotation in (int, float) and rule.bounds is not None else noun


# a number that YAML 1.1 (PyYAML) reads as a string: an exponent without a decimal point or sign
_STRING_NUMBER = re.compile(r"[-+]?(\d+[eE][-+]?|[\d.]+[eE])\d+")


def _hint(value: Any, annotation) -> str:
    """Why a number written as ``1e-8`` or ``1.0e8`` arrived as a string, when one is expected."""
    if not isinstance(value, str) or not _STRING_NUMBER.fullmatch(value) or _matching_arm(0.5, annotation) is None:
        return ""
    return "; YAML reads a number in exponent notation only with a decimal point and a signed exponent: 1.0e-8, 1.0e+3"


# ---- the commented YAML template

_TEMPLATE_HEADER = """\
# Configuration of an acdc-potential fit: every option, with its default value and its meaning.
# Written by `acdc-potential config > config.yaml`; edit, then
#
#     acdc-potential fit train.extxyz -o model.pt --config config.yaml
#
# Any subset of the sections and options may be given: the others keep these defaults. Unknown
# names, and values of the wrong type or out of range, are errors. Units: lengths in A (Angstrom),
# energies in eV.
"""

_COMMENT_WIDTH = 100
_PARAM = re.compile(r":param\s+(\w+):")


def _section_template(name: str, section) -> str:
    """One section of :meth:`FitConfig.template`: a comment naming it, then each option."""
    kind = type(section)
    meanings = _params(kind.__doc__)
    lines = [*_comment(f"{name} ({kind.__name__}): {_summary(kind.__doc__)}", ""), f"{name}:"]
    for option in dataclasses.fields(section):
        lines += [*_comment(meanings[option.name], "  "), "  " + _yaml_entry(option.name, getattr(section, option.name))]
    return "\n".join(lines) + "\n"


def _params(docstring: str) -> Dict[str, str]:
    """The ``:param name: text`` entries of ``docstring``, each text on one line."""
    parts = _PARAM.split(" ".join(docstring.split()))
    return {name: _plain(text) for name, text in zip(parts[1::2], parts[2::2])}


def _summary(docstring: str) -> str:
    """The first paragraph of ``docstring``, on one line."""
    return _plain(" ".join(docstring.strip().split("\n\n")[0].split()))


def _plain(text: str) -> str:
    """reST made plain: ``:func:`~a.b.name``` -> ``name``, ``:data:`NAME``` -> ``NAME``,
    double backquotes -> single."""
    text = re.sub(r":\w+:`~[\w.]*?(\w+)`", r"\1", text)
    text = re.sub(r":\w+:`([^`]+)`", r"\1", text)
    return text.replace("``", "`").strip()


def _comment(text: str, indent: str) -> List[str]:
    prefix = indent + "# "
    return textwrap.wrap(text, _COMMENT_WIDTH, initial_indent=prefix, subsequent_indent=prefix, break_long_words=False, break_on_hyphens=False)


def _yaml_entry(name: str, value: Any) -> str:
    """``name: value`` on one line of YAML, nested values in flow style (``[3, 4]``, ``{}``, ``null``)."""
    return yaml.safe_dump({name: value}, default_flow_style=True, width=math.inf, sort_keys=False).strip()[1:-1]


def atomic_number(element: Union[str, int]) -> int:
    """Atomic number from a symbol or a number (as YAML may give either)."""
    if isinstance(element, int) or str(element).isdigit():
        return int(element)
    if element not in ase.data.atomic_numbers:
        raise ValueError(f"unknown element '{element}'")
    return ase.data.atomic_numbers[element]


