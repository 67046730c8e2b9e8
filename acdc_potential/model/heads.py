"""Energy heads of fitted sparse-KRR models, in TorchScript (what ships in the ``.pt`` file).

A head maps the neighbour pairs of a batch to per-atom energies and variances, in two steps
so that energies and uncertainties share one environment computation:

- ``environments(pairs: Pairs) -> List[Tensor]``: the per-atom representation (the density
  coefficients of a Wigner head; the unit invariant features of a polynomial head, and of a
  message-passing head, whose features take in the neighbours' environments);
- ``forward(environments, species) -> Tensor`` ``[n_atoms]``: atomic energies (eV);
- ``variance(environments, species, group, n_groups, per_atom) -> Tensor``: the calibrated
  variance (eV^2) of each atomic energy (``[n_atoms]``; the unexplained prior variance) or the
  predictive variance of the sum over the atoms of each group (``[n_groups]``; ``group[i]``
  the group of atom ``i``) (:mod:`acdc_potential.model.uncertainty`).

Everything about the sparse environments that does not depend on the atom is precomputed
at construction (docs/equations.md, "Collapsed energies").
"""

import dataclasses
from typing import Dict, List, Optional, Tuple

import torch

from ..descriptors.density import DensityExpansion, Pairs, unflatten
from ..descriptors.vectors import VectorFeatures
from ..kernels.base import species_sums, weighted_gram_eigenpairs
from ..kernels.polynomial import polynomial_pieces
from ..kernels.wigner.features import COLLAPSE_CHUNK, OrderFeatures
from ..kernels.wigner.iteration import WignerKernels
from .compensated import compensated_polynomial_sum, grid_split, split_halves
from .uncertainty import FeatureVariance, SparseState, atom_factor_width, feature_atom_variance


class DensityHead(torch.nn.Module):
    """A head whose atomic environments come from its own density expansion: here the density
    coefficients themselves (subclasses may turn them into features).

    ``pairs_left``: whether its energies sum over sparse environments pair by pair in the module's
    dtype at every call (large, cancelling fitted weights that float32 cannot hold); ``plain_pairs``:
    whether that sum is a plain one, rounded anew at every call (docs/equations.md, "Numerical
    precision"), not a compensated one; both false here.
    """

    def __init__(self, density: DensityExpansion):
        super().__init__()
        self.density = density
        self.pairs_left = False
        self.plain_pairs = False

    def environments(self, pairs: Pairs) -> List[torch.Tensor]:
        return self.density.from_pairs(pairs)

    def variance_parts(self) -> List[str]:
        """Names of the submodules and buffers that only :meth:`variance` uses: they stay float64 in a
        file of any dtype (the unexplained variance ``k_xx - |k_xM P|^2`` cancels far below float32's
        precision), and the variance casts its inputs to float64. None here."""
        return []


class SparseWignerHead(DensityHead):
    """A head that sums Wigner kernels over its sparse environments (``self.kernels``, a
    :class:`WignerKernels`), with their ``nu = 2`` features (:meth:`WignerKernels.nu2_features`) for the
    pairs: hundreds of MB for large models, so computed on the first call (in the caller's dtype and
    device), not stored in the file."""

    # (each subclass declares ``sparse_features: Dict[int, torch.Tensor]``: TorchScript reads the
    # annotations of the scripted class only)

    def clear_cache(self):
        self.sparse_features = {}

    def _sparse_features(self, sparse: List[torch.Tensor]) -> Dict[int, torch.Tensor]:
        """:meth:`WignerKernels.nu2_features` of the sparse environments, computed once."""
        if not self.kernels.use_features(sparse[0].dtype) or self.kernels.nu_max < 2:
            return {}
        stale = True
        for value in self.sparse_features.values():
            stale = value.dtype != sparse[0].dtype or value.device != sparse[0].device
            break
        if stale:
            with torch.no_grad():
                self.sparse_features = self.kernels.nu2_features(sparse)
        return self.sparse_features


