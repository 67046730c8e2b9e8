"""Density coefficients ``c_i[a n l m]`` of the neighbour density, in torch.

Layout (used by every later stage): a list with one tensor per angular channel
``l = 0..l_max``, of shape ``[n_atoms, 2l + 1, n_species * n_radial[l]]``; the last
index is ``q = a * n_radial[l] + n`` for neighbour species ``a`` (position in the
model's ``species`` list) and radial index ``n``; ``m`` is stored at ``m + l``.

    c_i[a n l m] = sum_{j in A_i, a_j = a} f_cut(r_ji) I_nl(r_ji) Y_lm(r_ji / r_ji)

(WK eq. 4; docs/equations.md, "Neighbour density" and "Density coefficients"), where
``I_nl`` is the tabulated radial integral of :mod:`acdc_potential.descriptors.radial` and
``f_cut`` the shifted cosine switch.
The central atom does not contribute to its own density.
"""

from typing import List, NamedTuple, Sequence, Tuple

import torch

from .harmonics import SphericalHarmonics
from ..errors import StructureError
from .neighbors import AtomsBatch
from .radial import DensityHypers, RadialSpline


class Pairs(NamedTuple):
    """The neighbour pairs of a batch of atoms (one or several structures), as models see them.

    ``vectors [P, 3]``: ``r_ji = x_j - x_i`` (plus the cell shift) from centre to neighbour,
    differentiable; ``centers [P]`` and ``neighbors [P]``: atom indices ``i`` and ``j`` in the
    batch; ``species [N]``: the species index (position in the model's species) of every atom.
    """

    vectors: torch.Tensor
    centers: torch.Tensor
    neighbors: torch.Tensor
    species: torch.Tensor


def shifted_cosine(r: torch.Tensor, cutoff: float, width: float) -> torch.Tensor:
    """1 below ``cutoff - width``, ``(1 + cos(pi (r - cutoff + width) / width)) / 2`` up to ``cutoff``, 0 beyond."""
    if width <= 0.0:
        return (r < cutoff).to(r.dtype)
    s = torch.clamp((r - (cutoff - width)) / width, 0.0, 1.0)
    return 0.5 * (1.0 + torch.cos(torch.pi * s))


