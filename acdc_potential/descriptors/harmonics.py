"""Real spherical harmonics in plain torch operations.

Same definition and order as sphericart (Wikipedia's real harmonics, columns
``l = 0..l_max``, ``m = -l..l``), tested against it. We do not call sphericart-torch
inside models because its derivatives are registered from Python
(``torch.library.register_autograd``): in an engine that loads the exported file
without importing ``sphericart.torch`` (LAMMPS, or a Python process that never
imports it), its backward pass is silently missing and forces come out wrong. Built
from elementary torch operations, these harmonics differentiate to any order and the
exported model needs no compiled extension.

``Y_lm`` of a unit vector ``u = (x, y, z)`` is a homogeneous polynomial of degree
``l`` (a solid harmonic divided by ``r^l``). We build its monomial coefficients once,
exactly, from the textbook recursion and evaluate all harmonics as one matrix product
``Y = monomials(u) @ coefficients``. With ``C_m + i S_m = (x + i y)^m`` and
``P_l^m(z) = (1 - z^2)^(m/2) Q_l^m(z)``:

    Y_l0 = K_l0 Q_l^0,   Y_lm = sqrt(2) K_lm Q_l^m C_m,   Y_l,-m = sqrt(2) K_lm Q_l^m S_m,

``K_lm = sqrt((2l + 1) / 4 pi (l - m)! / (l + m)!)``, ``Q_m^m = (2m - 1)!!``,
``Q_{m+1}^m = (2m + 1) z Q_m^m``, ``(l - m) Q_l^m = (2l - 1) z Q_{l-1}^m - (l + m - 1)
r^2 Q_{l-2}^m``, where the factor ``r^2 = x^2 + y^2 + z^2 = 1`` keeps every term of
degree ``l``.
"""

import math
from collections import defaultdict
from typing import Dict, List, Tuple

import numpy as np
import torch

Polynomial = Dict[Tuple[int, int, int], float]


def _add(*terms: Tuple[float, Polynomial]) -> Polynomial:
    result: Polynomial = defaultdict(float)
    for factor, polynomial in terms:
        for exponent, value in polynomial.items():
            result[exponent] += factor * value
    return dict(result)


def _times(polynomial: Polynomial, exponent: Tuple[int, int, int]) -> Polynomial:
    return {(a + exponent[0], b + exponent[1], c + exponent[2]): v for (a, b, c), v in polynomial.items()}


def _r_squared_times(polynomial: Polynomial) -> Polynomial:
    return _add((1.0, _times(polynomial, (2, 0, 0))), (1.0, _times(polynomial, (0, 2, 0))), (1.0, _times(polynomial, (0, 0, 2))))


def real_harmonic_polynomials(l_max: int) -> List[List[Polynomial]]:
    """Monomial coefficients ``{(a, b, c): value}`` of ``Y_lm`` (``x^a y^b z^c``), as ``[l][m + l]``."""
    cosines: List[Polynomial] = [{(0, 0, 0): 1.0}]
    sines: List[Polynomial] = [{}]
    for m in range(1, l_max + 1):
        cosines.append(_add((1.0, _times(cosines[m - 1], (1, 0, 0))), (-1.0, _times(sines[m - 1], (0, 1, 0)))))
        sines.append(_add((1.0, _times(sines[m - 1], (1, 0, 0))), (1.0, _times(cosines[m - 1], (0, 1, 0)))))

    q: Dict[Tuple[int, int], Polynomial] = {}
    for m in range(l_max + 1):
        q[(m, m)] = {(0, 0, 0): float(np.prod(np.arange(1, 2 * m, 2)))}
        if m + 1 <= l_max:
            q[(m + 1, m)] = _add((2 * m + 1, _times(q[(m, m)], (0, 0, 1))))
        for l in range(m + 2, l_max + 1):
            q[(l, m)] = _add(
                ((2 * l - 1) / (l - m), _times(q[(l - 1, m)], (0, 0, 1))),
                (-(l + m - 1) / (l - m), _r_squared_times(q[(l - 2, m)])),
            )

    harmonics = []
    for l in range(l_max + 1):
        row = []
        for m in range(-l, l + 1):
            k = math.sqrt((2 * l + 1) / (4 * math.pi) * math.factorial(l - abs(m)) / math.factorial(l + abs(m)))
            if m == 0:
                row.append(_add((k, q[(l, 0)])))
            else:
                angular = sines[-m] if m < 0 else cosines[m]
                product: Polynomial = defaultdict(float)
                for e1, v1 in q[(l, abs(m))].items():
                    for e2, v2 in angular.items():
                        product[(e1[0] + e2[0], e1[1] + e2[1], e1[2] + e2[2])] += math.sqrt(2.0) * k * v1 * v2
                row.append(dict(product))
        harmonics.append(row)
    return harmonics


class SphericalHarmonics(torch.nn.Module):
    """``forward(vectors [P, 3]) -> [P, (l_max + 1)^2]``, real harmonics of ``vectors / |vectors|``.

    Buffers: ``exponents [K, 3]`` of the ``K`` monomials of degree ``0..l_max`` and
    ``coefficients [K, (l_max + 1)^2]`` (block-diagonal in ``l``).
    """

    def __init__(self, l_max: int):
        super().__init__()
        self.l_max = int(l_max)
        exponents = [(a, b, l - a - b) for l in range(self.l_max + 1) for a in range(l, -1, -1) for b in range(l - a, -1, -1)]
        column = {e: k for k, e in enumerate(exponents)}
        coefficients = np.zeros((len(exponents), (self.l_max + 1) ** 2))
        for l, row in enumerate(real_harmonic_polynomials(self.l_max)):
            for m, polynomial in enumerate(row):
                for exponent, value in polynomial.items():
                    coefficients[column[exponent], l * l + m] = value
        self.register_buffer("exponents", torch.tensor(exponents, dtype=torch.long))
        self.register_buffer("coefficients", torch.tensor(coefficients, dtype=torch.float64))

    def forward(self, vectors: torch.Tensor) -> torch.Tensor:
        unit = vectors / torch.linalg.vector_norm(vectors, dim=1, keepdim=True)
        powers = [torch.ones_like(unit)]
        for _ in range(self.l_max):
            powers.append(powers[-1] * unit)
        powers = torch.stack(powers, dim=2)  # [P, 3, l_max + 1]: u_alpha^k
        monomials = powers[:, 0, self.exponents[:, 0]] * powers[:, 1, self.exponents[:, 1]] * powers[:, 2, self.exponents[:, 2]]
        return monomials @ self.coefficients.to(vectors.dtype)
