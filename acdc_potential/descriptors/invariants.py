"""Invariant ACDC features of chosen body orders, for kernels on features (docs/equations.md, "Polynomial kernel").

:class:`Invariants` maps an atom's density coefficients to the concatenation of its invariant
features of orders ``nu`` in ``orders``, each order with its floor as one more component and scaled to
unit norm (:func:`joined_parts`), divided by ``sqrt(len(orders))`` so that every order weighs the same
and the whole vector has unit norm:

- ``nu = 1``: the ``l = 0`` density coefficients ``<a n 0 0 | rho_i>``;
- ``nu = 2``: the power spectrum (MP-ACDC eq. 6-7, :func:`~acdc_potential.descriptors.acdc.power_spectrum`);
- ``nu = 3``: the bispectrum by two CG iterations (eq. 5): ``rho_i^{2}; lambda +1`` for ``lambda <= l_max``
  (the only blocks that couple with a density block ``l <= l_max`` to an invariant), optionally
  contracted per block by a PCA fitted on training environments (eq. 24, the "delayed" contraction;
  :func:`fit_contraction`), then coupled with ``rho_i`` to ``(0, +1)``.

It is plain differentiable torch and TorchScript-compatible: the fit differentiates it in forward mode
(:class:`~acdc_potential.kernels.polynomial.PolynomialKernel`), the exported head runs the same module.
"""

from typing import List, Optional, Tuple

import torch

from .acdc import BlockProjections, CGProduct, Key, fit_block_projections, floored_unit_rows, power_spectrum

ORDERS = (1, 2, 3)
# default floor of each part of the features relative to the median norm of the part over training atoms
# (fit_floors): the part's typical size, so that a part carries its size against the floor as much as its
# direction, and an atom that loses its last neighbour (or message) changes gently. Measured on every
# reference set (README, "Feature models"; benchmarks/floors.py): the polynomial kernel's test force error
# at 1 was the lowest, or within 9 % of the lowest, of the floors 0 to 20
NORM_FLOOR = 1.0


def joined_parts(parts: List[torch.Tensor], floors: torch.Tensor) -> torch.Tensor:
    """The ``K`` parts ``x_k [n, F_k]`` of the features (orders, messages), each with its floor ``f_k``
    (``floors [K]``) made of unit norm (:func:`~acdc_potential.descriptors.acdc.floored_unit_rows`),
    joined and divided by ``sqrt(K)``, so that every part weighs the same and the row has unit norm:
    ``[n, sum_k F_k + K]``, the ``K`` components of the floors last (a model fitted without floors is
    the same model with ``K`` zero components appended to its sparse features)."""
    units = [floored_unit_rows(x, floors[k]) for k, x in enumerate(parts)]
    joined = [u[:, :-1] for u in units] + [u[:, -1:] for u in units]
    return torch.cat(joined, dim=1) / float(len(units)) ** 0.5


def fit_floors(norms: List[torch.Tensor], relative: float) -> List[float]:
    """The floor of each part: ``relative`` times the median of its norms ``norms[k] [n]`` over the
    training atoms where it is not zero (a short message cutoff or a dilute gas leaves many atoms without
    a part; their zeros would pull the floor to zero); 0 for a part that is zero everywhere."""
    return [relative * median(n[n > 0]) for n in norms]


def median(values: torch.Tensor) -> float:
    """The median of ``values`` ``[n]`` (the mean of the two middle values for even ``n``; 0 for none)."""
    if values.numel() == 0:
        return 0.0
    ordered = values.flatten().sort().values
    middle = (ordered.numel() - 1) // 2
    return float(ordered[middle : ordered.numel() - middle].mean())


def check_orders(orders: List[int], allowed: Tuple[int, ...] = ORDERS, what: str = "invariant orders", empty: bool = False) -> List[int]:
    """``orders`` sorted without repeats; a ``ValueError`` naming them as ``what`` unless they are a
    subset of ``allowed`` (1, 2, 3 by default), non-empty unless ``empty``."""
    chosen = sorted({int(nu) for nu in orders})
    if (not chosen and not empty) or not set(chosen) <= set(allowed):
        raise ValueError(f"{what} must be a {'' if empty else 'non-empty '}subset of {list(allowed)}, got {list(orders)}")
    return chosen


