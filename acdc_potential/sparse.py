"""Sparse environments and the kernels evaluated against them.

A *sparse kernel* holds the density coefficients of a set of sparse environments
``M_m`` (chosen per central species by :func:`select_sparse`) and maps the density
coefficients of atoms to kernel rows ``k(A_i, M_m)``, resolved into *pieces*
(body orders for the Wigner kernel) that are mixed linearly:

    k(i, m) = sum_p omega_p(mixing) k_p(i, m),     k_p = 0 unless a_i = a_m

(design.md section 2, WK eq. E4). Because every row of the design matrix is linear in
the pieces, the fitter stores them separately and re-mixes them while tuning
``c0, a, b`` without recomputing any kernel.

Coefficients travel in two forms: the list over ``l`` of ``[n, 2l + 1, Q_l]`` of
:mod:`acdc_potential.density`, and a flat ``[n, D]`` (``D = sum_l (2l + 1) Q_l``,
concatenated over ``l``, row-major within ``l``) described by a :class:`Layout`.
"""

import dataclasses
import importlib
import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import scipy.linalg
import torch


class Layout:
    """Shapes ``[(2l + 1, Q_l)]`` of the coefficient list, to flatten and unflatten it."""

    def __init__(self, shapes: Sequence[Tuple[int, int]]):
        self.shapes = [(int(a), int(b)) for a, b in shapes]
        self.sizes = [a * b for a, b in self.shapes]
        self.size = sum(self.sizes)

    @classmethod
    def of(cls, coefficients: List[torch.Tensor]) -> "Layout":
        return cls([tuple(c.shape[1:]) for c in coefficients])

    def flatten(self, coefficients: List[torch.Tensor]) -> torch.Tensor:
        """List over ``l`` of ``[n, 2l + 1, Q_l]`` -> ``[n, D]``."""
        return torch.cat([c.reshape(c.shape[0], -1) for c in coefficients], dim=1)

    def unflatten(self, flat: torch.Tensor) -> List[torch.Tensor]:
        """``[n, D]`` -> list over ``l`` of ``[n, 2l + 1, Q_l]``."""
        return unflatten(flat, [list(shape) for shape in self.shapes])


def unflatten(flat: torch.Tensor, shapes: List[List[int]]) -> List[torch.Tensor]:
    """Flat coefficients ``[n, D]`` back to the list over ``l`` of ``[n, 2l + 1, Q_l]``
    (``shapes[l] = [2l + 1, Q_l]``); TorchScript-compatible, used by exported models."""
    out: List[torch.Tensor] = []
    start = 0
    for shape in shapes:
        size = shape[0] * shape[1]
        out.append(flat[:, start : start + size].reshape(-1, shape[0], shape[1]))
        start += size
    return out


def sum_by_structure(x: torch.Tensor, owner: torch.Tensor, n_structures: int) -> torch.Tensor:
    """Sum ``[n_pieces, n, ...]`` over the atoms of each structure -> ``[n_pieces, n_structures, ...]``."""
    out = x.new_zeros((x.shape[0], n_structures) + tuple(x.shape[2:]))
    return out.index_add(1, owner, x)


def _qualified_name(function: Callable) -> str:
    return f"{function.__module__}:{function.__qualname__}"


def _resolve(name: str) -> Callable:
    module, qualname = name.split(":")
    target = importlib.import_module(module)
    for part in qualname.split("."):
        target = getattr(target, part)
    return target