class WignerHead(SparseWignerHead):
    """``e_i = sum_m w_m sum_nu omega_nu k^nu(A_i, M_m) / s_{a nu}``, the exponential Wigner kernel (WK eq. E4).

    ``s_{a nu}`` is the per-species scale of each order (see
    :class:`~acdc_potential.kernels.wigner.kernel.WignerKernel`). With the weights
    ``omega_nu w_m / s_{a_m nu}`` precomputed, the constant piece ``omega_0 sum_m w_m`` summed once per
    species, correctly rounded (:func:`~acdc_potential.kernels.base.species_sums`), the orders ``nu >= 1``
    go through one of two routes:

    - ``collapsed`` (default, what exported files run): every order ``nu <= 4`` folded exactly
      into per-species tensors (:meth:`OrderFeatures.collapse`) at a cost per atom independent
      of the number of sparse environments, and orders ``nu >= 5`` (non-default models) summed
      pair by pair (:meth:`WignerKernels.weighted_sum`);
    - ``pairs``: every order pair by pair, the reference the collapse is checked against
      (``tests/test_routes.py``). Fitted weights are large and cancel, and this sum rounds them
      at every configuration, so its energies are noisy at 1e-10..1e-8 relative
      (docs/equations.md, "Numerical precision").

    The variance, only when asked, goes without gradients through the kernel rows (the ``pairs``
    route, and models of ``nu_max >= 4``) or, on the ``collapsed`` route of a ``nu_max <= 3`` model
    where it is cheaper (:func:`feature_route`), through the atoms' invariants ``Phi^nu`` (one
    scalar product per order, :class:`~acdc_potential.model.uncertainty.FeatureVariance`).

    :param density: the density expansion. :param kernel: the fitted
        :class:`~acdc_potential.kernels.wigner.kernel.WignerKernel`. :param state: its
        :class:`~acdc_potential.model.uncertainty.SparseState`. :param species: the model's
        atomic numbers. :param route: ``collapsed`` (default) or ``pairs``.
    """

    sparse_features: Dict[int, torch.Tensor]
    collapsed_shapes: List[List[int]]

    def __init__(self, density: DensityExpansion, kernel, state: SparseState, species: List[int], route: str = "collapsed"):
        super().__init__(density)
        if route not in ROUTES:
            raise ValueError(f"route must be one of {ROUTES}, got {route!r}")
        self.state = state
        self.collapsed = route == "collapsed"
        self.kernels = WignerKernels(kernel.wigner_hypers)
        # the orders that collapse: all of them up to nu_max = 4; a module of its own, in the file's
        # dtype, while ``kernels`` (the variance's) stays float64
        self.folded = WignerKernels(dataclasses.replace(kernel.wigner_hypers, nu_max=min(self.kernels.nu_max, FOLDED_ORDERS)))
        self.register_buffer("inverse_scale", 1.0 / kernel.order_scales(species))
        order_weights = self.state.piece_weights[:, None] * self.inverse_scale[self.state.sparse_species].T
        pair_weights = order_weights * self.state.weights[None, :]
        # the constant piece, on both routes, from the weights' correctly rounded sums per species: summing
        # their rounded products errs by epsilon times their absolute sum, a fixed offset per atom
        self.register_buffer("constant", self.state.piece_weights[0] * self.inverse_scale[:, 0] * species_sums(self.state.weights, self.state.sparse_species, len(species)))
        pair_weights[0] = 0.0
        sparse = unflatten(self.state.sparse, self.state.shapes)
        self.collapsed_shapes = []
        flat = torch.zeros((len(species), 0), dtype=torch.float64)
        if self.collapsed:
            folded = pair_weights[: FOLDED_ORDERS + 1]
            parts = OrderFeatures(self.folded).collapse(sparse, self.state.sparse_species, folded, len(species))
            parts[0] = self.constant
            self.collapsed_shapes = [list(part.shape[1:]) for part in parts]
            flat = torch.cat([part.reshape(len(species), -1) for part in parts], dim=1)
            pair_weights = torch.cat([torch.zeros_like(folded), pair_weights[FOLDED_ORDERS + 1 :]])
        self.register_buffer("collapsed_flat", flat)
        # what is left for the pairs: everything (route pairs), orders above 4, or nothing
        self.register_buffer("pair_weights", pair_weights)
        self.pairs_left = not self.collapsed or self.kernels.nu_max > FOLDED_ORDERS
        self.plain_pairs = self.pairs_left
        self.sparse_features = {}
        self._feature_variance(sparse, len(species))

    def _feature_variance(self, sparse: List[torch.Tensor], n_species: int) -> None:
        """``by_features`` (:func:`feature_route`); ``phi3_index``,
        ``phi3_weight`` (:meth:`OrderFeatures.order3_reduction`, for :meth:`variance_rows`) and
        ``variances``, the :class:`FeatureVariance` of the head's kernel (column scales ``(omega_nu /
        s_{a nu})^(1/2)`` of order ``nu``'s columns; empty unless ``by_features``)."""
        counts = torch.bincount(self.state.sparse_species, minlength=n_species)
        sizes = feature_route(self.kernels, sparse, self.state.shapes, counts, self.state.projection.shape[1]) if self.collapsed else []
        # the column scales are square roots of the order weights: none may be negative
        positive = bool((self.state.piece_weights >= 0).all()) and bool((self.inverse_scale >= 0).all())
        self.by_features = len(sizes) > 0 and positive
        index, weight = torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.float64)
        if self.by_features and self.kernels.nu_max >= 3:
            index, weight = OrderFeatures(self.kernels).order3_reduction([shape[1] for shape in self.state.shapes])
        self.register_buffer("phi3_index", index)
        self.register_buffer("phi3_weight", weight.to(torch.float64))
        rows = torch.zeros((0, 0), dtype=torch.float64)
        scales = torch.zeros((n_species, 0), dtype=torch.float64)
        if self.by_features:
            with torch.no_grad():
                chunks = torch.arange(sparse[0].shape[0]).split(COLLAPSE_CHUNK)
                rows = torch.cat([self.variance_rows([x.index_select(0, chunk) for x in sparse]) for chunk in chunks])
            columns = torch.cat([torch.full((size,), nu, dtype=torch.long) for nu, size in enumerate(sizes)])
            scales = (self.state.piece_weights[None, :] * self.inverse_scale).sqrt()[:, columns]
        species_of_rows = self.state.sparse_species if self.by_features else torch.zeros(0, dtype=torch.long)
        self.variances = FeatureVariance(rows, species_of_rows, self.state.projection, scales)

    def variance_rows(self, a: List[torch.Tensor]) -> torch.Tensor:
        """``[n, D]``: ``1`` (the constant piece), then ``Phi^nu`` of :meth:`WignerKernels.invariant_features`
        (``Phi^3`` shortened by ``phi3_index``, ``phi3_weight``) of float64 coefficients ``a``."""
        features: Dict[int, torch.Tensor] = {}
        if self.kernels.nu_max >= 2:
            features = self.kernels.nu2_features(a)
        phi = self.kernels.invariant_features(a, features)
        if len(phi) >= 3:
            phi[2] = phi[2].index_select(1, self.phi3_index) * self.phi3_weight
        return torch.cat([torch.ones((a[0].shape[0], 1), dtype=a[0].dtype, device=a[0].device)] + phi, dim=1)

    def _collapsed_parts(self, dtype: torch.dtype) -> List[torch.Tensor]:
        parts: List[torch.Tensor] = []
        start = 0
        flat = self.collapsed_flat.to(dtype)
        for shape in self.collapsed_shapes:
            size = 1
            for n in shape:
                size *= n
            parts.append(flat[:, start : start + size].reshape([flat.shape[0]] + shape))
            start += size
        return parts

    def forward(self, coefficients: List[torch.Tensor], species: torch.Tensor) -> torch.Tensor:
        if self.collapsed:
            energy = self.folded.collapsed_energy(coefficients, species, self._collapsed_parts(coefficients[0].dtype))
        else:
            energy = self.constant.to(coefficients[0].dtype)[species]
        if self.pairs_left:
            sparse = unflatten(self.state.sparse.to(coefficients[0].dtype), self.state.shapes)
            weights = self.pair_weights.to(coefficients[0].dtype)
            features = self._sparse_features(sparse)
            energy = energy + self.kernels.weighted_sum(coefficients, species, sparse, self.state.sparse_species, weights, features)
        return energy

    def kernel(
        self,
        a: List[torch.Tensor],
        species_a: torch.Tensor,
        b: List[torch.Tensor],
        species_b: torch.Tensor,
        b_features: Optional[Dict[int, torch.Tensor]] = None,
    ) -> torch.Tensor:
        """Mixed kernel ``[n_a, n_b]`` (all pieces, scaled and weighted), in the variance's dtype."""
        inverse_scale = self.inverse_scale[species_a].T
        pieces = self.kernels(a, species_a, b, species_b, b_features) * inverse_scale[:, :, None]
        return torch.einsum("p,pnm->nm", self.state.piece_weights, pieces)

    def variance_parts(self) -> List[str]:
        return ["state", "kernels", "inverse_scale", "phi3_weight", "variances"]

    def variance(
        self, coefficients: List[torch.Tensor], species: torch.Tensor, group: torch.Tensor, n_groups: int, per_atom: bool
    ) -> torch.Tensor:
        """In float64 (:meth:`variance_parts`) from the coefficients, whatever their dtype."""
        with torch.no_grad():
            a = [c.detach().to(self.state.sparse.dtype) for c in coefficients]
            if self.by_features:
                return self._variance_by_features(a, species, group, n_groups, per_atom).to(coefficients[0].dtype)
            sparse = unflatten(self.state.sparse, self.state.shapes)
            k_xm = self.kernel(a, species, sparse, self.state.sparse_species, self._sparse_features(sparse))
            if per_atom:
                inverse_scale = self.inverse_scale[species].T
                piece_weights = self.state.piece_weights
                k_xx = piece_weights[0] + piece_weights[1:] @ (self.kernels.invariant_matched(a, a) * inverse_scale[1:])
                variance = self.state.atom_variance(k_xm, k_xx, species)
            else:
                variance = self.state.group_variance(k_xm, self.kernel(a, species, a, species), species, group, n_groups)
            return variance.to(coefficients[0].dtype)

    def _variance_by_features(self, a: List[torch.Tensor], species: torch.Tensor, group: torch.Tensor, n_groups: int, per_atom: bool) -> torch.Tensor:
        x = self.variance_rows(a)
        carries = self.state.centres[species]
        if per_atom:
            return self.state.energy_scale**2 * carries * self.variances.atoms(x, species)
        phi, k_gg = self.variances.structures(x, species, carries, group, n_groups)
        return self.state.projected_group_variance(phi, k_gg, group, n_groups)


