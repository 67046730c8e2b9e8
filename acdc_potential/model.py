"""The deployable model: density expansion + energy head, as a metatomic ``AtomisticModel``.

:class:`AtomisticPotential` is a TorchScript-compatible module that reads the
neighbour lists a metatomic engine hands it (ASE, LAMMPS, i-PI, ...), computes the
density coefficients of every atom (:mod:`acdc_potential.density`) and passes them to
an *energy head*, a TorchScript module with two methods:

- ``forward(coefficients: List[Tensor], species: Tensor) -> Tensor``: per-atom
  energies ``[n_atoms]`` from the coefficients (layout of :mod:`acdc_potential.density`)
  and the species index of each centre;
- ``variance(coefficients, species, group: Tensor, n_groups: int, per_atom: bool) -> Tensor``:
  the predictive variance (eV^2) of each atomic energy (``per_atom``, ``[n_atoms]``)
  or of the sum of the atomic energies of each group (``[n_groups]``; ``group[i]`` is
  the group of atom ``i``).

:class:`WignerHead` and :class:`PolynomialHead` are the heads of fitted sparse-KRR
models (:func:`build_potential`); everything about the sparse environments that does
not depend on the atom is precomputed there. Forces and stress come from autograd in the
engine, through the distance vectors of its neighbour lists.

Outputs: ``energy`` (per system, or per atom) and ``energy_uncertainty``, the
projected-process predictive standard deviation of the system's energy or of each
atomic energy, as :meth:`SparseKRRModel.predict` gives them. The system one needs the
kernel between every pair of atoms of the system: cheap for molecules, seconds for
hundreds of atoms.
"""

import copy
from typing import Dict, List, Optional

import torch
from metatensor.torch import Labels, TensorBlock, TensorMap
from metatomic.torch import (
    AtomisticModel,
    ModelCapabilities,
    ModelMetadata,
    ModelOutput,
    NeighborListOptions,
    System,
)

from .correlations import power_spectrum
from .density import DensityExpansion
from .regression import projected_variance
from .sparse import unflatten


class AtomisticPotential(torch.nn.Module):
    """Energy model on metatomic systems.

    :param density: the density expansion (its ``species`` are the model's species).
    :param head: energy head (see the module docstring).
    :param baseline: ``[n_species]`` energy of each species added to every atom (eV).
    """

    def __init__(self, density: DensityExpansion, head: torch.nn.Module, baseline: torch.Tensor):
        super().__init__()
        self.density = density
        self.head = head
        self.register_buffer("baseline", baseline.to(torch.float64).clone())
        self.neighbors = NeighborListOptions(cutoff=density.cutoff, full_list=True, strict=True)

    def requested_neighbor_lists(self) -> List[NeighborListOptions]:
        return [self.neighbors]

    def environments(self, systems: List[System]):
        """Density coefficients of all atoms, their species index ``[N]`` and system index ``[N]``."""
        vectors: List[torch.Tensor] = []
        centers: List[torch.Tensor] = []
        neighbors: List[torch.Tensor] = []
        system_index: List[torch.Tensor] = []
        types: List[torch.Tensor] = []
        offset = 0
        for i, system in enumerate(systems):
            pairs = system.get_neighbor_list(self.neighbors)
            vectors.append(pairs.values.reshape(-1, 3))
            centers.append(pairs.samples.column("first_atom").to(torch.long) + offset)
            neighbors.append(pairs.samples.column("second_atom").to(torch.long) + offset)
            system_index.append(torch.full((len(system),), i, dtype=torch.long, device=system.positions.device))
            types.append(system.types.to(torch.long))
            offset += len(system)
        species = self.density.species_index(torch.cat(types))
        coefficients = self.density(torch.cat(vectors), torch.cat(centers), species[torch.cat(neighbors)], offset)
        return coefficients, species, torch.cat(system_index)

    def forward(
        self,
        systems: List[System],
        outputs: Dict[str, ModelOutput],
        selected_atoms: Optional[Labels] = None,
    ) -> Dict[str, TensorMap]:
        if len(systems) == 0:
            return {}
        coefficients, species, system_index = self.environments(systems)
        device = species.device
        atom_index = torch.cat([torch.arange(len(s), device=device) for s in systems])
        keep = torch.ones_like(system_index, dtype=torch.bool)
        if selected_atoms is not None:
            keep = torch.zeros_like(system_index, dtype=torch.bool)
            for row in selected_atoms.values:
                keep = keep | ((system_index == row[0]) & (atom_index == row[1]))
        n_systems = len(systems)

        results: Dict[str, TensorMap] = {}
        for name in ["energy", "energy_uncertainty"]:
            if name not in outputs:
                continue
            per_atom = outputs[name].sample_kind == "atom"
            if name == "energy":
                values = self.head(coefficients, species) + self.baseline.to(coefficients[0].dtype)[species]
                values = values[keep]
                if not per_atom:
                    values = torch.zeros(n_systems, dtype=values.dtype, device=device).index_add(0, system_index[keep], values)
            elif per_atom:
                values = torch.sqrt(self.head.variance(coefficients, species, system_index, n_systems, True)[keep])
            else:
                kept = [c[keep] for c in coefficients]
                values = torch.sqrt(self.head.variance(kept, species[keep], system_index[keep], n_systems, False))
            if per_atom:
                samples = Labels(["system", "atom"], torch.stack([system_index[keep], atom_index[keep]], dim=1).to(torch.int32))
            else:
                samples = Labels(["system"], torch.arange(n_systems, device=device, dtype=torch.int32).reshape(-1, 1))
            block = TensorBlock(
                values=values.reshape(-1, 1),
                samples=samples,
                components=[],
                properties=Labels(["energy"], torch.zeros((1, 1), dtype=torch.int32, device=device)),
            )
            results[name] = TensorMap(Labels(["_"], torch.zeros((1, 1), dtype=torch.int32, device=device)), [block])
        return results


