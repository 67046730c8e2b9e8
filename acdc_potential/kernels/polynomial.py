"""The GAP-form polynomial kernel on the normalised power spectrum.

Pieces ``[delta(a_i, a_m), delta(a_i, a_m) (x^_i . x^_m)^zeta]`` with ``x^`` the unit
power spectrum (MP-ACDC eq. 7) of each environment, mixed by ``c0`` and ``a``
(docs/equations.md, "Polynomial kernel"). :func:`polynomial_pieces` is the one
implementation, used by the fit (:class:`PolynomialKernel`) and by the exported head
(:class:`~acdc_potential.model.heads.PolynomialHead`).
"""

from typing import Dict, Optional

import torch

from ..descriptors.acdc import power_spectrum, unit_rows
from .base import SparseKernel, sum_by_structure

# invariant features a polynomial kernel may be built on, by the name checkpoints store
FEATURES = {"power_spectrum": power_spectrum}


def polynomial_pieces(x: torch.Tensor, species_x: torch.Tensor, y: torch.Tensor, species_y: torch.Tensor, zeta: int) -> torch.Tensor:
    """``[delta, delta (x . y)^zeta]`` ``[2, n_x, n_y]`` between unit feature rows ``x [n_x, F]``
    and ``y [n_y, F]`` of central species ``species_x [n_x]``, ``species_y [n_y]``."""
    delta = (species_x.unsqueeze(1) == species_y.unsqueeze(0)).to(x.dtype)
    return torch.stack([delta, delta * (x @ y.T) ** zeta])


class PolynomialKernel(SparseKernel):
    """GAP-form kernel on normalised invariant features: pieces ``[delta(a_i, a_m), (x^_i . x^_m)^zeta]``.

    :param zeta: exponent.
    :param features: name in :data:`FEATURES` of the invariants ``[n, F]`` computed from a
        coefficient list (default ``power_spectrum``).
    :param mixing: ``c0`` (species-delta weight), ``a`` (polynomial weight).
    """

    kind = "polynomial"
    mixing_names = ("c0", "a")

    def __init__(self, zeta: int = 4, features: str = "power_spectrum", mixing: Optional[Dict[str, float]] = None):
        super().__init__(2, mixing or {"c0": 1.0, "a": 1.0})
        if features not in FEATURES:
            raise ValueError(f"unknown features {features!r} for a polynomial kernel (known: {sorted(FEATURES)})")
        self.zeta = int(zeta)
        self.feature_name = features
        self.features = FEATURES[features]

    def pairs(self, a, species_a, b, species_b):
        return polynomial_pieces(unit_rows(self.features(a)), species_a, unit_rows(self.features(b)), species_b, self.zeta)

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
        return {"zeta": self.zeta, "features": self.feature_name}

    @classmethod
    def from_hypers(cls, hypers, mixing):
        return cls(int(hypers["zeta"]), str(hypers["features"]), mixing)
