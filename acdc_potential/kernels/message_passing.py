"""The polynomial kernel on message-passing ACDC invariants (MP-ACDC ``[1 <- 1]``, ``[2 <- 1]``, beside single-centre orders).

The pieces are those of :class:`~acdc_potential.kernels.polynomial.PolynomialKernel`,
``[delta(a_i, a_m), delta(a_i, a_m) (x_i . x_m)^zeta]``, on the unit features ``x_i`` of
:class:`~acdc_potential.descriptors.invariants.MessagePassingInvariants` (docs/equations.md,
"Message-passing kernel"). Because ``x_i`` depends on the neighbours' densities, an atom's environment
is its feature vector, not its density coefficients: the sparse environments are stored as features
(a one-block layout ``[(1, F)]``), and the rows of a batch come from the features of all its atoms and
their forward-mode derivatives along the kept position and strain columns of each structure (:meth:`structure_rows`).
"""

import dataclasses
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..descriptors.density import DensityExpansion, Layout
from ..descriptors.invariants import (
    MESSAGE_ORDERS,
    NORM_FLOOR,
    SINGLE_CENTRE_BESIDE_MESSAGE,
    MessagePassingInvariants,
    check_message_orders,
    check_orders,
    fit_floors,
    fit_message_contraction,
)
from ..descriptors.jacobian import internal_columns
from ..descriptors.neighbors import AtomsBatch
from ..descriptors.radial import DensityHypers
from .base import sum_by_structure
from .polynomial import PolynomialKernel, floats


def batch_tangents(batch: AtomsBatch, kept: torch.Tensor, width: int) -> torch.Tensor:
    """Derivatives of the batch's pair vectors along one column of each structure, ``[k, P, 3]``.

    :param kept: ``[S, k]`` columns of :func:`~acdc_potential.descriptors.jacobian.structure_jacobian`
        (:attr:`~acdc_potential.descriptors.jacobian.InternalColumns.kept`), direction ``d`` of
        structure ``s`` being column ``kept[s, d]``: ``3 j + alpha`` moves atom ``j`` (numbered within
        its structure) along ``alpha``, so a pair vector ``r = x_j - x_i`` by ``e_alpha`` (``-e_alpha``
        for its centre); ``3 n_max + 3 alpha + beta`` is the strain ``x -> (1 + eps) x``, which moves
        ``r`` by ``e_alpha r_beta`` (``n_max`` the largest structure of the batch).
    :param width: the number of columns; ``kept`` entries from ``width`` on pad (no motion).
    """
    vectors = batch.pair_vectors().detach()
    n_max = int(batch.atoms_per_structure().max())
    local = batch.local_index()
    column = kept[batch.structure[batch.centers]]  # [P, k]
    position, strain = column < 3 * n_max, (column >= 3 * n_max) & (column < width)
    atom, strain_index = torch.div(column, 3, rounding_mode="floor"), (column - 3 * n_max).clamp(0, 8)
    atom_moves = (local[batch.neighbors, None] == atom).to(vectors) - (local[batch.centers, None] == atom).to(vectors)
    strain_moves = vectors.gather(1, strain_index % 3)
    size = torch.where(position, atom_moves, torch.where(strain, strain_moves, torch.zeros_like(strain_moves)))
    alpha = torch.where(position, column % 3, torch.div(strain_index, 3, rounding_mode="floor"))
    return (size[:, :, None] * torch.nn.functional.one_hot(alpha, 3).to(vectors)).transpose(0, 1)


