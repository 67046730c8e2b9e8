"""The exponential Wigner kernel as a fit-time sparse kernel (rows, derivatives, per-species scales)."""

import dataclasses
from typing import Dict, List, Optional, Sequence

import torch

from ...descriptors.cg import key_lambda
from ..base import SparseKernel
from .features import order_features_of
from .gradients import order_feature_gradients_of
from .iteration import WignerHypers, exponential_weights, invariant_kernels, matched_invariant_rows, wigner_module


class WignerKernel(SparseKernel):
    """Exponential Wigner kernel ``c0 k^0 + a sum_{nu=1}^{nu_max} b^nu / nu! k^nu / s_{a nu}`` (WK eq. E4).

    The pieces are the invariant body-ordered kernels ``k^nu``, ``nu = 0..nu_max``, of
    :mod:`~acdc_potential.kernels.wigner.iteration` (``k^0`` the species delta), each divided by
    ``s_{a nu}``, the mean ``k^nu(m, m)`` over the sparse environments of the central species ``a``.
    Raw ``k^nu`` differ by orders of magnitude between orders and species, so that without
    this no single ``b`` mixes the body orders of every species sensibly; with it each
    piece has unit mean self-similarity and ``b^nu / nu!`` is the weight of order ``nu``.

    :meth:`rows` uses the chunked :func:`~acdc_potential.kernels.wigner.iteration.invariant_kernels`,
    :meth:`paired` the iterations on matched pair lists (for gradients).

    :param hypers: :class:`~acdc_potential.kernels.wigner.iteration.WignerHypers` (``nu_max``, ``lambda_max``, ...).
    :param mixing: ``c0``, ``a``, ``b``.
    :param species_scale: ``{atomic number: [s_{a 1}, ..., s_{a nu_max}]}``; by default
        computed by :meth:`set_sparse`.

    Attributes for the derivative rows (:meth:`structure_derivatives`): ``max_feature_dimension``
    (2e5: up to this size of the per-atom invariants the rows go through them, beyond it
    through per-pair reverse passes), ``feature_budget`` (5e7 entries of one block of summed
    derivatives) and ``sparse_feature_budget`` (3e8 entries of the sparse environments'
    invariants kept, for all species together, while the rows are built).
    """

    kind = "wigner"
    mixing_names = ("c0", "a", "b")

    def __init__(
        self, hypers, mixing: Optional[Dict[str, float]] = None, species_scale: Optional[Dict[int, List[float]]] = None
    ):
        super().__init__(hypers.nu_max + 1, mixing or {"c0": 1.0, "a": 1.0, "b": 1.0})
        self.wigner_hypers = hypers
        self.nu_max = int(hypers.nu_max)
        self.fixed_scale = species_scale is not None
        self._sparse_invariants: Dict[int, List[torch.Tensor]] = {}
        self.max_feature_dimension = 200_000
        self.feature_budget = 5e7
        self.sparse_feature_budget = 3e8
        self.species_scale = {int(z): [float(x) for x in v] for z, v in species_scale.items()} if species_scale else None

    def order_scales(self, species: Sequence[int]) -> torch.Tensor:
        """``[len(species), nu_max + 1]`` scales ``s_{a nu}`` of the atomic numbers ``species``
        (1 for ``nu = 0``, and for species or orders without a scale yet)."""
        table = torch.ones((len(species), self.nu_max + 1), dtype=torch.float64)
        for row, z in enumerate(species):
            if self.species_scale is not None and int(z) in self.species_scale:
                table[row, 1:] = torch.tensor(self.species_scale[int(z)], dtype=torch.float64)
        return table

    def _order_scale(self, species: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``[nu_max + 1, n]`` factors ``1 / s_{a nu}`` for central atomic numbers ``[n]``."""
        if self.species_scale is None:
            return like.new_ones((self.nu_max + 1, species.shape[0]))
        table = self.order_scales(range(int(species.max()) + 1 if species.numel() else 1)).to(like)
        return 1.0 / table[species].T

    def set_sparse(self, coefficients, species, layout):
        """Store the sparse environments and, unless given, the scales ``s_{a nu}``."""
        super().set_sparse(coefficients, species, layout)
        self.clear_cache()
        if self.fixed_scale or self.nu_max == 0:
            return
        self.species_scale = None
        a = layout.unflatten(self.sparse_coefficients)
        diagonal = self.paired(a, self.sparse_species, a, self.sparse_species)[1:]
        self.species_scale = {
            int(z): diagonal[:, self.sparse_species == z].mean(dim=1).clamp_min(1e-300).tolist()
            for z in torch.unique(self.sparse_species).tolist()
        }

    def pairs(self, a, species_a, b, species_b):
        delta = (species_a[:, None] == species_b[None, :]).to(a[0].dtype)
        higher = wigner_module(self.wigner_hypers, a[0]).invariant_pairs(a, b)
        higher = higher.reshape(self.nu_max, a[0].shape[0], b[0].shape[0]) * delta
        return torch.cat([delta[None], higher]) * self._order_scale(species_a, a[0])[:, :, None]

    def paired(self, a, species_a, b, species_b):
        """Pieces of matched rows ``(a[p], b[p])``, ``[nu_max + 1, P]`` (see
        :func:`~acdc_potential.kernels.wigner.iteration.matched_invariant_rows`)."""
        return torch.stack(self.paired_pieces(a, species_a, b, species_b))

    def paired_pieces(self, a, species_a, b, species_b):
        rows = matched_invariant_rows(a, species_a, b, species_b, self.wigner_hypers)
        scale = self._order_scale(species_a, a[0])
        return [row * scale[nu] for nu, row in enumerate(rows)]

    def _order_features(self, flat: torch.Tensor) -> List[torch.Tensor]:
        """:meth:`~acdc_potential.kernels.wigner.features.OrderFeatures.order_features` ``[n, d_nu]``
        per ``nu`` of flat coefficients ``[n, D]``."""
        return order_features_of(self.wigner_hypers, flat).order_features(self.layout.unflatten(flat))

    def feature_sizes(self) -> Optional[List[int]]:
        """Sizes ``d_nu`` of the per-atom invariants (``Phi^3`` shortened by :meth:`_reduce`), or
        ``None`` when the kernel is not their scalar product (``nu_max > 4``, or no float64 features)."""
        if self.nu_max > 4 or self.sparse_coefficients is None:
            return None
        if not wigner_module(self.wigner_hypers, self.sparse_coefficients).use_features(self.sparse_coefficients.dtype):
            return None
        return [phi.shape[1] for phi in self._reduce(self._order_features(self.sparse_coefficients[:1]))]

    def clear_cache(self) -> None:
        """Free the sparse environments' invariants kept by :meth:`structure_derivatives`."""
        self._sparse_invariants = {}

    def _reduce(self, phi: List[torch.Tensor]) -> List[torch.Tensor]:
        """``Phi^3`` (last dimension) shortened by
        :meth:`~acdc_potential.kernels.wigner.features.OrderFeatures.order3_reduction`, same
        scalar products; the other orders unchanged."""
        if len(phi) < 3:
            return phi
        index, weight = order_features_of(self.wigner_hypers, phi[2]).order3_reduction([shape[1] for shape in self.layout.shapes])
        return phi[:2] + [phi[2].index_select(-1, index.to(phi[2].device)) * weight.to(phi[2])] + phi[3:]

    def structure_derivatives(self, coefficients, species, tangents, structure, n_structures, directions=None):
        """As :meth:`SparseKernel.structure_derivatives`; through the per-atom invariants
        ``Phi^nu`` when their size is at most ``max_feature_dimension``.

        Every order is a scalar product ``k^nu(i, m) = <Phi^nu_i, Phi^nu_m>``
        (:meth:`~acdc_potential.kernels.wigner.features.OrderFeatures.order_features`), so a
        structure's kernel sums and their derivatives along its ``K`` directions are
        ``<sum_i Phi_i, Phi_m>`` and ``<sum_i dPhi_i / dc_i . t_ik, Phi_m>``: the derivatives of
        the invariants of each structure's atoms summed *before* the sparse environments enter
        (:meth:`~acdc_potential.kernels.wigner.gradients.OrderFeatureGradients.order_feature_sums`),
        then one GEMM per order. The cost per structure is ``(k_s + 1) d M`` (``k_s`` its own
        directions, ``directions[s]``; the batch's padding is skipped) instead of ``n_atoms M``
        reverse passes through the kernel iterations (``Phi^3`` shortened by :meth:`_reduce`;
        ``d ~ 3e3`` for Cu at ``nu_max = 3``, ``1.6e5`` at 4, ``8e4`` for ethanol's three species at 3).
        Beyond ``max_feature_dimension`` the per-pair path is cheaper. The summed derivatives
        of a group of structures are bounded by ``feature_budget`` entries, as are the chunks
        in which the invariants of the sparse environments are computed; those of one species
        are kept for later groups and calls (until :meth:`clear_cache`) if they fit, with those
        of the species kept before, in ``sparse_feature_budget`` entries, else recomputed per group.
        """
        sizes = self.feature_sizes()
        if sizes is None or sum(sizes) > self.max_feature_dimension:
            return super().structure_derivatives(coefficients, species, tangents, structure, n_structures, directions)
        module = order_feature_gradients_of(self.wigner_hypers, coefficients)
        coefficients = coefficients.detach()
        n_k = tangents.shape[1]
        # at least one row of derivatives per structure (zero when it has no direction): no empty blocks
        counts = [n_k] * n_structures if directions is None else [max(1, int(k)) for k in directions.tolist()]
        values = coefficients.new_zeros((self.n_pieces, n_structures, self.n_sparse))
        derivatives = coefficients.new_zeros((self.n_pieces, n_structures, self.n_sparse, n_k))
        # rows of summed invariants and derivatives per [rows, d] block; sparse rows per [rows, d] block
        per_block = max(n_k + 1, int(self.feature_budget // sum(sizes)))
        per_sparse = max(1, int(self.feature_budget // sum(sizes)))
        for atoms, sparse in self._blocks(species):
            scale = self._order_scale(species[atoms[:1]], coefficients)[:, 0]
            owner = structure[atoms]
            values[0, :, sparse] += torch.bincount(owner, minlength=n_structures).to(values)[:, None] * scale[0]
            sparse_chunks = [sparse[start : start + per_sparse] for start in range(0, sparse.numel(), per_sparse)]
            cached = self._sparse_invariants.get(int(species[atoms[0]]))
            held = sum(x.numel() for kept in self._sparse_invariants.values() for x in kept)
            if cached is None and held + sparse.numel() * sum(sizes) <= self.sparse_feature_budget:
                # kept for every group and every later call (until clear_cache), built in chunks
                parts = [self._reduce(self._order_features(self.sparse_coefficients[chunk])) for chunk in sparse_chunks]
                cached = [torch.cat([part[nu] for part in parts]) for nu in range(len(sizes))]
                self._sparse_invariants[int(species[atoms[0]])] = cached
            if cached is not None:
                sparse_chunks = [sparse]
            # per structure, a row of the sum of the invariants and a row of its derivative along each
            # of its own directions, written by order_feature_sums into buffers allocated once: one
            # GEMM per order then gives values and derivatives in one pass over the sparse invariants
            present = torch.unique(owner).tolist()
            buffers = [coefficients.new_empty((min(per_block, sum(counts[s] + 1 for s in present)), d)) for d in sizes]
            for group in _row_groups(present, counts, per_block):
                # row of each structure's sum, then (structure, direction) of every derivative row
                starts, owners, directions_of, used = [], [], [], 0
                for s in group:
                    k = counts[s]
                    rows = atoms[owner == s]
                    c = self.layout.unflatten(coefficients[rows])
                    t = [x.view(rows.numel(), n_k, *x.shape[1:])[:, :k] for x in self.layout.unflatten(tangents[rows].reshape(-1, tangents.shape[2]))]
                    module.order_feature_sums(c, t, [x[used] for x in buffers], [x[used + 1 : used + 1 + k] for x in buffers])
                    starts.append(used)
                    owners.extend([s] * k)
                    directions_of.extend(range(k))
                    used += k + 1
                device = values.device
                summed = torch.tensor(starts, device=device)
                along = torch.ones(used, dtype=torch.bool, device=device).index_fill_(0, summed, False)
                structures = torch.tensor(group, device=device)[:, None]
                row_structure = torch.tensor(owners, device=device)[:, None]
                row_direction = torch.tensor(directions_of, device=device)[:, None]
                for chunk in sparse_chunks:
                    phi_m = cached if cached is not None else self._reduce(self._order_features(self.sparse_coefficients[chunk]))
                    for nu in range(len(sizes)):
                        both = (buffers[nu][:used] @ phi_m[nu].T) * scale[nu + 1]
                        values[nu + 1, structures, chunk[None, :]] += both[summed]
                        derivatives[nu + 1].index_put_((row_structure, chunk[None, :], row_direction), both[along], accumulate=True)
        return values, derivatives

    def rows(self, coefficients, species):
        self.check_species(species)
        sparse = self.layout.unflatten(self.sparse_coefficients)
        raw = invariant_kernels(self.layout.unflatten(coefficients), species, sparse, self.sparse_species, self.wigner_hypers)
        return raw * self._order_scale(species, coefficients)[:, :, None]

    def equivariant_rows(self, coefficients: torch.Tensor, species: torch.Tensor, key: int) -> torch.Tensor:
        """Pieces ``k^{nu, lambda sigma}(i, m) / s_{a_i nu}``, ``nu = 1..nu_max``, of the block ``key``
        (:func:`~acdc_potential.descriptors.cg.block_key`) against the sparse set:
        ``[nu_max, n, M, 2 lambda + 1, 2 lambda + 1]``, zero across central species (WK eq. 5; the
        rows of tensorial targets, which have no ``nu = 0`` piece).

        :param coefficients: ``[n, D]`` flat density coefficients. :param species: ``[n]`` atomic numbers.
        """
        self.check_species(species)
        module = wigner_module(self.wigner_hypers, coefficients)
        width = 2 * key_lambda(key) + 1
        out = coefficients.new_zeros((self.nu_max, coefficients.shape[0], self.n_sparse, width, width))
        scale = self._order_scale(species, coefficients)[1:]
        for atoms, sparse in self._blocks(species):
            b = self.layout.unflatten(self.sparse_coefficients[sparse])
            step = max(1, module.chunk_size // sparse.numel())
            for start in range(0, atoms.numel(), step):
                rows = atoms[start : start + step]
                block = module.equivariant_block(self.layout.unflatten(coefficients[rows]), b, key)
                out[:, rows[:, None], sparse[None, :]] = block * scale[:, rows, None, None, None]
        return out

    def piece_weights(self, mixing=None):
        m = {**self.mixing, **(mixing or {})}
        return exponential_weights(self.nu_max, m["c0"], m["a"], m["b"], torch.zeros((), dtype=torch.float64))

    def hypers(self):
        return {"wigner": dataclasses.asdict(self.wigner_hypers), "species_scale": self.species_scale}

    @classmethod
    def from_hypers(cls, hypers, mixing):
        return cls(WignerHypers(**hypers["wigner"]), mixing, hypers["species_scale"])


def _row_groups(structures: List[int], counts: List[int], rows: int) -> List[List[int]]:
    """``structures`` in consecutive groups whose ``counts[s] + 1`` rows (a structure's summed
    invariants and their derivatives along its own directions) fit in ``rows``."""
    groups: List[List[int]] = []
    used = rows  # as if a group were full: the first structure opens one
    for s in structures:
        if used + counts[s] + 1 > rows:
            groups.append([])
            used = 0
        groups[-1].append(s)
        used += counts[s] + 1
    return groups
