"""The deployable model: neighbour pairs -> energy and dipole heads -> outputs, as a metatomic module.

:class:`AtomisticPotential` is a TorchScript-compatible module that reads the neighbour
lists a metatomic engine hands it (ASE, LAMMPS, i-PI, TorchSim, ...), gathers the pairs of
all atoms of all systems (:class:`~acdc_potential.descriptors.density.Pairs`) and passes
them to an *energy head* (:mod:`acdc_potential.model.heads`). Forces and stress come from
autograd in the engine, through the distance vectors of its neighbour lists.

Outputs: ``energy`` (per system, or per atom); ``energy_uncertainty``, the calibrated
standard deviation of the system's energy (projected-process predictive) or of each atomic
energy (the prior's part that the sparse environments do not explain); and
``acdc-potential::forces_uncertainty`` (per atom, eV/A), the standard deviation of each
Cartesian force component of an atom (:mod:`acdc_potential.model.uncertainty`), present in
calibrated models only; ``acdc-potential::dipole`` (e*A, per system or the local dipoles per atom,
components ``xyz``), in models with a dipole head, without gradients. A model may have an energy
head, a dipole head, or both (one engine call then returns energy and dipole). The per-system uncertainty needs the kernel between every pair of
atoms of the system: cheap for molecules, seconds for hundreds of atoms. This module imports nothing of the
fitting code (:mod:`acdc_potential.fit`); in-memory predictions of a fitted model run this
same module (:func:`acdc_potential.inference.predict`).
"""

from typing import Dict, List, Optional, Tuple

import torch
from metatensor.torch import Labels, TensorBlock, TensorMap
from metatomic.torch import ModelOutput, NeighborListOptions, System

from ..descriptors.density import Pairs
from ..descriptors.neighbors import MIN_DISTANCE

# the standard deviation of each force component of an atom (eV/A), a non-standard metatomic output
FORCES_UNCERTAINTY = "acdc-potential::forces_uncertainty"
# the dipole moment (e*A; per system, or the local dipoles per atom), Cartesian components "xyz"
DIPOLE = "acdc-potential::dipole"


def check_system(index: int, positions: torch.Tensor, vectors: torch.Tensor, min_distance: float) -> None:
    """Raise a ``ValueError`` naming system ``index`` if its positions are not finite or two of
    its atoms (pair vectors ``[P, 3]``) are closer than ``min_distance`` (A)."""
    if not bool(torch.isfinite(positions).all()):
        raise ValueError("system " + str(index) + ": positions contain NaN or infinity")
    if vectors.shape[0] > 0:
        closest = float(torch.linalg.vector_norm(vectors.detach(), dim=1).min())
        if closest < min_distance:
            raise ValueError(
                "system " + str(index) + ": two atoms are " + str(round(closest * 1e4) / 1e4)
                + " A apart (overlapping atoms; minimum is " + str(min_distance) + " A)"
            )