def pair_keys(l_max: int) -> List[Key]:
    """The ``nu = 2`` blocks ``(lambda, +1)``, ``lambda = 0..l_max``, that feed the ``nu = 3`` invariants."""
    return [(lam, 1) for lam in range(l_max + 1)]


class Invariants(torch.nn.Module):
    """Invariants of orders ``orders`` of density coefficients with angular channels ``0..l_max``.

    :param l_max: largest ``l`` of the density coefficients.
    :param orders: body orders ``nu`` (a subset of 1, 2, 3).
    :param projections: for ``nu = 3``, the contraction ``[Q_l^2 ... , k]`` of each ``nu = 2`` block of
        :func:`pair_keys` (in that order; :func:`fit_contraction`), or ``None`` for all features.
    :param floors: the floor of each order's part (:func:`joined_parts`, :func:`fit_floors`); default 0.

    ``forward(coefficients)``: list over ``l`` of ``[n, 2l + 1, Q_l]`` -> ``[n, F]``, ``F`` the number of
    invariants of every order plus one component per order (its floor's).
    """

    def __init__(self, l_max: int, orders: List[int], projections: Optional[List[torch.Tensor]] = None, floors: Optional[List[float]] = None):
        super().__init__()
        self.orders: List[int] = check_orders(orders)
        self.register_buffer("floors", part_floors(floors, len(self.orders)))
        density_keys = [(l, 1) for l in range(l_max + 1)]
        keys = pair_keys(l_max)
        self.pairs = CGProduct(density_keys, density_keys, l_max, keys=keys)
        self.triples = CGProduct(keys, density_keys, 0, invariants_only=True)
        if projections is not None and len(projections) != len(keys):
            raise ValueError(f"expected {len(keys)} nu = 2 projections (lambda = 0..{l_max}), got {len(projections)}")
        self.contraction = BlockProjections(projections)

    def nu2_blocks(self, coefficients: List[torch.Tensor]) -> List[torch.Tensor]:
        """The ``nu = 2`` blocks of :func:`pair_keys`, ``[n, 2 lambda + 1, Q^2]`` (uncontracted)."""
        return self.pairs(coefficients, coefficients)

    def bispectrum(self, coefficients: List[torch.Tensor]) -> torch.Tensor:
        """``nu = 3`` invariants ``[n, F_3]``, contracted when the module has projections."""
        return self.triples(self.contraction(self.nu2_blocks(coefficients)), coefficients)[0][:, 0]

    def parts(self, coefficients: List[torch.Tensor]) -> List[torch.Tensor]:
        """The invariants of each order, ``[n, F_nu]``, before the floors and the normalisation."""
        parts: List[torch.Tensor] = []
        for nu in self.orders:
            if nu == 1:
                parts.append(coefficients[0][:, 0])
            elif nu == 2:
                parts.append(power_spectrum(coefficients))
            else:
                parts.append(self.bispectrum(coefficients))
        return parts

    def forward(self, coefficients: List[torch.Tensor]) -> torch.Tensor:
        return joined_parts(self.parts(coefficients), self.floors)


def part_floors(floors: Optional[List[float]], n_parts: int) -> torch.Tensor:
    """``[n_parts]`` the floors of a feature module's parts (zeros for ``None``); a ``ValueError`` unless one per part."""
    values = [0.0] * n_parts if floors is None else [float(f) for f in floors]
    if len(values) != n_parts or any(not f >= 0.0 for f in values):
        raise ValueError(f"expected {n_parts} non-negative floors, one per part of the features, got {floors}")
    return torch.tensor(values, dtype=torch.float64)


def fit_contraction(l_max: int, coefficients: List[torch.Tensor], components: int) -> List[torch.Tensor]:
    """PCA projections of the ``nu = 2`` blocks (eq. 24) fitted on the environments ``coefficients``
    (list over ``l`` of ``[n, 2l + 1, Q_l]``), at most ``components`` per block: the leading
    eigenvectors of the uncentred covariance over environments and ``mu`` (:class:`BlockPCA`)."""
    module = Invariants(l_max, [3]).to(coefficients[0].device)
    with torch.no_grad():
        return fit_block_projections(module.nu2_blocks([c.detach() for c in coefficients]), components)


