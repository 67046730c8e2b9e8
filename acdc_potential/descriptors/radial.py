"""Radial bases, neighbour densities and their tabulated radial integrals.

The density of neighbours of species ``a`` around a centre ``i`` is (WK eq. 4, E1, E2;
docs/equations.md, "Neighbour density" and "Radial basis and radial integral")

    rho_i^a(x) = sum_{j in A_i, a_j = a} f_cut(r_ji) f(r_ji) g_{sigma(r_ji)}(x - r_ji)

with ``g_sigma`` a unit-integral 3D Gaussian, ``g_sigma(x) = (2 pi sigma^2)^(-3/2)
exp(-x^2 / 2 sigma^2)``. Two densities are available:

- ``gaussian``: constant width ``sigma``, ``f = 1`` (the usual SOAP density);
- ``wigner``: ``sigma(r) = C exp(r / r0)`` and ``f(r) = exp(-r / r0)`` (WK eq. E1, E2).

``f_cut`` is the shifted cosine over the last ``smoothing`` Angstrom before the cutoff
(applied in :mod:`acdc_potential.descriptors.density`, not here). Expanding ``rho`` on
``R_nl(r) Y_lm(x / |x|)`` gives ``c_i[a n l m] = sum_j f_cut(r_ji) I_nl(r_ji)
Y_lm(r_ji / r_ji)``, with the radial integral (plane-wave expansion of the Gaussian)

    I_nl(d) = 4 pi (2 pi sigma^2)^(-3/2) f(d)
              int_0^R dr r^2 R_nl(r) exp(-(r^2 + d^2) / 2 sigma^2) i_l(r d / sigma^2),

``i_l`` the modified spherical Bessel function of the first kind, ``sigma = sigma(d)``.
:class:`RadialSpline` tabulates ``I_nl`` once per set of hyperparameters and evaluates
it with cubic splines in torch, so values and derivatives are consistent.
"""

import math
import dataclasses
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import List, Optional, Tuple, Union

import numpy as np
import torch

from ..errors import SplineAccuracyWarning

# scipy is imported by the functions that tabulate (at fit and export time only), so that
# the deployable model (acdc_potential.model) imports without it


def spherical_bessel_zeros(l_max: int, n_zeros: int) -> np.ndarray:
    """First ``n_zeros`` positive zeros of ``j_l`` for ``l = 0..l_max``, ``[l_max + 1, n_zeros]``.

    The zeros of ``j_l`` and ``j_{l+1}`` interlace, so each zero of ``j_{l+1}`` is
    bracketed by two consecutive zeros of ``j_l``.
    """
    import scipy.optimize
    import scipy.special

    n_total = n_zeros + l_max + 1
    zeros = np.zeros((l_max + 1, n_total))
    zeros[0] = np.pi * np.arange(1, n_total + 1)
    for l in range(1, l_max + 1):
        for k in range(n_total - l):
            zeros[l, k] = scipy.optimize.brentq(
                lambda x: scipy.special.spherical_jn(l, x),
                zeros[l - 1, k],
                zeros[l - 1, k + 1],
                xtol=1e-15,
            )
    return zeros[:, :n_zeros]


def laplacian_eigenstate_sizes(max_radial: int, max_angular: Optional[int] = None) -> List[int]:
    """Number of radial functions per ``l`` of the Laplacian-eigenstate truncation.

    Keeps every ``(l, n)`` whose eigenvalue ``z_ln^2`` does not exceed that of ``(l=0,
    n=max_radial)`` (Bigi et al., J. Chem. Phys. 157, 234101 (2022)); ``max_angular``
    caps ``l``. Returns one count per ``l = 0..l_max``.
    """
    guess = max_radial + 1 if max_angular is None else max_angular
    while True:
        zeros = spherical_bessel_zeros(guess, max_radial + 1)
        threshold = zeros[0, max_radial]
        sizes = [int(np.sum(zeros[l] <= threshold * (1 + 1e-12))) for l in range(guess + 1)]
        if max_angular is not None or sizes[-1] == 0:
            break
        guess *= 2
    sizes = [s for s in sizes if s > 0]
    return sizes if max_angular is None else sizes[: max_angular + 1]


