"""Message-passing ACDC features ``[nu <- nu1]`` (MP-ACDC eq. 12, 21-23; docs/equations.md, "MP-ACDC features").

Every atom ``i`` is a centre. For each ordered pair ``(i, j)`` of the neighbour list the
pair term ``|r_ji; l2 m2>`` is the expansion of a Gaussian at ``r_ji`` on the ``R_nl Y_lm``
basis of a :class:`~acdc_potential.descriptors.density.DensityExpansion`, with the species of ``j`` as
channel: the density of the single neighbour ``j`` (:func:`pair_terms`).

1. message (eq. 21, 23): ``|rho_i^{[0 <- nu1]}> = sum_j |rho_j^{nu1}> (x) |r_ji>``, coupled to
   ``(lambda, sigma)`` blocks with eq. 5;
2. interaction (eq. 22): ``|rho_i^{[nu <- nu1]}> = |rho_i^{nu}> (x) |rho_i^{[0 <- nu1]}>``.

Features are blocks ``{(lambda, sigma): [n_atoms, 2 lambda + 1, n_features]}`` as in
:mod:`acdc_potential.descriptors.acdc`. The neighbour sum is done without materialising the
per-pair tensor product: the pair term factorises into ``Y_lm(r^_ji)`` and a radial and species
part, so the CG contraction is done per pair on the node features and ``Y`` only, and the sum
over neighbours of the outer product with the radial part is one batched matrix product.
"""

from typing import Dict, List, NamedTuple, Optional, Tuple

import numpy as np
import torch

from .cg import real_clebsch_gordan
from .acdc import ACDCFeatures, BlockProjections, Blocks, CGProduct, Key, couplings
from .density import DensityExpansion
from .neighbors import AtomsBatch


class PairTerms(NamedTuple):
    """Pair terms ``<a n l m | r_ji> = delta(a, a_j) f_cut(r_ji) I_nl(r_ji) Y_lm(r^_ji)``, kept factorised.

    They are the density of the single neighbour ``j`` of each pair, on the basis of a
    :class:`DensityExpansion` (:func:`pair_terms`); the message exploits the factorisation.

    :param radial: list over ``l`` of ``[P, n_radial[l]]``, ``f_cut I_nl``.
    :param harmonics: list over ``l`` of ``[P, 2l + 1]``, ``Y_lm``.
    :param species: ``[P]`` species index ``a_j`` of the neighbour.
    :param n_species: number of species channels.
    """

    radial: List[torch.Tensor]
    harmonics: List[torch.Tensor]
    species: torch.Tensor
    n_species: int

    def dense(self) -> List[torch.Tensor]:
        """Pair terms as density coefficients: list over ``l`` of ``[P, 2l + 1, n_species * n_radial[l]]``
        with channel ``a * n_radial[l] + n`` (zero outside ``a = a_j``)."""
        dense = []
        for radial, harmonics in zip(self.radial, self.harmonics):
            species = torch.nn.functional.one_hot(self.species, self.n_species).to(radial.dtype)
            channels = (species.unsqueeze(2) * radial.unsqueeze(1)).reshape(radial.shape[0], -1)
            dense.append(harmonics.unsqueeze(2) * channels.unsqueeze(1))
        return dense


class PairBasis(torch.nn.Module):
    """The factorised pair basis of a :class:`DensityExpansion`, TorchScript-compatible.

    ``forward(vectors [P, 3])`` returns ``(radial, harmonics)``: lists over ``l`` of
    ``f_cut(r) I_nl(r)`` ``[P, n_radial[l]]`` and ``Y_lm(r^)`` ``[P, 2l + 1]``, the fields of
    :class:`PairTerms`.
    """

    def __init__(self, expansion: DensityExpansion):
        super().__init__()
        self.expansion = expansion
        self.n_species = expansion.n_species

    def forward(self, vectors: torch.Tensor) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        expansion = self.expansion
        radial, harmonics = expansion.pair_basis(vectors)
        return (
            list(torch.split(radial, expansion.n_radial, dim=1)),
            [harmonics[:, l * l : (l + 1) * (l + 1)] for l in range(expansion.l_max + 1)],
        )


def pair_terms(expansion: DensityExpansion, vectors: torch.Tensor, neighbor_species: torch.Tensor) -> PairTerms:
    """Factorised pair terms of ``vectors`` ``[P, 3]`` (``r_ji``) with neighbour species ``[P]``
    (indices in ``expansion.species``), on the radial basis and cutoff of ``expansion``."""
    radial, harmonics = PairBasis(expansion)(vectors)
    return PairTerms(radial, harmonics, neighbor_species, expansion.n_species)


