"""Convergence of the Wigner kernels to their definition (WK eq. 5) as the basis grows.

Uses the oracle of ``tests/test_wigner_definition.py`` (SO(3) quadrature of powers of the
Gaussian-overlap integral, no radial basis, no CG) and prints, for growing ``(l_max, n_max)``,
the relative error of the invariant and pseudoscalar kernels ``nu = 1..4``, then the error of
normalised kernels with uniform and with ``inverse_dimension`` channel weights.

usage: python benchmarks/wigner_definition.py
"""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import test_wigner_definition as oracle  # noqa: E402

BASES = [(2, 6), (4, 8), (6, 10), (7, 11), (8, 12)]


def normalised(k, nu):
    return k[("A", "B"), nu, 1] / np.sqrt(k[("A", "A"), nu, 1] * k[("B", "B"), nu, 1])


def main():
    definition = oracle.definition._fixture_function()
    for nu in range(1, 5):
        print(f"definition nu = {nu}: invariant {definition[('A', 'B'), nu, 1]:.6e}, pseudoscalar {definition[('A', 'B'), nu, -1]:.3e}")
    print("\n| kernel | " + " | ".join(f"({l}, {n})" for l, n in BASES) + " |")
    print("| --- " * (len(BASES) + 1) + "|")
    errors = [oracle.relative_errors(oracle.package_kernels(l, n), definition) for l, n in BASES]
    for key in sorted(errors[0], key=lambda k: (-k[1], k[0])):
        name = f"nu = {key[0]}" + (" pseudoscalar" if key[1] < 0 else "")
        print(f"| {name} | " + " | ".join(f"{e[key]:.1e}" for e in errors) + " |", flush=True)
    l_max, n_max = BASES[3]
    for weights in ("uniform", "inverse_dimension"):
        computed = oracle.package_kernels(l_max, n_max, weights)
        cells = ", ".join(f"{abs(normalised(computed, nu) / normalised(definition, nu) - 1):.1e}" for nu in range(1, 5))
        print(f"normalised kernels at ({l_max}, {n_max}), {weights}: nu = 1..4 off by {cells}")


if __name__ == "__main__":
    main()