class LaplacianEigenstateBasis:
    """``R_nl(r) = N_nl j_l(z_ln r / R)``, orthonormal on ``[0, R]`` with weight ``r^2``.

    ``z_ln`` is the ``n``-th zero of ``j_l``, ``R`` the cutoff; the normalisation is
    ``N_nl^-2 = R^3 j_{l+1}(z_ln)^2 / 2``.
    """

    def __init__(self, cutoff: float, n_radial: List[int]):
        self.cutoff = float(cutoff)
        self.n_radial = list(n_radial)
        self.zeros = spherical_bessel_zeros(len(n_radial) - 1, max(n_radial))
        self.integration_radius = self.cutoff

    def evaluate(self, l: int, r: np.ndarray) -> np.ndarray:
        """``R_nl`` at points ``r`` (any shape), returns shape ``r.shape + [n_radial[l]]``."""
        import scipy.special

        z = self.zeros[l, : self.n_radial[l]]
        norm = np.sqrt(2.0 / self.cutoff**3) / np.abs(scipy.special.spherical_jn(l + 1, z))
        return norm * scipy.special.spherical_jn(l, np.asarray(r)[..., None] * z / self.cutoff)

    def max_wavenumber(self) -> float:
        return float(max(self.zeros[l, n - 1] for l, n in enumerate(self.n_radial))) / self.cutoff


class GtoBasis:
    """Gaussian-type orbitals ``r^n exp(-r^2 / 2 sigma_n^2)``, Loewdin-orthonormalised.

    ``sigma_n = R max(sqrt(n), 1) / N`` with ``N = n_radial[l]`` (featomic's definition).
    The overlap ``S`` of the normalised primitives is analytic on ``[0, inf)``; the
    basis of each ``l`` is ``S^(-1/2)`` applied to them.
    """

    def __init__(self, cutoff: float, n_radial: List[int]):
        import scipy.special

        self.cutoff = float(cutoff)
        self.n_radial = list(n_radial)
        self.integration_radius = 5.0 * self.cutoff
        self._sigmas = {}
        self._orthonormalisation = {}
        for size in set(self.n_radial):
            sigmas = self.cutoff * np.maximum(np.sqrt(np.arange(size)), 1.0) / size
            n = np.arange(size)
            alpha = 0.5 / sigmas[:, None] ** 2 + 0.5 / sigmas[None, :] ** 2
            power = (n[:, None] + n[None, :] + 3) / 2.0
            overlap = scipy.special.gamma(power) / (2.0 * alpha**power)
            # Loewdin orthonormalisation of the normalised primitives
            normalisation = 1.0 / np.sqrt(np.diag(overlap))
            overlap = normalisation[:, None] * overlap * normalisation[None, :]
            eigenvalues, eigenvectors = np.linalg.eigh(overlap)
            if eigenvalues.min() < 1e-12:
                raise ValueError(f"GTO basis with {size} functions is numerically singular")
            self._sigmas[size] = sigmas
            inverse_sqrt = (eigenvectors / np.sqrt(eigenvalues)) @ eigenvectors.T
            self._orthonormalisation[size] = inverse_sqrt * normalisation[None, :]

    def evaluate(self, l: int, r: np.ndarray) -> np.ndarray:
        size = self.n_radial[l]
        r = np.asarray(r)[..., None]
        primitive = r ** np.arange(size) * np.exp(-0.5 * r**2 / self._sigmas[size] ** 2)
        return primitive @ self._orthonormalisation[size].T

    def max_wavenumber(self) -> float:
        return float(max(self.n_radial)) / self.cutoff