def padded_slots(rows: torch.Tensor, n_rows: int) -> Tuple[torch.Tensor, int]:
    """Layout of ``P`` pairs grouped by row as a zero-padded ``[n_rows, K]`` array.

    :param rows: ``[P]`` row of each pair (any order); ``n_rows``: number of rows.
    :return: ``slot [P]`` (pair ``p`` sits at ``[rows[p], slot[p]]``) and ``K``, the longest row.
    """
    counts = torch.bincount(rows, minlength=n_rows)
    first = torch.cumsum(counts, 0) - counts
    order = torch.argsort(rows, stable=True)
    slot = torch.empty_like(rows)
    slot[order] = torch.arange(rows.shape[0], device=rows.device) - first[rows[order]]
    width = int(counts.max()) if rows.shape[0] > 0 else 0
    return slot, width


def pad(values: torch.Tensor, rows: torch.Tensor, slot: torch.Tensor, n_rows: int, width: int) -> torch.Tensor:
    """Per-pair ``values [P, X]`` as ``[n_rows, width, X]`` (see :func:`padded_slots`), zero-filled."""
    padded = values.new_zeros((n_rows, width, values.shape[1]))
    return padded.index_put((rows, slot), values)


class Message(torch.nn.Module):
    """The message ``|rho_i^{[0 <- nu1]}; sigma; lambda mu>`` (eq. 21, 23), TorchScript-compatible.

    ``out[i, M, f * G + g] = sum_{p: centers[p] = i} sum_{m1 m2} C^{l1 l2 L}_{m1 m2 M}
    node[neighbors[p], m1, f] pair[p, m2, g]`` with ``pair = PairTerms.dense()`` (``G`` its
    width), chunks ordered as ``couplings(node_keys, [(l2, +1)])`` and parity
    ``sigma = s1 (-1)^(l1 + l2 + L)``. Because ``pair[p, m2, (a, n)] = delta(a, a_j) R[p, n]
    Y[p, m2]``, the CG contraction is done per pair on ``node`` and ``Y`` only; the sum over
    pairs of its outer product with ``R`` is one batched matrix product per ``(i, a_j)``
    (rows of a zero-padded layout), which also attaches the species channel.

    :param node_keys: keys ``(l1, s1)`` of the node features, in the order of ``forward``'s list.
    :param l_pair_max: largest ``l2`` of the pair terms.
    :param lambda_max: largest ``lambda`` of the message.
    :param keys: compute only these ``(lambda, sigma)`` blocks (default: all).
    """

    def __init__(self, node_keys: List[Key], l_pair_max: int, lambda_max: int, keys: Optional[List[Key]] = None):
        super().__init__()
        pair_keys = [(l2, 1) for l2 in range(l_pair_max + 1)]
        plan = [c for c in couplings(node_keys, pair_keys, lambda_max) if keys is None or (c.L, c.sigma) in keys]
        self.keys: List[Key] = sorted({(c.L, c.sigma) for c in plan})
        # one group per (node block, l2) computes all its L at once, the CG of each L side by side
        lambdas: Dict[Tuple[int, int], List[int]] = {}
        for c in plan:
            lambdas.setdefault((node_keys.index((c.l1, c.s1)), c.l2), []).append(c.L)
        groups = sorted(lambdas)
        self.group_node: List[int] = [node for node, _ in groups]
        self.group_l2: List[int] = [l2 for _, l2 in groups]
        self.group_sizes: List[List[int]] = [[2 * L + 1 for L in lambdas[g]] for g in groups]
        cgs = [
            np.concatenate([real_clebsch_gordan(node_keys[node][0], l2, L) for L in lambdas[(node, l2)]], axis=2)
            for node, l2 in groups
        ]
        self.cg_shape: List[List[int]] = [list(cg.shape) for cg in cgs]
        self.cg_start: List[int] = [int(x) for x in np.cumsum([0] + [cg.size for cg in cgs])[:-1]]
        self.register_buffer("cg", torch.tensor(np.concatenate([np.zeros(0)] + [cg.ravel() for cg in cgs])))
        # output block k: its (group, position of L in the group) pieces, in plan order
        self.chunks: List[List[Tuple[int, int]]] = [[] for _ in self.keys]
        for c in plan:
            group = (node_keys.index((c.l1, c.s1)), c.l2)
            self.chunks[self.keys.index((c.L, c.sigma))].append((groups.index(group), lambdas[group].index(c.L)))

    def forward(
        self,
        nodes: List[torch.Tensor],
        harmonics: List[torch.Tensor],
        radial: List[torch.Tensor],
        species: torch.Tensor,
        n_species: int,
        centers: torch.Tensor,
        neighbors: torch.Tensor,
    ) -> List[torch.Tensor]:
        """:param nodes: node features, ``[n_atoms, 2 l1 + 1, F]`` per key of ``node_keys``;
        ``harmonics``, ``radial``, ``species``, ``n_species``: the fields of :class:`PairTerms`;
        ``centers``, ``neighbors``: ``[P]`` pair indices. Returns one block per key of :attr:`keys`."""
        n_atoms = nodes[0].shape[0]
        rows = centers * n_species + species
        n_rows = n_atoms * n_species
        slot, width = padded_slots(rows, n_rows)
        gathered: Dict[int, torch.Tensor] = {}
        padded_radial: Dict[int, torch.Tensor] = {}
        pieces: List[List[torch.Tensor]] = []
        for k in range(len(self.group_node)):
            index, l2 = self.group_node[k], self.group_l2[k]
            if index not in gathered:
                gathered[index] = nodes[index][neighbors]
            if l2 not in padded_radial:
                padded_radial[l2] = pad(radial[l2], rows, slot, n_rows, width)
            node = gathered[index]  # [P, 2 l1 + 1, F]
            shape = self.cg_shape[k]
            size = shape[0] * shape[1] * shape[2]
            cg = self.cg[self.cg_start[k] : self.cg_start[k] + size].to(node.dtype).reshape(shape)
            angular = harmonics[l2] @ cg.permute(1, 0, 2).reshape(shape[1], shape[0] * shape[2])  # [P, a * S]
            coupled = torch.einsum("paS,paf->pSf", angular.reshape(-1, shape[0], shape[2]), node)
            f = node.shape[2]
            coupled = pad(coupled.reshape(node.shape[0], shape[2] * f), rows, slot, n_rows, width)
            summed = torch.bmm(coupled.transpose(1, 2), padded_radial[l2])  # [rows, S * F, n]
            n = summed.shape[2]
            # [(i, a), (S, f), n] -> [i, S, f, (a, n)]
            summed = summed.reshape(n_atoms, n_species, shape[2], f, n).permute(0, 2, 3, 1, 4)
            summed = summed.reshape(n_atoms, shape[2], f * n_species * n)
            pieces.append(torch.split(summed, self.group_sizes[k], dim=1))
        return [torch.cat([pieces[g][i] for g, i in chunks], dim=2) for chunks in self.chunks]


