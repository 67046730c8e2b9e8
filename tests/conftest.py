"""Shared test helpers: random rotations and real Wigner D matrices fitted from the harmonics."""

import sys
from pathlib import Path

import numpy as np
import pytest
import sphericart.torch
import torch

sys.path.insert(0, str(Path(__file__).parent))


def random_rotation(seed: int) -> np.ndarray:
    """A uniformly random proper rotation matrix ``[3, 3]`` (QR of a Gaussian matrix)."""
    rng = np.random.default_rng(seed)
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def wigner_d_real(l: int, rotation: np.ndarray) -> torch.Tensor:
    """Real Wigner matrix ``D [2l+1, 2l+1]`` with ``Y_l(R x) = D Y_l(x)`` (``Y_l`` a column).

    Fitted by least squares from sphericart's harmonics on random points, so it uses the
    same convention as the code under test without depending on it.
    """
    rng = np.random.default_rng(12345)
    x = torch.tensor(rng.normal(size=(4 * (2 * l + 1) + 20, 3)), dtype=torch.float64)
    rotated = x @ torch.tensor(rotation, dtype=torch.float64).T
    harmonics = sphericart.torch.SphericalHarmonics(l)
    y = harmonics(x)[:, l * l : (l + 1) ** 2]
    y_rotated = harmonics(rotated)[:, l * l : (l + 1) ** 2]
    # y_rotated[p] = D y[p]  <=>  y_rotated = y D^T
    d_transposed = torch.linalg.lstsq(y, y_rotated).solution
    return d_transposed.T.contiguous()


@pytest.fixture(autouse=True)
def _double_precision():
    torch.manual_seed(0)
    yield