def export_model(
    potential: AtomisticPotential,
    path: str,
    dtype: torch.dtype = torch.float64,
    name: str = "acdc-potential model",
    description: str = "",
    extensions_directory: Optional[str] = None,
) -> AtomisticModel:
    """Wrap ``potential`` in metatomic's ``AtomisticModel`` and save it as one TorchScript file.

    ``dtype`` float64 (default) or float32. Supported devices are declared as cpu and
    cuda; the cuda path is untested (no GPU on the development machines).
    """
    potential = copy.deepcopy(potential).to(dtype).eval()
    clear_cache = getattr(potential.head, "clear_cache", None)
    if clear_cache is not None:
        clear_cache()
    outputs = {
        "energy": ModelOutput(unit="eV", sample_kind="atom"),
        "energy_uncertainty": ModelOutput(unit="eV", sample_kind="atom"),
    }
    capabilities = ModelCapabilities(
        outputs=outputs,
        atomic_types=potential.density.species,
        interaction_range=potential.density.cutoff,
        length_unit="angstrom",
        supported_devices=["cpu", "cuda"],
        dtype="float64" if dtype == torch.float64 else "float32",
    )
    metadata = ModelMetadata(name=name, description=description, authors=["acdc-potential"])
    model = AtomisticModel(potential, metadata, capabilities)
    model.save(path, collect_extensions=extensions_directory)
    return model


class _SparseState(torch.nn.Module):
    """What a head keeps of a fitted sparse-KRR model (see :class:`~acdc_potential.regression.ProjectedProcess`).

    Buffers: ``sparse [M, D]`` flat coefficients of the sparse environments (sorted by
    species), ``sparse_species [M]`` their central species index, ``weights [M]``,
    ``piece_weights [n_pieces]``, ``projection [M, r]`` and ``triangular [r, r]`` for the
    predictive variance ``k_xx - |k_xM P|^2 + |R^-T P^T k_Mx|^2``.
    """

    def __init__(self, fitted, species: List[int]):
        super().__init__()
        kernel = fitted.kernel
        self.shapes: List[List[int]] = [list(shape) for shape in kernel.layout.shapes]
        index = {z: k for k, z in enumerate(species)}
        sparse_species = torch.tensor([index[int(z)] for z in kernel.sparse_species.tolist()], dtype=torch.long)
        # grouped by species, so that per-species blocks of sparse data are views
        order = torch.argsort(sparse_species, stable=True)
        self.register_buffer("sparse", kernel.sparse_coefficients.detach().to(torch.float64)[order].clone())
        self.register_buffer("sparse_species", sparse_species[order].clone())
        self.register_buffer("weights", fitted.solution.weights.detach().to(torch.float64)[order].clone())
        self.register_buffer("piece_weights", kernel.piece_weights().to(torch.float64).clone())
        self.register_buffer("projection", fitted.solution.projection.detach().to(torch.float64)[order].clone())
        self.register_buffer("triangular", fitted.solution.triangular.detach().to(torch.float64).clone())

    def variance(self, k_xm: torch.Tensor, k_xx: torch.Tensor) -> torch.Tensor:
        """``[n]`` variances from kernel rows ``k_xm [n, M]`` and ``k(x, x)`` ``[n]``."""
        variance = projected_variance(k_xm.to(torch.float64), k_xx.to(torch.float64), self.projection, self.triangular)
        return variance.to(k_xm.dtype)

    def group_variance(self, k_xm: torch.Tensor, k_xy: torch.Tensor, group: torch.Tensor, n_groups: int) -> torch.Tensor:
        """``[n_groups]`` variances of sums over groups, from atom rows ``k_xm [n, M]`` and
        the kernel between all atoms ``k_xy [n, n]``."""
        k_gm = torch.zeros((n_groups, k_xm.shape[1]), dtype=k_xm.dtype, device=k_xm.device).index_add(0, group, k_xm)
        same = (group.unsqueeze(1) == group.unsqueeze(0)).to(k_xy.dtype)
        k_gg = torch.zeros(n_groups, dtype=k_xy.dtype, device=k_xy.device).index_add(0, group, (k_xy * same).sum(dim=1))
        return self.variance(k_gm, k_gg)