def feature_route(kernels: WignerKernels, sparse: List[torch.Tensor], shapes: List[List[int]], counts: torch.Tensor, r: int) -> List[int]:
    """The sizes of the columns of :meth:`WignerHead.variance_rows` per order ``nu = 0..nu_max``
    (``Phi^3`` shortened) where the variances of a Wigner head are cheaper through these ``D``
    invariants of the atoms (:class:`~acdc_potential.model.uncertainty.FeatureVariance`) than through its
    kernel rows, else ``[]``.

    That is for ``nu_max <= 3`` (above, the invariants have ``D^2`` entries), where an atom's ``D``
    invariants against the ``w = min(D, M_s)`` columns of its species' factor take fewer multiply-adds
    than its ``M_s`` kernel entries, each at least the products of the ``nu = 2`` feature blocks,
    ``sum_blocks (2 lambda + 1)^2 d_block`` (:meth:`WignerKernels.invariants_from_features`), and the
    factors (``[S, D, r]`` and, where ``w < r``, ``[S, D, w]``; ``counts [S]``, the sparse environments
    per species) stay below ``FEATURE_VARIANCE_ENTRIES``."""
    if kernels.nu_max > 3 or sparse[0].shape[0] == 0:
        return []
    one = [x[:1] for x in sparse]
    features = kernels.nu2_features(one) if kernels.nu_max >= 2 else {}
    sizes = [1] + [phi.shape[1] for phi in kernels.invariant_features(one, features)]
    if kernels.nu_max >= 3:
        sizes[3] = OrderFeatures(kernels).order3_reduction([shape[1] for shape in shapes])[0].shape[0]
    d = sum(sizes)
    pair = sum(f.shape[1] ** 2 * f.shape[2] for f in features.values()) + d
    largest = int(counts.max())
    entries = counts.shape[0] * d * (r + atom_factor_width(d, largest, r))  # FeatureVariance's factors
    pays = d * min(d, largest) <= largest * pair and entries <= FEATURE_VARIANCE_ENTRIES
    return sizes if pays else []