class DensityExpansion(torch.nn.Module):
    """Expansion of the neighbour density on ``R_nl(r) Y_lm(r^)``.

    :param hypers: the density and basis (:class:`~acdc_potential.descriptors.radial.DensityHypers`).
    :param species: atomic numbers of the neighbour-species channels, in order.

    ``forward`` is TorchScript-compatible; :meth:`compute` is the convenience entry
    point for an :class:`~acdc_potential.descriptors.neighbors.AtomsBatch`.
    """

    def __init__(self, hypers: DensityHypers, species: List[int]):
        super().__init__()
        hypers.validate()
        self.cutoff = float(hypers.cutoff)
        self.smoothing = float(hypers.smoothing)
        self.n_radial: List[int] = hypers.n_radial()
        self.l_max = len(self.n_radial) - 1
        self.species: List[int] = [int(s) for s in species]
        self.n_species = len(self.species)
        self.radial = RadialSpline(hypers)
        self.spherical_harmonics = SphericalHarmonics(self.l_max)
        lookup = torch.full((max(self.species) + 1,), -1, dtype=torch.long)
        lookup[torch.tensor(self.species)] = torch.arange(self.n_species)
        self.register_buffer("species_lookup", lookup)

    @torch.jit.unused
    def coefficient_size(self) -> int:
        """``D``, the size of an atom's flat density coefficients."""
        return sum((2 * l + 1) * self.n_species * n for l, n in enumerate(self.n_radial))

    def species_index(self, numbers: torch.Tensor) -> torch.Tensor:
        """Position of each atomic number in ``species``; raises on unknown species."""
        inside = numbers < self.species_lookup.shape[0]
        index = torch.where(inside, self.species_lookup[torch.clamp(numbers, 0, self.species_lookup.shape[0] - 1)], -1)
        if bool((index < 0).any()):
            unknown: List[int] = torch.unique(numbers[index < 0]).tolist()
            raise ValueError(
                "atomic numbers " + str(unknown) + " are not among the model's species " + str(self.species)
            )
        return index

    def pair_basis(self, vectors: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The basis functions at each pair vector, factorised.

        :param vectors: ``[P, 3]`` pair vectors ``r_ji``.
        :return: ``f_cut(r) I_nl(r)`` as ``[P, sum_l n_radial[l]]`` (ordered by ``l``
            then ``n``) and ``Y_lm(r^)`` as ``[P, (l_max + 1)^2]``.
        """
        distances = torch.linalg.vector_norm(vectors, dim=1)
        cutoff = shifted_cosine(distances, self.cutoff, self.smoothing)
        return self.radial(distances) * cutoff.unsqueeze(1), self.spherical_harmonics(vectors)

    def forward(
        self,
        vectors: torch.Tensor,
        centers: torch.Tensor,
        neighbor_species: torch.Tensor,
        n_atoms: int,
    ) -> List[torch.Tensor]:
        """Density coefficients from pair vectors.

        :param vectors: ``[P, 3]`` vectors ``r_ji`` from centre to neighbour.
        :param centers: ``[P]`` index of the centre of each pair.
        :param neighbor_species: ``[P]`` species index ``a_j`` (see :meth:`species_index`).
        :param n_atoms: number of centres.
        :return: one ``[n_atoms, 2l + 1, n_species * n_radial[l]]`` tensor per ``l``.
        """
        radial, harmonics = self.pair_basis(vectors)
        target = centers * self.n_species + neighbor_species

        coefficients: List[torch.Tensor] = []
        start = 0
        for l, n in enumerate(self.n_radial):
            y = harmonics[:, l * l : (l + 1) * (l + 1)]
            pair = y.unsqueeze(2) * radial[:, start : start + n].unsqueeze(1)
            c = torch.zeros(
                (n_atoms * self.n_species, 2 * l + 1, n), dtype=vectors.dtype, device=vectors.device
            )
            c = c.index_add(0, target, pair)
            c = c.reshape(n_atoms, self.n_species, 2 * l + 1, n).transpose(1, 2)
            coefficients.append(c.reshape(n_atoms, 2 * l + 1, self.n_species * n))
            start += n
        return coefficients

    def from_pairs(self, pairs: Pairs) -> List[torch.Tensor]:
        """Density coefficients of every atom of a batch of :class:`Pairs` (see :meth:`forward`)."""
        return self.forward(pairs.vectors, pairs.centers, pairs.species[pairs.neighbors], pairs.species.shape[0])

    def compute(self, batch: AtomsBatch) -> List[torch.Tensor]:
        """Density coefficients of every atom of ``batch`` (see :meth:`forward`)."""
        try:
            self.species_index(batch.numbers)
        except ValueError as error:
            bad = ~torch.isin(batch.numbers, torch.tensor(self.species, device=batch.numbers.device))
            structure = int(batch.structure[bad][0])
            raise StructureError(f"structure {structure}: {error}") from None
        species = self.species_index(batch.numbers)
        return self.forward(batch.pair_vectors(), batch.centers, species[batch.neighbors], batch.n_atoms)


class Layout:
    """Shapes ``[(2l + 1, Q_l)]`` of the coefficient list, to flatten and unflatten it."""

    def __init__(self, shapes: Sequence[Tuple[int, int]]):
        self.shapes = [(int(a), int(b)) for a, b in shapes]
        self.sizes = [a * b for a, b in self.shapes]
        self.size = sum(self.sizes)

    @classmethod
    def of(cls, coefficients: List[torch.Tensor]) -> "Layout":
        return cls([tuple(c.shape[1:]) for c in coefficients])

    def flatten(self, coefficients: List[torch.Tensor]) -> torch.Tensor:
        """List over ``l`` of ``[n, 2l + 1, Q_l]`` -> ``[n, D]``."""
        return torch.cat([c.reshape(c.shape[0], c.shape[1] * c.shape[2]) for c in coefficients], dim=1)

    def unflatten(self, flat: torch.Tensor) -> List[torch.Tensor]:
        """``[n, D]`` -> list over ``l`` of ``[n, 2l + 1, Q_l]``."""
        return unflatten(flat, [list(shape) for shape in self.shapes])


def unflatten(flat: torch.Tensor, shapes: List[List[int]]) -> List[torch.Tensor]:
    """Flat coefficients ``[n, D]`` back to the list over ``l`` of ``[n, 2l + 1, Q_l]``
    (``shapes[l] = [2l + 1, Q_l]``); TorchScript-compatible, used by exported models."""
    out: List[torch.Tensor] = []
    start = 0
    for shape in shapes:
        size = shape[0] * shape[1]
        out.append(flat[:, start : start + size].reshape(-1, shape[0], shape[1]))
        start += size
    return out
