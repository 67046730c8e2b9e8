"""Weighted sums of polynomial kernels over sparse environments, rounded (nearly) once (TorchScript).

``e_i = sum_m w_m (x_i . x_m)^zeta`` with fitted weights that are large and cancel (docs/equations.md,
"Numerical precision"): evaluated in float64 its terms are each rounded anew at every configuration,
so the energy is not a smooth function of the positions below ``epsilon sum_m |w_m (x_i . x_m)^zeta|``.
For ``zeta <= 2`` the sum folds into per-species tensors (``PolynomialHead.collapse``); for larger ``zeta``
it is evaluated here in double-double arithmetic (error-free transformations, Ogita, Rump & Oishi,
SIAM J. Sci. Comput. 26, 1955 (2005)), so that its error is far below the rounding of the result:

- the dot products of unit rows to about ``F 2^-78``: split on the grid ``2^-25``, the grid parts multiply
  and sum without rounding in any matrix product (Ozaki et al., Numer. Algorithms 59, 95 (2012)), and only
  the small rest is rounded (:func:`split_dot`);
- products as a double and its rounding error (:func:`two_product`), sums likewise (:func:`two_sum`), to
  about ``2^-80`` of the larger factor's magnitude;
- the sum over sparse environments exactly on a grid fitted to its largest term, the small rest plainly
  (:func:`split_row_sums`).

The bound on the error of the sum is then about ``zeta F 2^-78 sum_m |w_m d_m^(zeta - 1)| + 2^-80 sum_m
|w_m|``, with ``d_m = x_i . x_m``: for a copper model's weights (up to 1e7, 1000 sparse environments) about
1e-15 eV, where the plain sum's is 1e-8. Every split is a rounding to a grid and every product that
meets an addition is exact, so a compiler that contracts multiply-adds into fused ones (CUDA kernels
fused by TorchScript) changes no result.
"""

from typing import Tuple

import torch