ROUTES = ("collapsed", "pairs")
# largest factors of the variances by features (FeatureVariance, 8 bytes each)
FEATURE_VARIANCE_ENTRIES = 2**25
# orders that fold into per-species tensors (OrderFeatures.collapse)
FOLDED_ORDERS = 4


class PolynomialHead(DensityHead):
    """``e_i = sum_m w_m [c0 delta(a_i, a_m) + a delta(a_i, a_m) (x^_i . x^_m)^zeta]`` on unit
    invariant features (:func:`~acdc_potential.kernels.polynomial.polynomial_pieces`, the kernel's
    :class:`~acdc_potential.descriptors.invariants.Invariants`).

    The constant piece is summed once per species. The polynomial piece goes through one of two
    routes (as :class:`WignerHead`'s):

    - ``collapsed`` (default): for ``zeta = 1`` and ``2`` folded exactly into per-species tensors at
      export (:meth:`collapse`): ``e_i = a x^_i . v_a`` with ``v_a = sum_{m : a_m = a} w_m x^_m`` (a
      linear model on the features), or ``e_i = a x^_i^T W_a x^_i`` with ``W_a = sum_m w_m x^_m
      x^_m^T``, kept whole where some species has at least ``F`` sparse environments and otherwise
      as its exact eigenpairs; the cancellation among large fitted weights is then rounded once, and
      a linear model costs ``F`` per atom. Larger ``zeta`` sum pair by pair in double-double
      arithmetic (:func:`~acdc_potential.model.compensated.compensated_polynomial_sum`), so that the
      cancellation is rounded once as well;
    - ``pairs``: every ``zeta`` pair by pair, the reference the collapse is tested against; its
      energies are rounded anew at every configuration (docs/equations.md, "Numerical precision").

    :param density: the density expansion. :param kernel: the fitted
        :class:`~acdc_potential.kernels.polynomial.PolynomialKernel`. :param state: its
        :class:`~acdc_potential.model.uncertainty.SparseState`. :param species: the model's atomic numbers.
        :param route: ``collapsed`` (default) or ``pairs``.
    """

    def __init__(self, density: DensityExpansion, kernel, state: SparseState, species: List[int], route: str = "collapsed"):
        super().__init__(density)
        self.state = state
        self.zeta = int(kernel.zeta)
        self.features = kernel.feature_module(density).to(state.sparse.device)
        # the sparse environments are unit features already: the state's tensor, not a second copy
        self.register_buffer("sparse_features", state.sparse)
        self.collapse(species, route)
        self.atoms = feature_atom_variance(state, self.zeta)

    def environments(self, pairs: Pairs) -> List[torch.Tensor]:
        """The unit invariant features ``[n, F]`` (one tensor), shared by energies and variances."""
        return [self.features(self.density.from_pairs(pairs))]

    def collapse(self, species: List[int], route: str) -> None:
        """Precompute what does not depend on the atom: ``constant`` ``[S]`` (``c0 sum_{m : a_m = a}
        w_m``), and on the ``collapsed`` route for ``zeta <= 2`` the tensors of the polynomial piece,
        ``folded`` (``[S, F]`` for ``zeta = 1``; ``[S, F, r]`` for ``zeta = 2``) and ``values``
        (``[S, r]`` eigenvalues, or ``[S, 0]`` where ``folded`` is ``W_a`` itself); for ``zeta >= 3``
        the splits that the compensated sum takes: of the weights ``a w_m`` (``weight_high``,
        ``weight_low`` ``[M]``) and of the sparse features (``sparse_grid``, ``sparse_rest`` ``[M, F]``)."""
        if route not in ROUTES:
            raise ValueError(f"route must be one of {ROUTES}, got {route!r}")
        state, n_species = self.state, len(species)
        self.register_buffer("constant", state.piece_weights[0] * species_sums(state.weights, state.sparse_species, n_species))
        self.collapsed = route == "collapsed" and self.zeta <= 2
        self.compensated = route == "collapsed" and self.zeta > 2
        self.pairs_left = not self.collapsed
        self.plain_pairs = self.pairs_left and not self.compensated
        x = self.sparse_features
        weights = state.piece_weights[1] * state.weights
        empty = x.new_zeros((0, x.shape[1]))
        grid, rest = grid_split(x, 25) if self.compensated else (empty, empty)
        high, low = split_halves(weights) if self.compensated else (x.new_zeros(0), x.new_zeros(0))
        self.register_buffer("sparse_grid", grid)
        self.register_buffer("sparse_rest", rest)
        self.register_buffer("weight_high", high)
        self.register_buffer("weight_low", low)
        folded = x.new_zeros((n_species, 0))
        values = x.new_zeros((n_species, 0))
        if self.collapsed and self.zeta == 1:
            folded = x.new_zeros((n_species, x.shape[1])).index_add(0, state.sparse_species, weights[:, None] * x)
        elif self.collapsed:
            d = x.shape[1]
            largest = int(torch.bincount(state.sparse_species, minlength=n_species).max())
            folded = x.new_zeros((n_species, d, min(largest, d)))
            values = x.new_zeros((n_species, largest if largest < d else 0))
            for s in range(n_species):
                rows = torch.nonzero(state.sparse_species == s).flatten()
                if rows.numel() == 0:
                    continue
                if largest >= d:
                    gram = x[rows].T @ (weights[rows, None] * x[rows])
                    folded[s] = 0.5 * (gram + gram.T)
                else:
                    folded[s], values[s] = weighted_gram_eigenpairs(x[rows], weights[rows], largest)
        self.register_buffer("folded", folded)
        self.register_buffer("values", values)

    def kernel(self, x: torch.Tensor, species_x: torch.Tensor, y: torch.Tensor, species_y: torch.Tensor) -> torch.Tensor:
        """Mixed kernel ``[n_x, n_y]`` between unit feature rows, in the variance's dtype."""
        pieces = polynomial_pieces(x, species_x, y, species_y, self.zeta)
        return torch.einsum("p,pnm->nm", self.state.piece_weights, pieces)

    def polynomial_energy(self, unit: torch.Tensor, species: torch.Tensor) -> torch.Tensor:
        """``[n]`` the polynomial piece ``a sum_m w_m delta (x^_i . x^_m)^zeta`` of unit features ``[n, F]``."""
        if self.compensated and unit.dtype == torch.float64:
            return self.compensated_energy(unit, species)
        if not self.collapsed:
            polynomial = polynomial_pieces(unit, species, self.sparse_features.to(unit.dtype), self.state.sparse_species, self.zeta)[1]
            return self.state.piece_weights[1].to(unit.dtype) * (polynomial @ self.state.weights.to(unit.dtype))
        folded = self.folded.to(unit.dtype)
        if self.zeta == 1:
            return (unit * folded[species]).sum(dim=1)
        energy = torch.zeros(species.shape[0], dtype=unit.dtype, device=unit.device)
        present = torch.unique(species)
        for index in range(present.shape[0]):
            s = int(present[index])
            atoms = torch.nonzero(species == s).flatten()
            rows = unit.index_select(0, atoms)
            projected = rows @ folded[s]
            if self.values.shape[1] == 0:  # W_a itself
                term = (projected * rows).sum(dim=1)
            else:  # its eigenvectors V, W_a = V diag(values) V^T
                term = (projected * projected * self.values[s].to(unit.dtype)).sum(dim=1)
            energy = energy.index_add(0, atoms, term)
        return energy

    def compensated_energy(self, unit: torch.Tensor, species: torch.Tensor) -> torch.Tensor:
        """The polynomial piece of float64 unit features ``[n, F]``, species by species, rounded once."""
        energy = torch.zeros(species.shape[0], dtype=unit.dtype, device=unit.device)
        present = torch.unique(species)
        for index in range(present.shape[0]):
            atoms = torch.nonzero(species == present[index]).flatten()
            rows = torch.nonzero(self.state.sparse_species == present[index]).flatten()
            if rows.shape[0] == 0:
                continue
            term = compensated_polynomial_sum(
                unit.index_select(0, atoms),
                self.sparse_features.index_select(0, rows),
                self.sparse_grid.index_select(0, rows),
                self.sparse_rest.index_select(0, rows),
                (self.weight_high.index_select(0, rows), self.weight_low.index_select(0, rows)),
                self.zeta,
            )
            energy = energy.index_add(0, atoms, term)
        return energy

    def forward(self, environments: List[torch.Tensor], species: torch.Tensor) -> torch.Tensor:
        unit = environments[0]
        return self.constant.to(unit.dtype)[species] + self.polynomial_energy(unit, species)

    def variance_parts(self) -> List[str]:
        return ["state", "atoms", "sparse_features"]

    def variance(
        self, environments: List[torch.Tensor], species: torch.Tensor, group: torch.Tensor, n_groups: int, per_atom: bool
    ) -> torch.Tensor:
        """In float64 (:meth:`variance_parts`) from the features, whatever their dtype."""
        with torch.no_grad():
            unit = environments[0].detach().to(self.sparse_features.dtype)
            if per_atom:
                variance = self.atoms(unit, species, self.sparse_features)
            else:
                k_xm = self.kernel(unit, species, self.sparse_features, self.state.sparse_species)
                variance = self.state.group_variance(k_xm, self.kernel(unit, species, unit, species), species, group, n_groups)
            return variance.to(environments[0].dtype)


