"""The GAP-form polynomial kernel on normalised invariant ACDC features.

Pieces ``[delta(a_i, a_m), delta(a_i, a_m) (x^_i . x^_m)^zeta]`` with ``x^`` the unit invariants of
the chosen body orders (:class:`~acdc_potential.descriptors.invariants.Invariants`; the power
spectrum, MP-ACDC eq. 7, by default) of each environment, mixed by ``c0`` and ``a``
(docs/equations.md, "Polynomial kernel"); ``zeta = 1`` is a linear model on the features.
:func:`polynomial_pieces` and :class:`Invariants` are the one implementation, used by the fit
(:class:`PolynomialKernel`) and by the exported head (:class:`~acdc_potential.model.heads.PolynomialHead`).

An environment of these kernels is its unit feature vector (a one-block layout ``[(1, F)]``): the
sparse environments are stored as features, which lets a linear kernel take the feature directions
themselves as its sparse set (:meth:`PolynomialKernel.feature_basis`, the solve in feature space).
"""

from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..descriptors.density import DensityExpansion, Layout
from ..descriptors.invariants import NORM_FLOOR, Invariants, check_orders, concatenated, fit_contraction, fit_floors
from ..descriptors.jacobian import batch_density, kept_jacobian
from ..descriptors.neighbors import AtomsBatch
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
        on training atoms before any environment is computed (:meth:`prepare`; 0: no contraction).
    :param projections: that PCA, when already fitted (from a checkpoint).
    :param mixing: ``c0`` (species-delta weight), ``a`` (polynomial weight).
    :param feature_space: a linear kernel (``zeta = 1``) whose features are fewer than the sparse
        environments asked for takes the feature directions as its sparse set (:meth:`feature_basis`).
    :param norm_floor: the floor of each order's features relative to its median norm over training
        atoms (:func:`~acdc_potential.descriptors.invariants.joined_parts`; 0: plain unit parts).
    :param floors: those floors, when already fitted (from a checkpoint); fitted by :meth:`prepare` otherwise.

    ``jvp_entries`` (attribute, 2^25) bounds the numbers that the feature JVPs of the derivative rows
    hold at once (:meth:`derivative_rows`).
    """

    kind = "polynomial"
    mixing_names = ("c0", "a")

    def __init__(
        self,
        zeta: int = 2,
        orders: Sequence[int] = (1, 2),
        contraction: int = 0,
        projections: Optional[List] = None,
        mixing: Optional[Dict[str, float]] = None,
        feature_space: bool = True,
        norm_floor: float = NORM_FLOOR,
        floors: Optional[List[float]] = None,
    ):
        super().__init__(2, mixing or {"c0": 1.0, "a": 1.0})
        if not norm_floor >= 0.0:
            raise ValueError(f"norm_floor must be non-negative, got {norm_floor}")
        self.norm_floor = float(norm_floor)
        self.floors = floats(floors)
        self.zeta = int(zeta)
        self.orders = check_orders(list(orders))
        if contraction < 0:
            raise ValueError(f"contraction must be 0 (none) or a number of components, got {contraction}")
        self.contraction = int(contraction) if self.contracts() else 0
        self.projections = projections
        self.feature_space = bool(feature_space)
        self.modules: Dict[Tuple[int, str], torch.nn.Module] = {}
        self.jvp_entries = 2**25

    def contracts(self) -> bool:
        """Whether the features have factors that ``contraction`` applies to (``nu = 3``)."""
        return 3 in self.orders

    @property
    def unprepared(self) -> bool:
        return (bool(self.contraction) and self.projections is None) or self.floors is None

    def prepare(self, expansion: DensityExpansion, batches: List[AtomsBatch]) -> None:
        """Fit on every atom of ``batches`` what is not given: the contraction of the ``nu = 2`` blocks
        (when asked for), then the floors of the parts (:func:`fit_floors`)."""
        self._zero_floors_without_norm_floor()
        if not self.unprepared:
            return
        with torch.no_grad():
            blocks = []
            for batch in batches:
                c, layout = batch_density(expansion, batch)
                blocks.append(layout.unflatten(c))
            if bool(self.contraction) and self.projections is None:
                self.projections = fit_contraction(expansion.l_max, concatenated(blocks), self.contraction)
            if self.floors is None:
                self.floors = self._fit_floors(Invariants(expansion.l_max, self.orders, self.projections).to(expansion.species_lookup.device), concatenated(blocks))
        self.modules = {}

    def _fit_floors(self, module: Invariants, coefficients: List[torch.Tensor]) -> List[float]:
        """:func:`fit_floors` of the parts of ``module`` on the atoms of ``coefficients``, through chunks
        of atoms whose uncontracted order-3 invariants stay within :attr:`jvp_entries` numbers."""
        n_atoms = coefficients[0].shape[0]
        step = max(1, self.jvp_entries // self._entries_per_jvp(module, [c[:1] for c in coefficients])) if n_atoms else 1
        norms = [
            [torch.linalg.vector_norm(x, dim=1) for x in module.parts([c[start : start + step] for c in coefficients])]
            for start in range(0, n_atoms, step)
        ]
        return fit_floors([torch.cat(part) for part in zip(*norms)] if norms else [], self.norm_floor)

    def n_parts(self) -> int:
        """The parts of the features, each with its floor: one per order."""
        return len(self.orders)

    def _zero_floors_without_norm_floor(self) -> None:
        """With ``norm_floor`` 0 the floors are zero: nothing to fit."""
        if self.floors is None and self.norm_floor == 0.0:
            self.floors = [0.0] * self.n_parts()

    def to(self, device: torch.device) -> "PolynomialKernel":
        """:meth:`SparseKernel.to`, the contraction's projections included (they are fitted on the CPU
        today; moved all the same, so that no tensor of the kernel is left behind)."""
        other = super().to(device)
        other.projections = moved(self.projections, device)
        other.modules = {}
        return other

    def feature_module(self, expansion: DensityExpansion) -> torch.nn.Module:
        """A new feature module of this kernel for the model's density ``expansion`` (what the exported head runs)."""
        return Invariants(expansion.l_max, self.orders, self.projections, self.floors)

    def module(self, expansion: DensityExpansion) -> torch.nn.Module:
        """:meth:`feature_module`, kept for the last expansion and device."""
        key = (id(expansion), str(expansion.species_lookup.device))
        if key not in self.modules:
            if self.unprepared:
                raise RuntimeError("the kernel's contraction or floors are not fitted yet: call prepare first")
            self.modules = {key: self.feature_module(expansion).to(expansion.species_lookup.device)}
        return self.modules[key]

    def environments(self, expansion: DensityExpansion, batch: AtomsBatch, centres: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Layout]:
        """The unit features of the atoms ``centres`` (default all), ``[n, F]``, and their one-block layout."""
        with torch.no_grad():
            c, layout = batch_density(expansion, batch, centres)
            x = self.module(expansion)(layout.unflatten(c))
        return x, Layout([(1, x.shape[1])])

    def selection_features(self, flat: torch.Tensor, layout: Layout) -> torch.Tensor:
        return flat

    def feature_basis(self, environments: torch.Tensor, species: torch.Tensor, chosen: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor]:
        """The sparse set of the solve in feature space: per species of ``chosen``, the origin and ``F``
        orthonormal feature directions, ``[S (F + 1), F]``, and their atomic numbers.

        With ``zeta = 1`` their kernel columns span the whole function space of the kernel,
        ``w_a0 + w_a . x^``, so the projected process on them is the exact Gaussian process (ridge
        regression on ``[1, x^]`` with prior variances ``c0`` and ``a``, whichever orthonormal directions),
        at the cost of ``F + 1`` sparse environments per species. The directions are the principal axes
        of the species' ``environments`` ``[n, F]`` (atomic numbers ``species [n]``), the most populated
        first, so that a prefix of the set (the tuning's) is the best low-rank model of its size.
        """
        if self.zeta != 1:
            raise ValueError(f"only a linear kernel (zeta = 1) has a feature-space basis, not zeta = {self.zeta}")
        rows, numbers = [], []
        for z in chosen:
            x = environments[species == z]
            _, axes = torch.linalg.eigh(x.T @ x)
            rows += [x.new_zeros((1, x.shape[1])), axes.flip(1).T]
            numbers.append(torch.full((x.shape[1] + 1,), int(z), dtype=torch.long, device=x.device))
        return torch.cat(rows), torch.cat(numbers)

    def complete_species(self) -> List[int]:
        """The species whose sparse set spans the whole function space of a linear kernel: ``[1, x_m]``
        of rank ``F + 1``, ``F`` the features but the components of zero floors (a :meth:`feature_basis`,
        or enough selected environments)."""
        if self.zeta != 1 or self.sparse_coefficients is None:
            return []
        complete = []
        # a zero floor's component (the last ones) is zero for every environment: no dimension of the space
        n_features, floors = self.sparse_coefficients.shape[1], self.floors or []
        zero = {n_features - len(floors) + k for k, floor in enumerate(floors) if floor == 0.0}
        kept = [k for k in range(n_features) if k not in zero]
        for z in torch.unique(self.sparse_species).tolist():
            rows = self.sparse_coefficients[self.sparse_species == z][:, kept]
            if rows.shape[0] < rows.shape[1] + 1:
                continue
            values = torch.linalg.svdvals(torch.cat([torch.ones_like(rows[:, :1]), rows], dim=1))
            if float(values[-1]) > max(rows.shape) * torch.finfo(rows.dtype).eps * float(values[0]):
                complete.append(int(z))
        return complete

    def pairs(self, a, species_a, b, species_b):
        return polynomial_pieces(a[0][:, 0], species_a, b[0][:, 0], species_b, self.zeta)

    def structure_rows(self, expansion, batch, centres, gradients, strain):
        """As :meth:`SparseKernel.structure_rows`: the values from the atoms' features
        (:meth:`environments`), the derivatives in forward mode through them (:meth:`derivative_rows`)."""
        if not gradients:
            x, _ = self.environments(expansion, batch, centres)
            return sum_by_structure(self.rows(x, batch.numbers[centres]), batch.structure[centres], batch.n_structures), None
        return self.derivative_rows(expansion, batch, centres, strain)

    def derivative_rows(self, expansion, batch, centres, strain):
        """:meth:`structure_rows` with gradients.

        With ``s = x^_i . x^_m``: ``d k / d dir = zeta s^(zeta-1) x^_m . dx^_i`` where
        ``dx^_i = (d x^_i / d c_i) t_i`` comes from one feature JVP per tangent ``t_i`` of the atom's
        density coefficients along the structure's kept columns (:func:`~acdc_potential.descriptors.jacobian.internal_columns`), so
        the cost per (atom, sparse environment) pair is a dot product. Atoms are processed in chunks
        of at most ``max_pairs`` (atom, tangent) JVPs, fewer where one JVP holds many numbers: with
        order 3 the ``nu = 2`` blocks of an atom (1.3e5 numbers for four species) are carried along
        every tangent, so the chunks keep :attr:`jvp_entries` numbers per intermediate.
        """
        coefficients, layout = batch_density(expansion, batch, centres)
        coefficients = coefficients.detach()
        species, owner, n_structures = batch.numbers[centres], batch.structure[centres], batch.n_structures
        module = self.module(expansion)

        def features(flat: torch.Tensor) -> torch.Tensor:
            return module(layout.unflatten(flat))

        columns, tangents = kept_jacobian(expansion, batch, centres, strain)
        n_k = tangents.shape[1]
        values = coefficients.new_zeros((2, n_structures, self.n_sparse))
        derivatives = coefficients.new_zeros((2, n_structures, self.n_sparse, n_k))
        step = max(1, min(self.max_pairs, self.jvp_entries // self._entries_per_jvp(module, layout.unflatten(coefficients[:1]))) // n_k)
        for block, sparse in self._blocks(species):
            x_m = self.sparse_coefficients[sparse]
            for start in range(0, block.numel(), step):
                atoms = block[start : start + step]
                c = coefficients[atoms]
                x = features(c)
                dx = torch.func.vmap(lambda t: torch.func.jvp(features, (c,), (t,))[1], in_dims=1, out_dims=1)(tangents[atoms])
                similarity = x @ x_m.T
                along = torch.einsum("mf,ikf->imk", x_m, dx)
                directional = (self.zeta * similarity ** (self.zeta - 1))[:, :, None] * along
                pieces = torch.stack([torch.ones_like(similarity), similarity**self.zeta])
                values[:, :, sparse] += sum_by_structure(pieces, owner[atoms], n_structures)
                derivatives[1, :, sparse] += sum_by_structure(directional[None], owner[atoms], n_structures)[0]
        return values, columns.full(derivatives)

    def _entries_per_jvp(self, module: torch.nn.Module, one: List[torch.Tensor]) -> int:
        """About the numbers of the largest intermediate of one atom's feature JVP along one tangent:
        its features, or with order 3 its ``nu = 2`` blocks. :param one: one atom's coefficients."""
        if one[0].shape[0] == 0:
            return 1
        with torch.no_grad():
            entries = module(one).shape[1]
            if 3 in self.orders:
                entries = max(entries, sum(block.numel() for block in module.nu2_blocks(one)))
        return entries

    def piece_weights(self, mixing=None):
        m = {**self.mixing, **(mixing or {})}
        return torch.tensor([m["c0"], m["a"]], dtype=torch.float64)

    def hypers(self):
        return {
            "zeta": self.zeta, "orders": list(self.orders), "contraction": self.contraction, "projections": self.projections,
            "feature_space": self.feature_space, "norm_floor": self.norm_floor, "floors": self.floors,
        }

    @classmethod
    def from_hypers(cls, hypers, mixing):
        projections = hypers["projections"]
        return cls(
            int(hypers["zeta"]), [int(nu) for nu in hypers["orders"]], int(hypers["contraction"]), list(projections) if projections is not None else None,
            mixing, bool(hypers["feature_space"]), float(hypers["norm_floor"]), floats(hypers["floors"]),
        )


def floats(values: Optional[Sequence]) -> Optional[List[float]]:
    """``values`` as a list of floats (``None`` stays ``None``)."""
    return None if values is None else [float(v) for v in values]


def moved(value, device: torch.device):
    """``value`` (a tensor, or lists and tuples of them, or ``None``) with every tensor on ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(moved(item, device) for item in value)
    return value
