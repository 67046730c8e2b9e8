"""Real-basis Clebsch-Gordan coefficients: orthogonality, equivariance, parity."""

import numpy as np
import pytest
import sphericart.torch
import torch
from conftest import random_rotation, wigner_d_real

from acdc_potential.descriptors.cg import ClebschGordanCache, allowed_couplings, couple, coupling_parity, real_clebsch_gordan

COUPLINGS = allowed_couplings(3, 3, 4)


@pytest.mark.parametrize("l1, l2, L", COUPLINGS)
def test_orthogonality(l1, l2, L):
    cg = real_clebsch_gordan(l1, l2, L).reshape(-1, 2 * L + 1)
    np.testing.assert_allclose(cg.T @ cg, np.eye(2 * L + 1), atol=1e-13)


def test_completeness():
    """sum over L of the projectors is the identity on the product space."""
    l1, l2 = 2, 3
    total = sum(
        real_clebsch_gordan(l1, l2, L).reshape(-1, 2 * L + 1) @ real_clebsch_gordan(l1, l2, L).reshape(-1, 2 * L + 1).T
        for L in range(abs(l1 - l2), l1 + l2 + 1)
    )
    np.testing.assert_allclose(total, np.eye((2 * l1 + 1) * (2 * l2 + 1)), atol=1e-13)


def harmonics(l, x):
    return sphericart.torch.SphericalHarmonics(l)(x)[:, l * l : (l + 1) ** 2]


@pytest.mark.parametrize("l1, l2, L", COUPLINGS)
def test_coupled_equivariants_are_equivariant(l1, l2, L):
    """Couple Y_l1(x) with Y_l2(y) for two different vectors; the result is a
    lambda = L equivariant with parity (-1)^(l1 + l2), i.e. sigma = (-1)^(l1+l2+L)."""
    rng = np.random.default_rng(l1 * 100 + l2 * 10 + L)
    x = torch.tensor(rng.normal(size=(5, 3)))
    y = torch.tensor(rng.normal(size=(5, 3)))
    cg = ClebschGordanCache()[(l1, l2, L)]

    def coupled(x, y):
        return couple(harmonics(l1, x).unsqueeze(2), harmonics(l2, y).unsqueeze(2), cg)[:, :, 0]

    rotation = random_rotation(L + 3)
    r = torch.tensor(rotation)
    expected = coupled(x, y) @ wigner_d_real(L, rotation).T
    torch.testing.assert_close(coupled(x @ r.T, y @ r.T), expected, atol=1e-12, rtol=1e-10)
    sigma = coupling_parity(l1, 1, l2, 1, L)
    torch.testing.assert_close(coupled(-x, -y), sigma * (-1) ** L * coupled(x, y), atol=1e-13, rtol=1e-12)
    assert float(coupled(x, y).abs().max()) > 1e-3


def test_odd_coupling_is_pseudovector():
    """l1 = l2 = 1 to L = 1 is the cross product: sigma = -1."""
    assert coupling_parity(1, 1, 1, 1, 1) == -1
    x, y = torch.randn(1, 3, dtype=torch.float64), torch.randn(1, 3, dtype=torch.float64)
    cg = ClebschGordanCache()[(1, 1, 1)]
    coupled = couple(harmonics(1, x).unsqueeze(2), harmonics(1, y).unsqueeze(2), cg)[0, :, 0]
    # sphericart's l = 1 harmonics are sqrt(3 / 4 pi) (y, z, x) / r
    cross = torch.linalg.cross(x / x.norm(), y / y.norm())[0][[1, 2, 0]] * 3 / (4 * np.pi)
    ratio = coupled / cross
    torch.testing.assert_close(ratio, ratio[0].expand(3), atol=1e-12, rtol=1e-10)


def test_invalid_coupling_raises():
    with pytest.raises(ValueError, match="no coupling"):
        real_clebsch_gordan(1, 1, 3)
