"""Weighted sums of polynomial kernels over sparse environments, rounded once (TorchScript).

``e_i = sum_m w_m (x_i . x_m)^zeta`` with fitted weights that are large and cancel (docs/equations.md,
"Numerical precision"): evaluated in float64 its terms are each rounded anew at every configuration,
so the energy is not a smooth function of the positions below ``epsilon sum_m |w_m (x_i . x_m)^zeta|``.
For ``zeta <= 2`` the sum folds into per-species tensors (``PolynomialHead.collapse``); for larger ``zeta``
it is evaluated here with error-free transformations, so that every term and the sum are exact to
about ``epsilon^2`` of the terms (double-double arithmetic, Ogita, Rump & Oishi, SIAM J. Sci. Comput.
26, 1955 (2005)):

- the dot products exactly, by splitting the unit features on a fixed grid ``2^-b`` so that the
  grid parts multiply and sum without rounding in any matrix product (Ozaki et al., Numer.
  Algorithms 59, 95 (2012)): :func:`grid_split`, :func:`exact_dot`;
- products of two doubles as a double and its rounding error (:func:`two_product`), sums likewise
  (:func:`two_sum`);
- the sum over sparse environments exactly on a grid fitted to its largest term (:func:`exact_row_sums`).

Every splitting is a rounding to a grid, never Veltkamp's ``c a - (c a - a)``, which a compiler that
contracts into fused multiply-adds would break.
"""

from typing import Tuple

import torch


def grid_bits(n_features: int) -> int:
    """Bits ``b`` of the grid ``2^-b`` on which ``n_features``-long dot products of numbers in
    ``[-1, 1]`` are exact in float64: ``F 2^(2b) <= 2^53``."""
    return (53 - max(n_features - 1, 1).bit_length()) // 2


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


def two_product(a: torch.Tensor, a_halves: Tuple[torch.Tensor, torch.Tensor], b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``a b = p + e``, ``p = fl(a b)`` and ``e`` its rounding error to about ``2^-80 max(|a|, 1)``,
    for ``|b| <= 1`` (Dekker's product; ``a``'s halves given, by :func:`split_halves`, or by
    :func:`grid_split` at 26 bits where ``|a| <= 1``; ``b`` split on the grid ``2^-26``: of the
    cross products only those below that bound are rounded)."""
    a_high, a_low = a_halves
    b_high, b_low = grid_split(b, 26)
    p = a * b
    return p, (((a_high * b_high - p) + a_high * b_low) + a_low * b_high) + a_low * b_low


def exact_dot(x: torch.Tensor, grid: torch.Tensor, rest: torch.Tensor, y: torch.Tensor, bits: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``x y^T = high + low`` ``[n, M]`` to about ``F 2^-(53 + bits)``, for rows of norm at most 1.

    :param x: ``[n, F]``. :param grid: ``[M, F]`` ``y`` on the grid ``2^-bits``; :param rest: ``[M, F]``
        ``y - grid``; :param y: ``[M, F]``. ``high`` carries the gradient of ``x y^T`` in ``x``.
    """
    x_grid, x_rest = grid_split(x, bits)
    exact = x_grid @ grid.T  # integers times 2^-2b below 2^53 in magnitude: no rounding
    small = x_grid @ rest.T + x_rest @ y.T
    high, low = two_sum(exact, small)
    return high, low.detach()


def double_product(a: Tuple[torch.Tensor, torch.Tensor], b: Tuple[torch.Tensor, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(a_high + a_low) (b_high + b_low)`` as a double-double, for ``|a_high|, |b_high| <= 1``."""
    p, e = two_product(a[0], grid_split(a[0], 26), b[0])
    return p, e + a[0] * b[1] + a[1] * b[0]


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


def exact_row_sums(terms: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``sum_m terms[i, m] = high_i + low_i`` ``[n]``, ``high`` exact and ``low`` to ``2^-84 M
    max_m |terms[i, m]|``, for ``M < 2^23`` terms: each row is split on the grid ``G_i = 2^-30``
    of its largest term's power of two, on which the parts sum without rounding."""
    _, exponent = torch.frexp(terms.abs().amax(dim=1, keepdim=True))
    grid = torch.ldexp(torch.ones_like(terms[:, :1]), exponent - 30)
    on_grid = torch.round(terms / grid) * grid
    return on_grid.sum(dim=1), (terms - on_grid).sum(dim=1)


def compensated_polynomial_sum(
    x: torch.Tensor,
    sparse: torch.Tensor,
    sparse_grid: torch.Tensor,
    sparse_rest: torch.Tensor,
    weights: torch.Tensor,
    weight_halves: Tuple[torch.Tensor, torch.Tensor],
    zeta: int,
    bits: int,
) -> torch.Tensor:
    """``[n]`` ``sum_m w_m (x_i . y_m)^zeta`` rounded once, with the gradient of its plain evaluation.

    :param x: ``[n, F]`` unit features; :param sparse: ``[M, F]`` unit features ``y``, with
        ``sparse_grid`` and ``sparse_rest`` their :func:`grid_split` at ``bits`` (:func:`grid_bits`);
    :param weights: ``[M]`` ``w``, with ``weight_halves`` their :func:`split_halves`.

    The value is the plain sum plus the difference to the compensated one: that difference is
    rounding, zero in exact arithmetic, so it carries no gradient.
    """
    high, low = exact_dot(x, sparse_grid, sparse_rest, sparse, bits)
    plain = high**zeta @ weights
    with torch.no_grad():
        power_high, power_low = compensated_power(high.detach(), low, zeta)
        term, error = two_product(weights, weight_halves, power_high)
        total_high, total_low = exact_row_sums(term)
        correction = (total_high - plain.detach()) + (total_low + (error + weights * power_low).sum(dim=1))
    return plain + correction