class MessagePassingHead(PolynomialHead):
    """:class:`PolynomialHead` on :class:`~acdc_potential.descriptors.invariants.MessagePassingInvariants`:
    an atom's environment is its feature vector, computed from the pairs of the whole batch (its
    neighbours' densities enter), so the atomic energy of ``i`` depends on atoms up to ``max(r_cut,
    2 r_m)`` away, ``r_m`` the message's cutoff (:attr:`interaction_range`; ``2 r_cut`` by default).

    :param density: the density expansion. :param kernel: the fitted
        :class:`~acdc_potential.kernels.message_passing.MessagePassingKernel`. :param state: its
        :class:`~acdc_potential.model.uncertainty.SparseState` (sparse environments as features).
        :param species: the model's atomic numbers. :param route: as :class:`PolynomialHead`'s.
    """

    def __init__(self, density: DensityExpansion, kernel, state: SparseState, species: List[int], route: str = "collapsed"):
        super().__init__(density, kernel, state, species, route)
        self.interaction_range = max(float(density.cutoff), 2.0 * float(self.features.message.cutoff))

    def environments(self, pairs: Pairs) -> List[torch.Tensor]:
        return [self.features(pairs.vectors, pairs.centers, pairs.neighbors, pairs.species)]


# the lambda = 1, sigma = +1 block (a polar vector; descriptors.cg.block_key)
DIPOLE_BLOCK = 2
# the real l = 1 components m = -1, 0, 1 are y, z, x: SPHERICAL picks them from Cartesian x, y, z,
# CARTESIAN picks x, y, z from them
SPHERICAL = [1, 2, 0]
CARTESIAN = [SPHERICAL.index(axis) for axis in range(3)]