class SparseKernel:
    """Base class: sparse state, species blocks and gradients; subclasses define :meth:`pairs`.

    Subclasses set ``mixing_names`` and implement :meth:`pairs` (all pairs of two sets of
    environments, plain differentiable torch, so that ``torch.func`` can vmap it) and
    :meth:`piece_weights`. ``max_pairs`` bounds the (atom, sparse environment) pairs whose
    gradients are computed at once.
    """

    kind = ""
    mixing_names: Tuple[str, ...] = ()

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
        """Constructor arguments other than ``mixing`` (for checkpoints)."""
        raise NotImplementedError

    def set_sparse(self, coefficients: torch.Tensor, species: torch.Tensor, layout: Layout) -> None:
        """Store the sparse environments: flat coefficients ``[M, D]`` and atomic numbers ``[M]``."""
        self.sparse_coefficients = coefficients.detach()
        self.sparse_species = species.detach().to(torch.long)
        self.layout = layout

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

    def structure_derivatives(
        self,
        coefficients: torch.Tensor,
        species: torch.Tensor,
        tangents: torch.Tensor,
        structure: torch.Tensor,
        n_structures: int,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Kernel pieces summed over each structure's atoms, and their directional derivatives.

        :param coefficients: ``[n, D]`` flat density coefficients of the atoms.
        :param species: ``[n]`` central atomic numbers.
        :param tangents: ``[n, K, D]`` derivatives of each atom's coefficients along ``K``
            directions (positions and strain of its structure).
        :param structure: ``[n]`` structure index of each atom, in ``0..n_structures-1``.
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

    def self_kernel(self, coefficients: torch.Tensor, species: torch.Tensor) -> torch.Tensor:
        """``k_p(i, i)`` for every atom, ``[n_pieces, n]``."""
        a = self.layout.unflatten(coefficients)
        return self.paired(a, species, a, species)

    def within(self, coefficients: torch.Tensor, species: torch.Tensor) -> torch.Tensor:
        """``sum_{i, j} k_p(i, j)`` over all atom pairs of one structure, ``[n_pieces]``."""
        total = coefficients.new_zeros(self.n_pieces)
        for z in torch.unique(species).tolist():
            a = self.layout.unflatten(coefficients[species == z])
            z_a = species[species == z]
            total = total + self.pairs(a, z_a, a, z_a).sum(dim=(1, 2))
        return total

    def to_dict(self) -> Dict:
        return {
            "kind": self.kind,
            "hypers": self.hypers(),
            "mixing": dict(self.mixing),
            "layout": [list(s) for s in self.layout.shapes] if self.layout is not None else None,
            "sparse_coefficients": self.sparse_coefficients,
            "sparse_species": self.sparse_species,
        }


def _species_delta(species_a: torch.Tensor, species_b: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return (species_a[:, None] == species_b[None, :]).to(like.dtype)


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` divided by their norm (zero rows, atoms without neighbours, stay zero)."""
    return x / torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min(1e-150)


def _default_features() -> Callable:
    from .correlations import power_spectrum

    return power_spectrum


class PolynomialKernel(SparseKernel):
    """GAP-form kernel on normalised invariant features: pieces ``[delta(a_i, a_m), (x^_i . x^_m)^zeta]``.

    :param zeta: exponent.
    :param features: coefficient list -> ``[n, F]`` invariants (default
        :func:`acdc_potential.correlations.power_spectrum`); must be a module-level function
        so that checkpoints can name it.
    :param mixing: ``c0`` (species-delta weight), ``a`` (polynomial weight).
    """

    kind = "polynomial"
    mixing_names = ("c0", "a")

    def __init__(self, zeta: int = 4, features: Optional[Callable] = None, mixing: Optional[Dict[str, float]] = None):
        super().__init__(2, mixing or {"c0": 1.0, "a": 1.0})
        self.zeta = int(zeta)
        self.features = features or _default_features()

    def pairs(self, a, species_a, b, species_b):
        xa = _unit_rows(self.features(a))
        xb = _unit_rows(self.features(b))
        delta = _species_delta(species_a, species_b, xa)
        return torch.stack([delta, delta * (xa @ xb.T) ** self.zeta])

    def structure_derivatives(self, coefficients, species, tangents, structure, n_structures):
        """As :meth:`SparseKernel.structure_derivatives`, in forward mode through the features.

        With ``s = x^_i . x^_m``: ``d k / d c_i . t = zeta s^(zeta-1) / |x_i| (x^_m - s x^_i) . dx_i``
        where ``dx_i = (d x_i / d c_i) t`` comes from one feature JVP per tangent at the
        atom level, so the cost per (atom, sparse environment) pair is a dot product. Atoms
        are processed in chunks of ``max_pairs / K`` (atom, tangent) JVPs.
        """
        coefficients = coefficients.detach()
        n_k = tangents.shape[1]
        values = coefficients.new_zeros((2, n_structures, self.n_sparse))
        derivatives = coefficients.new_zeros((2, n_structures, self.n_sparse, n_k))

        def features(flat):
            return self.features(self.layout.unflatten(flat))

        step = max(1, self.max_pairs // n_k)
        for block, sparse in self._blocks(species):
            unit_sparse = _unit_rows(features(self.sparse_coefficients[sparse]))
            for start in range(0, block.numel(), step):
                atoms = block[start : start + step]
                c = coefficients[atoms]
                x = features(c)
                norm = torch.linalg.vector_norm(x, dim=1).clamp_min(1e-150)
                unit = x / norm[:, None]
                dx = torch.func.vmap(lambda t: torch.func.jvp(features, (c,), (t,))[1], in_dims=1, out_dims=1)(tangents[atoms])
                similarity = unit @ unit_sparse.T
                along_sparse = torch.einsum("mf,ikf->imk", unit_sparse, dx)
                along_self = torch.einsum("if,ikf->ik", unit, dx)
                scale = self.zeta * similarity ** (self.zeta - 1) / norm[:, None]
                directional = scale[:, :, None] * (along_sparse - similarity[:, :, None] * along_self[:, None, :])
                pieces = torch.stack([torch.ones_like(similarity), similarity**self.zeta])
                values[:, :, sparse] += sum_by_structure(pieces, structure[atoms], n_structures)
                derivatives[1, :, sparse] += sum_by_structure(directional[None], structure[atoms], n_structures)[0]
        return values, derivatives

    def piece_weights(self, mixing=None):
        m = {**self.mixing, **(mixing or {})}
        return torch.tensor([m["c0"], m["a"]], dtype=torch.float64)

    def hypers(self):
        return {"zeta": self.zeta, "features": _qualified_name(self.features)}


class WignerKernel(SparseKernel):
    """Exponential Wigner kernel ``c0 k^0 + a sum_{nu=1}^{nu_max} b^nu / nu! k^nu / s_{a nu}`` (WK eq. E4).

    The pieces are the invariant body-ordered kernels ``k^nu``, ``nu = 0..nu_max``, of
    :mod:`acdc_potential.wigner` (``k^0`` the species delta), each divided by ``s_{a nu}``,
    the mean ``k^nu(m, m)`` over the sparse environments of the central species ``a``.
    Raw ``k^nu`` differ by orders of magnitude between orders and species, so that without
    this no single ``b`` mixes the body orders of every species sensibly; with it each
    piece has unit mean self-similarity and ``b^nu / nu!`` is the weight of order ``nu``.

    :meth:`rows` uses the chunked :func:`~acdc_potential.wigner.invariant_kernels`,
    :meth:`paired` the iterations on matched pair lists (for gradients).

    :param hypers: :class:`~acdc_potential.wigner.WignerHypers` (``nu_max``, ``lambda_max``, ...).
    :param mixing: ``c0``, ``a``, ``b``.
    :param species_scale: ``{atomic number: [s_{a 1}, ..., s_{a nu_max}]}``; by default
        computed by :meth:`set_sparse`.

    Attributes for the derivative rows (:meth:`structure_derivatives`): ``max_feature_dimension``
    (2e5: up to this size of the per-atom invariants the rows go through them, beyond it
    through per-pair reverse passes), ``feature_budget`` (5e7 entries of one block of summed
    derivatives) and ``sparse_feature_budget`` (3e8 entries of the sparse environments'
    invariants kept for one species while the rows are built).
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

    def _order_scale(self, species: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``[nu_max + 1, n]`` factors ``1 / s_{a nu}`` for central species ``[n]`` (ones until known)."""
        if self.species_scale is None:
            return like.new_ones((self.nu_max + 1, species.shape[0]))
        table = like.new_ones((int(species.max()) + 1 if species.numel() else 1, self.nu_max + 1))
        for z, values in self.species_scale.items():
            if z < table.shape[0]:
                table[z, 1:] = like.new_tensor(values)
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
        from .wigner import wigner_module

        delta = _species_delta(species_a, species_b, a[0])
        higher = wigner_module(self.wigner_hypers, a[0]).invariant_pairs(a, b)
        higher = higher.reshape(self.nu_max, a[0].shape[0], b[0].shape[0]) * delta
        return torch.cat([delta[None], higher]) * self._order_scale(species_a, a[0])[:, :, None]

    def paired(self, a, species_a, b, species_b):
        """Pieces of matched rows ``(a[p], b[p])``, ``[nu_max + 1, P]`` (see :meth:`WignerKernels.invariant_matched`)."""
        return torch.stack(self.paired_pieces(a, species_a, b, species_b))

    def paired_pieces(self, a, species_a, b, species_b):
        from .wigner import matched_invariant_rows

        rows = matched_invariant_rows(a, species_a, b, species_b, self.wigner_hypers)
        scale = self._order_scale(species_a, a[0])
        return [row * scale[nu] for nu, row in enumerate(rows)]

    def _order_features(self, flat: torch.Tensor) -> List[torch.Tensor]:
        """:meth:`WignerKernels.order_features` ``[n, d_nu]`` per ``nu`` of flat coefficients ``[n, D]``."""
        from .wigner import wigner_module

        return wigner_module(self.wigner_hypers, flat).order_features(self.layout.unflatten(flat))

    def feature_sizes(self) -> Optional[List[int]]:
        """Sizes ``d_nu`` of the per-atom invariants (``Phi^3`` shortened by :meth:`_reduce`), or
        ``None`` when the kernel is not their scalar product (``nu_max > 4``, or no float64 features)."""
        from .wigner import wigner_module

        if self.nu_max > 4 or self.sparse_coefficients is None:
            return None
        if not wigner_module(self.wigner_hypers, self.sparse_coefficients).use_features(self.sparse_coefficients.dtype):
            return None
        return [phi.shape[1] for phi in self._reduce(self._order_features(self.sparse_coefficients[:1]))]

    def clear_cache(self) -> None:
        """Free the sparse environments' invariants kept by :meth:`structure_derivatives`."""
        self._sparse_invariants = {}

    def _reduce(self, phi: List[torch.Tensor]) -> List[torch.Tensor]:
        """``Phi^3`` (last dimension) shortened by :meth:`WignerKernels.order3_reduction`, same
        scalar products; the other orders unchanged."""
        from .wigner import wigner_module

        if len(phi) < 3:
            return phi
        index, weight = wigner_module(self.wigner_hypers, phi[2]).order3_reduction([shape[1] for shape in self.layout.shapes])
        return phi[:2] + [phi[2].index_select(-1, index.to(phi[2].device)) * weight.to(phi[2])] + phi[3:]

    def structure_derivatives(self, coefficients, species, tangents, structure, n_structures):
        """As :meth:`SparseKernel.structure_derivatives`; through the per-atom invariants
        ``Phi^nu`` when their size is at most ``max_feature_dimension``.

        Every order is a scalar product ``k^nu(i, m) = <Phi^nu_i, Phi^nu_m>``
        (:meth:`WignerKernels.order_features`), so a structure's kernel sums and their
        derivatives along its ``K`` directions are ``<sum_i Phi_i, Phi_m>`` and
        ``<sum_i dPhi_i / dc_i . t_ik, Phi_m>``: the derivatives of the invariants of
        each structure's atoms summed *before* the sparse environments enter
        (:meth:`WignerKernels.order_feature_sums`), then one GEMM per order. The cost per
        structure is ``K d M`` instead of ``n_atoms M`` reverse passes through the kernel
        iterations (``Phi^3`` shortened by :meth:`WignerKernels.order3_reduction`; ``d ~ 3e3``
        for Cu at ``nu_max = 3``, ``1.6e5`` at 4, ``8e4`` for ethanol's three species at 3).
        Beyond ``max_feature_dimension`` the per-pair path is cheaper. The summed derivatives
        of a group of structures are bounded by ``feature_budget`` entries, as are the chunks
        in which the invariants of the sparse environments are computed; those of one species
        are kept for later groups and calls (until :meth:`clear_cache`) if they fit in
        ``sparse_feature_budget`` entries, else recomputed per group.
        """
        sizes = self.feature_sizes()
        if sizes is None or sum(sizes) > self.max_feature_dimension:
            return super().structure_derivatives(coefficients, species, tangents, structure, n_structures)
        from .wigner import wigner_module

        module = wigner_module(self.wigner_hypers, coefficients)
        coefficients = coefficients.detach()
        n_k = tangents.shape[1]
        values = coefficients.new_zeros((self.n_pieces, n_structures, self.n_sparse))
        derivatives = coefficients.new_zeros((self.n_pieces, n_structures, self.n_sparse, n_k))
        # structures per [structures, K, d] block of summed derivatives; sparse rows per [rows, d] block
        per_block = max(1, int(self.feature_budget // (n_k * sum(sizes))))
        per_sparse = max(1, int(self.feature_budget // sum(sizes)))
        for atoms, sparse in self._blocks(species):
            scale = self._order_scale(species[atoms[:1]], coefficients)[:, 0]
            owner = structure[atoms]
            values[0, :, sparse] += torch.bincount(owner, minlength=n_structures).to(values)[:, None] * scale[0]
            sparse_chunks = [sparse[start : start + per_sparse] for start in range(0, sparse.numel(), per_sparse)]
            cached = self._sparse_invariants.get(int(species[atoms[0]]))
            if cached is None and sparse.numel() * sum(sizes) <= self.sparse_feature_budget:
                # kept for every group and every later call (until clear_cache), built in chunks
                parts = [self._reduce(self._order_features(self.sparse_coefficients[chunk])) for chunk in sparse_chunks]
                cached = [torch.cat([part[nu] for part in parts]) for nu in range(len(sizes))]
                self._sparse_invariants[int(species[atoms[0]])] = cached
            if cached is not None:
                sparse_chunks = [sparse]
            present = torch.unique(owner)
            # written per structure by order_feature_sums, allocated once
            phi_buffer = [coefficients.new_empty((min(per_block, present.numel()), d)) for d in sizes]
            dphi_buffer = [coefficients.new_empty((min(per_block, present.numel()), n_k, d)) for d in sizes]
            for first in range(0, present.numel(), per_block):
                group = present[first : first + per_block]
                phi_sum = [x[: group.numel()] for x in phi_buffer]
                dphi_sum = [x[: group.numel()] for x in dphi_buffer]
                for position, s in enumerate(group.tolist()):
                    rows = atoms[owner == s]
                    c = self.layout.unflatten(coefficients[rows])
                    t = [x.view(rows.numel(), n_k, *x.shape[1:]) for x in self.layout.unflatten(tangents[rows].reshape(-1, tangents.shape[2]))]
                    module.order_feature_sums(c, t, [x[position] for x in phi_sum], [x[position] for x in dphi_sum])
                for chunk in sparse_chunks:
                    phi_m = cached if cached is not None else self._reduce(self._order_features(self.sparse_coefficients[chunk]))
                    for nu in range(len(sizes)):
                        k = phi_sum[nu] @ phi_m[nu].T * scale[nu + 1]
                        dk = (dphi_sum[nu].reshape(-1, sizes[nu]) @ phi_m[nu].T) * scale[nu + 1]
                        values[nu + 1, group[:, None], chunk[None, :]] += k
                        derivatives[nu + 1, group[:, None], chunk[None, :]] += dk.view(group.numel(), n_k, -1).transpose(1, 2)
        return values, derivatives

    def rows(self, coefficients, species):
        from .wigner import invariant_kernels

        self.check_species(species)
        sparse = self.layout.unflatten(self.sparse_coefficients)
        raw = invariant_kernels(self.layout.unflatten(coefficients), species, sparse, self.sparse_species, self.wigner_hypers)
        return raw * self._order_scale(species, coefficients)[:, :, None]

    def piece_weights(self, mixing=None):
        m = {**self.mixing, **(mixing or {})}
        orders = [m["a"] * m["b"] ** nu / math.factorial(nu) for nu in range(1, self.nu_max + 1)]
        return torch.tensor([m["c0"]] + orders, dtype=torch.float64)

    def hypers(self):
        return {
            "class": _qualified_name(type(self.wigner_hypers)),
            "fields": dataclasses.asdict(self.wigner_hypers),
            "species_scale": self.species_scale,
        }


def kernel_from_dict(state: Dict) -> SparseKernel:
    """Rebuild a kernel (with its sparse environments) from :meth:`SparseKernel.to_dict`."""
    hypers = dict(state["hypers"])
    if state["kind"] == "polynomial":
        kernel = PolynomialKernel(hypers["zeta"], _resolve(hypers["features"]), state["mixing"])
    elif state["kind"] == "wigner":
        wigner_hypers = _resolve(hypers["class"])(**hypers["fields"])
        kernel = WignerKernel(wigner_hypers, state["mixing"], hypers["species_scale"])
    else:
        raise ValueError(f"unknown kernel kind {state['kind']!r}")
    if state["sparse_coefficients"] is not None:
        kernel.set_sparse(state["sparse_coefficients"], state["sparse_species"], Layout(state["layout"]))
    return kernel


def farthest_point_sampling(features: torch.Tensor, n_select: int, first: int = 0) -> torch.Tensor:
    """Greedy farthest point sampling in Euclidean feature space.

    :param features: ``[n, F]``.
    :return: ``[k]`` indices, ``k <= n_select``; stops early when the remaining points
        duplicate selected ones (distance below ``1e-12`` of the largest), since duplicate
        sparse environments only make ``K_MM`` singular.
    """
    n = features.shape[0]
    n_select = min(n_select, n)
    selected = [first]
    distance = torch.linalg.vector_norm(features - features[first], dim=1) ** 2
    scale = float(distance.max()) if n > 1 else 0.0
    while len(selected) < n_select:
        best = int(torch.argmax(distance))
        if float(distance[best]) <= 1e-24 * max(scale, 1e-300):
            break
        selected.append(best)
        distance = torch.minimum(distance, torch.linalg.vector_norm(features - features[best], dim=1) ** 2)
    return torch.tensor(selected, dtype=torch.long, device=features.device)


def cur_selection(features: torch.Tensor, n_select: int) -> torch.Tensor:
    """Deterministic CUR row selection: column-pivoted QR of the top-``k`` left singular vectors.

    The pivots follow the statistical leverage of the rows while avoiding redundant ones
    (Golub, Klema, Stewart's subset selection); beyond the numerical rank the remaining
    rows are added by farthest point sampling from the chosen ones.
    """
    n = features.shape[0]
    n_select = min(n_select, n)
    u, s, _ = torch.linalg.svd(features, full_matrices=False)
    rank = int((s > s[0] * 1e-10).sum()) if s.numel() else 0
    k = min(n_select, rank)
    if k == 0:
        return torch.zeros(1, dtype=torch.long, device=features.device)
    _, _, pivots = scipy.linalg.qr(u[:, :k].T.cpu().numpy(), pivoting=True, mode="economic")
    chosen = torch.tensor(pivots[:k], dtype=torch.long, device=features.device)
    if k == n_select:
        return chosen
    distance = torch.cdist(features, features[chosen]).min(dim=1).values ** 2
    extra = []
    while len(chosen) + len(extra) < n_select and float(distance.max()) > 0.0:
        best = int(torch.argmax(distance))
        extra.append(best)
        distance = torch.minimum(distance, torch.linalg.vector_norm(features - features[best], dim=1) ** 2)
    return torch.cat([chosen, torch.tensor(extra, dtype=torch.long, device=features.device)])


def select_sparse(
    features: torch.Tensor,
    species: torch.Tensor,
    n_sparse: Union[int, Dict[int, int]],
    method: str = "fps",
) -> torch.Tensor:
    """Sparse environments per central species, on normalised features.

    :param features: ``[n, F]`` invariant features of candidate environments (e.g. the
        power spectrum).
    :param species: ``[n]`` central atomic numbers.
    :param n_sparse: number per species, or a dict ``{atomic number: number}``.
    :param method: ``"fps"`` or ``"cur"``.
    :return: indices into the candidates, grouped by species (ascending atomic number).
    """
    if method not in ("fps", "cur"):
        raise ValueError(f"unknown sparse selection method {method!r}; use 'fps' or 'cur'")
    unit = _unit_rows(features)
    chosen = []
    for z in torch.unique(species).tolist():
        candidates = torch.nonzero(species == z).flatten()
        count = n_sparse.get(z, 0) if isinstance(n_sparse, dict) else n_sparse
        if count <= 0:
            raise ValueError(f"no sparse environments requested for species {z}, which is in the training set")
        x = unit[candidates]
        local = farthest_point_sampling(x, count) if method == "fps" else cur_selection(x, count)
        chosen.append(candidates[local])
    return torch.cat(chosen)
