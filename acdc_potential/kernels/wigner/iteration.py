"""Wigner kernels: body-ordered equivariant kernels by iteration in kernel space.

Notation (WK, the Wigner-kernel paper, cited by equation number as docs/README.md explains;
the formulas are in docs/equations.md, "nu = 1 Wigner kernel" to "Exponential kernel"). ``a``
and ``b`` are density coefficients of two sets of environments in the layout of
:mod:`acdc_potential.descriptors.density`: a list over ``l`` of ``[n_env, 2l + 1, Q_l]``
tensors, ``m`` stored at ``m + l``. A *pair* is one environment
of ``a`` with one of ``b``. An equivariant kernel between pairs is a set of blocks
``k^{nu, lambda sigma}_{mu mu'}``, one ``[..., 2 lambda + 1, 2 lambda + 1]`` matrix per
pair, ``mu`` indexing the side of ``a`` and ``mu'`` that of ``b``.

- ``nu = 0`` (WK eq. 8): ``delta(a_i, a_i')`` of the central species.
- ``nu = 1`` (WK eq. 7, B1): ``k^{1,l}_{m m'} = kappa_l sum_q a[q l m] b[q l m']``,
  ``sigma = +1`` (:func:`nu1_kernels`), ``kappa_l = 1`` (B1; see "Normalisation" below);
  the species-aware functions set every ``nu >= 1`` kernel to zero across central species.
- Wigner iteration (WK eq. 6, C1, appendix F), for any two equivariant kernels ``x, y``:
  ``k^{lambda sigma}_{mu mu'} = sum C^{l1 l2 lambda}_{m1 m2 mu} C^{l1 l2 lambda}_{m1' m2' mu'}
  x^{l1 s1}_{m1 m1'} y^{l2 s2}_{m2 m2'}`` over ``sigma = s1 s2 (-1)^(l1 + l2 + lambda)``,
  every block truncated at ``lambda <= lambda_max`` (``nu = 1`` blocks included), with
  the real CG of :mod:`acdc_potential.descriptors.cg`. ``k^{nu+1} = iterate(k^nu, k^1)``.
- Invariant contraction: the ``(0, +1)`` block of an iteration only needs ``l1 = l2``,
  ``s1 = s2`` and ``C^{l l 0}_{m m' 0} = +-delta_{m m'} / sqrt(2l + 1)``, so it is a
  Frobenius product ``sum_{l s} <x^{l s}, y^{l s}> / (2l + 1)``.
- Invariant-only path (WK appendix F): full iterations up to ``ceil(nu_max / 2)``, then
  ``k^{nu, 0+} = contract(k^{ceil(nu/2)}, k^{floor(nu/2)})``. Recoupling the final
  ``lambda = 0`` contraction maps the truncation of the intermediate ``k^{ceil(nu/2)}``
  onto that of the full path's partial products, so both paths give the same kernels
  for every ``nu`` (the tests check it; WK expected small differences). The full
  path is kept because it also yields the equivariant blocks.
- Exponential kernel (WK eq. E4): :func:`exponential_kernel`, :func:`exponential_weights`.

Normalisation: B1 gives ``k^1`` the same scale for every ``l`` (``kappa_l = 1``). With it the
plain C1 iteration yields exactly the kernels of WK eq. 5 with the Haar measure normalised to
one (``int dR = 1``): expanding the overlap ``int rho_i(x) rho_i'(R^-1 x) dx = sum_l
<k^{1,l}, D^l(R)>`` and coupling the ``nu`` factors ``D^{l1} D^{l2} = sum C C D^lambda`` is C1
term by term, and ``int D^lambda dR = delta_{lambda 0}``. The pseudoscalar ``(0, -)`` blocks are
the odd part under inversion of one environment. ``tests/test_wigner.py`` checks both against an
SO(3) quadrature of powers of the Gaussian-overlap integral. ``channel_weights:
inverse_dimension`` restores the ``kappa_l = 8 pi^2 / (2l + 1)`` of earlier versions (checkpoints
of format version <= 2): a valid body-ordered kernel that weights the density's ``l`` channels
unevenly at every ``nu >= 2``, not eq. 5. Either way ``k^{nu, lambda sigma}`` is the scalar
product of the ``nu``-body ACDC features (full tensor product, as
:func:`acdc_potential.descriptors.acdc.acdc_features`) of the rescaled coefficients
``kappa_l^(1/2) c[q l m]`` (WK eq. B1, B2); for ``lambda = 0``: ``k^{2,0} = sum_l kappa_l^2 /
(2l + 1) <P_l(a), P_l(b)>`` (docs/equations.md, "Kernels as scalar products of ACDC features
(appendix B)").

Cost (WK appendix D): the radial-chemical index ``q`` appears only in ``k^1``. Each
``(l1, l2)`` coupling is evaluated for all its ``lambda`` at once as three GEMM-shaped
contractions per chunk of pairs: ``x`` times the CG on the right, ``y`` per pair (the
only batched product), the CG on the left per ``lambda``. Iterating a kernel with
itself (``k^2 = iterate(k^1, k^1)``, or ``wigner_iteration(x, x)``) uses the symmetry of
the coupling to skip ``l1 > l2``.

Feature path (float64, ``nu_max <= 4``): by WK appendix B, ``k^{2, lambda sigma}(i, j) =
F_i F_j^T`` with the ``nu = 2`` features of :meth:`WignerKernels.nu2_features`, and the
invariant-only contractions need nothing beyond ``k^1`` and ``k^2``. Evaluated that way,
all pairs of a set of atoms with a set of environments cost one large GEMM per block,
which runs an order of magnitude closer to the machine's peak than the small per-pair
products of the iterations, at more flops per pair (``~(2 lambda + 1)^2 Q^2`` per
coupling); exported models compute the features of their sparse environments once and keep
them. Built on these features, outside this module and outside TorchScript: the per-atom
invariants ``Phi^nu`` whose scalar products are the invariant kernels, and the collapse of
the weighted sums of a ``nu_max <= 4`` model onto per-species tensors
(:mod:`~acdc_potential.kernels.wigner.features`); their derivatives summed over a
structure's atoms, for the fit (:mod:`~acdc_potential.kernels.wigner.gradients`). This
module keeps :meth:`WignerKernels.collapsed_energy`, which evaluates a collapsed model in
the exported file.

Gradients with respect to ``a``: plain autograd keeps every chunk's intermediates (about
25 kB per pair at ``lambda_max = 3``), so outside TorchScript each chunk is checkpointed
(recomputed in the backward pass) when ``a`` requires grad. For a weighted sum over the
second set (energies of a sparse model), :meth:`WignerKernels.weighted_sum` differentiates
chunk by chunk instead, in bounded memory without recomputation and also in TorchScript.

Blocks are keyed by the package's one key convention, the integer ``2 lambda + (sigma < 0)``
of :func:`~acdc_potential.descriptors.cg.block_key` (TorchScript has no tuple-keyed
dictionaries). The tuple ``(lambda, sigma)`` is only how the Python-level helper functions
(:func:`wigner_iteration`, :func:`equivariant_kernels`) present their blocks.
"""

import math
from dataclasses import astuple, dataclass
from functools import lru_cache
from typing import Dict, List, Optional, Tuple

import torch

from ...descriptors.cg import ClebschGordanCache, block_key, coupled_lambdas, key_lambda, key_sigma, parity_sign


