"""Row kinds of the regression: one energy row per structure, 3 N force rows, 6 stress rows.

Each kind has its label, its regulariser (:class:`~acdc_potential.config.Regularisers`)
and its place in a structure's block of rows: energy first, then forces (atom-major,
x y z), then the stress in Voigt order xx yy zz yz xz xy (ASE's sign).
"""

from typing import Tuple

import torch

from ..data import Labelled

ENERGY, FORCES, STRESS = 0, 1, 2
KIND_NAMES = ("energy", "forces", "stress")
VOIGT = ((0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1))


def _voigt(tensor: torch.Tensor) -> torch.Tensor:
    """``[..., 3, 3]`` -> ``[..., 6]`` of the symmetric part, order xx yy zz yz xz xy."""
    symmetric = 0.5 * (tensor + tensor.transpose(-1, -2))
    return torch.stack([symmetric[..., a, b] for a, b in VOIGT], dim=-1)


def _rows_of(structure: Labelled, energies: bool, forces: bool, stress: bool) -> Tuple[bool, bool, bool]:
    return (
        energies and structure.energy is not None,
        forces and structure.forces is not None,
        stress and structure.stress is not None,
    )


def _row_count(structure: Labelled, wanted: Tuple[bool, bool, bool]) -> int:
    """Rows of ``structure`` for its ``wanted`` (energy, forces, stress) of :func:`_rows_of`."""
    use_e, use_f, use_s = wanted
    return int(use_e) + (3 * structure.n_atoms if use_f else 0) + (6 if use_s else 0)
