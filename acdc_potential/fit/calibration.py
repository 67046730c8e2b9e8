"""Calibration of the uncertainties on held-out structures (docs/equations.md, "Uncertainties").

A model is fitted without some structures of the tuning sample and without the sparse
environments taken from them (at deployment an atom is never exactly a sparse environment,
and at one the unexplained variance is zero; a species whose every sparse environment comes
from them keeps its own), and predicts them; the factors of
:class:`~acdc_potential.model.uncertainty.Calibration` make its standard deviations match its
errors there: ``alpha^2`` is the mean square of (energy error / predicted standard deviation)
over the held-out structures, ``beta_a^2`` that of (force component error / atomic energy
uncertainty) over their atoms of species ``a``.
"""

import dataclasses
from typing import Dict, List, Sequence

import numpy as np
import torch

from ..config import Regularisers
from ..data import Labelled
from ..model.uncertainty import Calibration
from .design import DesignMatrix, mix_pieces
from .solver import ProjectedProcess, design_triangle, merge_triangles, prior_triangle, solution_from_triangle, sparse_projection

# at most this many held-out structures are predicted (with uncertainties, which cost more than energies)
MAX_STRUCTURES = 200


def held_out_structures(structures: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """A random ``fraction`` (at least one, at most :data:`MAX_STRUCTURES`) of the structure
    numbers ``structures`` ``[S]`` (seeded), sorted."""
    order = torch.randperm(len(structures), generator=torch.Generator().manual_seed(seed + 1))
    count = min(MAX_STRUCTURES, max(1, int(round(fraction * len(structures)))))
    return torch.sort(structures[order[:count]]).values


def held_out_solution(
    design: DesignMatrix,
    k_mm_pieces: torch.Tensor,
    piece_weights: torch.Tensor,
    regularisers: Regularisers,
    jitter: float,
    held_out: torch.Tensor,
    kept_sparse: torch.Tensor,
) -> ProjectedProcess:
    """The projected-process solution on the rows of ``design`` outside the structures
    ``held_out`` (structure numbers), with the sparse environments ``kept_sparse`` (indices
    into ``M``) only. Arguments as :func:`~acdc_potential.fit.solver.solve_projected_process`."""
    k_mm = mix_pieces(piece_weights, k_mm_pieces[:, kept_sparse][:, :, kept_sparse])
    projection = sparse_projection(k_mm, jitter)
    rows = torch.nonzero(~torch.isin(design.structure, held_out)).flatten()
    triangle = design_triangle(design, piece_weights, regularisers, projection, rows, kept_sparse)
    return solution_from_triangle(merge_triangles(prior_triangle(projection), triangle), projection)


def calibration_of(predictions: Dict[str, torch.Tensor], structures: Sequence[Labelled], species: Sequence[int] = ()) -> Calibration:
    """The :class:`Calibration` that makes ``predictions`` (of an uncalibrated model, with
    uncertainties: :func:`~acdc_potential.inference.predict`) match the labels of ``structures``.

    Energies: ``alpha = sqrt(mean_s (e_s / sigma_s)^2)``; forces: ``beta_a = sqrt(mean (d_ik /
    (alpha sigma_i))^2)`` over the components ``k`` of the atoms ``i`` of species ``a`` with a
    positive uncertainty ``sigma_i``, and for the atomic numbers of ``species`` without such atoms
    the same mean over all atoms. Without energy labels ``alpha`` is 1; without forces, no ``beta``.
    """
    sigma = predictions["energy_uncertainty"].numpy()
    ratios = [(float(predictions["energy"][s]) - st.energy) / sigma[s] for s, st in enumerate(structures) if st.energy is not None and sigma[s] > 0]
    alpha = float(np.sqrt(np.mean(np.square(ratios)))) if ratios else 1.0
    atom_sigma = alpha * predictions["atom_uncertainty"].numpy()
    numbers = np.concatenate([st.atoms.numbers for st in structures])
    labelled = np.concatenate([np.full(st.n_atoms, st.forces is not None) for st in structures])
    forces = np.concatenate([st.forces if st.forces is not None else np.zeros((st.n_atoms, 3)) for st in structures])
    usable = labelled & (atom_sigma > 0)
    errors = predictions["forces"].numpy() - forces
    def rms_ratio(mask: np.ndarray) -> float:
        return float(np.sqrt(np.mean(np.square(errors[mask] / atom_sigma[mask, None]))))

    beta = {int(z): rms_ratio(usable & (numbers == z)) for z in np.unique(numbers[usable])}
    if beta:
        pooled = rms_ratio(usable)
        beta.update({int(z): pooled for z in species if int(z) not in beta})
    return Calibration(alpha, beta, len(ratios), int(usable.sum()))


def calibrate(model, structures: List[Labelled]) -> Calibration:
    """:func:`calibration_of` the predictions of ``model`` (a
    :class:`~acdc_potential.fit.checkpoint.SparseKRRModel` fitted without ``structures``), for its species."""
    predictions = model.predict(structures, forces=True, stress=False, uncertainty=True)
    return calibration_of(predictions, structures, model.species)


def kept_sparse(owners: torch.Tensor, species: torch.Tensor, held_out: Sequence[int]) -> torch.Tensor:
    """Indices of the sparse environments (source positions of their structures ``owners`` ``[M]``,
    atomic numbers ``species`` ``[M]``) not taken from the structures ``held_out`` (source
    positions), except for a species that would keep none: it keeps all of its own."""
    keep = ~torch.isin(owners, torch.tensor(list(held_out), dtype=owners.dtype))
    for z in torch.unique(species).tolist():
        if not bool(keep[species == z].any()):
            keep[species == z] = True
    return torch.nonzero(keep).flatten()


def calibration_structures(structures: Sequence[Labelled], energies: bool, forces: bool) -> List[Labelled]:
    """``structures`` with positive weight, with only the kinds of labels the fit used."""
    return [
        dataclasses.replace(s, energy=s.energy if energies else None, forces=s.forces if forces else None)
        for s in structures
        if s.weight > 0
    ]
