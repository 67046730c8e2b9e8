"""Atom-centred density correlations (ACDC) by Clebsch-Gordan iteration.

Equivariant features are dictionaries of blocks ``{(lambda, sigma): tensor}``; each
tensor has shape ``[n_atoms, 2 lambda + 1, n_features]`` with ``mu`` stored at
``mu + lambda`` (sphericart's order, as in :mod:`acdc_potential.descriptors.density`). ``sigma = +1``
marks true tensors, ``sigma = -1`` pseudo-tensors: under inversion a block picks up
``sigma (-1)^lambda``.

- :func:`density_blocks`: the ``nu = 1`` features, the density coefficients themselves.
- :func:`cg_product`: one CG iteration of two feature sets (MP-ACDC eq. 5).
- :func:`acdc_features`: ``nu``-fold correlations by repeated coupling with the density.
- :func:`power_spectrum`: the ``nu = 2`` invariants (SOAP, eq. 6-7) by a direct sum over ``m``.
- :class:`BlockPCA`: data-driven contraction of each block (eq. 24).

Everything is plain torch on the dtype and device of its inputs, differentiable, and
batched: atoms of all structures are stacked along the first axis. The functions take
and return blocks as dictionaries; :class:`CGProduct` and :class:`ACDCFeatures` do the
work as TorchScript-compatible modules on lists of blocks in the order of their ``keys``
(TorchScript has no tuple-keyed dictionaries), for use in exported models.
"""

from typing import Dict, List, NamedTuple, Optional, Tuple, Union

import numpy as np
import torch

from .cg import couple, coupled_lambdas, coupling_parity, real_clebsch_gordan

Key = Tuple[int, int]
Blocks = Dict[Key, torch.Tensor]


def density_blocks(coefficients: List[torch.Tensor]) -> Blocks:
    """``nu = 1`` features: ``{(l, +1): c_l}`` with ``c_l`` ``[n_atoms, 2l + 1, n_species * n_radial[l]]``.

    The feature index is the density channel ``q = a * n_radial[l] + n``.
    """
    return {(l, 1): c for l, c in enumerate(coefficients)}


class Coupling(NamedTuple):
    """One chunk of an output block of :func:`cg_product`: input blocks ``(l1, s1)`` and
    ``(l2, s2)`` coupled to ``(L, sigma)``. In :func:`coupling_layout`, ``features[start:stop]``
    of the output block; inside the chunk the feature of channel ``i`` of the first and ``j``
    of the second input is at ``start + i * q + j`` (``q`` the width of the second input block)."""

    l1: int
    s1: int
    l2: int
    s2: int
    L: int
    sigma: int
    start: int = 0
    stop: int = 0


def couplings(
    a_keys: List[Key], b_keys: List[Key], lambda_max: int, invariants_only: bool = False
) -> List[Coupling]:
    """Every coupling of a block of ``a_keys`` with one of ``b_keys`` (eq. 5), in feature order.

    ``(l1, s1)`` runs over ``sorted(a_keys)``, then ``(l2, s2)`` over ``sorted(b_keys)``
    (``lambda`` ascending, ``sigma = -1`` before ``+1``), then ``L`` over ``|l1 - l2| ..
    min(l1 + l2, lambda_max)``; ``sigma = s1 s2 (-1)^(l1 + l2 + L)``. ``invariants_only``
    keeps only ``(0, +1)``, i.e. ``l1 = l2`` and ``s1 = s2``.
    """
    result = []
    for l1, s1 in sorted(a_keys):
        for l2, s2 in sorted(b_keys):
            for L in coupled_lambdas(l1, l2, lambda_max):
                sigma = coupling_parity(l1, s1, l2, s2, L)
                if not invariants_only or (L, sigma) == (0, 1):
                    result.append(Coupling(l1, s1, l2, s2, L, sigma))
    return result


def coupling_layout(
    a_widths: Dict[Key, int], b_widths: Dict[Key, int], lambda_max: int, invariants_only: bool = False
) -> Dict[Key, List[Coupling]]:
    """Feature layout of :func:`cg_product` given the feature counts of the input blocks.

    For each output key ``(lambda, sigma)`` (sorted), its chunks in the order of
    :func:`couplings`, with ``start`` and ``stop`` filled in.
    """
    layout: Dict[Key, List[Coupling]] = {}
    for c in couplings(list(a_widths), list(b_widths), lambda_max, invariants_only):
        chunks = layout.setdefault((c.L, c.sigma), [])
        start = chunks[-1].stop if chunks else 0
        chunks.append(c._replace(start=start, stop=start + a_widths[(c.l1, c.s1)] * b_widths[(c.l2, c.s2)]))
    return dict(sorted(layout.items()))