def message(
    node_blocks: Blocks,
    pairs: PairTerms,
    centers: torch.Tensor,
    neighbors: torch.Tensor,
    lambda_max: int,
    keys: Optional[List[Key]] = None,
) -> Blocks:
    """The message (eq. 21, 23) as blocks; see :class:`Message`.

    :param node_blocks: features of every atom, ``[n_atoms, 2 l1 + 1, F]`` per ``(l1, s1)``.
    :param pairs: the pair terms of the ``P`` pairs (:func:`pair_terms`).
    :param centers: ``[P]`` centre ``i`` of each pair; ``neighbors``: ``[P]`` neighbour ``j``.
    :param lambda_max: largest ``lambda`` of the message.
    :param keys: compute only these ``(lambda, sigma)`` blocks (default: all).
    :return: blocks ``[n_atoms, 2 lambda + 1, n_features]``, features as
        ``coupling_layout(node_blocks, density_blocks(pairs.dense()))``.
    """
    node_keys = sorted(node_blocks)
    module = Message(node_keys, len(pairs.harmonics) - 1, lambda_max, keys).to(centers.device)
    blocks = module(
        [node_blocks[key] for key in node_keys], pairs.harmonics, pairs.radial, pairs.species, pairs.n_species,
        centers, neighbors,
    )
    return dict(zip(module.keys, blocks))