class WignerHead(torch.nn.Module):
    """``e_i = sum_m w_m sum_nu omega_nu k^nu(A_i, M_m) / s_{a nu}``, the exponential Wigner kernel (WK eq. E4).

    ``s_{a nu}`` is the per-species scale of each order (see
    :class:`~acdc_potential.sparse.WignerKernel`). With the weights ``omega_nu w_m / s_{a_m nu}``
    precomputed, energies and forces go, for ``nu_max <= 3``, through per-species tensors
    into which the sum over sparse environments folds exactly (:meth:`WignerKernels.collapse`,
    cost independent of their number), and above through :meth:`WignerKernels.weighted_sum`
    (bounded memory, one pass); the variance, only when asked, through the kernel rows
    without gradients.
    """

    sparse_features: Dict[int, torch.Tensor]
    collapsed_shapes: List[List[int]]

    def __init__(self, fitted, species: List[int]):
        super().__init__()
        from .wigner import WignerKernels

        kernel = fitted.kernel
        self.state = _SparseState(fitted, species)
        self.kernels = WignerKernels(kernel.wigner_hypers)
        scale = torch.ones((len(species), kernel.nu_max + 1), dtype=torch.float64)
        for z, values in (kernel.species_scale or {}).items():
            if int(z) in species:
                scale[species.index(int(z)), 1:] = torch.tensor(values, dtype=torch.float64)
        self.register_buffer("inverse_scale", 1.0 / scale)
        order_weights = self.state.piece_weights[:, None] * self.inverse_scale[self.state.sparse_species].T
        self.register_buffer("pair_weights", order_weights * self.state.weights[None, :])
        # nu <= 3: the weighted sums over sparse environments fold into per-species tensors
        # (WignerKernels.collapse), so an MD step costs the same for any number of them
        self.collapsed = self.kernels.nu_max <= 3
        self.collapsed_shapes = []
        flat = torch.zeros((len(species), 0), dtype=torch.float64)
        if self.collapsed:
            sparse = unflatten(self.state.sparse, self.state.shapes)
            parts = self.kernels.collapse(sparse, self.state.sparse_species, self.pair_weights, len(species))
            self.collapsed_shapes = [list(part.shape[1:]) for part in parts]
            flat = torch.cat([part.reshape(len(species), -1) for part in parts], dim=1)
        self.register_buffer("collapsed_flat", flat)
        # nu = 2 features of the sparse environments (WignerKernels.nu2_features), for the
        # MD path of nu = 4 and for the variance: hundreds of MB for large models, so
        # computed on the first call (in the caller's dtype and device), not stored
        self.sparse_features = {}

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
            return self.kernels.collapsed_energy(coefficients, species, self._collapsed_parts(coefficients[0].dtype))
        sparse = unflatten(self.state.sparse.to(coefficients[0].dtype), self.state.shapes)
        weights = self.pair_weights.to(coefficients[0].dtype)
        features = self._sparse_features(sparse)
        return self.kernels.weighted_sum(coefficients, species, sparse, self.state.sparse_species, weights, features)

    def kernel(
        self,
        a: List[torch.Tensor],
        species_a: torch.Tensor,
        b: List[torch.Tensor],
        species_b: torch.Tensor,
        b_features: Optional[Dict[int, torch.Tensor]] = None,
    ) -> torch.Tensor:
        """Mixed kernel ``[n_a, n_b]`` (all pieces, scaled and weighted)."""
        inverse_scale = self.inverse_scale.to(a[0].dtype)[species_a].T
        pieces = self.kernels(a, species_a, b, species_b, b_features) * inverse_scale[:, :, None]
        return torch.einsum("p,pnm->nm", self.state.piece_weights.to(a[0].dtype), pieces)

    def variance(
        self, coefficients: List[torch.Tensor], species: torch.Tensor, group: torch.Tensor, n_groups: int, per_atom: bool
    ) -> torch.Tensor:
        with torch.no_grad():
            a = [c.detach() for c in coefficients]
            sparse = unflatten(self.state.sparse.to(a[0].dtype), self.state.shapes)
            k_xm = self.kernel(a, species, sparse, self.state.sparse_species, self._sparse_features(sparse))
            if per_atom:
                inverse_scale = self.inverse_scale.to(a[0].dtype)[species].T
                piece_weights = self.state.piece_weights.to(a[0].dtype)
                k_xx = piece_weights[0] + piece_weights[1:] @ (self.kernels.invariant_matched(a, a) * inverse_scale[1:])
                return self.state.variance(k_xm, k_xx)
            return self.state.group_variance(k_xm, self.kernel(a, species, a, species), group, n_groups)