@dataclass
class WignerHypers:
    """Hyperparameters of the Wigner kernels.

    :param nu_max: largest correlation order ``nu`` (body order ``nu + 1``), default 4.
    :param lambda_max: truncation of every equivariant block, ``lambda <= lambda_max``,
        default 3 (the ``nu = 1`` kernels use ``l <= min(l_max, lambda_max)``).
    :param invariant_only: compute the invariant kernels by the invariant-only path of
        WK appendix F (default ``True``) instead of the full iterations: same kernels,
        about 3 times cheaper at ``nu_max = 4``.
    :param chunk_size: number of pairs evaluated at once (rows of ``a`` against at most
        ``chunk_size`` environments of ``b``), default 2048: small enough for the
        intermediates (``O(chunk_size * lambda_max^4)``) to stay in cache, which was
        measured to be faster than larger chunks.
    :param checkpoint: when ``a`` requires gradients (outside TorchScript), recompute each
        chunk during the backward pass instead of keeping its intermediates, so that
        memory stays bounded for any number of pairs (default ``True``).
    :param channel_weights: the scale ``kappa_l`` of each ``l`` channel of ``k^1``:
        ``uniform`` (default, ``kappa_l = 1``, WK eq. B1: the kernels of eq. 5) or
        ``inverse_dimension`` (``8 pi^2 / (2l + 1)``, what models of checkpoint format
        version <= 2 were fitted with; see the module's "Normalisation").
    """

    nu_max: int = 4
    lambda_max: int = 3
    invariant_only: bool = True
    chunk_size: int = 2048
    checkpoint: bool = True
    channel_weights: str = "uniform"

    def validate(self):
        if self.nu_max < 0 or self.lambda_max < 0 or self.chunk_size < 1:
            raise ValueError(f"need nu_max >= 0, lambda_max >= 0, chunk_size >= 1, got {self}")
        if self.channel_weights not in CHANNEL_WEIGHTS:
            raise ValueError(f"channel_weights must be one of {sorted(CHANNEL_WEIGHTS)}, got {self.channel_weights!r}")

    def channel_scales(self) -> List[float]:
        """``kappa_l`` for ``l = 0..lambda_max``."""
        return [CHANNEL_WEIGHTS[self.channel_weights](l) for l in range(self.lambda_max + 1)]


CHANNEL_WEIGHTS = {
    "uniform": lambda l: 1.0,
    "inverse_dimension": lambda l: 8.0 * math.pi**2 / (2 * l + 1),
}


