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
minutes on a laptop; none is tuned to a particular data set.
"""

import dataclasses
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Union

import ase.data
import torch
import yaml

from .data import LabelKeys
from .descriptors.radial import DensityHypers


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

    :param type: ``wigner`` (exponential body-ordered Wigner kernel, WK eq. E4) or
        ``polynomial`` (``(x . x')^zeta`` on the normalised power spectrum, the GAP form).
    :param nu_max: largest correlation order of the Wigner kernel (body order ``nu_max + 1``),
        or ``auto`` (default): the candidates of ``grid.nu_max`` (3 and 4) are compared on
        held-out structures (:func:`~acdc_potential.fit.driver.select_on_grid`) and the
        cheapest within ``grid.tolerance`` of the best is kept. ``nu_max <= 3`` is what an
        exported model evaluates at a cost independent of the number of sparse environments
        (:meth:`~acdc_potential.kernels.wigner.features.OrderFeatures.collapse`; docs/equations.md,
        "Collapsed energies"); 4 adds five-body correlations (much better for gold
        clusters in our tests, no better for molecules or bulk copper) at a cost per MD
        step proportional to that number.
    :param lambda_max: angular truncation of the Wigner iterations.
    :param zeta: exponent of the polynomial kernel.
    :param mixing: starting values of the mixing coefficients (``c0``, ``a``, ``b`` for
        ``wigner``; ``c0``, ``a`` for ``polynomial``); tuned when ``options.tune``.
    """

    type: str = "wigner"
    nu_max: Union[int, str] = "auto"
    lambda_max: int = 3
    zeta: int = 4
    mixing: Dict[str, float] = field(default_factory=dict)


@dataclass
class SparseConfig:
    """Sparse environments.

    :param n: number per central species; an integer for all, or a map from element
        symbol (or atomic number) to a number. Species with fewer atoms keep them all.
        The default, 1000, is what GAP fits commonly use; the fitting cost grows linearly
        with it (and the memory of the design matrix), the cost of an exported
        ``nu_max <= 3`` model per MD step does not.
    :param selection: ``fps`` (farthest point sampling) or ``cur``, on the power spectrum.
    """

    n: Union[int, Dict[str, int]] = 1000
    selection: str = "fps"


@dataclass
class FitOptions:
    """What to fit and how.

    :param energies: use energy rows. :param forces: use force rows.
    :param stress: use stress rows (periodic structures that have a stress).
    :param tune: select the mixing coefficients and regularisers on held-out structures
        (no kernel is recomputed).
    :param validation: fraction of the training structures held out while tuning.
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
    """

    energies: bool = True
    forces: bool = True
    stress: bool = True
    tune: bool = True
    validation: float = 0.1
    tune_sparse: int = 300
    isolated_energies: Optional[Dict[str, float]] = None
    seed: int = 0
    design_memory: float = 4.0


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
class FitConfig:
    density: DensityHypers = field(default_factory=DensityHypers)
    kernel: KernelConfig = field(default_factory=KernelConfig)
    sparse: SparseConfig = field(default_factory=SparseConfig)
    regularisers: Regularisers = field(default_factory=Regularisers)
    grid: GridConfig = field(default_factory=GridConfig)
    options: FitOptions = field(default_factory=FitOptions)
    keys: LabelKeys = field(default_factory=LabelKeys)

    @classmethod
    def from_dict(cls, values: Optional[Dict]) -> "FitConfig":
        config = cls()
        for section, overrides in (values or {}).items():
            if not hasattr(config, section):
                known = ", ".join(f.name for f in dataclasses.fields(cls))
                raise ValueError(f"unknown configuration section '{section}' (known: {known})")
            current = getattr(config, section)
            names = {f.name for f in dataclasses.fields(current)}
            unknown = set(overrides or {}) - names
            if unknown:
                raise ValueError(f"unknown option(s) {sorted(unknown)} in section '{section}' (known: {sorted(names)})")
            setattr(config, section, dataclasses.replace(current, **(overrides or {})))
        return config

    @classmethod
    def from_yaml(cls, path: Optional[str]) -> "FitConfig":
        if path is None:
            return cls()
        with open(path) as file:
            return cls.from_dict(yaml.safe_load(file))

    def to_dict(self) -> Dict:
        return dataclasses.asdict(self)


def atomic_number(element: Union[str, int]) -> int:
    """Atomic number from a symbol or a number (as YAML may give either)."""
    if isinstance(element, int) or str(element).isdigit():
        return int(element)
    if element not in ase.data.atomic_numbers:
        raise ValueError(f"unknown element '{element}'")
    return ase.data.atomic_numbers[element]


