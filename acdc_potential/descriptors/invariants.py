"""Invariant ACDC features of chosen body orders, for kernels on features (docs/equations.md, "Polynomial kernel").

:class:`Invariants` maps an atom's density coefficients to the concatenation of its invariant
features of orders ``nu`` in ``orders``, each order scaled to unit norm and divided by
``sqrt(len(orders))`` so that every order weighs the same and the whole vector has unit norm:

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

from .acdc import BlockProjections, CGProduct, Key, fit_block_projections, power_spectrum, unit_rows

ORDERS = (1, 2, 3)


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

    ``forward(coefficients)``: list over ``l`` of ``[n, 2l + 1, Q_l]`` -> ``[n, F]``.
    """

    def __init__(self, l_max: int, orders: List[int], projections: Optional[List[torch.Tensor]] = None):
        super().__init__()
        self.orders: List[int] = check_orders(orders)
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

    def forward(self, coefficients: List[torch.Tensor]) -> torch.Tensor:
        parts: List[torch.Tensor] = []
        for nu in self.orders:
            if nu == 1:
                x = coefficients[0][:, 0]
            elif nu == 2:
                x = power_spectrum(coefficients)
            else:
                x = self.bispectrum(coefficients)
            parts.append(unit_rows(x))
        return torch.cat(parts, dim=1) / float(len(parts)) ** 0.5


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
    on the basis of ``message``, each part of unit norm, together of unit norm.

    An atom's ``[nu <- 1]`` invariants depend on its neighbours' densities, hence on atoms up to twice
    the cutoff away: they are computed from the pairs of the whole batch, not from one atom's coefficients.
    ``[1 <- 1]`` has about ``Q^3`` invariants per coupling and ``[2 <- 1]``, which couples the centre's
    ``nu = 2`` blocks with the message, about ``Q^4`` (``Q`` the message's density channels): the two
    factors of each coupling may be contracted by a PCA per block (eq. 24; ``projections``,
    :func:`fit_message_contraction`).

    :param density: the model's density expansion (orders 1, 2).
    :param message: expansion of the neighbour densities and pair terms of the message, of the same
        cutoff and species (a coarser basis keeps the ``Q^3`` features of the message tractable).
    :param orders: single-centre orders beside the message, a subset of 1, 2 (may be empty).
    :param message_orders: the ``nu`` of the ``[nu <- 1]`` invariants, a non-empty subset of 1, 2.
    :param projections: per message order (in the order of ``message_orders``), the ``(centre, message)``
        projections of the factors' blocks (:meth:`MPACDC.intermediates`), or ``None`` for all features.

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
    ):
        super().__init__()
        from .mpacdc import MPACDC, PairBasis

        if message.cutoff != density.cutoff or message.species != density.species:
            raise ValueError("the message's expansion must have the density's cutoff and species")
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

    def factors(self, vectors: torch.Tensor, centers: torch.Tensor, neighbors: torch.Tensor, species: torch.Tensor) -> List[Tuple[List[torch.Tensor], List[torch.Tensor]]]:
        """The uncontracted factors of the ``[nu <- 1]`` coupling of every atom, per message order
        (:meth:`MPACDC.intermediates`)."""
        radial, harmonics = self.pair(vectors)
        neighbor_species = species[neighbors]
        coefficients = self.message(vectors, centers, neighbor_species, species.shape[0])
        return [
            passing.intermediates(coefficients, harmonics, radial, neighbor_species, self.message.n_species, centers, neighbors)
            for passing in self.passing
        ]

    def forward(self, vectors: torch.Tensor, centers: torch.Tensor, neighbors: torch.Tensor, species: torch.Tensor) -> torch.Tensor:
        n_atoms = species.shape[0]
        neighbor_species = species[neighbors]
        parts: List[torch.Tensor] = []
        local = self.local
        if local is not None:
            # Invariants divides its unit parts by sqrt(len(orders)): undone, so that every part weighs the same
            parts.append(local(self.density(vectors, centers, neighbor_species, n_atoms)) * float(len(self.orders)) ** 0.5)
        radial, harmonics = self.pair(vectors)
        coefficients = self.message(vectors, centers, neighbor_species, n_atoms)
        for passing in self.passing:
            mp = passing(coefficients, harmonics, radial, neighbor_species, self.message.n_species, centers, neighbors)[0][:, 0]
            parts.append(unit_rows(mp))
        # every single-centre order and every message order one unit part
        return torch.cat(parts, dim=1) / float(len(self.orders) + len(self.message_orders)) ** 0.5


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
