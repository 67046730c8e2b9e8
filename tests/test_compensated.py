"""Compensated polynomial sums (``model/compensated.py``) against exact rational arithmetic."""

from fractions import Fraction

import pytest
import torch

from acdc_potential.model.compensated import (
    compensated_polynomial_sum,
    grid_split,
    split_dot,
    split_halves,
    split_row_sums,
    two_product,
)


def exact(value) -> Fraction:
    return Fraction(float(value))


def unit_rows(n: int, n_features: int, generator: torch.Generator) -> torch.Tensor:
    rows = torch.randn(n, n_features, generator=generator, dtype=torch.float64)
    return rows / rows.norm(dim=1, keepdim=True)


def exact_dot(x, y) -> Fraction:
    return sum((exact(a) * exact(b) for a, b in zip(x, y)), Fraction(0))


def test_the_splits_and_the_product_are_exact_to_their_bounds():
    generator = torch.Generator().manual_seed(0)
    a = torch.cat([1e7 * torch.randn(50, generator=generator, dtype=torch.float64), torch.tensor([0.0, 1.0, -1e-300], dtype=torch.float64)])
    high, low = split_halves(a)
    assert torch.equal(high + low, a)
    b = torch.cat([torch.rand(50, generator=generator, dtype=torch.float64) * 2 - 1, torch.tensor([1.0, -1.0, 1e-12], dtype=torch.float64)])
    grid, rest = grid_split(b, 26)
    assert torch.equal(grid + rest, b) and torch.equal(torch.round(grid * 2.0**26), grid * 2.0**26)
    p, e = two_product((high, low), b)
    for i in range(a.shape[0]):
        error = abs(exact(p[i]) + exact(e[i]) - exact(a[i]) * exact(b[i]))
        assert error <= 2**-80 * max(abs(float(a[i])), 1.0), i


def test_dot_products_and_row_sums_are_exact_where_they_claim():
    generator = torch.Generator().manual_seed(1)
    n_features = 300
    x, y = unit_rows(3, n_features, generator), unit_rows(5, n_features, generator)
    grid, rest = grid_split(y, 25)
    high, low = split_dot(x, grid, rest, y)
    x_grid, _ = grid_split(x, 25)
    for i in range(3):
        for m in range(5):
            # the grid parts' matrix product is exact; the whole dot product to F 2^-78
            assert exact((x_grid[i] @ grid[m])) == exact_dot(x_grid[i], grid[m])
            assert abs(exact(high[i, m]) + exact(low[i, m]) - exact_dot(x[i], y[m])) <= n_features * Fraction(2) ** -78
    terms = 1e8 * torch.randn(2, 1000, generator=generator, dtype=torch.float64)
    total_high, total_low = split_row_sums(terms)
    for i in range(2):
        true = sum((exact(t) for t in terms[i]), Fraction(0))
        assert abs(exact(total_high[i]) + exact(total_low[i]) - true) <= 2**-90 * float(terms[i].abs().sum())


@pytest.mark.parametrize("zeta", [1, 3, 4, 5, 6])
def test_a_sum_of_large_cancelling_terms_is_rounded_once(zeta):
    """Weights of 1e8 that cancel (to zero at the first atom): the plain float64 sum is off by about
    2^-53 of the terms' magnitude, the compensated one within its stated bound (module docstring)."""
    generator = torch.Generator().manual_seed(zeta)
    n_features, n_sparse = 40, 60
    y, x = unit_rows(n_sparse, n_features, generator), unit_rows(3, n_features, generator)
    w = 1e8 * torch.randn(n_sparse, generator=generator, dtype=torch.float64)
    k = (x[0] @ y.T) ** zeta
    largest = int(k.abs().argmax())  # its weight absorbs the rest and stays of the same size
    w[largest] = 0.0
    w[largest] = -(w @ k) / k[largest]
    grid, rest = grid_split(y, 25)
    compensated = compensated_polynomial_sum(x, y, grid, rest, split_halves(w), zeta)
    plain = (x @ y.T) ** zeta @ w
    errors = []
    for i in range(x.shape[0]):
        true = sum((exact(weight) * exact_dot(x[i], row) ** zeta for weight, row in zip(w, y)), Fraction(0))
        slope = float(((x[i] @ y.T).abs() ** (zeta - 1) @ w.abs()))
        bound = 2**-52 * abs(float(true)) + zeta * n_features * 2**-78 * slope + 2**-80 * float(w.abs().sum())
        errors.append((abs(float(exact(compensated[i]) - true)), abs(float(exact(plain[i]) - true))))
        assert errors[-1][0] <= bound, (i, float(true), errors[-1], bound)
    # the test can see the difference: where the terms cancel, the plain sum is off by about 2^-53 of them
    assert errors[0][1] > 1e3 * max(errors[0][0], 1e-300), errors[0]


def test_the_compensated_sum_carries_the_gradient_of_the_plain_one():
    generator = torch.Generator().manual_seed(0)
    y = unit_rows(20, 10, generator)
    x = unit_rows(2, 10, generator).requires_grad_(True)
    w = torch.randn(20, generator=generator, dtype=torch.float64)
    grid, rest = grid_split(y, 25)
    value = compensated_polynomial_sum(x, y, grid, rest, split_halves(w), 4)
    (gradient,) = torch.autograd.grad(value.sum(), x)
    expected = 4 * ((x.detach() @ y.T) ** 3 * w) @ y
    torch.testing.assert_close(gradient, expected, rtol=1e-12, atol=1e-12)


def test_empty_and_tiny_inputs():
    y = unit_rows(4, 6, torch.Generator().manual_seed(2))
    w = torch.ones(4, dtype=torch.float64)
    grid, rest = grid_split(y, 25)
    none = compensated_polynomial_sum(y.new_zeros((0, 6)), y, grid, rest, split_halves(w), 4)
    assert none.shape == (0,)
    tiny = 1e-80 * torch.ones(1, 6, dtype=torch.float64) / 6**0.5
    value = compensated_polynomial_sum(tiny, y, grid, rest, split_halves(w), 4)
    assert torch.isfinite(value).all()