class WignerKernels(torch.nn.Module):
    """Batched, TorchScript-compatible evaluation of Wigner kernels.

    Holds the CG matrices of every coupling ``l1, l2 <= lambda_max`` in one flat buffer,
    laid out for the three contractions of :meth:`iterate`. ``forward`` gives the
    invariant kernels ``[nu_max + 1, n_a, n_b]`` (see :func:`invariant_kernels`).

    :param hypers: :class:`WignerHypers`.
    :param dtype: floating-point type of the CG buffer (move with ``.to()``).
    """

    def __init__(self, hypers: WignerHypers, dtype: torch.dtype = torch.float64):
        super().__init__()
        hypers.validate()
        self.nu_max = int(hypers.nu_max)
        self.lambda_max = int(hypers.lambda_max)
        self.invariant_only = bool(hypers.invariant_only)
        self.chunk_size = int(hypers.chunk_size)
        self.checkpoint = bool(hypers.checkpoint)
        self.channel_weights = str(hypers.channel_weights)
        self.channel_scales: List[float] = hypers.channel_scales()

        cache = ClebschGordanCache(torch.float64)
        pieces: List[torch.Tensor] = []
        offset = 0
        # per (l1, l2) at index l1 * (lambda_max + 1) + l2: the lambdas, the offset of the
        # right matrix [2 l1 + 1, (2 l2 + 1) M] and of one left matrix [2 lambda + 1,
        # (2 l2 + 1)(2 l1 + 1)] per lambda; M = sum over lambda of 2 lambda + 1
        coupling_lambdas: List[List[int]] = []
        right_offsets: List[int] = []
        left_offsets: List[List[int]] = []
        for l1 in range(self.lambda_max + 1):
            for l2 in range(self.lambda_max + 1):
                lambdas = coupled_lambdas(l1, l2, self.lambda_max)
                cgs = [cache[(l1, l2, lam)] for lam in lambdas]
                right = torch.cat(cgs, dim=2).reshape(2 * l1 + 1, -1)
                coupling_lambdas.append(lambdas)
                right_offsets.append(offset)
                pieces.append(right.reshape(-1))
                offset += right.numel()
                lefts: List[int] = []
                for cg in cgs:
                    lefts.append(offset)
                    left = cg.permute(2, 1, 0).reshape(-1)
                    pieces.append(left)
                    offset += left.numel()
                left_offsets.append(lefts)
        self.coupling_lambdas = coupling_lambdas
        self.right_offsets = right_offsets
        self.left_offsets = left_offsets
        self.register_buffer("cg_flat", torch.cat(pieces).to(dtype))

    def _right(self, l1: int, l2: int) -> torch.Tensor:
        index = l1 * (self.lambda_max + 1) + l2
        columns = 0
        for lam in self.coupling_lambdas[index]:
            columns += 2 * lam + 1
        start = self.right_offsets[index]
        size = (2 * l1 + 1) * (2 * l2 + 1) * columns
        return self.cg_flat[start : start + size].view(2 * l1 + 1, (2 * l2 + 1) * columns)

    def _cg_block(self, l1: int, l2: int, lam: int) -> torch.Tensor:
        """``C^{l1 l2 lambda}`` ``[2 l1 + 1, 2 l2 + 1, 2 lambda + 1]``, a view of :meth:`_right`."""
        w1 = 2 * l1 + 1
        w2 = 2 * l2 + 1
        right = self._right(l1, l2)
        start = 0
        for other in self.coupling_lambdas[l1 * (self.lambda_max + 1) + l2]:
            if other == lam:
                break
            start += 2 * other + 1
        return right.view(w1, w2, right.shape[1] // w2)[:, :, start : start + 2 * lam + 1]

    def _left(self, l1: int, l2: int, position: int) -> torch.Tensor:
        index = l1 * (self.lambda_max + 1) + l2
        lam = self.coupling_lambdas[index][position]
        start = self.left_offsets[index][position]
        size = (2 * lam + 1) * (2 * l1 + 1) * (2 * l2 + 1)
        return self.cg_flat[start : start + size].view(2 * lam + 1, (2 * l2 + 1) * (2 * l1 + 1))

    def nu1(self, a: List[torch.Tensor], b: List[torch.Tensor]) -> Dict[int, torch.Tensor]:
        """``k^{1,l}`` of all pairs (WK eq. B1), keyed by :func:`block_key` ``(l, +1)``.

        :param a: ``[n_a, 2l + 1, Q_l]`` per ``l``; :param b: ``[n_b, 2l + 1, Q_l]`` per ``l``.
        :return: ``[n_a * n_b, 2l + 1, 2l + 1]`` per ``l <= min(l_max, lambda_max)``, pair
            ``i * n_b + j``, no central-species delta.
        """
        out: Dict[int, torch.Tensor] = {}
        n_pairs = a[0].shape[0] * b[0].shape[0]
        for key, k in self._nu1_grid(a, b).items():
            width = k.shape[1]
            out[key] = k.transpose(1, 2).reshape(n_pairs, width, width)
        return out

    def _nu1_grid(self, a: List[torch.Tensor], b: List[torch.Tensor]) -> Dict[int, torch.Tensor]:
        """``k^{1,l}`` of all pairs laid out ``[n_a, 2l + 1, n_b, 2l + 1]`` (one GEMM per ``l``)."""
        out: Dict[int, torch.Tensor] = {}
        n_a = a[0].shape[0]
        n_b = b[0].shape[0]
        for l in range(min(len(a), len(b), self.lambda_max + 1)):
            width = 2 * l + 1
            k = a[l].reshape(n_a * width, -1) @ b[l].reshape(n_b * width, -1).T
            out[block_key(l, 1)] = k.view(n_a, width, n_b, width) * self.channel_scales[l]
        return out

    def nu1_matched(self, a: List[torch.Tensor], b: List[torch.Tensor]) -> Dict[int, torch.Tensor]:
        """``k^{1,l}`` of matched rows, pair ``p`` = ``(a[p], b[p])`` (both ``[P, 2l + 1, Q_l]``
        per ``l``): ``[P, 2l + 1, 2l + 1]`` per ``l <= min(l_max, lambda_max)``, as :meth:`nu1`.
        Giving each pair its own copy of ``a`` yields every per-pair gradient in one pass."""
        out: Dict[int, torch.Tensor] = {}
        for l in range(min(len(a), len(b), self.lambda_max + 1)):
            out[block_key(l, 1)] = torch.bmm(a[l], b[l].transpose(1, 2)) * self.channel_scales[l]
        return out

    def iterate(
        self, x: Dict[int, torch.Tensor], y: Dict[int, torch.Tensor], symmetric: bool, only: int = -1
    ) -> Dict[int, torch.Tensor]:
        """Generalised Wigner iteration (WK eq. C1, appendix F) of two equivariant kernels.

        :param x: blocks ``[P, 2 l1 + 1, 2 l1 + 1]`` keyed by :func:`block_key`.
        :param y: blocks ``[P, 2 l2 + 1, 2 l2 + 1]``, same pairs.
        :param symmetric: ``y`` is ``x``: the ``(l2, l1)`` coupling then equals the
            ``(l1, l2)`` one (the sign of ``C^{l2 l1}`` cancels in ``C C``) and is skipped.
        :param only: a :func:`block_key`: return that block only, skipping the couplings
            that cannot reach it (the final coupling of a tensorial target); -1: all.
        :return: blocks ``[P, 2 lambda + 1, 2 lambda + 1]`` for ``lambda <= lambda_max``.
        """
        out: Dict[int, torch.Tensor] = {}
        x_keys = sorted(x.keys())
        y_keys = sorted(y.keys())
        for kx in x_keys:
            for ky in y_keys:
                if symmetric and ky < kx:
                    continue
                weight = 2.0 if symmetric and ky > kx else 1.0
                l1 = key_lambda(kx)
                l2 = key_lambda(ky)
                if l1 > self.lambda_max or l2 > self.lambda_max:
                    continue
                parity = key_sigma(kx) * key_sigma(ky)
                if only >= 0 and not _reaches(l1, l2, parity, only):
                    continue
                for position, block in enumerate(self._couple(x[kx], y[ky], l1, l2)):
                    lam = self.coupling_lambdas[l1 * (self.lambda_max + 1) + l2][position]
                    key = block_key(lam, parity * parity_sign(l1 + l2 + lam))
                    if only >= 0 and key != only:
                        continue
                    if weight != 1.0:
                        block = block * weight
                    if key in out:
                        out[key] = out[key] + block
                    else:
                        out[key] = block
        return out

    def _couple(self, x: torch.Tensor, y: torch.Tensor, l1: int, l2: int) -> List[torch.Tensor]:
        """All ``lambda`` blocks of the ``(l1, l2)`` coupling of ``x`` ``[P, 2l1+1, 2l1+1]``
        and ``y`` ``[P, 2l2+1, 2l2+1]``; one ``[P, 2 lambda + 1, 2 lambda + 1]`` per
        ``lambda`` of ``coupling_lambdas``."""
        n_pairs = x.shape[0]
        w1 = 2 * l1 + 1
        w2 = 2 * l2 + 1
        right = self._right(l1, l2)
        columns = right.shape[1] // w2
        # t[p, m1, m2', mu'] = sum_m1' x[p, m1, m1'] C[m1', m2', mu']: one GEMM over p m1
        t = (x.reshape(n_pairs * w1, w1) @ right).view(n_pairs, w1, w2, columns)
        # u[p, m2, m1, mu'] = sum_m2' y[p, m2, m2'] t[p, m1, m2', mu']: the batched product
        t = t.transpose(1, 2).reshape(n_pairs, w2, w1 * columns)
        u = torch.bmm(y, t).view(n_pairs, w2 * w1, columns)
        lambdas = self.coupling_lambdas[l1 * (self.lambda_max + 1) + l2]
        # split rather than slice: the backward of a slice fills a zero tensor of u's size
        parts = torch.split(u, [2 * lam + 1 for lam in lambdas], dim=2)
        blocks: List[torch.Tensor] = []
        for position, part in enumerate(parts):
            # k[p, mu, mu'] = sum_{m2 m1} C[m1, m2, mu] u[p, m2, m1, mu']
            blocks.append(torch.matmul(self._left(l1, l2, position), part))
        return blocks

    @torch.jit.export
    def nu2_features(self, a: List[torch.Tensor]) -> Dict[int, torch.Tensor]:
        """``nu = 2`` features whose scalar products are the ``nu = 2`` kernels (WK appendix B).

        :param a: density coefficients ``[n, 2l + 1, Q_l]`` per ``l``.
        :return: ``F^{lambda sigma}`` ``[n, 2 lambda + 1, D]`` keyed by :func:`block_key`, such
            that ``k^{2, lambda sigma}_{mu mu'}(i, j) = sum_d F_i[mu, d] F_j[mu', d]`` for the
            kernels of :meth:`iterate` ``(k^1, k^1)``; only the blocks the invariant
            kernels up to ``nu_max`` use (:meth:`_needs_k2_block`).

        ``F[mu, (l1 l2 q r)] = sum_{m1 m2} C^{l1 l2 lambda}_{m1 m2 mu} a~[q l1 m1] a~[r l2 m2]``
        with ``a~ = kappa_l^(1/2) a`` (B1), ``sigma = (-1)^(l1 + l2 + lambda)``.
        Swapping ``(l1, q)`` and ``(l2, r)`` changes ``F`` by the sign of the CG only, so only
        ``l1 <= l2`` is kept (times ``sqrt 2`` for ``l1 < l2``) and, for ``l1 = l2``, the
        pairs ``q <= r`` of the symmetric (``lambda`` even) and ``q < r`` of the
        antisymmetric (``lambda`` odd) blocks, off-diagonal ones times ``sqrt 2``.
        """
        pieces: Dict[int, List[torch.Tensor]] = {}
        n = a[0].shape[0]
        l_top = min(len(a) - 1, self.lambda_max)
        scaled = [a[l] * math.sqrt(self.channel_scales[l]) for l in range(l_top + 1)]
        for l1 in range(l_top + 1):
            for l2 in range(l1, l_top + 1):
                w1 = 2 * l1 + 1
                w2 = 2 * l2 + 1
                q1 = scaled[l1].shape[2]
                q2 = scaled[l2].shape[2]
                cg_blocks: List[torch.Tensor] = []
                lambdas: List[int] = []
                for lam in self.coupling_lambdas[l1 * (self.lambda_max + 1) + l2]:
                    if self._needs_k2_block(lam, parity_sign(l1 + l2 + lam)):
                        lambdas.append(lam)
                        cg_blocks.append(self._cg_block(l1, l2, lam))
                if len(lambdas) == 0:
                    continue
                cg = torch.cat(cg_blocks, dim=2)
                columns = cg.shape[2]
                # y[n, r, m1, L] = sum_m2 a~[n, m2, r] C[m1, m2, L]
                cg = cg.transpose(0, 1).reshape(w2, w1 * columns)
                y = (scaled[l2].transpose(1, 2).reshape(n * q2, w2) @ cg).view(n, q2, w1, columns)
                # x[n, q, r, L] = sum_m1 a~[n, m1, q] y[n, r, m1, L]
                y = y.transpose(1, 2).reshape(n, w1, q2 * columns)
                x = torch.bmm(scaled[l1].transpose(1, 2), y).view(n, q1, q2, columns).permute(0, 3, 1, 2)
                for lam, part in zip(lambdas, torch.split(x, [2 * lam + 1 for lam in lambdas], dim=1)):
                    if l1 < l2:
                        block = part.reshape(n, 2 * lam + 1, q1 * q2) * math.sqrt(2.0)
                    else:
                        block = self._triangle(part, lam % 2)
                    key = block_key(lam, parity_sign(l1 + l2 + lam))
                    if key in pieces:
                        pieces[key].append(block)
                    else:
                        pieces[key] = [block]
        out: Dict[int, torch.Tensor] = {}
        for key, blocks in pieces.items():
            out[key] = torch.cat(blocks, dim=2)
        return out

    def _needs_k2_block(self, lam: int, sigma: int) -> bool:
        """Whether the invariant kernels up to ``nu_max`` use the ``k^{2, lambda sigma}`` block:
        ``k^2`` is its ``(0, +)`` block, ``k^3 = <k^2, k^1>`` reads the ``(l, +)`` ones (``k^1``
        has ``sigma = +1`` only) and ``k^4 = <k^2, k^2>`` all of them."""
        if self.nu_max >= 4:
            return True
        if self.nu_max == 3:
            return sigma > 0
        return lam == 0 and sigma > 0

    @staticmethod
    def _triangle(x: torch.Tensor, offset: int) -> torch.Tensor:
        """Pairs ``q <= r`` (``offset = 0``) or ``q < r`` (1) of ``x`` ``[n, w, Q, Q]`` ->
        ``[n, w, P]``, off-diagonal entries times ``sqrt 2``."""
        size = x.shape[2]
        index = torch.triu_indices(size, size, offset, device=x.device)
        scale = torch.full((index.shape[1],), math.sqrt(2.0), dtype=x.dtype, device=x.device)
        scale = scale.masked_fill(index[0] == index[1], 1.0)
        return x.reshape(x.shape[0], x.shape[1], size * size)[:, :, index[0] * size + index[1]] * scale

    @torch.jit.export
    def invariants_from_features(
        self, a: List[torch.Tensor], fa: Dict[int, torch.Tensor], b: List[torch.Tensor], fb: Dict[int, torch.Tensor]
    ) -> torch.Tensor:
        """``k^{nu, 0+}`` ``[nu_max, n_a, n_b]`` for ``nu = 1..nu_max <= 4`` of all pairs,
        without central-species delta, from the coefficients and :meth:`nu2_features`.

        ``k^2`` blocks are the products ``F_a F_b^T`` (large GEMMs, independent of the pair
        count per atom otherwise); ``nu = 3, 4`` follow by the invariant-only contractions
        ``<k^2, k^1>`` and ``<k^2, k^2>`` (appendix F). Equal to :meth:`invariant_pairs`.
        """
        n_a = a[0].shape[0]
        n_b = b[0].shape[0]
        k1 = self._nu1_grid(a, b)
        rows: List[torch.Tensor] = [k1[block_key(0, 1)][:, 0, :, 0]]
        if self.nu_max >= 2:
            k2: Dict[int, torch.Tensor] = {}
            for key in sorted(fa.keys()):
                width = 2 * key_lambda(key) + 1
                k = fa[key].reshape(n_a * width, -1) @ fb[key].reshape(n_b * width, -1).T
                k2[key] = k.view(n_a, width, n_b, width)
            rows.append(k2[block_key(0, 1)][:, 0, :, 0])
            if self.nu_max >= 3:
                rows.append(self.contract(k2, k1, 3))
            if self.nu_max >= 4:
                rows.append(self.contract(k2, k2, 3))
        return torch.stack(rows)

    @torch.jit.export
    def invariant_features(self, a: List[torch.Tensor], features: Dict[int, torch.Tensor]) -> List[torch.Tensor]:
        """Per-atom invariants ``Phi^nu`` ``[n, d_nu]`` for ``nu = 1..min(nu_max, 3)`` whose scalar
        products are the kernels, ``k^{nu, 0+}(i, j) = <Phi^nu_i, Phi^nu_j>`` (no central-species delta).

        With ``F`` the :meth:`nu2_features` (``features``, of ``a``) and ``kappa_l`` the channel scales
        of ``k^1``: ``Phi^1 = kappa_0^(1/2) a^0``, ``Phi^2 = F^{0+}`` and ``Phi^3 = (kappa_l / (2l +
        1))^(1/2) F^{l+ T} a^l`` over ``l`` (``k^3 = <k^2, k^1>``: ``F^T a`` contracts ``mu``), of
        ``Q^3`` entries and more (meant for few species or radial channels).

        :param a: density coefficients ``[n, 2l + 1, Q_l]`` per ``l``.
        """
        n = a[0].shape[0]
        out: List[torch.Tensor] = []
        if self.nu_max >= 1:
            out.append(a[0][:, 0, :] * math.sqrt(self.channel_scales[0]))
        if self.nu_max >= 2:
            out.append(features[block_key(0, 1)][:, 0, :])
        if self.nu_max >= 3:
            orders = self._collapsed_orders(a, features)
            sizes: List[int] = [features[block_key(l, 1)].shape[2] * a[l].shape[2] for l in orders]
            # filled in place: for many environments this is the largest tensor of a fit
            phi = a[0].new_empty((n, sum(sizes)))
            offset = 0
            for l, size in zip(orders, sizes):
                scaled = a[l] * math.sqrt(self.channel_scales[l] / (2 * l + 1))
                phi[:, offset : offset + size] = torch.bmm(features[block_key(l, 1)].transpose(1, 2), scaled).reshape(n, size)
                offset += size
            out.append(phi)
        return out

    def _collapsed_orders(self, coefficients: List[torch.Tensor], features: Dict[int, torch.Tensor]) -> List[int]:
        """The ``l`` of the ``nu = 3`` terms ``<k^{2, l+}, k^{1, l}>`` (those with both blocks)."""
        orders: List[int] = []
        if self.nu_max >= 3:
            for l in range(min(len(coefficients), self.lambda_max + 1)):
                if block_key(l, 1) in features:
                    orders.append(l)
        return orders

    @torch.jit.export
    def collapsed_energy(self, a: List[torch.Tensor], species: torch.Tensor, collapsed: List[torch.Tensor]) -> torch.Tensor:
        """``[n]`` energies ``e_i = sum_j sum_nu weights[nu, j] k^nu(a_i, b_j)`` (same species) from
        :meth:`~acdc_potential.kernels.wigner.features.OrderFeatures.collapse`: cost per atom
        independent of the number of environments ``b_j``.

        ``<Phi^3_i, W^3>`` is evaluated as ``sum_l <F^{l+}_i, a^l_i W^3_l^T>`` (``W^3_l`` the
        ``[D_l, Q_l]`` part of ``W^3``), and ``<Phi^4_i, W^4>`` as ``sum_blocks <F_i W^{4, lambda
        sigma}, F_i>``, or ``sum_blocks sum_k s_k |F_i v_k|^2`` where a block keeps ``W = V
        diag(s) V^T``; neither builds ``Phi^3`` or ``Phi^4`` of the atoms."""
        energy = collapsed[0][species]
        if self.nu_max >= 1:
            energy = energy + (a[0][:, 0, :] * collapsed[1][species]).sum(dim=1) * math.sqrt(self.channel_scales[0])
        if self.nu_max >= 2:
            features = self.nu2_features(a)
            energy = energy + (features[block_key(0, 1)][:, 0, :] * collapsed[2][species]).sum(dim=1)
            orders = self._collapsed_orders(a, features)
            present = torch.unique(species)
            for index in range(present.shape[0]):
                atoms = torch.nonzero(species == present[index]).flatten()
                s = int(present[index])
                start = 0
                for l in orders:
                    f = features[block_key(l, 1)].index_select(0, atoms)
                    width = a[l].shape[2]
                    size = f.shape[2] * width
                    w3 = collapsed[3][s][start : start + size].view(f.shape[2], width)
                    start += size
                    projected = a[l].index_select(0, atoms) @ w3.T
                    term = (projected * f).sum(dim=(1, 2)) * math.sqrt(self.channel_scales[l] / (2 * l + 1))
                    energy = energy.index_add(0, atoms, term)
                if self.nu_max >= 4:
                    position = 4
                    for key in sorted(features.keys()):
                        f = features[key].index_select(0, atoms)
                        d = f.shape[2]
                        rows = f.reshape(-1, d)
                        projected = rows @ collapsed[position][s]
                        values = collapsed[position + 1][s]
                        if values.shape[0] == 0:  # the matrix W itself
                            term = (projected * rows).sum(dim=1)
                        else:  # its eigenvectors V, W = V diag(values) V^T
                            term = (projected * projected) @ values
                        energy = energy.index_add(0, atoms, term.view(f.shape[0], f.shape[1]).sum(dim=1))
                        position += 2
        return energy

    def contract(self, x: Dict[int, torch.Tensor], y: Dict[int, torch.Tensor], mu_prime_dim: int = 2) -> torch.Tensor:
        """``(0, +1)`` block of ``iterate(x, y)``: ``sum_{l s} <x^{ls}, y^{ls}>_F / (2l + 1)``.

        Blocks ``[P, 2l + 1, 2l + 1]`` give ``[P]``; blocks laid out ``[n_a, 2l + 1, n_b,
        2l + 1]`` with ``mu_prime_dim = 3`` give ``[n_a, n_b]``."""
        terms: List[torch.Tensor] = []
        for key in sorted(x.keys()):
            if key in y:
                terms.append((x[key] * y[key]).sum(dim=[1, mu_prime_dim]) / (2 * key_lambda(key) + 1))
        return torch.stack(terms).sum(dim=0)

    def equivariant_pairs(self, a: List[torch.Tensor], b: List[torch.Tensor], nu_max: int) -> List[Dict[int, torch.Tensor]]:
        """Full-path kernels ``k^nu`` for ``nu = 1..nu_max`` (index ``nu - 1``) of all pairs of
        ``a`` and ``b`` (pair ``i * n_b + j``), without central-species delta (WK eq. C1)."""
        return self.equivariant_from_nu1(self.nu1(a, b), nu_max)

    def equivariant_from_nu1(self, k1: Dict[int, torch.Tensor], nu_max: int) -> List[Dict[int, torch.Tensor]]:
        """``[k^1, ..., k^nu_max]`` by Wigner iterations (WK eq. C1) from the ``k^1`` blocks
        ``[P, 2l + 1, 2l + 1]`` (at least ``k^1`` is returned)."""
        kernels: List[Dict[int, torch.Tensor]] = [k1]
        for nu in range(2, nu_max + 1):
            kernels.append(self.iterate(kernels[-1], k1, nu == 2))
        return kernels

    @torch.jit.export
    def equivariant_block(self, a: List[torch.Tensor], b: List[torch.Tensor], key: int) -> torch.Tensor:
        """The block ``key`` = :func:`block_key` ``(lambda, sigma)`` of ``k^nu``, ``nu = 1..nu_max``,
        of all pairs of ``a`` and ``b``, without central-species delta: ``[nu_max, n_a, n_b, 2 lambda + 1,
        2 lambda + 1]``, ``mu`` (of ``a``) before ``mu'``. All pairs at once: callers cut ``a`` into chunks
        of about ``chunk_size`` pairs.

        Every order is ``k^nu = iterate(k^{ceil(nu/2)}, k^{floor(nu/2)})`` (WK eq. C1, appendix F): every
        block for the orders up to ``ceil(nu_max / 2)``, which the higher ones need, and for those only the
        couplings that reach the block (``k^4`` from ``k^2 k^2``: 1.7 times cheaper than ``k^3 k^1``, which
        needs every block of ``k^3``). Orders of coupling differ only by the truncation of the intermediate
        blocks at ``lambda_max``; this one makes ``k^nu`` the same whatever ``nu_max`` (a fit that chooses its
        order among the pieces of a larger one exports the same kernel).
        """
        n_a = a[0].shape[0]
        n_b = b[0].shape[0]
        width = 2 * key_lambda(key) + 1
        k1 = self.nu1(a, b)
        full: List[Dict[int, torch.Tensor]] = [k1]
        for nu in range(2, (self.nu_max + 1) // 2 + 1):
            high = (nu + 1) // 2
            full.append(self.iterate(full[high - 1], full[nu - high - 1], high == nu - high))
        blocks: List[torch.Tensor] = []
        for nu in range(1, self.nu_max + 1):
            if nu <= len(full):
                current = full[nu - 1]
            else:
                high = (nu + 1) // 2
                current = self.iterate(full[high - 1], full[nu - high - 1], high == nu - high, key)
            if key in current:
                blocks.append(current[key].view(n_a, n_b, width, width))
            else:
                blocks.append(a[0].new_zeros((n_a, n_b, width, width)))
        return torch.stack(blocks)

    @torch.jit.export
    def equivariant_weighted_sum(
        self, a: List[torch.Tensor], species_a: torch.Tensor, b: List[torch.Tensor], species_b: torch.Tensor, weights: torch.Tensor, key: int
    ) -> torch.Tensor:
        """``t_{i mu} = sum_nu sum_j sum_mu' k^{nu, lambda sigma}_{mu mu'}(a_i, b_j) weights[nu - 1, j, mu']``
        over the ``b_j`` of ``a_i``'s central species: ``[n_a, 2 lambda + 1]`` (block ``key``).

        :param weights: ``[nu_max, n_b, 2 lambda + 1]``, e.g. E4 coefficients over order scales
            times regression weights. Chunks of about ``chunk_size`` pairs; no graph is kept
            between chunks only when the caller disables gradients.
        """
        width = 2 * key_lambda(key) + 1
        out = a[0].new_zeros((species_a.shape[0], width))
        present: List[int] = torch.unique(species_a).tolist()
        for z in present:
            rows = torch.nonzero(species_a == z).flatten()
            columns = torch.nonzero(species_b == z).flatten()
            if columns.numel() == 0:
                continue
            b_z = [c.index_select(0, columns) for c in b]
            w_z = weights.index_select(1, columns)
            step = max(1, self.chunk_size // columns.numel())
            for start in range(0, rows.numel(), step):
                chunk = rows[start : start + step]
                block = self.equivariant_block([c.index_select(0, chunk) for c in a], b_z, key)
                out = out.index_add(0, chunk, torch.einsum("vnmab,vmb->na", block, w_z))
        return out

    def invariant_pairs(self, a: List[torch.Tensor], b: List[torch.Tensor]) -> torch.Tensor:
        """Invariant kernels ``[nu_max, n_a * n_b]`` for ``nu = 1..nu_max`` of all pairs,
        without central-species delta, by the path selected in the hypers."""
        return self.invariants_from_nu1(self.nu1(a, b))

    def invariant_matched(self, a: List[torch.Tensor], b: List[torch.Tensor]) -> torch.Tensor:
        """Invariant kernels ``[nu_max, P]`` of matched rows (see :meth:`nu1_matched`),
        without central-species delta."""
        return self.invariants_from_nu1(self.nu1_matched(a, b))

    def invariants_from_nu1(self, k1: Dict[int, torch.Tensor]) -> torch.Tensor:
        """``k^{nu, 0+}`` ``[nu_max, P]`` for ``nu = 1..nu_max`` from the ``k^1`` blocks of
        ``P`` pairs, by the invariant-only or the full path."""
        n_pairs = k1[block_key(0, 1)].shape[0]
        if self.nu_max == 0:
            return torch.zeros((0, n_pairs), dtype=k1[block_key(0, 1)].dtype, device=k1[block_key(0, 1)].device)
        return torch.stack(self.invariant_rows_from_nu1(k1))

    def invariant_rows_from_nu1(self, k1: Dict[int, torch.Tensor]) -> List[torch.Tensor]:
        """As :meth:`invariants_from_nu1`, one ``[P]`` tensor per ``nu``: unstacked, so that
        the gradient of one order does not push zeros through the graphs of the others."""
        if self.invariant_only:
            n_full = (self.nu_max + 1) // 2
        else:
            n_full = self.nu_max - 1
        kernels = self.equivariant_from_nu1(k1, n_full)
        invariant_key = block_key(0, 1)
        rows: List[torch.Tensor] = []
        for nu in range(1, self.nu_max + 1):
            if nu <= len(kernels):
                rows.append(kernels[nu - 1][invariant_key][:, 0, 0])
            elif self.invariant_only:
                rows.append(self.contract(kernels[(nu + 1) // 2 - 1], kernels[nu // 2 - 1]))
            else:
                rows.append(self.contract(kernels[nu - 2], kernels[0]))
        return rows

    def _chunk(self, a_rows: List[torch.Tensor], b: List[torch.Tensor]) -> torch.Tensor:
        """``[nu_max, rows, n_b]`` invariant kernels of one chunk of rows of ``a``."""
        return self.invariant_pairs(a_rows, b).view(self.nu_max, a_rows[0].shape[0], b[0].shape[0])

    @torch.jit.unused
    def _checkpointed_chunk(self, a_rows: List[torch.Tensor], b: List[torch.Tensor]) -> torch.Tensor:
        return _RecomputedChunk.apply(self, len(a_rows), *a_rows, *b)

    def use_features(self, dtype: torch.dtype) -> bool:
        """Whether chunks go through :meth:`invariants_from_features`: it covers
        ``nu_max <= 4``, and only in float64: the long scalar products of the features
        (thousands of terms) double the float32 rounding error of the kernels, which
        breaks the 1e-5 relative agreement of float32 exports, so float32 keeps the
        kernel-space iterations."""
        return self.nu_max <= 4 and dtype == torch.float64

    def _chunks(
        self, species_a: torch.Tensor, species_b: torch.Tensor, max_width: int
    ) -> Tuple[List[torch.Tensor], List[torch.Tensor], List[int]]:
        """Chunks covering every same-species pair with at most ``chunk_size`` pairs (at
        least one row) each: column blocks of at most ``max_width`` columns (indices into
        ``b``), row chunks (indices into ``a``) and, per row chunk, the position of its
        column block."""
        column_blocks: List[torch.Tensor] = []
        row_chunks: List[torch.Tensor] = []
        chunk_blocks: List[int] = []
        central_species = torch.unique(species_a)
        for index in range(central_species.shape[0]):
            species = central_species[index]
            rows = torch.nonzero(species_a == species).flatten()
            columns = torch.nonzero(species_b == species).flatten()
            if columns.shape[0] == 0:
                continue
            width = min(columns.shape[0], max_width)
            step = max(1, self.chunk_size // width)
            for column_start in range(0, columns.shape[0], width):
                column_blocks.append(columns[column_start : column_start + width])
                for start in range(0, rows.shape[0], step):
                    row_chunks.append(rows[start : start + step])
                    chunk_blocks.append(len(column_blocks) - 1)
        return column_blocks, row_chunks, chunk_blocks

    @staticmethod
    def _select_features(features: Dict[int, torch.Tensor], columns: torch.Tensor) -> Dict[int, torch.Tensor]:
        """Rows ``columns`` (sorted) of every feature block, as views when they are contiguous."""
        start = int(columns[0])
        count = columns.shape[0]
        contiguous = int(columns[-1]) - start + 1 == count
        out: Dict[int, torch.Tensor] = {}
        for key, value in features.items():
            out[key] = value.narrow(0, start, count) if contiguous else value.index_select(0, columns)
        return out

    def _chunk_values(
        self, a_rows: List[torch.Tensor], b_block: List[torch.Tensor], fb_block: Dict[int, torch.Tensor]
    ) -> torch.Tensor:
        """``[nu_max, rows, columns]`` invariant kernels of one chunk, from features when exact."""
        if self.use_features(a_rows[0].dtype):
            return self.invariants_from_features(a_rows, self.nu2_features(a_rows), b_block, fb_block)
        return self._chunk(a_rows, b_block)

    def forward(
        self,
        a: List[torch.Tensor],
        species_a: torch.Tensor,
        b: List[torch.Tensor],
        species_b: torch.Tensor,
        b_features: Optional[Dict[int, torch.Tensor]] = None,
    ) -> torch.Tensor:
        """Invariant kernels ``[nu_max + 1, n_a, n_b]``, see :func:`invariant_kernels`.

        For ``nu_max <= 4`` in float64 by the ``nu = 2`` features (column blocks of at most 256
        environments bound their memory; ``b_features``, :meth:`nu2_features` of ``b``, saves
        computing them); above, by kernel-space iterations in chunks, checkpointed when ``a``
        requires gradients outside TorchScript."""
        n_a = species_a.shape[0]
        n_b = species_b.shape[0]
        same = (species_a.unsqueeze(1) == species_b.unsqueeze(0)).to(a[0].dtype)
        if self.nu_max == 0:
            return same.unsqueeze(0)
        track = torch.is_grad_enabled() and any([c.requires_grad for c in a])
        features = self.use_features(a[0].dtype)
        column_blocks, row_chunks, chunk_blocks = self._chunks(species_a, species_b, 256 if features else self.chunk_size)
        # sliced once and shared by the row chunks, so that checkpoints keep a single copy
        b_blocks = [[c.index_select(0, columns) for c in b] for columns in column_blocks]
        fb_blocks: List[Dict[int, torch.Tensor]] = []
        for columns, block in zip(column_blocks, b_blocks):
            if not features:
                empty: Dict[int, torch.Tensor] = {}
                fb_blocks.append(empty)
            elif b_features is None:
                fb_blocks.append(self.nu2_features(block))
            else:
                fb_blocks.append(self._select_features(b_features, columns))
        values: List[torch.Tensor] = []
        positions: List[torch.Tensor] = []
        for rows, block in zip(row_chunks, chunk_blocks):
            a_rows = [c.index_select(0, rows) for c in a]
            if track and self.checkpoint and not features and not torch.jit.is_scripting():
                values.append(self._checkpointed_chunk(a_rows, b_blocks[block]).reshape(self.nu_max, -1))
            else:
                values.append(self._chunk_values(a_rows, b_blocks[block], fb_blocks[block]).reshape(self.nu_max, -1))
            positions.append((rows.unsqueeze(1) * n_b + column_blocks[block].unsqueeze(0)).flatten())
        out = torch.zeros((self.nu_max + 1, n_a * n_b), dtype=a[0].dtype, device=a[0].device)
        out[0] = same.flatten()
        if len(values) > 0:
            # a single write: one per chunk would copy the gradient of the output per chunk
            out[1:, torch.cat(positions)] = torch.cat(values, dim=1)
        return out.view(self.nu_max + 1, n_a, n_b)

    @torch.jit.export
    def weighted_sum(
        self,
        a: List[torch.Tensor],
        species_a: torch.Tensor,
        b: List[torch.Tensor],
        species_b: torch.Tensor,
        weights: torch.Tensor,
        b_features: Optional[Dict[int, torch.Tensor]] = None,
    ) -> torch.Tensor:
        """``e_i = sum_nu sum_j weights[nu, j] k^{nu, 0+}(a_i, b_j)``, ``[n_a]``, in bounded memory.

        :param weights: ``[nu_max + 1, n_b]``, e.g. E4 coefficients times regression weights.
        :param b_features: :meth:`nu2_features` of ``b``, computed here when not given
            (an exported model keeps them; used for ``nu_max <= 4``). Sorting ``b`` by
            species makes their per-species blocks views instead of copies.

        Each chunk's gradient with respect to its rows of ``a`` is taken at once and the
        chunk's graph freed; ``e`` is then returned as ``value + sum (a - a.detach()) g``,
        which has the right value and first derivatives (forces, stress), without a graph
        through the kernels. Second derivatives, and derivatives with respect to ``b`` or
        ``weights``, are not available through this path. Works in TorchScript (the MD path of an exported model).
        """
        same = (species_a.unsqueeze(1) == species_b.unsqueeze(0)).to(a[0].dtype)
        energy = same @ weights[0]
        if self.nu_max == 0:
            return energy
        track = torch.is_grad_enabled() and any([c.requires_grad for c in a])
        gradients = [torch.zeros_like(c) for c in a]
        features = self.use_features(a[0].dtype)
        fb: Dict[int, torch.Tensor] = {}
        if features:
            fb = self.nu2_features(b) if b_features is None else b_features
        column_blocks, row_chunks, chunk_blocks = self._chunks(species_a, species_b, species_b.shape[0] if features else self.chunk_size)
        b_blocks = [[c.index_select(0, columns) for c in b] for columns in column_blocks]
        fb_blocks: List[Dict[int, torch.Tensor]] = []
        for columns in column_blocks:
            fb_blocks.append(self._select_features(fb, columns) if features else fb)
        weight_blocks = [weights[1:].index_select(1, columns).unsqueeze(1) for columns in column_blocks]
        for rows, block in zip(row_chunks, chunk_blocks):
            a_rows = [c.detach().index_select(0, rows) for c in a]
            if track:
                for c in a_rows:
                    c.requires_grad_(True)
                chunk_energy = (self._chunk_values(a_rows, b_blocks[block], fb_blocks[block]) * weight_blocks[block]).sum(dim=(0, 2))
                chunk_gradients = torch.autograd.grad([chunk_energy.sum()], a_rows, allow_unused=True)
                for l, g in enumerate(chunk_gradients):
                    if g is not None:
                        gradients[l] = gradients[l].index_add(0, rows, g)
            else:
                chunk_energy = (self._chunk_values(a_rows, b_blocks[block], fb_blocks[block]) * weight_blocks[block]).sum(dim=(0, 2))
            energy = energy.index_add(0, rows, chunk_energy.detach())
        if track:
            for c, g in zip(a, gradients):
                energy = energy + ((c - c.detach()) * g).sum(dim=(1, 2))
        return energy


def _reaches(l1: int, l2: int, parity: int, key: int) -> bool:
    """Whether the ``(l1, l2)`` coupling of blocks of parity product ``parity`` yields block ``key``."""
    lam = key_lambda(key)
    return abs(l1 - l2) <= lam <= l1 + l2 and parity * parity_sign(l1 + l2 + lam) == key_sigma(key)


class _RecomputedChunk(torch.autograd.Function):
    """One chunk of :meth:`WignerKernels._chunk` that keeps only its inputs and recomputes
    the kernels in the backward pass (first derivatives only). torch's checkpoint does not
    bound memory here (non-reentrant keeps about 8 kB per pair) or does not support
    ``torch.autograd.grad`` (reentrant)."""

    @staticmethod
    def forward(ctx, module, n_a, *tensors):
        ctx.module = module
        ctx.n_a = n_a
        ctx.save_for_backward(*tensors)
        return module._chunk(list(tensors[:n_a]), list(tensors[n_a:]))

    @staticmethod
    def backward(ctx, grad_output):
        if torch.is_grad_enabled():
            raise RuntimeError("second derivatives of checkpointed Wigner kernels are not supported")
        needed = ctx.needs_input_grad[2:]
        inputs = [t.detach().requires_grad_(need) for t, need in zip(ctx.saved_tensors, needed)]
        with torch.enable_grad():
            out = ctx.module._chunk(inputs[: ctx.n_a], inputs[ctx.n_a :])
            leaves = [t for t in inputs if t.requires_grad]
            grads = iter(torch.autograd.grad(out, leaves, grad_output, allow_unused=True))
        return (None, None, *[next(grads) if need else None for need in needed])


@lru_cache(maxsize=32)
def _cached_module(hypers: Tuple, dtype: torch.dtype, device: str) -> WignerKernels:
    return WignerKernels(WignerHypers(*hypers), dtype).to(device)


def wigner_module(hypers: WignerHypers, like: torch.Tensor) -> WignerKernels:
    """A (cached) :class:`WignerKernels` on the dtype and device of ``like``."""
    return _cached_module(astuple(hypers), like.dtype, str(like.device))


def nu1_kernels(a: List[torch.Tensor], b: List[torch.Tensor], channel_weights: str = "uniform") -> List[torch.Tensor]:
    """``nu = 1`` equivariant kernels (WK eq. 7 via B1), no central-species delta.

    :param a: density coefficients ``[n_a, 2l + 1, Q_l]`` per ``l``.
    :param b: density coefficients ``[n_b, 2l + 1, Q_l]`` per ``l``.
    :return: ``k^{1,l}`` ``[n_a, n_b, 2l + 1, 2l + 1]`` per ``l``,
        ``kappa_l sum_q a[i, m, q] b[j, m', q]`` (``kappa_l`` of ``channel_weights``).
    """
    module = wigner_module(WignerHypers(lambda_max=min(len(a), len(b)) - 1, channel_weights=channel_weights), a[0])
    shape = (a[0].shape[0], b[0].shape[0])
    return [k.view(*shape, k.shape[1], k.shape[2]) for _, k in sorted(module.nu1(a, b).items())]


def invariant_kernels(
    a: List[torch.Tensor],
    species_a: torch.Tensor,
    b: List[torch.Tensor],
    species_b: torch.Tensor,
    hypers: WignerHypers,
) -> torch.Tensor:
    """Body-ordered invariant Wigner kernels ``k^{nu, 0+}`` for ``nu = 0..nu_max``.

    :param a: density coefficients ``[n_a, 2l + 1, Q_l]`` per ``l`` (may require grad).
    :param species_a: ``[n_a]`` central species (any integer labels).
    :param b: density coefficients ``[n_b, 2l + 1, Q_l]`` per ``l`` (e.g. sparse environments).
    :param species_b: ``[n_b]`` central species.
    :param hypers: :class:`WignerHypers` (path, truncation, chunking).
    :return: ``[nu_max + 1, n_a, n_b]``; ``nu = 0`` is ``delta(species_a, species_b)``
        (WK eq. 8) and every ``nu`` is zero across central species. Differentiable with
        respect to ``a``; pairs are evaluated per central species in chunks of at most
        ``hypers.chunk_size``.
    """
    return wigner_module(hypers, a[0])(a, species_a, b, species_b)


def matched_invariant_kernels(
    a: List[torch.Tensor],
    species_a: torch.Tensor,
    b: List[torch.Tensor],
    species_b: torch.Tensor,
    hypers: WignerHypers,
) -> torch.Tensor:
    """Invariant kernels ``[nu_max + 1, P]`` of matched rows ``(a[p], b[p])`` (``a``, ``b``
    and the species with ``P`` rows), ``nu = 0`` the species delta; for per-pair
    gradients, with one copy of the coefficients per pair. Not chunked."""
    return torch.stack(matched_invariant_rows(a, species_a, b, species_b, hypers))


def matched_invariant_rows(
    a: List[torch.Tensor],
    species_a: torch.Tensor,
    b: List[torch.Tensor],
    species_b: torch.Tensor,
    hypers: WignerHypers,
) -> List[torch.Tensor]:
    """:func:`matched_invariant_kernels` as a list of ``[P]`` tensors, ``nu = 0..nu_max``
    (for one reverse pass per order that only traverses that order's graph)."""
    delta = (species_a == species_b).to(a[0].dtype)
    if hypers.nu_max == 0:
        return [delta]
    module = wigner_module(hypers, a[0])
    return [delta] + [row * delta for row in module.invariant_rows_from_nu1(module.nu1_matched(a, b))]


def _to_int_keys(blocks: Dict[Tuple[int, int], torch.Tensor], n_pairs: int) -> Dict[int, torch.Tensor]:
    return {block_key(lam, sigma): k.reshape(n_pairs, 2 * lam + 1, 2 * lam + 1) for (lam, sigma), k in blocks.items()}


def _to_tuple_keys(blocks: Dict[int, torch.Tensor], shape: Tuple[int, ...]) -> Dict[Tuple[int, int], torch.Tensor]:
    return {
        (key_lambda(key), key_sigma(key)): k.reshape(*shape, k.shape[1], k.shape[2])
        for key, k in sorted(blocks.items())
    }


def wigner_iteration(
    x: Dict[Tuple[int, int], torch.Tensor], y: Dict[Tuple[int, int], torch.Tensor], lambda_max: int
) -> Dict[Tuple[int, int], torch.Tensor]:
    """Generalised Wigner iteration of two equivariant kernels (WK eq. C1, appendix F).

    :param x: blocks ``[..., 2 l1 + 1, 2 l1 + 1]`` keyed by ``(l1, s1)``.
    :param y: blocks ``[..., 2 l2 + 1, 2 l2 + 1]`` keyed by ``(l2, s2)``, same leading shape.
    :param lambda_max: truncation of the output (and of the inputs).
    :return: blocks ``[..., 2 lambda + 1, 2 lambda + 1]`` keyed by ``(lambda, sigma)``.
    """
    like = next(iter(x.values()))
    shape = tuple(like.shape[:-2])
    n_pairs = math.prod(shape)
    module = wigner_module(WignerHypers(nu_max=2, lambda_max=lambda_max), like)
    out = module.iterate(_to_int_keys(x, n_pairs), _to_int_keys(y, n_pairs), x is y)
    return _to_tuple_keys(out, shape)


def equivariant_kernels(
    a: List[torch.Tensor],
    species_a: torch.Tensor,
    b: List[torch.Tensor],
    species_b: torch.Tensor,
    hypers: WignerHypers,
) -> Dict[int, Dict[Tuple[int, int], torch.Tensor]]:
    """Equivariant Wigner kernels by full iterations (WK eq. C1), ``nu = 0..nu_max``.

    Arguments as :func:`invariant_kernels`. Returns ``{nu: {(lambda, sigma): [n_a, n_b,
    2 lambda + 1, 2 lambda + 1]}}``, ``lambda <= lambda_max``, zero across central
    species; ``nu = 0`` holds the single block ``(0, +1)``, the species delta. All pairs
    are evaluated at once (no chunking): meant for moderate ``n_a * n_b``.
    """
    module = wigner_module(hypers, a[0])
    n_a, n_b = species_a.shape[0], species_b.shape[0]
    same = (species_a.unsqueeze(1) == species_b.unsqueeze(0)).to(a[0].dtype)
    out = {0: {(0, 1): same.view(n_a, n_b, 1, 1)}}
    mask = same.view(n_a * n_b, 1, 1)
    for nu, blocks in enumerate(module.equivariant_pairs(a, b, hypers.nu_max)[: hypers.nu_max], start=1):
        out[nu] = _to_tuple_keys({key: k * mask for key, k in blocks.items()}, (n_a, n_b))
    return out


def exponential_weights(nu_max: int, c0, a, b, like: torch.Tensor) -> torch.Tensor:
    """Coefficients ``[c0, a b / 1!, a b^2 / 2!, ..., a b^nu_max / nu_max!]`` of WK eq. E4,
    ``[nu_max + 1]`` on the dtype and device of ``like``; ``c0, a, b`` floats or scalar
    tensors (differentiable)."""
    nu = torch.arange(nu_max + 1, dtype=like.dtype, device=like.device)
    factorials = torch.tensor([float(math.factorial(n)) for n in range(nu_max + 1)], dtype=like.dtype, device=like.device)
    b = torch.as_tensor(b, dtype=like.dtype, device=like.device)
    weights = a * b**nu / factorials
    return torch.cat([torch.as_tensor(c0, dtype=like.dtype, device=like.device).reshape(1), weights[1:]])


def exponential_kernel(k_nu: torch.Tensor, c0, a, b) -> torch.Tensor:
    """Exponential body-ordered kernel (WK eq. E4).

    :param k_nu: ``[nu_max + 1, ...]`` kernels of each ``nu`` (``nu = 0`` first).
    :param c0, a, b: floats or scalar tensors (differentiable).
    :return: ``c0 k^0 + a sum_{nu >= 1} b^nu / nu! k^nu``, shape ``k_nu.shape[1:]``.
    """
    return torch.tensordot(exponential_weights(k_nu.shape[0] - 1, c0, a, b, k_nu), k_nu, dims=1)
