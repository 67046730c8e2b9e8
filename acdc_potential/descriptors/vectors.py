"""True-vector ``(lambda = 1, sigma = +1)`` features of every atom, for linear dipole models.

The features a linear model of a vector target needs (MP-ACDC section II C, Fig. 10): for each atom ``i`` the
``(1, +1)`` block ``[3, Q]`` (real ``m = -1, 0, 1``, i.e. ``y, z, x``) of

- ``acdc``: ``|rho_i^{nu}; +1; 1 mu>``, the ACDC of body order ``nu`` (eq. 5 iterated; ``nu = 1`` the ``l = 1``
  density coefficients themselves);
- ``mpacdc``: ``|rho_i^{[1 <- 1]}; +1; 1 mu>``, the message-passing features (eq. 12, 21-23), which see the
  neighbours' densities, hence atoms up to twice the cutoff away.

A dipole ``mu_i = x_i v_{a_i}`` (``v_a [Q]`` one vector per species, shared by the three components) is then
equivariant. :class:`VectorFeatures` is the one implementation, used by the fit
(:mod:`acdc_potential.fit.dipole`) and by the exported head (:class:`~acdc_potential.model.heads.FeatureDipoleHead`).
"""

from typing import Optional

import torch

from .acdc import ACDCFeatures
from .density import DensityExpansion
from .mpacdc import MPACDC, PairBasis

VECTOR_KINDS = ("acdc", "mpacdc")
VECTOR_KEY = (1, 1)


class VectorFeatures(torch.nn.Module):
    """The ``(1, +1)`` features of every atom of a batch of pairs, TorchScript-compatible.

    :param expansion: the density expansion (and, for ``mpacdc``, the basis of the pair terms).
    :param kind: ``acdc`` or ``mpacdc``. :param order: the body order ``nu`` of ``acdc`` features (1, 2 or 3).

    ``forward(vectors [P, 3], centers [P], neighbors [P], species [N])`` (``species`` the index of each atom in
    ``expansion.species``) -> ``[N, 3, Q]``.
    """

    def __init__(self, expansion: DensityExpansion, kind: str, order: int = 2):
        super().__init__()
        if kind not in VECTOR_KINDS:
            raise ValueError(f"vector features are one of {VECTOR_KINDS}, not {kind!r}")
        if expansion.l_max < 1:
            raise ValueError("lambda = 1 features need a density with max_angular >= 1")
        if kind == "acdc" and order not in (1, 2, 3):
            raise ValueError(f"the body order of acdc vector features is 1, 2 or 3, not {order}")
        self.expansion = expansion
        self.local: Optional[ACDCFeatures] = ACDCFeatures(expansion.l_max, order, 1, keys=[VECTOR_KEY]) if kind == "acdc" else None
        self.passing: Optional[MPACDC] = MPACDC(expansion.l_max, expansion.l_max, 1, 1, 1) if kind == "mpacdc" else None
        self.pair = PairBasis(expansion)
        self.index: int = 0 if self.passing is None else self.passing.keys.index(VECTOR_KEY)

    def forward(self, vectors: torch.Tensor, centers: torch.Tensor, neighbors: torch.Tensor, species: torch.Tensor) -> torch.Tensor:
        neighbor_species = species[neighbors]
        coefficients = self.expansion(vectors, centers, neighbor_species, species.shape[0])
        local = self.local
        if local is not None:
            return local(coefficients)[0]
        passing = self.passing
        assert passing is not None
        radial, harmonics = self.pair(vectors)
        return passing(coefficients, harmonics, radial, neighbor_species, self.expansion.n_species, centers, neighbors)[self.index]
