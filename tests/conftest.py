"""Shared test helpers: random rotations and real Wigner D matrices fitted from the harmonics."""

import sys
from pathlib import Path

import ase
import ase.build
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


def ethanol(seed: int = 0) -> ase.Atoms:
    """Ethanol with atoms displaced by up to ~0.1 A (no symmetry left)."""
    atoms = ase.build.molecule("CH3CH2OH")
    atoms.rattle(0.1, seed=seed)
    return atoms


def random_cluster(seed: int, symbols: str, half_width: float = 1.8, min_distance: float = 2.0) -> ase.Atoms:
    """A random compact cluster: positions uniform in a cube of ``half_width`` (A) around the
    origin, at least ``min_distance`` (A) apart."""
    rng = np.random.default_rng(seed)
    atoms = ase.Atoms(symbols)
    positions = []
    while len(positions) < len(atoms):
        candidate = rng.uniform(-half_width, half_width, size=3)
        if all(np.linalg.norm(candidate - p) > min_distance for p in positions):
            positions.append(candidate)
    atoms.positions = np.array(positions)
    return atoms


def copper_cell() -> ase.Atoms:
    """A 4-atom fcc Cu cell, sheared to a triclinic cell, atoms rattled."""
    atoms = ase.build.bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms.cell = atoms.cell.array @ np.array([[1.0, 0.05, 0.0], [0.0, 1.0, -0.04], [0.03, 0.0, 1.0]])
    atoms.rattle(0.1, seed=3)
    return atoms


def check_forces_and_stress(atoms, displacements, strains, h, force_tolerance, stress_tolerance):
    """Assert that ``atoms.calc``'s forces and stress equal central finite differences.

    :param displacements: ``(atom, direction)`` pairs to displace by ``+-h`` (A).
    :param strains: ``(a, b)`` components of a symmetric strain ``+-h`` (stress = dE/d eps / V).
    """
    forces, stress = atoms.get_forces(), atoms.get_stress(voigt=False)
    assert np.abs(forces).max() > 1e-3 and np.abs(stress).max() > 1e-5

    def energy_of(change):
        other = atoms.copy()
        other.calc = atoms.calc
        change(other)
        return other.get_potential_energy()

    for atom, direction in displacements:

        def displaced(sign):
            def change(other):
                other.positions[atom, direction] += sign * h

            return energy_of(change)

        derivative = (displaced(1) - displaced(-1)) / (2 * h)
        assert abs(-derivative - forces[atom, direction]) < force_tolerance, (atom, direction)

    for a, b in strains:

        def strained(sign):
            strain = np.eye(3)
            strain[a, b] += sign * h / 2
            strain[b, a] += sign * h / 2
            return energy_of(lambda other: other.set_cell(atoms.cell.array @ strain, scale_atoms=True))

        derivative = (strained(1) - strained(-1)) / (2 * h) / atoms.get_volume()
        assert abs(derivative - stress[a, b]) < stress_tolerance, (a, b)


@pytest.fixture(autouse=True)
def _double_precision():
    torch.manual_seed(0)
    yield