class MessagePassingInvariants(torch.nn.Module):
    """Invariants of every atom of a batch of pairs: single-centre orders ``orders`` of ``density``
    (:class:`Invariants`, without ``nu = 3``) beside the message-passing ``[nu <- 1]`` invariants for
    ``nu`` in ``message_orders`` (MP-ACDC eq. 12, 21-23; :class:`~acdc_potential.descriptors.mpacdc.MPACDC`)
    on the basis of ``message``, each part with its floor of unit norm, together of unit norm (:func:`joined_parts`).

    An atom's ``[nu <- 1]`` invariants depend on its neighbours' densities, hence on atoms up to twice
    the message's cutoff away: they are computed from the pairs of the whole batch, not from one atom's coefficients.
    ``[1 <- 1]`` has about ``Q^3`` invariants per coupling and ``[2 <- 1]``, which couples the centre's
    ``nu = 2`` blocks with the message, about ``Q^4`` (``Q`` the message's density channels): the two
    factors of each coupling may be contracted by a PCA per block (eq. 24; ``projections``,
    :func:`fit_message_contraction`).

    :param density: the model's density expansion (orders 1, 2).
    :param message: expansion of the neighbour densities and pair terms of the message, of the same
        species (a coarser basis keeps the ``Q^3`` features of the message tractable) and a cutoff
        ``r_m`` at most the density's: the message part sees only the pairs within ``r_m``, so that an
        atom's features depend on atoms up to ``max(r_cut, 2 r_m)`` away.
    :param orders: single-centre orders beside the message, a subset of 1, 2 (may be empty).
    :param message_orders: the ``nu`` of the ``[nu <- 1]`` invariants, a non-empty subset of 1, 2.
    :param projections: per message order (in the order of ``message_orders``), the ``(centre, message)``
        projections of the factors' blocks (:meth:`MPACDC.intermediates`), or ``None`` for all features.
    :param floors: the floor of each part, the single-centre orders then the message orders
        (:func:`joined_parts`); default 0.

    ``forward(vectors [P, 3], centers [P], neighbors [P], species [N])`` (``species`` the index of each
    atom in the expansions' species) -> ``[N, F]``.
    """

    # (TorchScript cannot infer the type of an empty list attribute)
    orders: List[int]

    def __init__(
        self,
        density,
        message,
        orders: List[int],
        message_orders: Optional[List[int]] = None,
        projections: Optional[List[Tuple[List[torch.Tensor], List[torch.Tensor]]]] = None,
        floors: Optional[List[float]] = None,
    ):
        super().__init__()
        from .mpacdc import MPACDC, PairBasis

        if message.cutoff > density.cutoff or message.species != density.species:
            raise ValueError("the message's expansion must have the density's species and at most its cutoff")
        self.message_orders: List[int] = check_message_orders([1] if message_orders is None else message_orders)
        self.orders = check_orders(list(orders), MESSAGE_ORDERS, SINGLE_CENTRE_BESIDE_MESSAGE, empty=True)
        self.density = density
        self.local = Invariants(density.l_max, self.orders) if self.orders else None
        self.message = message
        self.pair = PairBasis(message)
        l_max = message.l_max
        if projections is not None and len(projections) != len(self.message_orders):
            raise ValueError(f"expected projections for {len(self.message_orders)} message orders, got {len(projections)}")
        self.passing = torch.nn.ModuleList(
            [MPACDC(l_max, l_max, nu, 1, 0, True, projections=None if projections is None else projections[k]) for k, nu in enumerate(self.message_orders)]
        )
        self.register_buffer("floors", part_floors(floors, len(self.orders) + len(self.message_orders)))

    def message_pairs(self, vectors: torch.Tensor, centers: torch.Tensor, neighbors: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The pairs ``(vectors, centers, neighbors)`` within the message's cutoff (all, when it is the density's)."""
        if self.message.cutoff >= self.density.cutoff:
            return vectors, centers, neighbors
        inside = torch.nonzero(torch.linalg.vector_norm(vectors.detach(), dim=1) < self.message.cutoff).flatten()
        return vectors.index_select(0, inside), centers.index_select(0, inside), neighbors.index_select(0, inside)

    def factors(self, vectors: torch.Tensor, centers: torch.Tensor, neighbors: torch.Tensor, species: torch.Tensor) -> List[Tuple[List[torch.Tensor], List[torch.Tensor]]]:
        """The uncontracted factors of the ``[nu <- 1]`` coupling of every atom, per message order
        (:meth:`MPACDC.intermediates`)."""
        vectors, centers, neighbors = self.message_pairs(vectors, centers, neighbors)
        radial, harmonics = self.pair(vectors)
        neighbor_species = species[neighbors]
        coefficients = self.message(vectors, centers, neighbor_species, species.shape[0])
        return [
            passing.intermediates(coefficients, harmonics, radial, neighbor_species, self.message.n_species, centers, neighbors)
            for passing in self.passing
        ]

    def parts(self, vectors: torch.Tensor, centers: torch.Tensor, neighbors: torch.Tensor, species: torch.Tensor) -> List[torch.Tensor]:
        """The invariants of each single-centre order, then of each message order, before the floors and
        the normalisation."""
        n_atoms = species.shape[0]
        neighbor_species = species[neighbors]
        parts: List[torch.Tensor] = []
        local = self.local
        if local is not None:
            parts += local.parts(self.density(vectors, centers, neighbor_species, n_atoms))
        vectors, centers, neighbors = self.message_pairs(vectors, centers, neighbors)
        neighbor_species = species[neighbors]
        radial, harmonics = self.pair(vectors)
        coefficients = self.message(vectors, centers, neighbor_species, n_atoms)
        for passing in self.passing:
            parts.append(passing(coefficients, harmonics, radial, neighbor_species, self.message.n_species, centers, neighbors)[0][:, 0])
        return parts

    def forward(self, vectors: torch.Tensor, centers: torch.Tensor, neighbors: torch.Tensor, species: torch.Tensor) -> torch.Tensor:
        # every single-centre order and every message order one unit part
        return joined_parts(self.parts(vectors, centers, neighbors, species), self.floors)


# the nu of [nu <- 1], and the single-centre orders a message-passing kernel takes beside them
MESSAGE_ORDERS = (1, 2)
SINGLE_CENTRE_BESIDE_MESSAGE = "single-centre orders beside [nu <- 1] features"


def check_message_orders(orders: List[int]) -> List[int]:
    """``orders`` (the nu of ``[nu <- 1]``) sorted without repeats; a ``ValueError`` unless a non-empty subset of 1, 2."""
    return check_orders(orders, MESSAGE_ORDERS, "message orders (the nu of [nu <- 1])")


def fit_message_contraction(module: MessagePassingInvariants, batches, components: int) -> List[Tuple[List[torch.Tensor], List[torch.Tensor]]]:
    """PCA projections (eq. 24) of the two factors of each ``[nu <- 1]`` coupling (per message order of
    ``module``, uncontracted), at most ``components`` per block, fitted on every atom of ``batches``
    (:class:`~acdc_potential.descriptors.neighbors.AtomsBatch` objects of training structures)."""
    factors = []
    with torch.no_grad():
        for batch in batches:
            factors.append(module.factors(batch.pair_vectors(), batch.centers, batch.neighbors, module.message.species_index(batch.numbers)))
    projections = []
    for k in range(len(module.message_orders)):
        centre = concatenated([per_batch[k][0] for per_batch in factors])
        message = concatenated([per_batch[k][1] for per_batch in factors])
        projections.append((fit_block_projections(centre, components), fit_block_projections(message, components)))
    return projections


def concatenated(parts: List[List[torch.Tensor]]) -> List[torch.Tensor]:
    """Blocks of several batches ``parts[b][k]`` joined over the batches, block by block."""
    return [torch.cat([blocks[k] for blocks in parts]) for k in range(len(parts[0]))]