@dataclass
class DensityHypers:
    """Hyperparameters of the density expansion (all lengths in Angstrom).

    The defaults are the choices of the Wigner-kernel paper (WK: a Laplacian-eigenstate
    basis, the width growing with distance as in eq. E1, E2; docs/equations.md, "Neighbour
    density"), those of ``acdc-potential fit``.

    :param cutoff: radius of the atomic environments.
    :param smoothing: width of the shifted-cosine switch before ``cutoff``.
    :param max_angular: largest ``l`` (ignored when ``max_radial`` is a list).
    :param max_radial: largest ``n`` (so ``max_radial + 1`` functions), the same for
        every ``l``; or a list with the number of radial functions of each ``l``; or,
        with ``basis="le"`` and ``laplacian_truncation``, the ``n_max`` of ``l = 0``.
    :param basis: ``"le"`` (Laplacian eigenstates, spherical Bessel) or ``"gto"``.
    :param laplacian_truncation: with ``basis="le"``, keep the functions whose
        Laplacian eigenvalue is at most that of ``(l = 0, n = max_radial)``, capped at
        ``max_angular``.
    :param density: ``"gaussian"`` (constant ``width``) or ``"wigner"`` (``sigma(r) = C
        exp(r / r0)`` with weight ``exp(-r / r0)``).
    :param width: Gaussian width for ``density="gaussian"``.
    :param C: ``C`` of the Wigner-kernel density.
    :param r0: ``r0`` of the Wigner-kernel density.
    :param spline_accuracy: largest error of the tabulated radial integrals, relative
        to each function's largest value.
    """

    cutoff: float = 5.0
    smoothing: float = 0.5
    max_angular: int = 3
    max_radial: Union[int, List[int]] = 8
    basis: str = "le"
    laplacian_truncation: bool = False
    density: str = "wigner"
    width: float = 0.3
    C: float = 0.3
    r0: float = 3.0
    spline_accuracy: float = 1e-8

    def n_radial(self) -> List[int]:
        """Number of radial functions for each ``l = 0..l_max``."""
        if isinstance(self.max_radial, (list, tuple)):
            return [int(n) for n in self.max_radial]
        if self.basis == "le" and self.laplacian_truncation:
            return laplacian_eigenstate_sizes(self.max_radial, self.max_angular)
        return [self.max_radial + 1] * (self.max_angular + 1)

    def validate(self):
        if self.cutoff <= 0 or not 0 <= self.smoothing < self.cutoff:
            raise ValueError(f"need cutoff > smoothing >= 0, got {self.cutoff}, {self.smoothing}")
        if self.basis not in ("le", "gto"):
            raise ValueError(f"unknown radial basis '{self.basis}', expected 'le' or 'gto'")
        if self.density not in ("gaussian", "wigner"):
            raise ValueError(f"unknown density '{self.density}', expected 'gaussian' or 'wigner'")
        if any(n < 1 for n in self.n_radial()):
            raise ValueError("every angular channel needs at least one radial function")

    def radial_basis(self):
        if self.basis == "le":
            return LaplacianEigenstateBasis(self.cutoff, self.n_radial())
        return GtoBasis(self.cutoff, self.n_radial())

    def sigma_and_weight(self, d: np.ndarray):
        """Gaussian width ``sigma(d)`` and neighbour weight ``f(d)`` at distances ``d``."""
        d = np.asarray(d, dtype=np.float64)
        if self.density == "gaussian":
            return np.full_like(d, self.width), np.ones_like(d)
        return self.C * np.exp(d / self.r0), np.exp(-d / self.r0)


def _quadrature(radius: float, panel: float, order: int = 10):
    """Composite Gauss-Legendre nodes and weights on ``[0, radius]``."""
    n_panels = max(int(math.ceil(radius / panel)), 1)
    x, w = np.polynomial.legendre.leggauss(order)
    edges = np.linspace(0.0, radius, n_panels + 1)
    half = 0.5 * (edges[1:] - edges[:-1])
    nodes = (edges[:-1, None] + half[:, None] * (x[None, :] + 1.0)).ravel()
    weights = (half[:, None] * w[None, :]).ravel()
    return nodes, weights


def radial_integrals(hypers: DensityHypers, distances: np.ndarray) -> List[np.ndarray]:
    """``I_nl(d)`` of the module docstring by quadrature; one ``[len(d), n_radial[l]]`` per ``l``."""
    import scipy.special

    basis = hypers.radial_basis()
    sigma, weight = hypers.sigma_and_weight(distances)
    # the Gaussian factor kills the integrand beyond d + 12 sigma
    radius = min(basis.integration_radius, float(np.max(distances + 12.0 * sigma)))
    panel = min(float(np.min(sigma)), 2.0 * np.pi / max(basis.max_wavenumber(), 1e-12)) / 2.0
    r, w = _quadrature(radius, panel)

    d = distances[:, None]
    s2 = (sigma**2)[:, None]
    z = np.maximum(r[None, :] * d / s2, 1e-200)
    gaussian = np.exp(-((r[None, :] - d) ** 2) / (2.0 * s2))
    prefactor = 4.0 * np.pi * (2.0 * np.pi * sigma**2) ** -1.5 * weight
    result = []
    for l, n in enumerate(hypers.n_radial()):
        # i_l(z) exp(-z) = sqrt(pi / 2z) ive(l + 1/2, z), stable for large z
        bessel = np.sqrt(np.pi / (2.0 * z)) * scipy.special.ive(l + 0.5, z)
        kernel = gaussian * bessel * (w * r**2)[None, :]
        result.append(prefactor[:, None] * (kernel @ basis.evaluate(l, r)))
    return result


# the finest grid tried: 65537 points per function
MAX_INTERVALS = 2**16