class MessagePassingKernel(PolynomialKernel):
    """Polynomial kernel on :class:`MessagePassingInvariants`.

    :param message: the hyperparameters of the message's basis (a plain dict of :class:`DensityHypers`
        fields; its species are the model density's, its cutoff is ``cutoff``).
    :param zeta: exponent. :param orders: single-centre orders beside the message (subset of 1, 2;
        may be empty).
    :param message_orders: the ``nu`` of the ``[nu <- 1]`` invariants (a non-empty subset of 1, 2).
    :param contraction: components kept per block of the two factors of each ``[nu <- 1]`` coupling by
        the PCA of eq. 24, fitted on training structures before any environment is computed
        (:meth:`prepare`; 0: no contraction).
    :param projections: that PCA, ``(centre, message)`` per message order, when already fitted (from a checkpoint).
    :param mixing: ``c0``, ``a``. :param feature_space: as :class:`PolynomialKernel`'s.
    :param cutoff: the message's cutoff (A), at most the density's: how far a message travels and how far
        the neighbour densities it carries reach, so that an atomic energy depends on atoms up to
        ``max(r_cut, 2 cutoff)`` away; ``None`` (default): the density's.
    :param norm_floor: :param floors: as :class:`PolynomialKernel`'s, one floor per single-centre order
        and per message order (an atom whose last pair leaves the message's cutoff loses its message
        part smoothly).

    ``max_tangents`` (attribute, 2048) bounds the (atom, direction) pairs differentiated at once.
    """

    kind = "mpacdc"
    rows_by_species = False

    def __init__(
        self,
        message: Dict,
        zeta: int = 2,
        orders: Sequence[int] = (1, 2),
        message_orders: Sequence[int] = (1,),
        contraction: int = 0,
        projections: Optional[List[Tuple[List[torch.Tensor], List[torch.Tensor]]]] = None,
        mixing: Optional[Dict[str, float]] = None,
        feature_space: bool = True,
        cutoff: Optional[float] = None,
        norm_floor: float = NORM_FLOOR,
        floors: Optional[List[float]] = None,
    ):
        super().__init__(zeta, [2], contraction, projections, mixing, feature_space, norm_floor, floors)
        if cutoff is not None and not cutoff > 0.0:
            raise ValueError(f"the message's cutoff must be positive, got {cutoff}")
        self.cutoff = None if cutoff is None else float(cutoff)
        self.orders = check_orders(list(orders), MESSAGE_ORDERS, SINGLE_CENTRE_BESIDE_MESSAGE, empty=True)
        self.message_orders = check_message_orders(list(message_orders))
        try:
            DensityHypers(**dict(message)).validate()
        except TypeError as error:
            raise ValueError(f"the message's expansion is not a valid density: {error}") from None
        self.message = dict(message)
        self.max_tangents = 2048

    def contracts(self) -> bool:
        return True

    def prepare(self, expansion: DensityExpansion, batches: List[AtomsBatch]) -> None:
        """Fit on every atom of ``batches`` what is not given: the contraction of the ``[nu <- 1]``
        couplings (when asked for), then the floors of the parts (:func:`fit_floors`)."""
        self._zero_floors_without_norm_floor()
        if not self.unprepared:
            return
        message = self.message_expansion(expansion)
        device = expansion.species_lookup.device
        if bool(self.contraction) and self.projections is None:
            module = MessagePassingInvariants(expansion, message, self.orders, self.message_orders).to(device)
            self.projections = fit_message_contraction(module, batches, self.contraction)
        if self.floors is None:
            module = MessagePassingInvariants(expansion, message, self.orders, self.message_orders, self.projections).to(device)
            with torch.no_grad():
                norms = [
                    [torch.linalg.vector_norm(x, dim=1) for x in module.parts(b.pair_vectors(), b.centers, b.neighbors, message.species_index(b.numbers))]
                    for b in batches
                ]
            self.floors = fit_floors([torch.cat(part) for part in zip(*norms)], self.norm_floor)
        self.modules = {}

    def n_parts(self) -> int:
        """One part per single-centre order and per message order."""
        return len(self.orders) + len(self.message_orders)

    def message_expansion(self, expansion: DensityExpansion) -> DensityExpansion:
        """The message's expansion for the model's density ``expansion``: its species, the message's
        basis and cutoff (default the density's), on its device."""
        cutoff = expansion.cutoff if self.cutoff is None else self.cutoff
        if cutoff > expansion.cutoff:
            raise ValueError(f"the message's cutoff ({cutoff} A) exceeds the density's ({expansion.cutoff} A)")
        hypers = DensityHypers(**{**self.message, "cutoff": cutoff})
        return DensityExpansion(hypers, expansion.species).to(expansion.species_lookup.device)

    def feature_module(self, expansion: DensityExpansion) -> MessagePassingInvariants:
        """A new feature module of this kernel for the model's density ``expansion`` (what the exported head runs)."""
        return MessagePassingInvariants(expansion, self.message_expansion(expansion), self.orders, self.message_orders, self.projections, self.floors)

    def batch_features(self, expansion: DensityExpansion, batch: AtomsBatch, vectors: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``[N, F]`` unit features of every atom of ``batch`` (pair vectors ``vectors``, default the batch's)."""
        vectors = batch.pair_vectors() if vectors is None else vectors
        return self.module(expansion)(vectors, batch.centers, batch.neighbors, expansion.species_index(batch.numbers))

    def environments(self, expansion: DensityExpansion, batch: AtomsBatch, centres: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Layout]:
        """The features of the atoms ``centres`` (default all), ``[n, F]``, and their one-block layout."""
        with torch.no_grad():
            x = self.batch_features(expansion, batch)
        x = x if centres is None else x[centres]
        return x, Layout([(1, x.shape[1])])

    def tangent_size(self, expansion: DensityExpansion) -> int:
        """The features' size: the rows differentiate the features of the batch."""
        return self.layout.size

    def derivative_rows(self, expansion, batch, centres, strain):
        """:meth:`structure_rows` with gradients, from the features of every atom of the batch.

        With ``s = x_i . x_m`` (unit features) and ``dx_i`` the JVP of the batch's features along a
        direction: ``d k / d dir = zeta s^(zeta - 1) x_m . dx_i``; directions go ``max_tangents / N`` at a
        time, each structure's kept columns (:func:`~acdc_potential.descriptors.jacobian.internal_columns`:
        those the rigid motions do not determine), the others restored at the end.
        """
        owner = batch.structure[centres]
        species = batch.numbers[centres]
        n_structures = batch.n_structures
        columns = internal_columns(batch, strain)
        n_k = columns.kept.shape[1]
        vectors = batch.pair_vectors().detach()
        values = vectors.new_zeros((2, n_structures, self.n_sparse))
        derivatives = vectors.new_zeros((2, n_structures, self.n_sparse, n_k))

        def features(v: torch.Tensor) -> torch.Tensor:
            return self.batch_features(expansion, batch, v)[centres]

        x = features(vectors).detach()
        blocks = list(self._blocks(species))
        similarity = []
        for atoms, sparse in blocks:
            s = x[atoms] @ self.sparse_coefficients[sparse].T
            similarity.append(s)
            pieces = torch.stack([torch.ones_like(s), s**self.zeta])
            values[:, :, sparse] += sum_by_structure(pieces, owner[atoms], n_structures)
        step = max(1, self.max_tangents // batch.n_atoms)
        for start in range(0, n_k, step):
            stop = min(start + step, n_k)
            tangents = batch_tangents(batch, columns.kept[:, start:stop], columns.width)
            dx = torch.func.vmap(lambda t: torch.func.jvp(features, (vectors,), (t,))[1])(tangents)  # [k, n, F]
            for (atoms, sparse), s in zip(blocks, similarity):
                along = torch.einsum("mf,kif->imk", self.sparse_coefficients[sparse], dx[:, atoms])
                directional = self.zeta * (s ** (self.zeta - 1))[:, :, None] * along
                derivatives[1, :, sparse, start:stop] += sum_by_structure(directional[None], owner[atoms], n_structures)[0]
        return values, columns.full(derivatives)

    def hypers(self):
        projections = None if self.projections is None else [[list(centre), list(message)] for centre, message in self.projections]
        return {
            "zeta": self.zeta, "orders": list(self.orders), "message": dict(self.message),
            "message_orders": list(self.message_orders), "contraction": self.contraction, "projections": projections,
            "feature_space": self.feature_space, "cutoff": self.cutoff, "norm_floor": self.norm_floor, "floors": self.floors,
        }

    @classmethod
    def from_hypers(cls, hypers, mixing):
        projections = hypers["projections"]
        projections = None if projections is None else [(list(centre), list(message)) for centre, message in projections]
        orders = [int(nu) for nu in hypers["orders"]]
        cutoff = hypers["cutoff"]
        return cls(
            dict(hypers["message"]), int(hypers["zeta"]), orders, [int(nu) for nu in hypers["message_orders"]], int(hypers["contraction"]), projections,
            mixing, bool(hypers["feature_space"]), None if cutoff is None else float(cutoff), float(hypers["norm_floor"]), floats(hypers["floors"]),
        )


def message_hypers(density: DensityHypers, max_radial: int, max_angular: int) -> Dict:
    """The message expansion's hyperparameters: the density's with a coarser basis, as plain data."""
    return dataclasses.asdict(dataclasses.replace(density, max_radial=max_radial, max_angular=max_angular))