class DipoleHead(SparseWignerHead):
    """Atomic dipole contributions (e*A): local dipoles, and optionally atomic charges times positions.

    ``mu_i = sum_m sum_nu omega_nu / s_{a nu} k^{nu, 1+}(A_i, M_m) w_m + q_i (r_i - r_A)``, the symmetry-adapted
    kernel of WK eq. 5 with ``lambda = 1, sigma = +1``, mixed over the body orders as WK eq. E4 without
    ``c0`` (``k^{0, 1+} = 0``), with the per-species order scales ``s_{a nu}`` of the model's invariant
    kernel (defined as for energies, :class:`~acdc_potential.kernels.wigner.kernel.WignerKernel`);
    ``w_m`` ``[M, 3]`` the regression
    weights (spherical components). The charges ``q_i = sum_m sum_nu omega'_nu k^{nu, 0+}(A_i, M_m) / s_{a nu}
    v_m`` (``nu = 0`` the species delta) multiply positions relative to the system's mean ``r_A``, which
    keeps a system's total charge at zero. A system's dipole is the sum of its atoms' contributions
    (docs/equations.md, "Dipoles").

    :param density: the density expansion. :param kernel: the fitted Wigner kernel with its
        sparse environments (``nu_max`` the model's). :param weights: ``[M, 3]`` ``w_m``, real
        ``l = 1`` components ``m = -1, 0, 1``. :param omega: ``[nu_max]`` ``omega_nu``.
        :param species: the model's atomic numbers. :param charges: ``(omega' [nu_max + 1], v [M])``, or
        ``None`` for local dipoles only.
    """

    sparse_features: Dict[int, torch.Tensor]

    def __init__(self, density: DensityExpansion, kernel, weights: torch.Tensor, omega: torch.Tensor, species: List[int], charges: Optional[Tuple[torch.Tensor, torch.Tensor]] = None):
        super().__init__(density)
        self.kernels = WignerKernels(kernel.wigner_hypers)
        self.shapes: List[List[int]] = [list(shape) for shape in kernel.layout.shapes]
        index = {int(z): k for k, z in enumerate(species)}
        sparse_species = torch.tensor([index[int(z)] for z in kernel.sparse_species.tolist()], dtype=torch.long)
        self.register_buffer("sparse", kernel.sparse_coefficients.to(torch.float64).clone())
        self.register_buffer("sparse_species", sparse_species)
        inverse_scale = 1.0 / kernel.order_scales(species)[sparse_species].T
        order_weights = omega.to(torch.float64)[:, None] * inverse_scale[1:]
        self.register_buffer("pair_weights", order_weights[:, :, None] * weights.to(torch.float64)[None])
        self.charges = charges is not None
        charge_weights = torch.zeros((0, sparse_species.shape[0]), dtype=torch.float64)
        if charges is not None:
            charge_weights = charges[0].to(torch.float64)[:, None] * inverse_scale * charges[1].to(torch.float64)[None]
        self.register_buffer("charge_weights", charge_weights)
        self.register_buffer("cartesian", torch.tensor(CARTESIAN, dtype=torch.long))
        self.block: int = DIPOLE_BLOCK
        self.sparse_features = {}

    def forward(self, coefficients: List[torch.Tensor], species: torch.Tensor, centred: torch.Tensor) -> torch.Tensor:
        """``[n_atoms, 3]`` Cartesian dipole contributions (e*A) of atoms of species indices ``species`` at
        positions ``centred`` ``[n_atoms, 3]`` relative to their system's mean (used by the charges only)."""
        dtype = coefficients[0].dtype
        sparse = unflatten(self.sparse.to(dtype), self.shapes)
        spherical = self.kernels.equivariant_weighted_sum(coefficients, species, sparse, self.sparse_species, self.pair_weights.to(dtype), self.block)
        local = spherical.index_select(1, self.cartesian)
        if self.charges:
            features = self._sparse_features(sparse)
            charges = self.kernels.weighted_sum(coefficients, species, sparse, self.sparse_species, self.charge_weights.to(dtype), features)
            local = local + charges[:, None] * centred.to(dtype)
        return local