# tables kept by tabulate_radial_integrals, the least recently used first
KEPT_TABLES = 4
_TABLES: "OrderedDict[str, Tuple[np.ndarray, float, int, float]]" = OrderedDict()


def tabulate_radial_integrals(hypers: DensityHypers, max_intervals: int = MAX_INTERVALS) -> Tuple[np.ndarray, float, int, float]:
    """Cubic-spline coefficients of every ``I_nl`` on a uniform grid of ``[0, cutoff]``.

    The grid is doubled from 64 intervals until the spline error at the interval mid-points
    is below ``hypers.spline_accuracy`` relative to each function's largest value, up to
    ``max_intervals``; if that is not enough, a :class:`SplineAccuracyWarning` gives
    the accuracy reached (at every call).

    The :data:`KEPT_TABLES` tables of the process used last are kept: a fit's grid of trial fits and
    the final fit tabulate the same integrals (seconds each). A table holds ``n_intervals x 4 x
    n_functions`` float64 (a few MB at the default accuracy).

    :return: ``table [n_intervals, 4, n_functions]`` (coefficients of ``1, t, t^2, t^3`` in
        the local coordinate ``t = (r - r_i) / step``), ``step``, ``n_intervals`` and the
        largest relative error at the mid-points.
    """
    hypers.validate()
    key = repr((dataclasses.astuple(hypers), max_intervals))
    if key in _TABLES:
        _TABLES.move_to_end(key)
    else:
        _TABLES[key] = _tabulate(hypers, max_intervals)
        while len(_TABLES) > KEPT_TABLES:
            _TABLES.popitem(last=False)
    table, step, n_intervals, error = _TABLES[key]
    if error >= hypers.spline_accuracy:
        warnings.warn(
            f"the radial integrals are tabulated to a relative error of {error:.2g}, not the requested "
            f"spline_accuracy {hypers.spline_accuracy:.2g}, with the finest grid ({n_intervals} intervals over "
            f"{hypers.cutoff} A); narrow Gaussians and many radial functions need finer grids",
            SplineAccuracyWarning,
            stacklevel=3,
        )
    return table.copy(), step, n_intervals, error


def _tabulate(hypers: DensityHypers, max_intervals: int) -> Tuple[np.ndarray, float, int, float]:
    """The work of :func:`tabulate_radial_integrals`."""
    import scipy.interpolate

    n_intervals = 64
    while True:
        grid = np.linspace(0.0, hypers.cutoff, n_intervals + 1)
        values = np.concatenate(radial_integrals(hypers, grid), axis=1)
        spline = scipy.interpolate.CubicSpline(grid, values, axis=0)
        mid = 0.5 * (grid[1:] + grid[:-1])
        exact = np.concatenate(radial_integrals(hypers, mid), axis=1)
        scale = np.maximum(np.abs(values).max(axis=0), 1e-300)
        error = float(np.max(np.abs(spline(mid) - exact) / scale))
        if error < hypers.spline_accuracy or n_intervals >= max_intervals:
            break
        n_intervals *= 2
    step = float(grid[1] - grid[0])
    # spline.c[k, i, f] multiplies (r - grid[i])^(3 - k); store it in powers of t as [i, k, f]
    c = spline.c
    table = np.stack([c[3], c[2] * step, c[1] * step**2, c[0] * step**3], axis=1)
    return table, step, n_intervals, error


class RadialSpline(torch.nn.Module):
    """Cubic-spline table of all ``I_nl`` on a uniform grid of ``[0, cutoff]``.

    ``forward(r)`` takes distances ``[n_pairs]`` and returns ``[n_pairs, sum_l
    n_radial[l]]``, functions ordered by ``l`` then ``n``. It is differentiable with
    respect to ``r``, TorchScript-compatible and device-agnostic (the table is a buffer).
    The table comes from :func:`tabulate_radial_integrals`.
    """

    def __init__(self, hypers: DensityHypers):
        super().__init__()
        table, self.step, self.n_intervals, self.spline_error = tabulate_radial_integrals(hypers)
        self.register_buffer("table", torch.tensor(table, dtype=torch.float64))

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        t = r / self.step
        interval = torch.clamp(torch.floor(t.detach()), 0, self.n_intervals - 1).to(torch.long)
        t = (t - interval.to(t.dtype)).unsqueeze(1)
        c = self.table.to(r.dtype)[interval]
        return c[:, 0] + t * (c[:, 1] + t * (c[:, 2] + t * c[:, 3]))