class MPACDC(torch.nn.Module):
    """Message-passing ACDC from densities and pair terms, TorchScript-compatible; see
    :func:`mp_acdc_features` for the features and the options.

    :param l_max: largest ``l`` of the density coefficients.
    :param l_pair_max: largest ``l2`` of the pair terms.
    :param projections: optional contraction (eq. 24) of the two factors of the last coupling:
        ``(centre, message)``, one ``[F_k, K_k]`` per block of :attr:`centre_keys` and of
        :attr:`message_keys` (:meth:`intermediates`; :func:`~acdc_potential.descriptors.acdc.fit_block_projections`).
    """

    def __init__(
        self,
        l_max: int,
        l_pair_max: int,
        nu: int = 1,
        nu1: int = 1,
        lambda_max: int = 0,
        invariants_only: bool = False,
        intermediate_lambda_max: Optional[int] = None,
        projections: Optional[Tuple[List[torch.Tensor], List[torch.Tensor]]] = None,
    ):
        super().__init__()

        def capped(value: int) -> int:
            return value if intermediate_lambda_max is None else min(value, intermediate_lambda_max)

        centre_lambda = capped(nu * l_max)
        message_lambda = capped(lambda_max + centre_lambda)
        node_lambda = capped(message_lambda + l_pair_max)
        pair_keys = [(l2, 1) for l2 in range(l_pair_max + 1)]
        # plan with every block first, then build only the blocks that feed the output
        centre_all = ACDCFeatures(l_max, nu, centre_lambda, intermediate_lambda_max=intermediate_lambda_max).keys
        node_all = ACDCFeatures(l_max, nu1, node_lambda, intermediate_lambda_max=intermediate_lambda_max).keys
        message_plan = couplings(node_all, pair_keys, message_lambda)
        message_all = sorted({(c.L, c.sigma) for c in message_plan})
        interaction_plan = couplings(centre_all, message_all, lambda_max, invariants_only)
        message_keys = sorted({(c.l2, c.s2) for c in interaction_plan})
        self.centre = ACDCFeatures(
            l_max, nu, centre_lambda, False, intermediate_lambda_max, sorted({(c.l1, c.s1) for c in interaction_plan})
        )
        node_keys = sorted({(c.l1, c.s1) for c in message_plan if (c.L, c.sigma) in message_keys})
        self.nodes = ACDCFeatures(l_max, nu1, node_lambda, False, intermediate_lambda_max, node_keys)
        self.message = Message(self.nodes.keys, l_pair_max, message_lambda, message_keys)
        self.interaction = CGProduct(self.centre.keys, self.message.keys, lambda_max, invariants_only)
        self.keys: List[Key] = self.interaction.keys
        self.centre_keys: List[Key] = self.centre.keys
        self.message_keys: List[Key] = self.message.keys
        if projections is not None and (len(projections[0]), len(projections[1])) != (len(self.centre.keys), len(self.message.keys)):
            raise ValueError(
                f"expected {len(self.centre.keys)} centre and {len(self.message.keys)} message projections, "
                f"got {len(projections[0])} and {len(projections[1])}"
            )
        self.centre_projections = BlockProjections(None if projections is None else projections[0])
        self.message_projections = BlockProjections(None if projections is None else projections[1])

    def intermediates(
        self,
        coefficients: List[torch.Tensor],
        harmonics: List[torch.Tensor],
        radial: List[torch.Tensor],
        pair_species: torch.Tensor,
        n_species: int,
        centers: torch.Tensor,
        neighbors: torch.Tensor,
    ) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """The uncontracted factors of the last coupling: ``rho_i^{nu}`` blocks (:attr:`centre_keys`)
        and message blocks (:attr:`message_keys`)."""
        nodes = self.nodes(coefficients)
        messages = self.message(nodes, harmonics, radial, pair_species, n_species, centers, neighbors)
        return self.centre(coefficients), messages

    def forward(
        self,
        coefficients: List[torch.Tensor],
        harmonics: List[torch.Tensor],
        radial: List[torch.Tensor],
        pair_species: torch.Tensor,
        n_species: int,
        centers: torch.Tensor,
        neighbors: torch.Tensor,
    ) -> List[torch.Tensor]:
        """Arguments as :func:`mp_acdc_features`, with the fields of :class:`PairTerms` spelled
        out; returns blocks in the order of :attr:`keys`."""
        centre, messages = self.intermediates(coefficients, harmonics, radial, pair_species, n_species, centers, neighbors)
        return self.interaction(self.centre_projections(centre), self.message_projections(messages))


