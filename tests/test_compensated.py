"""Compensated polynomial sums (``model/compensated.py``) against exact rational arithmetic."""

from fractions import Fraction

import pytest
import torch

from acdc_potential.model.compensated import compensated_polynomial_sum, grid_bits, grid_split, split_halves


def exact_sum(x, y, w, zeta):
    """``sum_m w_m (x . y_m)^zeta`` of float64 inputs in rationals: no rounding at all."""
    xs = [Fraction(float(v)) for v in x]
    total = Fraction(0)
    for row, weight in zip(y, w):
        dot = sum((a * Fraction(float(b)) for a, b in zip(xs, row)), Fraction(0))
        total += Fraction(float(weight)) * dot**zeta
    return total


@pytest.mark.parametrize("zeta", [1, 3, 4, 5])
def test_a_sum_of_large_cancelling_terms_is_rounded_once(zeta):
    """Weights of 1e8 that cancel (to zero at the first atom): the plain float64 sum is off by
    about 2^-53 of the terms' magnitude, the compensated one by the rounding of the result and
    of the dot products' small parts; the split helpers are exact."""
    generator = torch.Generator().manual_seed(zeta)
    n_features, n_sparse = 40, 60
    y = torch.randn(n_sparse, n_features, generator=generator, dtype=torch.float64)
    y = y / y.norm(dim=1, keepdim=True)
    x = torch.randn(3, n_features, generator=generator, dtype=torch.float64)
    x = x / x.norm(dim=1, keepdim=True)
    w = 1e8 * torch.randn(n_sparse, generator=generator, dtype=torch.float64)
    # make the sum at the first atom nearly cancel: the last weight absorbs the rest
    k = (x[0] @ y.T) ** zeta
    w[-1] = -(w[:-1] @ k[:-1]) / k[-1]

    bits = grid_bits(n_features)
    grid, rest = grid_split(y, bits)
    assert torch.equal(grid + rest, y) and torch.equal(torch.round(grid * 2.0**bits), grid * 2.0**bits)
    high, low = split_halves(w)
    assert torch.equal(high + low, w)

    compensated = compensated_polynomial_sum(x, y, grid, rest, w, (high, low), zeta, bits)
    plain = (x @ y.T) ** zeta @ w
    # the dot products are exact to F 2^-(53 + b) (the rounding of their small part), the rest to 2^-100
    dot_error = zeta * n_features * 2.0 ** -(53 + bits) * float(w.abs().sum())
    errors = []
    for i in range(x.shape[0]):
        exact = exact_sum(x[i], y, w, zeta)
        errors.append((abs(float(Fraction(float(compensated[i])) - exact)), abs(float(Fraction(float(plain[i])) - exact))))
        assert errors[-1][0] <= 2**-52 * abs(float(exact)) + dot_error, (i, float(exact))
    # the test can see the difference: where the terms cancel, the plain sum is off by about 2^-53 of them
    assert errors[0][1] > 1e3 * max(errors[0][0], 1e-300), errors[0]


def test_the_compensated_sum_carries_the_gradient_of_the_plain_one():
    generator = torch.Generator().manual_seed(0)
    y = torch.randn(20, 10, generator=generator, dtype=torch.float64)
    y = y / y.norm(dim=1, keepdim=True)
    x = torch.randn(2, 10, generator=generator, dtype=torch.float64)
    x = (x / x.norm(dim=1, keepdim=True)).requires_grad_(True)
    w = torch.randn(20, generator=generator, dtype=torch.float64)
    bits = grid_bits(10)
    grid, rest = grid_split(y, bits)
    value = compensated_polynomial_sum(x, y, grid, rest, w, split_halves(w), 4, bits)
    (gradient,) = torch.autograd.grad(value.sum(), x)
    expected = 4 * ((x.detach() @ y.T) ** 3 * w) @ y
    torch.testing.assert_close(gradient, expected, rtol=1e-12, atol=1e-12)
