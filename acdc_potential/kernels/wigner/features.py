"""Per-atom invariants whose scalar products are the invariant Wigner kernels (WK appendix B).

For ``nu_max <= 4`` every invariant kernel is a scalar product ``k^{nu, 0+}(i, j) =
<Phi^nu_i, Phi^nu_j>`` of per-atom invariants built from the ``nu = 2`` features of
:meth:`~acdc_potential.kernels.wigner.iteration.WignerKernels.nu2_features`. They serve
two purposes, both outside TorchScript (nothing here is compiled into an exported file):

- the design rows of a fit (:mod:`~acdc_potential.kernels.wigner.gradients`), and
- the collapse of the weighted sums over sparse environments of a ``nu_max <= 4`` model
  onto per-species tensors at export time (:meth:`OrderFeatures.collapse`, docs/equations.md,
  "Collapsed energies"); the exported file evaluates them with
  :meth:`~acdc_potential.kernels.wigner.iteration.WignerKernels.collapsed_energy`.

``Phi^1..3`` themselves are :meth:`~acdc_potential.kernels.wigner.iteration.WignerKernels.invariant_features`,
compiled into exported files whose variances go through them
(:class:`~acdc_potential.model.uncertainty.FeatureVariance`).
"""

import math
from functools import lru_cache
from typing import Dict, List, Tuple

import torch

from ...descriptors.cg import key_lambda, parity_sign
from ..base import weighted_gram_eigenpairs
from .iteration import WignerHypers, WignerKernels, wigner_module