def mp_acdc_features(
    coefficients: List[torch.Tensor],
    pairs: PairTerms,
    centers: torch.Tensor,
    neighbors: torch.Tensor,
    nu: int = 1,
    nu1: int = 1,
    lambda_max: int = 0,
    invariants_only: bool = False,
    intermediate_lambda_max: Optional[int] = None,
) -> Blocks:
    """Message-passing ACDC ``|rho_i^{[nu <- nu1]}; sigma; lambda mu>`` (eq. 12, 21-23).

    ``rho_i^{nu}`` (centre) is coupled with the message ``sum_j rho_j^{nu1} (x) r_ji``. Features
    of each output block: chunks in the order of ``coupling_layout(rho_i^{nu}, message)``, the
    message's own features in the order of ``coupling_layout(rho_j^{nu1}, pair)``.

    :param coefficients: density coefficients of every atom, list over ``l`` of
        ``[n_atoms, 2l + 1, Q_l]`` (:meth:`DensityExpansion.compute`).
    :param pairs: pair terms of the ``P`` pairs (:func:`pair_terms`).
    :param centers: ``[P]`` centre ``i`` of each pair; ``neighbors``: ``[P]`` neighbour ``j``.
    :param nu: body order of the centre features ``rho_i^{nu}`` (1 or more).
    :param nu1: body order of the neighbour features ``rho_j^{nu1}`` (1 or more).
    :param lambda_max: largest ``lambda`` of the output.
    :param invariants_only: return only ``(0, +1)``; the last coupling is then cheap.
    :param intermediate_lambda_max: cap on the ``lambda`` of ``rho_i^{nu}``, ``rho_j^{nu1}`` and
        of the message. The default keeps everything that can reach ``lambda <= lambda_max``,
        so nothing is lost relative to an untruncated iteration.
    :return: blocks ``[n_atoms, 2 lambda + 1, n_features]`` keyed by ``(lambda, sigma)``.
    """
    module = MPACDC(
        len(coefficients) - 1, len(pairs.harmonics) - 1, nu, nu1, lambda_max, invariants_only, intermediate_lambda_max
    ).to(centers.device)
    blocks = module(coefficients, pairs.harmonics, pairs.radial, pairs.species, pairs.n_species, centers, neighbors)
    return dict(zip(module.keys, blocks))


class MPACDCFeatures(torch.nn.Module):
    """Message-passing ACDC features straight from a pair list, TorchScript-compatible.

    ``forward(vectors, centers, neighbors, numbers)`` expands the densities and the pair
    terms and returns one block per key of :attr:`keys`; options as :func:`mp_acdc_features`.

    :param density: expansion of the neighbour densities ``rho_i``.
    :param pair: basis of the pair terms (default: ``density``), whose species channels label
        the species of the neighbour ``j``.
    """

    def __init__(self, density: DensityExpansion, pair: Optional[DensityExpansion] = None, **options):
        super().__init__()
        self.density = density
        self.pair = PairBasis(density if pair is None else pair)
        self.features = MPACDC(density.l_max, self.pair.expansion.l_max, **options)
        self.keys: List[Key] = self.features.keys

    def forward(
        self, vectors: torch.Tensor, centers: torch.Tensor, neighbors: torch.Tensor, numbers: torch.Tensor
    ) -> List[torch.Tensor]:
        """:param vectors: ``[P, 3]`` pair vectors ``r_ji``; ``centers``, ``neighbors``: ``[P]``;
        ``numbers``: ``[n_atoms]`` atomic numbers. Returns blocks in the order of :attr:`keys`."""
        n_atoms = numbers.shape[0]
        coefficients = self.density(vectors, centers, self.density.species_index(numbers)[neighbors], n_atoms)
        pair_species = self.pair.expansion.species_index(numbers)[neighbors]
        radial, harmonics = self.pair(vectors)
        return self.features(coefficients, harmonics, radial, pair_species, self.pair.n_species, centers, neighbors)


def batch_mp_acdc_features(
    batch: AtomsBatch, density: DensityExpansion, pair: Optional[DensityExpansion] = None, **options
) -> Blocks:
    """:func:`mp_acdc_features` of every atom of ``batch``, differentiable in positions and cells.

    :param density: expansion of the neighbour densities ``rho_i``.
    :param pair: basis of the pair terms (default: ``density``).
    :param options: ``nu``, ``nu1``, ``lambda_max``, ``invariants_only``, ``intermediate_lambda_max``.
    """
    module = MPACDCFeatures(density, pair, **options).to(batch.positions.device)
    blocks = module(batch.pair_vectors(), batch.centers, batch.neighbors, batch.numbers)
    return dict(zip(module.keys, blocks))
