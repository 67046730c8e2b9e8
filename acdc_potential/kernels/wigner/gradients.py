"""Fit-only derivatives of the per-atom invariants, summed over the atoms of a structure.

The force and stress rows of a fit need ``sum_{i in S} dPhi^nu_i / dc_i . t_ik`` for every
structure ``S`` and direction ``k`` (positions and strain); building them as sums of GEMMs
here, before any sparse environment enters, is what makes thousands of sparse
environments affordable (:meth:`~acdc_potential.kernels.wigner.kernel.WignerKernel.structure_derivatives`).
Never scripted: exported models differentiate by autograd instead.
"""

import math
from typing import List

import torch

from ...descriptors.cg import block_key, key_lambda, key_sigma
from .features import OrderFeatures, _cached
from .iteration import WignerHypers


class OrderFeatureGradients(OrderFeatures):
    """:class:`OrderFeatures` with their derivatives summed over a structure's atoms."""

    def order_feature_sums(
        self, a: List[torch.Tensor], tangents: List[torch.Tensor], sums: List[torch.Tensor], derivatives: List[torch.Tensor]
    ) -> None:
        """``sum_i Phi^nu_i`` and its derivatives along ``K`` directions over all atoms of ``a``,
        written into ``sums[nu - 1]`` ``[d_nu]`` and ``derivatives[nu - 1]`` ``[K, d_nu]``
        (views of the caller's buffers: at ``[K, d] ~ 27 x 8e4`` for ethanol, fresh
        allocations per structure cost more in page faults than the arithmetic). ``Phi^3``
        is the shortened one of :meth:`order3_reduction`.

        :param a: density coefficients of the atoms (one structure), ``[n, 2l + 1, Q_l]`` per ``l``.
        :param tangents: their derivatives along ``K`` directions, ``[n, K, 2l + 1, Q_l]`` per ``l``.

        The invariants of :meth:`order_features` are multilinear in the coefficients:
        ``Phi^2 = F(a, a)``, ``Phi^3 = F(a, a)^T a``, ``Phi^4 = F^T F``. Their derivatives
        are sums over the slots, and the sum over atoms of each slot's term is one GEMM
        whose inner dimension runs over atoms and ``m`` together
        (:meth:`_pair_tangent_sums`); no per-atom derivative of a feature is formed.
        """
        if self.nu_max == 0:
            return
        n_k = tangents[0].shape[1]
        root = math.sqrt(self.kernels.channel_scales[0])
        torch.sum(a[0][:, 0, :], dim=0, out=sums[0]).mul_(root)
        torch.sum(tangents[0][:, :, 0, :], dim=0, out=derivatives[0]).mul_(root)
        if self.nu_max == 1:
            return
        features = self.kernels.nu2_features(a)
        ones = a[0].new_ones((a[0].shape[0], 1, 1))
        torch.sum(features[block_key(0, 1)][:, 0, :], dim=0, out=sums[1])
        self._feature_tangent_sums(a, tangents, 0, 1, ones, derivatives[1].unsqueeze(2))
        widths = [x.shape[2] for x in a]
        if self.nu_max >= 3:
            offset = 0
            for l1, l2, l3, columns, keep, weight in self._order3_layout(tuple(widths)):
                # the scale of Phi^3 rides on the small factors, not on the [K, D, Q] products
                scale = math.sqrt(self.kernels.channel_scales[l3] / (2 * l3 + 1))
                f = features[block_key(l3, 1)][:, :, columns[0] : columns[1]]
                b = a[l3] * scale
                block = self._pair_tangent_sums(a, tangents, l1, l2, l3, b)
                block.add_(torch.einsum("nud,nkuq->kdq", f, tangents[l3] * scale))
                value = torch.einsum("nud,nuq->dq", f, b).flatten()
                block = block.reshape(n_k, -1)
                if keep is not None:
                    value, block = value[keep], block[:, keep]
                size = value.shape[0]
                torch.mul(value, weight.to(value), out=sums[2][offset : offset + size])
                derivatives[2][:, offset : offset + size] = block * weight.to(block)
                offset += size
        if self.nu_max >= 4:
            offset = 0
            for key in sorted(features.keys()):
                f = features[key]
                scaled = f / math.sqrt(2 * key_lambda(key) + 1)
                d = f.shape[2]
                size = d * (d + 1) // 2
                gram = torch.einsum("nud,nue->de", f, scaled)
                d_gram = f.new_empty((n_k, d, d))
                self._feature_tangent_sums(a, tangents, key_lambda(key), key_sigma(key), scaled, d_gram)
                sums[3][offset : offset + size] = self.kernels._triangle(gram[None, None], 0)[0, 0]
                derivatives[3][:, offset : offset + size] = self.kernels._triangle((d_gram + d_gram.transpose(1, 2)).unsqueeze(1), 0)[:, 0]
                offset += size

    def _feature_tangent_sums(
        self, a: List[torch.Tensor], tangents: List[torch.Tensor], lam: int, sigma: int, b: torch.Tensor, out: torch.Tensor
    ) -> None:
        """``out[k, d, e] = sum_i sum_mu (dF^{lambda sigma}_i[mu, d] / dc_i . t_ik) b_i[mu, e]``
        for a whole block of :meth:`~acdc_potential.kernels.wigner.iteration.WignerKernels.nu2_features`
        (``out`` ``[K, D, E]``), pair by pair."""
        for l1, l2, first, last in self._pairs_of_block(lam, sigma, [x.shape[2] for x in a]):
            out[:, first:last] = self._pair_tangent_sums(a, tangents, l1, l2, lam, b)

    def _pair_tangent_sums(
        self, a: List[torch.Tensor], tangents: List[torch.Tensor], l1: int, l2: int, lam: int, b: torch.Tensor
    ) -> torch.Tensor:
        """``sum_i sum_mu (dF_i[mu, d] / dc_i . t_ik) b_i[mu, e]`` ``[K, D, E]`` for the ``(l1, l2)``
        part of the ``lambda`` block of :meth:`~acdc_potential.kernels.wigner.iteration.WignerKernels.nu2_features`
        (same storage of ``d``).

        :param a: coefficients ``[n, 2l + 1, Q_l]`` per ``l``; :param tangents:
            ``[n, K, 2l + 1, Q_l]`` per ``l``; :param b: ``[n, 2 lambda + 1, E]`` per atom.

        ``F[mu, (q r)] = sum C_{m1 m2 mu} a~[m1, q] a~[m2, r]``; its derivative has one term
        per slot, e.g. the first ``sum_{i m1} da~_i[k, m1, q] U_i[m1, r, e]`` with ``U_i =
        sum_{m2 mu} C a~_i[m2, r] b_i[mu, e]``: a GEMM over ``(i, m1)``.
        """
        n_k = tangents[0].shape[1]
        cg = self.kernels._cg_block(l1, l2, lam)
        s1 = math.sqrt(self.kernels.channel_scales[l1])
        s2 = math.sqrt(self.kernels.channel_scales[l2])
        # the storage factor sqrt 2 of l1 < l2 rides on the small factor C b
        cb = torch.einsum("xyu,nue->nxye", cg, b * (math.sqrt(2.0) if l1 < l2 else 1.0))
        x = torch.einsum("nkxq,nxre->kqre", tangents[l1] * s1, torch.einsum("nyr,nxye->nxre", a[l2] * s2, cb))
        x.add_(torch.einsum("nkyr,nyqe->kqre", tangents[l2] * s2, torch.einsum("nxq,nxye->nyqe", a[l1] * s1, cb)))
        if l1 < l2:
            return x.view(n_k, x.shape[1] * x.shape[2], x.shape[3])
        return self.kernels._triangle(x.permute(0, 3, 1, 2), lam % 2).transpose(1, 2)


def order_feature_gradients_of(hypers: WignerHypers, like: torch.Tensor) -> OrderFeatureGradients:
    """A (cached) :class:`OrderFeatureGradients` on the dtype and device of ``like``."""
    from dataclasses import astuple

    return _cached(OrderFeatureGradients, astuple(hypers), like.dtype, str(like.device))
