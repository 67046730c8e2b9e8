"""The GAP-form polynomial kernel on normalised invariant ACDC features.

Pieces ``[delta(a_i, a_m), delta(a_i, a_m) (x^_i . x^_m)^zeta]`` with ``x^`` the unit invariants of
the chosen body orders (:class:`~acdc_potential.descriptors.invariants.Invariants`; the power
spectrum, MP-ACDC eq. 7, by default) of each environment, mixed by ``c0`` and ``a``
(docs/equations.md, "Polynomial kernel"); ``zeta = 1`` is a linear model on the features.
:func:`polynomial_pieces` and :class:`Invariants` are the one implementation, used by the fit
(:class:`PolynomialKernel`) and by the exported head (:class:`~acdc_potential.model.heads.PolynomialHead`).
"""

from typing import Dict, List, Optional, Sequence

import torch

from ..descriptors.density import Layout
from ..descriptors.invariants import Invariants, check_orders, fit_contraction
from ..descriptors.acdc import unit_rows
from .base import SparseKernel, sum_by_structure


def polynomial_pieces(x: torch.Tensor, species_x: torch.Tensor, y: torch.Tensor, species_y: torch.Tensor, zeta: int) -> torch.Tensor:
    """``[delta, delta (x . y)^zeta]`` ``[2, n_x, n_y]`` between unit feature rows ``x [n_x, F]``
    and ``y [n_y, F]`` of central species ``species_x [n_x]``, ``species_y [n_y]``."""
    delta = (species_x.unsqueeze(1) == species_y.unsqueeze(0)).to(x.dtype)
    return torch.stack([delta, delta * (x @ y.T) ** zeta])


class PolynomialKernel(SparseKernel):
    """GAP-form kernel on normalised invariant features: pieces ``[delta(a_i, a_m), (x^_i . x^_m)^zeta]``.

    :param zeta: exponent (1: linear in the features).
    :param orders: body orders ``nu`` of the invariants (a subset of 1, 2, 3; default the power spectrum).
    :param contraction: with ``nu = 3``, components kept per ``nu = 2`` block by the PCA of eq. 24, fitted
        on the sparse environments when they are set (0: no contraction).
    :param projections: that PCA, when already fitted (from a checkpoint).
    :param mixing: ``c0`` (species-delta weight), ``a`` (polynomial weight).

    The feature module (:attr:`invariants`) is built when the sparse environments are set, which
    fixes the density's ``l_max``.
    """

    kind = "polynomial"
    mixing_names = ("c0", "a")

    def __init__(
        self,
        zeta: int = 4,
        orders: Sequence[int] = (2,),
        contraction: int = 0,
        projections: Optional[List[torch.Tensor]] = None,
        mixing: Optional[Dict[str, float]] = None,
    ):
        super().__init__(2, mixing or {"c0": 1.0, "a": 1.0})
        self.zeta = int(zeta)
        self.orders = check_orders(list(orders))
        if contraction < 0:
            raise ValueError(f"contraction must be 0 (none) or a number of components, got {contraction}")
        self.contraction = int(contraction) if 3 in self.orders else 0
        self.projections = projections
        self.invariants: Optional[Invariants] = None

    def set_sparse(self, coefficients: torch.Tensor, species: torch.Tensor, layout: Layout) -> None:
        """As :meth:`SparseKernel.set_sparse`; also fits the contraction on these environments (when
        asked for and not given) and builds the feature module."""
        super().set_sparse(coefficients, species, layout)
        l_max = len(layout.shapes) - 1
        if self.contraction and self.projections is None:
            self.projections = fit_contraction(l_max, layout.unflatten(self.sparse_coefficients), self.contraction)
        self.invariants = Invariants(l_max, self.orders, self.projections).to(coefficients.device)

    def features(self, coefficients: List[torch.Tensor]) -> torch.Tensor:
        """Unit invariant features ``[n, F]`` of a coefficient list."""
        return self.invariants(coefficients)

    def pairs(self, a, species_a, b, species_b):
        return polynomial_pieces(self.features(a), species_a, self.features(b), species_b, self.zeta)

    def structure_derivatives(self, coefficients, species, tangents, structure, n_structures):
        """As :meth:`SparseKernel.structure_derivatives`, in forward mode through the features.

        With ``s = x^_i . x^_m``: ``d k / d c_i . t = zeta s^(zeta-1) / |x_i| (x^_m - s x^_i) . dx_i``
        where ``dx_i = (d x_i / d c_i) t`` comes from one feature JVP per tangent at the
        atom level, so the cost per (atom, sparse environment) pair is a dot product. Atoms
        are processed in chunks of ``max_pairs / K`` (atom, tangent) JVPs.
        """
        coefficients = coefficients.detach()
        n_k = tangents.shape[1]
        values = coefficients.new_zeros((2, n_structures, self.n_sparse))
        derivatives = coefficients.new_zeros((2, n_structures, self.n_sparse, n_k))

        def features(flat):
            return self.features(self.layout.unflatten(flat))

        step = max(1, self.max_pairs // n_k)
        for block, sparse in self._blocks(species):
            unit_sparse = unit_rows(features(self.sparse_coefficients[sparse]))
            for start in range(0, block.numel(), step):
                atoms = block[start : start + step]
                c = coefficients[atoms]
                x = features(c)
                norm = torch.linalg.vector_norm(x, dim=1).clamp_min(1e-150)
                unit = x / norm[:, None]
                dx = torch.func.vmap(lambda t: torch.func.jvp(features, (c,), (t,))[1], in_dims=1, out_dims=1)(tangents[atoms])
                similarity = unit @ unit_sparse.T
                along_sparse = torch.einsum("mf,ikf->imk", unit_sparse, dx)
                along_self = torch.einsum("if,ikf->ik", unit, dx)
                scale = self.zeta * similarity ** (self.zeta - 1) / norm[:, None]
                directional = scale[:, :, None] * (along_sparse - similarity[:, :, None] * along_self[:, None, :])
                pieces = torch.stack([torch.ones_like(similarity), similarity**self.zeta])
                values[:, :, sparse] += sum_by_structure(pieces, structure[atoms], n_structures)
                derivatives[1, :, sparse] += sum_by_structure(directional[None], structure[atoms], n_structures)[0]
        return values, derivatives

    def piece_weights(self, mixing=None):
        m = {**self.mixing, **(mixing or {})}
        return torch.tensor([m["c0"], m["a"]], dtype=torch.float64)

    def hypers(self):
        return {"zeta": self.zeta, "orders": list(self.orders), "contraction": self.contraction, "projections": self.projections}

    @classmethod
    def from_hypers(cls, hypers, mixing):
        projections = hypers["projections"]
        return cls(int(hypers["zeta"]), [int(nu) for nu in hypers["orders"]], int(hypers["contraction"]), list(projections) if projections is not None else None, mixing)