class AtomisticPotential(torch.nn.Module):
    """Energy and dipole models on metatomic systems.

    :param head: energy head (:mod:`acdc_potential.model.heads`), or ``None`` for a dipole-only
        model; its ``density`` knows the model's species and cutoff.
    :param baseline: ``[n_species]`` energy of each species added to every atom (eV); zeros by default.
    :param force_scale: ``[n_species]`` ``beta_a`` (1/A) of the calibration
        (:class:`~acdc_potential.model.uncertainty.Calibration`): the standard deviation of a force
        component over the atomic energy uncertainty; zeros (default) for a model without it.
    :param dipole: a :class:`~acdc_potential.model.heads.DipoleHead` (output :data:`DIPOLE`), or
        ``None``; with an energy head it must know the energy head's species.
    """

    def __init__(
        self,
        head: Optional[torch.nn.Module] = None,
        baseline: Optional[torch.Tensor] = None,
        force_scale: Optional[torch.Tensor] = None,
        dipole: Optional[torch.nn.Module] = None,
    ):
        super().__init__()
        if head is None and dipole is None:
            raise ValueError("a model needs an energy head, a dipole head or both")
        first = head if head is not None else dipole
        self.species: List[int] = list(first.density.species)
        if head is not None and dipole is not None and not set(self.species) <= set(dipole.density.species):
            raise ValueError(f"the dipole model knows the species {list(dipole.density.species)}, not all of the energy model's {self.species}")
        self.head = head
        self.dipole = dipole
        self.cutoff = max(float(m.density.cutoff) for m in (head, dipole) if m is not None)
        # how far an atom's energy reaches: the cutoff, or twice the message's for message-passing heads
        self.interaction_range = max(float(getattr(m, "interaction_range", m.density.cutoff)) for m in (head, dipole) if m is not None)
        n_species = len(self.species)
        self.register_buffer("baseline", (baseline if baseline is not None else torch.zeros(n_species)).to(torch.float64).clone())
        scale = force_scale if force_scale is not None else torch.zeros(n_species)
        self.register_buffer("force_scale", scale.to(torch.float64).clone())
        self.neighbors = NeighborListOptions(cutoff=float(first.density.cutoff), full_list=True, strict=True)
        self.dipole_neighbors = NeighborListOptions(cutoff=float(dipole.density.cutoff) if dipole is not None else self.cutoff, full_list=True, strict=True)
        self.min_distance = MIN_DISTANCE
        self.forces_uncertainty: str = FORCES_UNCERTAINTY
        self.dipole_output: str = DIPOLE

    @torch.jit.export
    def requested_neighbor_lists(self) -> List[NeighborListOptions]:
        if self.dipole is not None and self.head is not None and self.dipole_neighbors.cutoff != self.neighbors.cutoff:
            return [self.neighbors, self.dipole_neighbors]
        return [self.neighbors]

    def pairs(self, systems: List[System], options: NeighborListOptions) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The neighbour pairs of all atoms of ``systems`` in the list ``options``: vectors ``[P, 3]``,
        centre and neighbour indices ``[P]`` in the batch, atomic numbers ``[N]`` and the system index
        of each atom ``[N]``."""
        vectors: List[torch.Tensor] = []
        centers: List[torch.Tensor] = []
        neighbors: List[torch.Tensor] = []
        system_index: List[torch.Tensor] = []
        types: List[torch.Tensor] = []
        offset = 0
        for i, system in enumerate(systems):
            pairs = system.get_neighbor_list(options)
            check_system(i, system.positions, pairs.values.reshape(-1, 3), self.min_distance)
            vectors.append(pairs.values.reshape(-1, 3))
            centers.append(pairs.samples.column("first_atom").to(torch.long) + offset)
            neighbors.append(pairs.samples.column("second_atom").to(torch.long) + offset)
            system_index.append(torch.full((len(system),), i, dtype=torch.long, device=system.positions.device))
            types.append(system.types.to(torch.long))
            offset += len(system)
        return torch.cat(vectors), torch.cat(centers), torch.cat(neighbors), torch.cat(types), torch.cat(system_index)

    def forward(
        self,
        systems: List[System],
        outputs: Dict[str, ModelOutput],
        selected_atoms: Optional[Labels] = None,
    ) -> Dict[str, TensorMap]:
        if len(systems) == 0:
            return {}
        vectors, centers, neighbors, types, system_index = self.pairs(systems, self.neighbors)
        device = types.device
        atom_index = torch.cat([torch.arange(len(s), device=device) for s in systems])
        keep = torch.ones_like(system_index, dtype=torch.bool)
        if selected_atoms is not None:
            keep = torch.zeros_like(system_index, dtype=torch.bool)
            for row in selected_atoms.values:
                keep = keep | ((system_index == row[0]) & (atom_index == row[1]))
        n_systems = len(systems)
        results: Dict[str, TensorMap] = {}
        head = self.head
        wanted = "energy" in outputs or "energy_uncertainty" in outputs or self.forces_uncertainty in outputs
        if head is not None and wanted:
            species = head.density.species_index(types)
            environments = head.environments(Pairs(vectors, centers, neighbors, species))
            # the atoms' energy uncertainty, computed once for both outputs that use it
            atom_sigma: Optional[torch.Tensor] = None
            for name in ["energy", "energy_uncertainty", self.forces_uncertainty]:
                if name not in outputs:
                    continue
                per_atom = outputs[name].sample_kind == "atom" or name == self.forces_uncertainty
                if name == "energy":
                    values = head(environments, species) + self.baseline.to(environments[0].dtype)[species]
                    values = values[keep]
                    if not per_atom:
                        values = torch.zeros(n_systems, dtype=values.dtype, device=device).index_add(0, system_index[keep], values)
                elif per_atom:
                    if atom_sigma is None:
                        atom_sigma = torch.sqrt(head.variance(environments, species, system_index, n_systems, True).clamp_min(0.0))
                    values = atom_sigma
                    if name == self.forces_uncertainty:
                        values = values * self.force_scale.to(values.dtype)[species]
                    values = values[keep]
                else:
                    kept = [x[keep] for x in environments]
                    values = torch.sqrt(head.variance(kept, species[keep], system_index[keep], n_systems, False).clamp_min(0.0))
                results[name] = _tensor_map(values.reshape(-1, 1), self._samples(per_atom, system_index, atom_index, keep, n_systems), [], "forces" if name == self.forces_uncertainty else "energy")
        dipole = self.dipole
        if dipole is not None and self.dipole_output in outputs:
            if self.head is not None and self.dipole_neighbors.cutoff != self.neighbors.cutoff:
                vectors, centers, neighbors, types, system_index = self.pairs(systems, self.dipole_neighbors)
            per_atom = outputs[self.dipole_output].sample_kind == "atom"
            species = dipole.density.species_index(types)
            # an observable along a trajectory: detached pair vectors and positions, no graph for derivatives
            centred = self.centred_positions(systems, system_index, n_systems, dipole.charges)
            local = dipole(dipole.environments(Pairs(vectors.detach(), centers, neighbors, species)), species, centred)[keep]
            values = local if per_atom else torch.zeros((n_systems, 3), dtype=local.dtype, device=device).index_add(0, system_index[keep], local)
            xyz = Labels(["xyz"], torch.arange(3, device=device, dtype=torch.int32).reshape(-1, 1))
            results[self.dipole_output] = _tensor_map(values.reshape(-1, 3, 1), self._samples(per_atom, system_index, atom_index, keep, n_systems), [xyz], "dipole")
        return results

    def centred_positions(self, systems: List[System], system_index: torch.Tensor, n_systems: int, needed: bool) -> torch.Tensor:
        """``[N, 3]`` positions relative to their system's mean (zeros when not ``needed``); a ``ValueError``
        for a periodic system when ``needed`` (charges times positions have no meaning there)."""
        positions = torch.cat([s.positions.detach() for s in systems])
        if not needed:
            return torch.zeros_like(positions)
        for i, system in enumerate(systems):
            if bool(system.pbc.any()):
                raise ValueError("system " + str(i) + ": periodic; this dipole model has atomic charges, whose dipole is defined for molecules only")
        counts = torch.zeros(n_systems, dtype=positions.dtype, device=positions.device).index_add(0, system_index, torch.ones_like(positions[:, 0]))
        means = torch.zeros((n_systems, 3), dtype=positions.dtype, device=positions.device).index_add(0, system_index, positions) / counts[:, None]
        return positions - means[system_index]

    def _samples(self, per_atom: bool, system_index: torch.Tensor, atom_index: torch.Tensor, keep: torch.Tensor, n_systems: int) -> Labels:
        if per_atom:
            return Labels(["system", "atom"], torch.stack([system_index[keep], atom_index[keep]], dim=1).to(torch.int32))
        return Labels(["system"], torch.arange(n_systems, device=system_index.device, dtype=torch.int32).reshape(-1, 1))


def _tensor_map(values: torch.Tensor, samples: Labels, components: List[Labels], name: str) -> TensorMap:
    """One block of ``values`` with one property ``name``."""
    device = values.device
    block = TensorBlock(values=values, samples=samples, components=components, properties=Labels([name], torch.zeros((1, 1), dtype=torch.int32, device=device)))
    return TensorMap(Labels(["_"], torch.zeros((1, 1), dtype=torch.int32, device=device)), [block])
