"""Clebsch-Gordan coefficients in the real spherical-harmonic basis of sphericart.

``wigners`` gives the coefficients of the complex (Condon-Shortley) basis,
``C[m1, m2, M] = <l1 m1; l2 m2 | L M>``. The real harmonics of sphericart (the
Wikipedia convention) are ``Y^real_l = U_l Y^complex_l`` with the unitary ``U_l`` of
:func:`complex_to_real`, so in the real basis

    C^real[a, b, c] = sum_{i j k} U_l1[a, i] U_l2[b, j] conj(U_L[c, k]) C[i, j, k].

For even ``l1 + l2 + L`` this is real; for odd ``l1 + l2 + L`` it is purely imaginary
(MP-ACDC eq. 5 and the discussion after it) and we keep its imaginary part, so
that coupling two real equivariants always gives a real equivariant. The odd
couplings are the pseudo-tensor (sigma = -1) channels.

Index convention everywhere in the package: ``m`` runs from ``-l`` to ``l`` and is
stored at position ``m + l``, as sphericart orders its output.
"""

from functools import lru_cache
from typing import Dict, List, Tuple

import numpy as np
import torch
import wigners


def complex_to_real(l: int) -> np.ndarray:
    """Unitary ``U`` of shape ``[2l+1, 2l+1]`` with ``Y^real_m = sum_k U[m, k] Y^complex_k``."""
    u = np.zeros((2 * l + 1, 2 * l + 1), dtype=np.complex128)
    inv_sqrt2 = 1.0 / np.sqrt(2.0)
    for m in range(-l, l + 1):
        if m < 0:
            u[m + l, l + m] = 1j * inv_sqrt2
            u[m + l, l - m] = -1j * (-1) ** m * inv_sqrt2
        elif m == 0:
            u[l, l] = 1.0
        else:
            u[m + l, l - m] = inv_sqrt2
            u[m + l, l + m] = (-1) ** m * inv_sqrt2
    return u


@lru_cache(maxsize=None)
def real_clebsch_gordan(l1: int, l2: int, L: int) -> np.ndarray:
    """Real-basis coupling coefficients, shape ``[2 l1 + 1, 2 l2 + 1, 2 L + 1]``.

    Orthogonality: ``sum_{m1 m2} C[m1, m2, M] C[m1, m2, M'] = delta(M, M')``.
    Cached per ``(l1, l2, L)``; do not modify the returned array.
    """
    if not abs(l1 - l2) <= L <= l1 + l2:
        raise ValueError(f"no coupling of l1={l1} and l2={l2} to L={L}")
    complex_cg = wigners.clebsch_gordan_array(l1, l2, L)
    cg = np.einsum(
        "ai,bj,ck,ijk->abc",
        complex_to_real(l1),
        complex_to_real(l2),
        complex_to_real(L).conj(),
        complex_cg,
        optimize=True,  # three successive products, not one (2l + 1)^6 loop
    )
    cg = cg.imag if (l1 + l2 + L) % 2 == 1 else cg.real
    cg = np.ascontiguousarray(cg)
    cg.setflags(write=False)
    return cg


def coupling_parity(l1: int, s1: int, l2: int, s2: int, L: int) -> int:
    """Parity ``sigma = s1 s2 (-1)^(l1 + l2 + L)`` of a coupled block (MP-ACDC eq. 5)."""
    return s1 * s2 * (-1) ** (l1 + l2 + L)


class ClebschGordanCache:
    """Real CG coefficients as torch tensors on one dtype and device.

    ``cache[(l1, l2, L)]`` is a ``[2 l1 + 1, 2 l2 + 1, 2 L + 1]`` tensor.
    """

    def __init__(self, dtype: torch.dtype = torch.float64, device: torch.device = "cpu"):
        self.dtype = dtype
        self.device = torch.device(device)
        self._tensors: Dict[Tuple[int, int, int], torch.Tensor] = {}

    def __getitem__(self, key: Tuple[int, int, int]) -> torch.Tensor:
        if key not in self._tensors:
            self._tensors[key] = torch.tensor(
                real_clebsch_gordan(*key), dtype=self.dtype, device=self.device
            )
        return self._tensors[key]


def couple(a: torch.Tensor, b: torch.Tensor, cg: torch.Tensor) -> torch.Tensor:
    """Couple two equivariants with CG coefficients, full tensor product of channels (MP-ACDC eq. 5).

    ``a``: ``[n, 2 l1 + 1, p]``, ``b``: ``[n, 2 l2 + 1, q]``, ``cg``: ``[2 l1 + 1,
    2 l2 + 1, 2 L + 1]``. Returns ``[n, 2 L + 1, p * q]`` with channel index
    ``i * q + j`` for channel ``i`` of ``a`` and ``j`` of ``b``::

        out[s, M, (i, j)] = sum_{m1 m2} C[m1, m2, M] a[s, m1, i] b[s, m2, j]

    as two contractions (``b`` with the CG, then a batched product with ``a``), never building
    the ``[n, m1, m2, p, q]`` intermediate of a three-operand einsum.
    """
    n, p, q, size = a.shape[0], a.shape[2], b.shape[2], cg.shape[2]
    bc = torch.einsum("sbj,abM->saMj", b, cg).reshape(n, a.shape[1], size * q)
    out = torch.bmm(a.transpose(1, 2), bc)  # [n, p, M * q]
    return out.reshape(n, p, size, q).transpose(1, 2).reshape(n, size, p * q)


def coupled_lambdas(l1: int, l2: int, lambda_max: int) -> List[int]:
    """The ``lambda`` of the coupling of ``l1`` and ``l2``: ``|l1 - l2| .. min(l1 + l2, lambda_max)``."""
    return list(range(abs(l1 - l2), min(l1 + l2, lambda_max) + 1))


def allowed_couplings(
    l_max_a: int, l_max_b: int, L_max: int
) -> List[Tuple[int, int, int]]:
    """All ``(l1, l2, L)`` with ``l1 <= l_max_a``, ``l2 <= l_max_b``, ``L <= L_max``."""
    return [(l1, l2, L) for l1 in range(l_max_a + 1) for l2 in range(l_max_b + 1) for L in coupled_lambdas(l1, l2, L_max)]


def block_key(lam: int, sigma: int) -> int:
    """Integer key ``2 lambda + (sigma < 0)`` of a ``(lambda, sigma)`` block."""
    return 2 * lam + int(sigma < 0)


def key_lambda(key: int) -> int:
    return key // 2


def key_sigma(key: int) -> int:
    return 1 - 2 * (key % 2)


def parity_sign(n: int) -> int:
    """``(-1)^n`` as an integer."""
    return 1 - 2 * (n % 2)