class PolynomialHead(torch.nn.Module):
    """``e_i = sum_m w_m [c0 delta(a_i, a_m) + a (x^_i . x^_m)^zeta]`` on the normalised power spectrum."""

    def __init__(self, fitted, species: List[int]):
        super().__init__()
        if fitted.kernel.features is not power_spectrum:
            raise ValueError("only polynomial kernels on the default power spectrum can be exported")
        self.state = _SparseState(fitted, species)
        self.zeta = int(fitted.kernel.zeta)
        features = power_spectrum(unflatten(self.state.sparse, self.state.shapes))
        self.register_buffer("sparse_features", features / torch.linalg.vector_norm(features, dim=1, keepdim=True).clamp_min(1e-150))

    def unit_features(self, coefficients: List[torch.Tensor]) -> torch.Tensor:
        features = power_spectrum(coefficients)
        return features / torch.linalg.vector_norm(features, dim=1, keepdim=True).clamp_min(1e-150)

    def kernel(self, x: torch.Tensor, species_x: torch.Tensor, y: torch.Tensor, species_y: torch.Tensor) -> torch.Tensor:
        """Mixed kernel ``[n_x, n_y]`` between unit feature rows."""
        same = (species_x.unsqueeze(1) == species_y.unsqueeze(0)).to(x.dtype)
        piece_weights = self.state.piece_weights.to(x.dtype)
        return same * (piece_weights[0] + piece_weights[1] * (x @ y.T) ** self.zeta)

    def forward(self, coefficients: List[torch.Tensor], species: torch.Tensor) -> torch.Tensor:
        unit = self.unit_features(coefficients)
        k_xm = self.kernel(unit, species, self.sparse_features.to(unit.dtype), self.state.sparse_species)
        return k_xm @ self.state.weights.to(unit.dtype)

    def variance(
        self, coefficients: List[torch.Tensor], species: torch.Tensor, group: torch.Tensor, n_groups: int, per_atom: bool
    ) -> torch.Tensor:
        with torch.no_grad():
            unit = self.unit_features([c.detach() for c in coefficients])
            k_xm = self.kernel(unit, species, self.sparse_features.to(unit.dtype), self.state.sparse_species)
            if per_atom:
                return self.state.variance(k_xm, self.kernel(unit, species, unit, species).diagonal())
            return self.state.group_variance(k_xm, self.kernel(unit, species, unit, species), group, n_groups)


def build_potential(fitted) -> AtomisticPotential:
    """The deployable :class:`AtomisticPotential` of a fitted :class:`~acdc_potential.regression.SparseKRRModel`."""
    heads = {"wigner": WignerHead, "polynomial": PolynomialHead}
    if fitted.kernel.kind not in heads:
        raise ValueError(f"cannot export a '{fitted.kernel.kind}' kernel (known: {sorted(heads)})")
    species = list(fitted.species)
    head = heads[fitted.kernel.kind](fitted, species)
    baseline = torch.tensor([fitted.baseline.energies.get(z, 0.0) for z in species], dtype=torch.float64)
    return AtomisticPotential(fitted.expansion, head, baseline)