class OrderFeatures:
    """The invariants ``Phi^nu`` of one :class:`WignerKernels` (its CG tables and truncation).

    :param kernels: the (TorchScript-compatible) Wigner-kernel module whose kernels the
        invariants reproduce.
    """

    def __init__(self, kernels: WignerKernels):
        self.kernels = kernels
        self.nu_max = kernels.nu_max
        self.lambda_max = kernels.lambda_max
        self.coupling_lambdas = kernels.coupling_lambdas

    def order_features(self, a: List[torch.Tensor]) -> List[torch.Tensor]:
        """Per-atom invariants whose scalar products are the kernels: ``k^{nu, 0+}(i, j) =
        <Phi^nu_i, Phi^nu_j>`` for ``nu = 1..nu_max <= 4`` (no central-species delta).

        ``Phi^1..3`` are :meth:`WignerKernels.invariant_features`; ``Phi^4 = (2 lambda + 1)^(-1/2)
        F^{lambda sigma T} F^{lambda sigma}`` over the blocks of the ``nu = 2`` features ``F``
        (``k^4 = <k^2, k^2>``; the upper triangle of the symmetric ``[D, D]`` Gram matrix,
        off-diagonal entries times ``sqrt 2``), of ``D^2`` entries: meant for few species or
        radial channels.

        :param a: density coefficients ``[n, 2l + 1, Q_l]`` per ``l``.
        :return: ``[n, d_nu]`` per ``nu``.
        """
        if self.nu_max > 4:
            raise ValueError("orders above 4 are not scalar products of per-atom invariants")
        features = self.kernels.nu2_features(a) if self.nu_max >= 2 else {}
        out = self.kernels.invariant_features(a, features)
        if self.nu_max >= 4:
            parts = []
            for key in sorted(features.keys()):
                gram = torch.bmm(features[key].transpose(1, 2), features[key])
                parts.append(self.kernels._triangle(gram.unsqueeze(1), 0)[:, 0, :] / math.sqrt(2 * key_lambda(key) + 1))
            out.append(torch.cat(parts, dim=1))
        return out

    def collapse(self, b: List[torch.Tensor], species_b: torch.Tensor, weights: torch.Tensor, n_species: int) -> List[torch.Tensor]:
        """``sum_j weights[nu, j] k^nu(., b_j)`` for ``nu <= 4`` folded into per-species tensors
        (docs/equations.md, "Collapsed energies").

        Every order is a scalar product ``<Phi^nu_i, Phi^nu_j>`` (:meth:`order_features`), so
        its weighted sum over ``j`` is one fixed vector ``W^nu = sum_j weights[nu, j] Phi^nu_j``
        per central species. For ``nu = 4`` the vector stands for symmetric matrices,
        ``W^{4, lambda sigma} = sum_j weights[4, j] F_j^T F_j / (2 lambda + 1)`` per block of
        :meth:`WignerKernels.nu2_features` (``k^4(i, j) = sum_blocks ||F_i F_j^T||^2 / (2 lambda + 1)
        = sum_blocks <F_i^T F_i, F_j^T F_j> / (2 lambda + 1)``), kept whole or, where the
        environments are fewer than its columns, as its eigenpairs (:meth:`_order4_tensors`), built
        without ``Phi^4`` of the environments.

        The sums over ``j`` are done here once, so the cancellation among large fitted weights is
        rounded once into fixed tensors: the energy is then a smooth function of the positions
        (docs/equations.md, "Numerical precision").

        :param b: environments (e.g. sparse), ``[n_b, 2l + 1, Q_l]`` per ``l``.
        :param species_b: ``[n_b]`` central species index in ``0..n_species-1``.
        :param weights: ``[nu_max + 1, n_b]``.
        :return: per species ``s`` (leading dimension), ``[sum_j weights[0, j]]``, then
            ``W^nu [d_nu]`` for ``nu = 1..min(nu_max, 3)``, then for ``nu_max = 4`` per block in
            the order of the sorted block keys ``W^{4, lambda sigma}`` as a matrix and values
            (:meth:`_order4_tensors`, :meth:`WignerKernels.collapsed_energy`).
        """
        if self.nu_max > 4:
            raise ValueError("orders above 4 do not collapse onto per-atom quantities")
        one_hot = torch.zeros((n_species, species_b.shape[0]), dtype=b[0].dtype, device=b[0].device)
        one_hot[species_b, torch.arange(species_b.shape[0], device=b[0].device)] = 1.0
        out: List[torch.Tensor] = [one_hot @ weights[0]]
        lower = OrderFeatures(self.kernels) if self.nu_max < 4 else OrderFeatures(wigner_module(_lowered(self.kernels), b[0]))
        # Phi^3 of every environment at once would take n_b d_3 entries (gigabytes for many species)
        first = lower.order_features([x[:1] for x in b])
        out.extend(one_hot.new_zeros((n_species, phi.shape[1])) for phi in first)
        step = max(1, COLLAPSE_ENTRIES // max(1, sum(phi.shape[1] for phi in first)))
        for start in range(0, species_b.shape[0], step):
            chunk = slice(start, start + step)
            for nu, phi in enumerate(lower.order_features([x[chunk] for x in b])):
                out[nu + 1] += (one_hot[:, chunk] * weights[nu + 1, chunk]) @ phi
        if self.nu_max == 4:
            out.extend(self._order4_tensors(b, species_b, weights[4], n_species))
        return out

    def _order4_tensors(self, b: List[torch.Tensor], species_b: torch.Tensor, weights: torch.Tensor, n_species: int) -> List[torch.Tensor]:
        """``W^{4, lambda sigma}_a`` (see :meth:`collapse`) per sorted block key, as a matrix
        ``[n_species, D, r]`` and values ``[n_species, r']``, zero-padded across species.

        ``W_a = S_a^T diag(omega) S_a`` with ``S_a`` the ``[M_a (2 lambda + 1), D]`` rows of the
        features of species ``a``'s environments and ``omega`` their weights over ``2 lambda + 1``,
        so its rank is at most ``M_a (2 lambda + 1)``. Where some species has at least ``D`` rows,
        the block keeps ``W_a`` itself (``r = D``, no values: ``r' = 0``), accumulated over chunks
        of environments. Otherwise it keeps the exact eigenpairs ``W_a = V diag(s) V^T`` (``r = r'
        = max_a M_a (2 lambda + 1) < D``): ``S_a^T = Q R`` (thin QR) gives ``W_a = Q (R diag(omega)
        R^T) Q^T``, and the ``[r, r]`` middle is diagonalised. An atom costs ``2 (2 lambda + 1) D r``
        operations per block: for the species with the most environments never more than its pairs'
        ``2 M_a (2 lambda + 1)^2 D``, and ``V`` is never larger than the features of the environments
        that the pairs would keep times the number of species (species with fewer environments are
        padded with zero columns, so that every species' tensors have one shape). The matrix
        is preferred where it is not larger: the eigenvalues of fitted ``W`` are large and of both
        signs, and rounding ``V`` (e.g. to float32) errs by their absolute sum, ``W`` by its entries.
        """
        largest = int(torch.bincount(species_b, minlength=n_species).max())  # environments of the largest species
        out: Dict[int, List[torch.Tensor]] = {}
        for s in range(n_species):
            rows = torch.nonzero(species_b == s).flatten()
            grams: Dict[int, torch.Tensor] = {}
            stacked: Dict[int, List[Tuple[torch.Tensor, torch.Tensor]]] = {}
            for start in range(0, rows.numel(), COLLAPSE_CHUNK):
                chunk = rows[start : start + COLLAPSE_CHUNK]
                for key, f in self.kernels.nu2_features([x.index_select(0, chunk) for x in b]).items():
                    width, d = f.shape[1], f.shape[2]
                    omega = (weights.index_select(0, chunk) / width).repeat_interleave(width)
                    f = f.reshape(-1, d)
                    if largest * width >= d:
                        if key not in grams:
                            grams[key] = f.new_zeros((d, d))
                        grams[key] += f.T @ (omega[:, None] * f)
                    else:
                        stacked.setdefault(key, []).append((f, omega))
            for key, gram in grams.items():
                if key not in out:
                    out[key] = [b[0].new_zeros((n_species,) + gram.shape), b[0].new_zeros((n_species, 0))]
                out[key][0][s] = 0.5 * (gram + gram.T)
            for key, parts in stacked.items():
                rank = largest * (2 * key_lambda(key) + 1)
                vectors, values = weighted_gram_eigenpairs(torch.cat([f for f, _ in parts]), torch.cat([omega for _, omega in parts]), rank)
                if key not in out:
                    out[key] = [b[0].new_zeros((n_species,) + vectors.shape), b[0].new_zeros((n_species, rank))]
                out[key][0][s] = vectors
                out[key][1][s] = values
        return [tensor for key in sorted(out.keys()) for tensor in out[key]]

    def order3_reduction(self, widths: List[int]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Entries and weights of a shorter ``Phi^3`` with the same scalar products.

        :param widths: ``Q_l`` per ``l`` of the coefficients.
        :return: ``index`` ``[d']`` into ``Phi^3`` of :meth:`order_features` and ``weight``
            ``[d']``: ``<Phi^3_i[index] w, Phi^3_j[index] w> = k^3(i, j)``.

        ``k^3`` sums, over every ordering ``(l1, l2 | l3)`` of each set of three ``l``, the
        same 3j-coupled invariant ``I[q, r, s]`` (``Phi^3`` keeps the orderings as separate
        blocks, with the index orders permuted; ``C^{l1 l2 l3}`` is ``sqrt(2 l3 + 1)`` times
        the 3j symbol): ``k^3 = sum_{l1 l2 l3 ordered} kappa_1 kappa_2 kappa_3 <I, I'>``.
        One block per set (``l1 <= l2 <= l3``) weighted by the number of orderings carries
        it all, and where ``l``'s are equal ``I`` is symmetric in their indices, so only
        ``r <= s`` (``l2 = l3``) or ``q <= r <= s`` (all equal) are kept, weighted by their
        multiplicity. About three times shorter (ethanol: 2.3e5 -> 7.8e4 entries).
        """
        index: List[torch.Tensor] = []
        weight: List[torch.Tensor] = []
        offsets: Dict[Tuple[int, int, int], int] = {}
        offset = 0
        for l3 in range(min(len(widths) - 1, self.lambda_max) + 1):
            pairs = self._pairs_of_block(l3, 1, widths)
            for l1, l2, first, _ in pairs:
                offsets[(l1, l2, l3)] = offset + first * widths[l3]
            offset += pairs[-1][3] * widths[l3]
        for l1, l2, l3, columns, keep, w in self._order3_layout(tuple(widths)):
            local = torch.arange((columns[1] - columns[0]) * widths[l3]) if keep is None else keep
            index.append(offsets[(l1, l2, l3)] + local)
            weight.append(w)
        return torch.cat(index), torch.cat(weight)

    @lru_cache(maxsize=16)
    def _order3_layout(self, widths: Tuple[int, ...]):
        """The blocks ``(l1 <= l2 <= l3)`` of the shortened ``Phi^3`` (:meth:`order3_reduction`),
        in its order: ``(l1, l2, l3, (first, last)`` columns of the :meth:`WignerKernels.nu2_features` block
        ``(l3, +)``, kept entries of the ``[D, Q_l3]`` block (``None``: all), their weights).
        Kept per ``widths``: the rows of every structure read it."""
        blocks = []
        for l3 in range(min(len(widths) - 1, self.lambda_max) + 1):
            q3 = widths[l3]
            for l1, l2, first, last in self._pairs_of_block(l3, 1, list(widths)):
                if l2 > l3:
                    continue
                q1, q2 = widths[l1], widths[l2]
                if l1 == l2:
                    q, r = torch.triu_indices(q1, q1, 0)
                else:
                    q = torch.arange(q1).repeat_interleave(q2)
                    r = torch.arange(q2).repeat(q1)
                q, r, s = q.repeat_interleave(q3), r.repeat_interleave(q3), torch.arange(q3).repeat(q.shape[0])
                one = torch.ones(q.shape, dtype=torch.float64)
                if l1 < l2 == l3:
                    keep = torch.nonzero(r <= s).flatten()
                    w = (1.5 * torch.where(r < s, 2.0 * one, one)).sqrt()[keep]
                elif l1 == l2 == l3:
                    keep = torch.nonzero(r <= s).flatten()
                    distinct = (q != r).to(torch.float64) + (r != s).to(torch.float64)
                    permutations = torch.where(distinct == 2, 6.0 * one, torch.where(distinct == 1, 3.0 * one, one))
                    w = (permutations / torch.where(q < r, 2.0 * one, one)).sqrt()[keep]
                else:
                    keep = None
                    w = (3.0 * one).sqrt()
                blocks.append((l1, l2, l3, (first, last), keep, w))
        return tuple(blocks)

    def _pairs_of_block(self, lam: int, sigma: int, widths: List[int]) -> List[Tuple[int, int, int, int]]:
        """``(l1, l2, first, last)``: the columns of the ``(l1, l2)`` part of the
        :meth:`WignerKernels.nu2_features` block ``(lambda, sigma)``, in its order."""
        out: List[Tuple[int, int, int, int]] = []
        start = 0
        l_top = min(len(widths) - 1, self.lambda_max)
        for l1 in range(l_top + 1):
            for l2 in range(l1, l_top + 1):
                if lam not in self.coupling_lambdas[l1 * (self.lambda_max + 1) + l2] or parity_sign(l1 + l2 + lam) != sigma:
                    continue
                if l1 < l2:
                    size = widths[l1] * widths[l2]
                else:
                    size = widths[l1] * (widths[l1] + 1) // 2 if lam % 2 == 0 else widths[l1] * (widths[l1] - 1) // 2
                out.append((l1, l2, start, start + size))
                start += size
        return out


# environments per chunk of the nu = 4 collapse: bounds its nu = 2 features held at once
COLLAPSE_CHUNK = 256
# entries of the invariants Phi^nu of the environments that the collapse of nu <= 3 holds at once
COLLAPSE_ENTRIES = 2**24


def _lowered(kernels: WignerKernels) -> WignerHypers:
    """The hyperparameters of ``kernels`` with ``nu_max`` 3 (the orders that fold into vectors)."""
    return WignerHypers(nu_max=3, lambda_max=kernels.lambda_max, channel_weights=kernels.channel_weights)


@lru_cache(maxsize=32)
def _cached(cls, hypers: Tuple, dtype: torch.dtype, device: str):
    return cls(wigner_module(WignerHypers(*hypers), torch.empty(0, dtype=dtype, device=device)))


def order_features_of(hypers: WignerHypers, like: torch.Tensor) -> OrderFeatures:
    """A (cached) :class:`OrderFeatures` on the dtype and device of ``like``."""
    from dataclasses import astuple

    return _cached(OrderFeatures, astuple(hypers), like.dtype, str(like.device))