class FeatureDipoleHead(DensityHead):
    """Atomic dipole contributions (e*A) of a linear model on true-vector features: ``mu_i = x_i v_{a_i}``,
    ``x_i`` ``[3, Q]`` the ``(1, +1)`` block of :class:`~acdc_potential.descriptors.vectors.VectorFeatures`
    and ``v_a`` ``[Q]`` one weight vector per species, shared by the three components (docs/equations.md,
    "Dipoles"). With message-passing features an atom's dipole depends on atoms up to twice the cutoff away
    (:attr:`interaction_range`).

    :param features: the feature module (its expansion is the head's density). :param vectors: ``[S, Q]`` ``v_a``.
    """

    def __init__(self, features: VectorFeatures, vectors: torch.Tensor):
        super().__init__(features.expansion)
        self.features = features
        self.register_buffer("vectors", vectors.detach().to(torch.float64).clone())
        self.register_buffer("cartesian", torch.tensor(CARTESIAN, dtype=torch.long))
        self.charges = False
        if features.passing is not None:
            self.interaction_range = 2.0 * float(features.expansion.cutoff)

    def environments(self, pairs: Pairs) -> List[torch.Tensor]:
        return [self.features(pairs.vectors, pairs.centers, pairs.neighbors, pairs.species)]

    def forward(self, environments: List[torch.Tensor], species: torch.Tensor, centred: torch.Tensor) -> torch.Tensor:
        """``[n_atoms, 3]`` Cartesian dipole contributions (e*A) of atoms of species indices ``species``
        (``centred``, the positions about the system's mean, unused: no charges)."""
        x = environments[0]
        spherical = torch.einsum("nmq,nq->nm", x, self.vectors.to(x.dtype).index_select(0, species))
        return spherical.index_select(1, self.cartesian)
