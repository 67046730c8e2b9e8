"""The sparse-kernel interface: kernel rows against a sparse set, and their derivatives.

A *sparse kernel* holds the density coefficients of a set of sparse environments
``M_m`` (chosen per central species by :func:`~acdc_potential.fit.selection.select_sparse`)
and maps the density coefficients of atoms to kernel rows ``k(A_i, M_m)``, resolved into
*pieces* (body orders for the Wigner kernel) that are mixed linearly:

    k(i, m) = sum_p omega_p(mixing) k_p(i, m),     k_p = 0 unless a_i = a_m

(docs/equations.md, "Exponential kernel"; WK eq. E4). Because every row of the design
matrix is linear in the pieces, the fitter stores them separately and re-mixes them while
tuning ``c0, a, b`` without recomputing any kernel.

Coefficients travel in two forms: the list over ``l`` of ``[n, 2l + 1, Q_l]`` of
:mod:`~acdc_potential.descriptors.density`, and a flat ``[n, D]`` described by a
:class:`~acdc_potential.descriptors.density.Layout`.

A kernel names itself in checkpoints by its registry name ``kind`` (:data:`acdc_potential.kernels.KERNELS`)
and plain-data ``hypers()``; :meth:`SparseKernel.from_hypers` rebuilds it from them.
"""

import copy
import math
from typing import Dict, List, Optional, Tuple

import torch

from ..descriptors.acdc import power_spectrum
from ..descriptors.density import DensityExpansion, Layout
from ..descriptors.jacobian import batch_density, kept_jacobian
from ..descriptors.neighbors import AtomsBatch


def sum_by_structure(x: torch.Tensor, owner: torch.Tensor, n_structures: int) -> torch.Tensor:
    """Sum ``[n_pieces, n, ...]`` over the atoms of each structure -> ``[n_pieces, n_structures, ...]``."""
    out = x.new_zeros((x.shape[0], n_structures) + tuple(x.shape[2:]))
    return out.index_add(1, owner, x)