def split_halves(a: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``a = high + low`` exactly, ``high`` the leading 26 bits of each element and ``low`` the rest (at
    most 27 bits), for numbers of any size (at construction: the weights)."""
    mantissa, exponent = torch.frexp(a)
    high = torch.ldexp(torch.round(mantissa * 2.0**26), exponent - 26)
    return high, a - high


def grid_split(x: torch.Tensor, bits: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``x = high + rest`` exactly, ``high`` rounded to the grid ``2^-bits`` (no gradient) and
    ``rest = x - high`` (carries ``x``'s gradient); for ``|x| <= 1``, ``|rest| <= 2^-(bits + 1)``."""
    scale = float(2**bits)
    high = (torch.round(x.detach() * scale) / scale).detach()
    return high, x - high


def two_sum(a: torch.Tensor, b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``a + b = s + e`` exactly, ``s = fl(a + b)`` (Knuth)."""
    s = a + b
    virtual = s - a
    return s, (a - (s - virtual)) + (b - virtual)


def two_product(a_halves: Tuple[torch.Tensor, torch.Tensor], b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``a b = high + low`` to about ``2^-80 max(|a|, 1)``, for ``|b| <= 1``: the four products of the
    halves (``a``'s given, by :func:`split_halves`, or by :func:`grid_split` at 26 bits where ``|a| <= 1``;
    ``b`` split on the grid ``2^-26``), of which only those below that bound are rounded, summed by
    :func:`two_sum`. ``a b`` itself is never formed, so no fused multiply-add can cancel the error term."""
    a_high, a_low = a_halves
    b_high, b_low = grid_split(b, 26)
    high, low = two_sum(a_high * b_high, a_high * b_low)
    high, more = two_sum(high, a_low * b_high)
    return high, low + more + a_low * b_low


def split_dot(x: torch.Tensor, grid: torch.Tensor, rest: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``x y^T = high + low`` ``[n, M]`` to about ``F 2^-78``, for rows ``x [n, F]`` and ``y [M, F]`` of
    norm at most 1 (unit features).

    :param grid: ``[M, F]`` ``y`` on the grid ``2^-25`` (:func:`grid_split`); :param rest: ``y - grid``.
    On that grid the products of ``x``'s and ``y``'s grid parts are integers times ``2^-50`` whose
    partial sums stay below ``|x| |y| 2^50 < 2^53``: their matrix product is exact, in any order; only
    ``x_grid rest^T + x_rest y^T`` (of order ``2^-25``) is rounded. ``high`` carries the gradient of
    ``x y^T`` in ``x``.
    """
    x_grid, x_rest = grid_split(x, 25)
    exact = x_grid @ grid.T
    small = x_grid @ rest.T + x_rest @ y.T
    high, low = two_sum(exact, small)
    return high, low.detach()


def double_product(a: Tuple[torch.Tensor, torch.Tensor], b: Tuple[torch.Tensor, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(a_high + a_low) (b_high + b_low)`` as a double-double, for ``|a_high|, |b_high| <= 1``."""
    high, low = two_product(grid_split(a[0], 26), b[0])
    return high, low + a[0] * b[1] + a[1] * b[0]


def compensated_power(high: torch.Tensor, low: torch.Tensor, zeta: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(high + low)^zeta`` as a double-double, for ``|high| <= 1``, ``|low| <= 2^-53``, by
    repeated squaring (two products for ``zeta = 3`` or ``4``)."""
    power = (high, low)
    top = 0
    while (2 << top) <= zeta:
        top += 1
    for bit in range(top - 1, -1, -1):
        power = double_product(power, power)
        if (zeta >> bit) & 1 == 1:
            power = double_product(power, (high, low))
    return power


def split_row_sums(terms: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``sum_m terms[i, m] = high_i + low_i`` ``[n]`` for ``terms [n, M]``: each row split on the grid
    ``2^(e_i - g)``, ``2^e_i`` above its largest term and ``g = 53 - bits(M)``, on which the parts sum
    exactly (``high``); the rests, below ``2^-g`` of the largest term, are summed plainly (``low``)."""
    bits = 0
    while (1 << bits) <= terms.shape[1]:
        bits += 1
    _, exponent = torch.frexp(terms.abs().amax(dim=1, keepdim=True))
    grid = torch.ldexp(torch.ones_like(terms[:, :1]), exponent.clamp_min(-900) - (53 - bits))
    on_grid = torch.round(terms / grid) * grid
    return on_grid.sum(dim=1), (terms - on_grid).sum(dim=1)


def compensated_polynomial_sum(
    x: torch.Tensor,
    sparse: torch.Tensor,
    sparse_grid: torch.Tensor,
    sparse_rest: torch.Tensor,
    weight_halves: Tuple[torch.Tensor, torch.Tensor],
    zeta: int,
) -> torch.Tensor:
    """``[n]`` ``sum_m w_m (x_i . y_m)^zeta`` in double-double arithmetic, rounded at the end, with the
    gradient of its plain evaluation.

    :param x: ``[n, F]`` unit features; :param sparse: ``[M, F]`` unit features ``y``, with
        ``sparse_grid`` and ``sparse_rest`` their :func:`grid_split` at 25 bits (:func:`split_dot`);
    :param weight_halves: ``[M]`` twice, the :func:`split_halves` of the weights ``w``.

    The value is the plain sum plus the difference to the compensated one: that difference is
    rounding, zero in exact arithmetic, so it carries no gradient.
    """
    weights = weight_halves[0] + weight_halves[1]
    high, low = split_dot(x, sparse_grid, sparse_rest, sparse)
    plain = high**zeta @ weights
    with torch.no_grad():
        power_high, power_low = compensated_power(high.detach(), low, zeta)
        term, error = two_product(weight_halves, power_high)
        total_high, total_low = split_row_sums(term)
        correction = (total_high - plain.detach()) + (total_low + (error + weights * power_low).sum(dim=1))
    return plain + correction