def couple_to_invariant(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``lambda = 0`` coupling of two blocks of the same ``l``, without a CG tensor.

    ``a``: ``[n, 2l + 1, p]``, ``b``: ``[n, 2l + 1, q]``; returns ``[n, 1, p * q]``, equal to
    :func:`acdc_potential.descriptors.cg.couple` with the real CG ``C^{l l 0}_{m m' 0} = delta_{m m'}
    (-1)^l / sqrt(2l + 1)``.
    """
    l = (a.shape[1] - 1) // 2
    scale = (-1.0) ** l / (2.0 * l + 1.0) ** 0.5
    out = torch.bmm(a.transpose(1, 2), b) * scale
    return out.reshape(a.shape[0], 1, a.shape[2] * b.shape[2])


class CGProduct(torch.nn.Module):
    """:func:`cg_product` for fixed input keys, as a TorchScript-compatible module.

    :param a_keys: keys ``(l1, s1)`` of the first input, in the order of ``forward``'s ``a``.
    :param b_keys: keys ``(l2, s2)`` of the second input, in the order of ``b``.
    :param lambda_max: largest output ``lambda``.
    :param invariants_only: compute only ``(0, +1)``.
    :param keys: compute only these output blocks (default: all).

    ``forward(a, b)`` takes the blocks as lists and returns one block per key of
    :attr:`keys` (sorted), features laid out as :func:`coupling_layout`. The CG coefficients
    are one flat float64 buffer, moved by ``.to(device)`` and cast to the inputs' dtype.
    """

    def __init__(
        self,
        a_keys: List[Key],
        b_keys: List[Key],
        lambda_max: int,
        invariants_only: bool = False,
        keys: Optional[List[Key]] = None,
    ):
        super().__init__()
        plan = couplings(a_keys, b_keys, lambda_max, invariants_only)
        plan = [c for c in plan if keys is None or (c.L, c.sigma) in keys]
        self.keys: List[Key] = sorted({(c.L, c.sigma) for c in plan})
        self.a_index: List[int] = [a_keys.index((c.l1, c.s1)) for c in plan]
        self.b_index: List[int] = [b_keys.index((c.l2, c.s2)) for c in plan]
        self.out_index: List[int] = [self.keys.index((c.L, c.sigma)) for c in plan]
        self.lambdas: List[int] = [c.L for c in plan]
        cgs = [real_clebsch_gordan(c.l1, c.l2, c.L).ravel() if c.L > 0 else np.zeros(0) for c in plan]
        self.cg_start: List[int] = [int(x) for x in np.cumsum([0] + [len(cg) for cg in cgs])[:-1]]
        self.register_buffer("cg", torch.tensor(np.concatenate([np.zeros(0)] + cgs), dtype=torch.float64))

    def forward(self, a: List[torch.Tensor], b: List[torch.Tensor]) -> List[torch.Tensor]:
        pieces: List[List[torch.Tensor]] = [[] for _ in self.keys]
        for k in range(len(self.lambdas)):
            x, y, L = a[self.a_index[k]], b[self.b_index[k]], self.lambdas[k]
            if L == 0:
                pieces[self.out_index[k]].append(couple_to_invariant(x, y))
            else:
                size = x.shape[1] * y.shape[1] * (2 * L + 1)
                cg = self.cg[self.cg_start[k] : self.cg_start[k] + size].to(x.dtype)
                pieces[self.out_index[k]].append(couple(x, y, cg.reshape(x.shape[1], y.shape[1], 2 * L + 1)))
        return [torch.cat(p, dim=2) for p in pieces]


def cg_product(a_blocks: Blocks, b_blocks: Blocks, lambda_max: int, invariants_only: bool = False) -> Blocks:
    """One CG iteration (MP-ACDC eq. 5) of two equivariant feature sets.

    Couples every block ``(l1, s1)`` of ``a_blocks`` with every ``(l2, s2)`` of
    ``b_blocks`` (same atoms, same first dimension) to each ``lambda`` in
    ``|l1 - l2| .. min(l1 + l2, lambda_max)``, with parity ``sigma = s1 s2 (-1)^(l1 + l2 + lambda)``.
    All ``(l1, s1, l2, s2)`` contributing to one ``(lambda, sigma)`` are concatenated
    along the features in the order of :func:`coupling_layout`, the full tensor product
    of channels in each chunk. ``invariants_only`` computes only ``(0, +1)``.

    :return: blocks ``[n_atoms, 2 lambda + 1, n_features]`` keyed by ``(lambda, sigma)``.
    """
    a_keys, b_keys = sorted(a_blocks), sorted(b_blocks)
    product = CGProduct(a_keys, b_keys, lambda_max, invariants_only).to(next(iter(a_blocks.values())).device)
    blocks = product([a_blocks[key] for key in a_keys], [b_blocks[key] for key in b_keys])
    return dict(zip(product.keys, blocks))


class ACDCFeatures(torch.nn.Module):
    """:func:`acdc_features` as a TorchScript-compatible module for a fixed ``l_max``.

    ``forward(coefficients)`` takes the density coefficients (list over ``l = 0..l_max`` of
    ``[n_atoms, 2l + 1, Q_l]``) and returns one block per key of :attr:`keys`. Intermediate
    blocks that feed none of the output blocks are not computed.

    :param keys: return only these blocks (default: all allowed by the other options).
    """

    def __init__(
        self,
        l_max: int,
        nu: int,
        lambda_max: int,
        invariants_only: bool = False,
        intermediate_lambda_max: Optional[int] = None,
        keys: Optional[List[Key]] = None,
    ):
        super().__init__()
        if nu < 1:
            raise ValueError(f"nu must be at least 1, got {nu}")
        density_keys = [(l, 1) for l in range(l_max + 1)]
        caps = []
        for step in range(1, nu):
            remaining = nu - 1 - step
            cap = lambda_max + remaining * l_max
            if intermediate_lambda_max is not None and remaining > 0:
                cap = min(cap, intermediate_lambda_max)
            caps.append(cap)
        last = len(caps) - 1

        def plan(k: int, a_keys: List[Key]) -> List[Coupling]:
            return couplings(a_keys, density_keys, caps[k], invariants_only and k == last)

        reachable = [density_keys]
        for k in range(len(caps)):
            reachable.append(sorted({(c.L, c.sigma) for c in plan(k, reachable[k])}))
        self.keys: List[Key] = [
            key
            for key in reachable[-1]
            if (key == (0, 1) if invariants_only else key[0] <= lambda_max) and (keys is None or key in keys)
        ]
        # walk back from the output: needed[k] are the blocks of order k + 1 that feed it
        needed = [self.keys]
        for k in reversed(range(len(caps))):
            needed.insert(0, sorted({(c.l1, c.s1) for c in plan(k, reachable[k]) if (c.L, c.sigma) in needed[0]}))
        steps = []
        for k in range(len(caps)):
            a_keys = density_keys if k == 0 else needed[k]
            steps.append(CGProduct(a_keys, density_keys, caps[k], invariants_only and k == last, needed[k + 1]))
        self.steps = torch.nn.ModuleList(steps)
        output_keys = density_keys if nu == 1 else self.keys
        self.selected: List[int] = [output_keys.index(key) for key in self.keys]

    def forward(self, coefficients: List[torch.Tensor]) -> List[torch.Tensor]:
        features = coefficients
        for step in self.steps:
            features = step(features, coefficients)
        return [features[i] for i in self.selected]


def acdc_features(
    coefficients: List[torch.Tensor],
    nu: int,
    lambda_max: int,
    invariants_only: bool = False,
    intermediate_lambda_max: Optional[int] = None,
) -> Blocks:
    """``nu``-neighbour equivariant ACDC ``|rho_i^{nu}; sigma; lambda mu>`` (eq. 5, iterated).

    Starts from the density (``nu = 1``) and couples with it ``nu - 1`` times:
    ``rho^{k+1} = cg_product(rho^{k}, rho^{1})``, so the features of a block are ordered as
    in :func:`coupling_layout` recursively (first the ``nu - 1`` features, then the density
    channel). Redundant orderings of the density channels are kept (no symmetrisation).

    :param coefficients: density coefficients, list over ``l`` of ``[n_atoms, 2l + 1, Q_l]``.
    :param nu: body order minus one (``nu = 2``: lambda-SOAP, ``nu = 3``: bispectrum).
    :param lambda_max: largest ``lambda`` of the output.
    :param invariants_only: return only the ``(0, +1)`` block; its last iteration is then cheap.
    :param intermediate_lambda_max: truncation of the intermediate iterations. The default
        keeps every intermediate ``lambda`` that can still reach ``lambda <= lambda_max``
        (``lambda_max + l_max`` per remaining iteration), so the output equals that of an
        untruncated iteration; a smaller value (e.g. ``lambda_max``, as the Wigner-kernel
        iteration does) is cheaper but drops some features for ``nu >= 3``.
    """
    module = ACDCFeatures(len(coefficients) - 1, nu, lambda_max, invariants_only, intermediate_lambda_max)
    return dict(zip(module.keys, module.to(coefficients[0].device)(coefficients)))


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` divided by their norm (zero rows, atoms without neighbours, stay zero)."""
    # a floor that float32 holds (1e-150 rounds to 0 there, and a zero row would give 0 / 0)
    floor = 1e-30 if x.dtype == torch.float32 else 1e-150
    return x / torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min(floor)


def floored_unit_rows(x: torch.Tensor, floor: torch.Tensor) -> torch.Tensor:
    """``[x_i, f] / sqrt(|x_i|^2 + f^2)`` ``[n, F + 1]``: the rows of ``x [n, F]`` with the floor ``f``
    (a scalar tensor, in the units of ``x``) as one more component, then of unit norm.

    Far above the floor a row is ``x_i / |x_i|``; as ``x_i`` goes to zero (an atom losing its last
    neighbour) it turns smoothly to ``[0, 1]``, where ``x_i / |x_i|`` would jump. ``f = 0`` is
    :func:`unit_rows` with a zero column."""
    column = floor.to(device=x.device, dtype=x.dtype).expand(x.shape[0], 1)
    return unit_rows(torch.cat([x, column], dim=1))


def power_spectrum(coefficients: List[torch.Tensor]) -> torch.Tensor:
    """SOAP power spectrum, the ``nu = 2`` invariants (eq. 6-7), by a direct sum over ``m``.

    ``p_i[l, q, q'] = w(q, q') (-1)^l / sqrt(2l + 1) sum_m c_i[q l m] c_i[q' l m]`` for
    ``q <= q'``, ``w = 1`` on the diagonal and ``sqrt(2)`` off it, so that the dot product of
    two power spectra equals the one over all ``(q, q')``:
    ``<p_i, p_k> = sum_l 1/(2l + 1) sum_{q q'} P_l[q q'](i) P_l[q q'](k)`` with
    ``P_l[q q'] = sum_m c[q l m] c[q' l m]``. ``(-1)^l / sqrt(2l + 1)`` is the real CG
    ``C^{l l 0}_{m m 0}``: without the ``sqrt(2)`` weights and with the redundant ``q > q'``
    entries, these are the ``(0, +1)`` features of ``acdc_features(coefficients, 2, 0)``,
    and they equal featomic's SoapPowerSpectrum (which has the same ``(-1)^l / sqrt(2l + 1)``,
    all ``(n, n')`` of one neighbour species and ``sqrt(2)`` on pairs of different species).

    :param coefficients: list over ``l`` of ``[n_atoms, 2l + 1, Q_l]``.
    :return: ``[n_atoms, sum_l Q_l (Q_l + 1) / 2]``, ordered by ``l``, then by the pairs
        ``q <= q'`` in row-major order (``torch.triu_indices``).
    """
    parts = []
    for l, c in enumerate(coefficients):
        q = c.shape[2]
        pairs = torch.triu_indices(q, q, device=c.device)
        rows, columns = pairs[0], pairs[1]
        weight = torch.full(rows.shape, 2.0**0.5, dtype=c.dtype, device=c.device)
        weight = weight.masked_fill(rows == columns, 1.0) * ((-1) ** l / (2 * l + 1) ** 0.5)
        square = torch.bmm(c.transpose(1, 2), c)  # [n_atoms, Q_l, Q_l]
        parts.append(square[:, rows, columns] * weight)
    return torch.cat(parts, dim=1)


class BlockPCA(torch.nn.Module):
    """Data-driven contraction of equivariant features, one PCA per ``(lambda, sigma)`` (eq. 24).

    ``x~[s, mu, k] = sum_f x[s, mu, f] U[f, k]``: the projection acts on the feature index only,
    the same for every ``mu``, so contracted blocks stay equivariant. ``U`` holds the leading
    eigenvectors of the uncentred covariance ``sum_{s, mu} x[s, mu, f] x[s, mu, f']``
    (uncentred because subtracting a mean would break equivariance for ``lambda > 0``).

    :param n_components: components kept per block (an int for all, or a dict by key);
        components whose eigenvalue is below ``tolerance`` times the largest are dropped too.
    """

    def __init__(self, n_components: Union[int, Dict[Tuple[int, int], int]], tolerance: float = 1e-12):
        super().__init__()
        self.n_components = n_components
        self.tolerance = tolerance
        self.projections: Dict[Tuple[int, int], torch.Tensor] = {}
        self.explained_variance: Dict[Tuple[int, int], float] = {}

    def _components(self, key: Tuple[int, int]) -> int:
        if isinstance(self.n_components, int):
            return self.n_components
        return self.n_components[key]

    def fit(self, blocks: Blocks) -> "BlockPCA":
        """Fit on training environments; ``blocks`` as from :func:`acdc_features` (gradients ignored).

        With fewer rows ``(s, mu)`` than features, the eigenvectors come from the smaller Gram
        matrix ``x x^T`` (``U = x^T V / sqrt(eigenvalue)``), so wide blocks such as the
        ``nu = 3`` or ``[1 <- 1]`` ones never need an ``F x F`` matrix; components beyond the
        rank of the sample (eigenvalue below 1e-10 of the largest) are dropped then.
        """
        self.projections = {}
        self.explained_variance = {}
        for key, block in blocks.items():
            x = block.detach().reshape(-1, block.shape[2])
            wide = x.shape[0] < x.shape[1]
            eigenvalues, eigenvectors = torch.linalg.eigh(x @ x.T if wide else x.T @ x)
            eigenvalues, eigenvectors = eigenvalues.flip(0), eigenvectors.flip(1)
            threshold = max(self.tolerance, 1e-10 if wide else 0.0) * float(eigenvalues[0].clamp_min(1e-300))
            keep = min(self._components(key), int((eigenvalues > threshold).sum()))
            if wide:
                eigenvectors = (x.T @ eigenvectors[:, :keep]) / eigenvalues[:keep].sqrt()
            self.projections[key] = eigenvectors[:, :keep].contiguous()
            total = float(eigenvalues.clamp_min(0.0).sum())
            self.explained_variance[key] = float(eigenvalues[:keep].sum()) / total if total > 0 else 1.0
        return self

    def forward(self, blocks: Blocks) -> Blocks:
        """Contracted blocks ``[n_atoms, 2 lambda + 1, n_kept]``; keys not seen in :meth:`fit` raise."""
        missing = set(blocks) - set(self.projections)
        if missing:
            raise KeyError(f"BlockPCA was not fitted on blocks {sorted(missing)}")
        return {key: block @ self.projections[key].to(block) for key, block in blocks.items()}

    transform = forward


class BlockProjections(torch.nn.Module):
    """Fixed projections of a list of blocks on their feature index (a fitted :class:`BlockPCA`, eq.
    24), TorchScript-compatible: ``forward(blocks)`` maps ``[n, 2 lambda + 1, F_k]`` to ``[n, 2 lambda +
    1, K_k]`` with ``projections[k]`` ``[F_k, K_k]``, or returns ``blocks`` unchanged without projections.

    :param projections: one ``[F_k, K_k]`` per block, in the order of ``forward``'s list, or ``None``.
    """

    # (TorchScript cannot infer the type of an empty list attribute)
    shapes: List[List[int]]
    starts: List[int]

    def __init__(self, projections: Optional[List[torch.Tensor]] = None):
        super().__init__()
        self.active = projections is not None
        self.shapes = [list(p.shape) for p in projections] if projections is not None else []
        self.starts = [sum(s[0] * s[1] for s in self.shapes[:k]) for k in range(len(self.shapes))]
        flat = [p.detach().to(torch.float64).reshape(-1) for p in projections] if projections is not None else []
        self.register_buffer("flat", torch.cat([torch.zeros(0, dtype=torch.float64)] + flat))

    def forward(self, blocks: List[torch.Tensor]) -> List[torch.Tensor]:
        if not self.active:
            return blocks
        out: List[torch.Tensor] = []
        for k, block in enumerate(blocks):
            shape = self.shapes[k]
            projection = self.flat[self.starts[k] : self.starts[k] + shape[0] * shape[1]].reshape(shape[0], shape[1])
            out.append(block @ projection.to(block.dtype))
        return out


def fit_block_projections(blocks: List[torch.Tensor], components: int) -> List[torch.Tensor]:
    """The :class:`BlockPCA` projections ``[F_k, K_k]`` (``K_k <= components``) of each block of
    ``blocks`` (``[n, 2 lambda + 1, F_k]``, environments of a training sample), in their order; a block
    of at most ``components`` features keeps them all (the identity), so that nothing the sample
    happens not to span is lost."""
    keyed = {(k, 1): block.detach() for k, block in enumerate(blocks) if block.shape[2] > components}
    pca = BlockPCA(components).fit(keyed)
    return [
        pca.projections[(k, 1)].cpu() if (k, 1) in keyed else torch.eye(block.shape[2], dtype=torch.float64)
        for k, block in enumerate(blocks)
    ]