def weighted_gram_eigenpairs(rows: torch.Tensor, omega: torch.Tensor, rank: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The exact eigenpairs of ``W = rows^T diag(omega) rows`` without forming it: ``V [D, rank]``
    and ``values [rank]`` with ``W = V diag(values) V^T``, zero-padded to ``rank >= n``.

    ``rows^T = Q R`` (thin QR) gives ``W = Q (R diag(omega) R^T) Q^T``, whose ``[n, n]`` middle is
    diagonalised. Large weights of both signs that cancel in ``W`` cancel here once, in ``values``
    (docs/equations.md, "Numerical precision").

    :param rows: ``[n, D]``, ``n <= D``. :param omega: ``[n]``. :param rank: columns of the result.
    """
    q, r = torch.linalg.qr(rows.T)
    middle = r @ (omega[:, None] * r.T)
    values, inner = torch.linalg.eigh(0.5 * (middle + middle.T))
    vectors = rows.new_zeros((rows.shape[1], rank))
    padded = rows.new_zeros(rank)
    vectors[:, : values.shape[0]] = q @ inner
    padded[: values.shape[0]] = values
    return vectors, padded


def species_sums(values: torch.Tensor, species: torch.Tensor, n_species: int) -> torch.Tensor:
    """``[n_species]``: the sum of ``values [n]`` over the entries of each species index ``species [n]``,
    correctly rounded (``math.fsum``). Fitted weights are large and of both signs: their plain sum errs by
    epsilon times their absolute sum, which for a model's constant piece is a fixed energy offset per atom
    (up to 2.9e-5 eV per atom on the default gold model; docs/equations.md, "Numerical precision")."""
    terms = [[] for _ in range(n_species)]
    for value, index in zip(values.detach().cpu().tolist(), species.cpu().tolist()):
        terms[index].append(value)
    return torch.tensor([math.fsum(t) for t in terms], dtype=values.dtype, device=values.device)


class SparseKernel:
    """Base class: sparse state, species blocks and gradients; subclasses define :meth:`pairs`.

    Subclasses set ``mixing_names`` and implement :meth:`pairs` (all pairs of two sets of
    environments, plain differentiable torch, so that ``torch.func`` can vmap it) and
    :meth:`piece_weights`. ``max_pairs`` bounds the (atom, sparse environment) pairs whose
    gradients are computed at once.
    """

    kind = ""
    mixing_names: Tuple[str, ...] = ()
    # the design builds rows one central species at a time (False: every species in one pass, for a
    # kernel whose per-atom features come from the whole batch and would be recomputed per species)
    rows_by_species = True

    def __init__(self, n_pieces: int, mixing: Dict[str, float]):
        self.n_pieces = n_pieces
        unknown = set(mixing) - set(self.mixing_names)
        if unknown:
            raise ValueError(f"unknown mixing parameters {sorted(unknown)}; expected {self.mixing_names}")
        self.mixing = {name: float(mixing[name]) for name in self.mixing_names}
        self.layout: Optional[Layout] = None
        self.sparse_coefficients: Optional[torch.Tensor] = None
        self.sparse_species: Optional[torch.Tensor] = None
        self.max_pairs = 4096

    def pairs(
        self, a: List[torch.Tensor], species_a: torch.Tensor, b: List[torch.Tensor], species_b: torch.Tensor
    ) -> torch.Tensor:
        """Kernel pieces between all pairs, ``[n_pieces, n_a, n_b]``; ``a, b`` coefficient lists."""
        raise NotImplementedError

    def piece_weights(self, mixing: Optional[Dict[str, float]] = None) -> torch.Tensor:
        """``[n_pieces]`` weights ``omega_p`` of the pieces for ``mixing`` (default: the stored one)."""
        raise NotImplementedError

    def hypers(self) -> Dict:
        """Constructor arguments other than ``mixing``, as plain data (for checkpoints)."""
        raise NotImplementedError

    @classmethod
    def from_hypers(cls, hypers: Dict, mixing: Dict[str, float]) -> "SparseKernel":
        """The kernel of :meth:`hypers` and ``mixing`` (without sparse environments)."""
        raise NotImplementedError

    @property
    def unprepared(self) -> bool:
        """Whether :meth:`prepare` must see training structures before any environment is computed."""
        return False

    def prepare(self, expansion: DensityExpansion, batches: List[AtomsBatch]) -> None:
        """Fit what the kernel's environments depend on (e.g. a contraction) on the atoms of ``batches``
        of training structures (nothing here)."""

    def environments(self, expansion: DensityExpansion, batch: AtomsBatch, centres: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Layout]:
        """What the kernel takes as the environments of the atoms ``centres`` of ``batch`` (default: all),
        flat ``[n, D]``, and their layout (no gradients): here their density coefficients; a kernel whose
        atoms see their neighbours' environments returns its per-atom features."""
        return batch_density(expansion, batch, centres)

    def tangent_size(self, expansion: DensityExpansion) -> int:
        """Numbers held per (atom, direction) while design rows are built: here the size of an atom's
        density coefficients (their Jacobian meets the kernel)."""
        return expansion.coefficient_size()

    def selection_features(self, flat: torch.Tensor, layout: Layout) -> torch.Tensor:
        """``[n, F]`` the features on which sparse environments are selected among :meth:`environments`:
        the power spectrum of density coefficients."""
        return power_spectrum(layout.unflatten(flat))

    def set_sparse(self, coefficients: torch.Tensor, species: torch.Tensor, layout: Layout) -> None:
        """Store the sparse environments: flat coefficients ``[M, D]`` and atomic numbers ``[M]``."""
        self.sparse_coefficients = coefficients.detach()
        self.sparse_species = species.detach().to(torch.long)
        self.layout = layout

    def with_sparse(self, coefficients: torch.Tensor, species: torch.Tensor) -> "SparseKernel":
        """A copy with the sparse environments ``coefficients [M', D]`` (this kernel's layout) of
        atomic numbers ``species [M']`` and every other parameter (mixing, scales derived from this
        kernel's sparse set) unchanged, so that its kernel values equal this one's."""
        other = copy.copy(self)
        other.clear_cache()  # rebinds its caches: the shallow copy no longer shares them
        other.mixing = dict(self.mixing)
        SparseKernel.set_sparse(other, coefficients, species, self.layout)
        return other

    def to(self, device: torch.device) -> "SparseKernel":
        """:meth:`with_sparse` with everything the kernel holds on ``device`` (a fit on a GPU hands its
        model to the CPU this way)."""
        return self.with_sparse(self.sparse_coefficients.to(device), self.sparse_species.to(device))

    def sparse_subset(self, indices: torch.Tensor) -> "SparseKernel":
        """:meth:`with_sparse` of the sparse environments ``indices`` only."""
        return self.with_sparse(self.sparse_coefficients[indices], self.sparse_species[indices])

    @property
    def n_sparse(self) -> int:
        return 0 if self.sparse_coefficients is None else self.sparse_coefficients.shape[0]

    def sparse_of(self, z: int) -> torch.Tensor:
        """Indices of the sparse environments of central species ``z``; raises if there are none."""
        if self.sparse_coefficients is None:
            raise RuntimeError("the kernel has no sparse environments; call set_sparse first")
        sparse = torch.nonzero(self.sparse_species == z).flatten()
        if sparse.numel() == 0:
            raise ValueError(f"no sparse environment has central species {z}: the model was not fitted on it")
        return sparse

    def complete_species(self) -> List[int]:
        """Atomic numbers whose sparse set spans the kernel's whole function space, so that more sparse
        environments of them would add nothing (none here: the kernel's space is not finite)."""
        return []

    def check_species(self, species: torch.Tensor) -> None:
        """Raise ``ValueError`` if some central species ``[n]`` has no sparse environment."""
        for z in torch.unique(species).tolist():
            self.sparse_of(z)

    def _blocks(self, species: torch.Tensor):
        """``(atom indices, sparse indices)`` for every central species of ``species``."""
        for z in torch.unique(species).tolist():
            yield torch.nonzero(species == z).flatten(), self.sparse_of(z)

    def rows(self, coefficients: torch.Tensor, species: torch.Tensor) -> torch.Tensor:
        """Kernel pieces against the sparse set, ``[n_pieces, n, M]`` (differentiable).

        :param coefficients: ``[n, D]`` flat density coefficients.
        :param species: ``[n]`` atomic numbers of the central atoms.
        """
        out = coefficients.new_zeros((self.n_pieces, coefficients.shape[0], self.n_sparse))
        for atoms, sparse in self._blocks(species):
            block = self.pairs(
                self.layout.unflatten(coefficients[atoms]),
                species[atoms],
                self.layout.unflatten(self.sparse_coefficients[sparse]),
                self.sparse_species[sparse],
            )
            pieces = torch.arange(self.n_pieces, device=out.device)[:, None, None]
            out = out.index_put((pieces, atoms[None, :, None], sparse[None, None, :]), block)
        return out

    def paired(
        self, a: List[torch.Tensor], species_a: torch.Tensor, b: List[torch.Tensor], species_b: torch.Tensor
    ) -> torch.Tensor:
        """Kernel pieces of matched rows, ``k_p(a_r, b_r)``, ``[n_pieces, P]`` (``a, b`` with ``P`` rows).

        The default vmaps :meth:`pairs` over the rows; kernels override it when a direct
        evaluation on pair lists is cheaper.
        """

        def one(a_row: List[torch.Tensor], z_a: torch.Tensor, b_row: List[torch.Tensor], z_b: torch.Tensor) -> torch.Tensor:
            return self.pairs([x[None] for x in a_row], z_a[None], [x[None] for x in b_row], z_b[None])[:, 0, 0]

        return torch.func.vmap(one, out_dims=1)(a, species_a, b, species_b)

    def paired_pieces(
        self, a: List[torch.Tensor], species_a: torch.Tensor, b: List[torch.Tensor], species_b: torch.Tensor
    ) -> List[torch.Tensor]:
        """:meth:`paired` as one ``[P]`` tensor per piece; kernels whose pieces have separate
        graphs override it, so that each piece's reverse pass traverses its own graph only."""
        return list(self.paired(a, species_a, b, species_b).unbind(0))

    def structure_rows(
        self, expansion: DensityExpansion, batch: AtomsBatch, centres: torch.Tensor, gradients: bool, strain: bool
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Kernel pieces summed over the atoms ``centres`` of each structure of ``batch``, and
        (``gradients``) their derivatives along the structure's positions and (``strain``) strain.

        :param expansion: the density expansion of the model's environments.
        :param batch: structures with their neighbour pairs. :param centres: ``[n]`` atom indices.
        :return: ``[n_pieces, S, M]`` and ``[n_pieces, S, M, K]`` (``None`` without ``gradients``)
            with ``K = 3 n_max`` position directions (``n_max`` the largest structure of the
            batch; column ``3 j + alpha`` for atom ``j`` of the structure), then the 9 strain
            components ``3 alpha + beta`` when ``strain``.

        Here an atom's kernel depends on its own density coefficients only: their Jacobian,
        from the batch's pairs (:func:`~acdc_potential.descriptors.jacobian.structure_jacobian`),
        meets :meth:`structure_derivatives` along each structure's kept columns
        (:func:`~acdc_potential.descriptors.jacobian.internal_columns`: those the rigid motions do
        not determine; the batch's padding and the strain columns without ``strain`` left out).
        Kernels on features override this method (the polynomial kernel differentiates its features
        along the same columns; the message-passing kernel, whose atoms see their neighbours'
        environments, works from the pairs).
        """
        c, _ = self.environments(expansion, batch, centres)
        owner = batch.structure[centres]
        if not gradients:
            return sum_by_structure(self.rows(c, batch.numbers[centres]), owner, batch.n_structures), None
        columns, tangents = kept_jacobian(expansion, batch, centres, strain)
        values, derivatives = self.structure_derivatives(c, batch.numbers[centres], tangents, owner, batch.n_structures, columns.counts)
        return values, columns.full(derivatives)

    def structure_derivatives(
        self,
        coefficients: torch.Tensor,
        species: torch.Tensor,
        tangents: torch.Tensor,
        structure: torch.Tensor,
        n_structures: int,
        directions: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Kernel pieces summed over each structure's atoms, and their directional derivatives.

        :param coefficients: ``[n, D]`` flat density coefficients of the atoms.
        :param species: ``[n]`` central atomic numbers.
        :param tangents: ``[n, K, D]`` derivatives of each atom's coefficients along ``K``
            directions of its structure (columns of its Jacobian, :meth:`structure_rows`).
        :param structure: ``[n]`` structure index of each atom, in ``0..n_structures-1``.
        :param directions: ``[n_structures]``: only the first ``directions[s]`` tangents of the atoms
            of structure ``s`` can be nonzero (the rest pad the batch); ``None``: all ``K``. A
            kernel may skip the padding (here it costs nothing: the tangents meet the gradients last).
        :return: ``sum_{i in S} k_p(i, m)`` ``[n_pieces, n_structures, M]`` and
            ``sum_{i in S} d k_p(i, m) / d c_i . tangents[i, k]`` ``[n_pieces, n_structures, M, K]``.

        The per-atom kernel depends on positions only through ``c_i``, so giving every
        (atom, sparse environment) pair its own copy of ``c_i`` yields every
        ``d k_p(i, m) / d c_i`` from one reverse pass per piece (:meth:`paired` on the pair
        list), instead of one pass per sparse environment; sparse environments are processed
        in chunks of at most ``max_pairs`` pairs.
        """
        coefficients = coefficients.detach()
        n_k = tangents.shape[1]
        values = coefficients.new_zeros((self.n_pieces, n_structures, self.n_sparse))
        derivatives = coefficients.new_zeros((self.n_pieces, n_structures, self.n_sparse, n_k))
        for atoms, sparse in self._blocks(species):
            n = atoms.numel()
            step = max(1, self.max_pairs // n)
            for start in range(0, sparse.numel(), step):
                columns = sparse[start : start + step]
                m = columns.numel()
                copies = coefficients[atoms].repeat_interleave(m, dim=0).requires_grad_()
                with torch.enable_grad():
                    pieces = self.paired_pieces(
                        self.layout.unflatten(copies),
                        species[atoms].repeat_interleave(m),
                        self.layout.unflatten(self.sparse_coefficients[columns].repeat(n, 1)),
                        self.sparse_species[columns].repeat(n),
                    )
                gradient = torch.stack([self._gradient(k, copies, p + 1 < self.n_pieces) for p, k in enumerate(pieces)])
                directional = torch.einsum("pimd,ikd->pimk", gradient.view(self.n_pieces, n, m, -1), tangents[atoms])
                owner = structure[atoms]
                k = torch.stack([piece.detach() for piece in pieces])
                values[:, :, columns] += sum_by_structure(k.view(self.n_pieces, n, m), owner, n_structures)
                derivatives[:, :, columns] += sum_by_structure(directional, owner, n_structures)
        return values, derivatives

    @staticmethod
    def _gradient(piece: torch.Tensor, copies: torch.Tensor, retain: bool) -> torch.Tensor:
        """``d piece[r] / d copies[r]`` ``[P, D]`` (each row of ``piece`` depends on its own copy only)."""
        if not piece.requires_grad:
            return torch.zeros_like(copies)
        (gradient,) = torch.autograd.grad(piece.sum(), copies, retain_graph=retain, allow_unused=True)
        return torch.zeros_like(copies) if gradient is None else gradient

    def clear_cache(self) -> None:
        """Free what the kernel keeps between calls while rows are built (nothing here)."""

    def sparse_block(self) -> torch.Tensor:
        """``K_MM`` per piece, ``[n_pieces, M, M]``."""
        return self.rows(self.sparse_coefficients, self.sparse_species)

    def to_dict(self) -> Dict:
        return {
            "kind": self.kind,
            "hypers": self.hypers(),
            "mixing": dict(self.mixing),
            "layout": [list(s) for s in self.layout.shapes] if self.layout is not None else None,
            "sparse_coefficients": self.sparse_coefficients,
            "sparse_species": self.sparse_species,
        }
