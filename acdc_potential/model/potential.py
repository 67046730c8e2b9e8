"""The deployable model: neighbour pairs -> energy head -> outputs, as a metatomic module.

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
calibrated models only. The per-system uncertainty needs the kernel between every pair of
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
    """Energy model on metatomic systems.

    :param head: energy head (:mod:`acdc_potential.model.heads`); its ``density`` knows the
        model's species and cutoff.
    :param baseline: ``[n_species]`` energy of each species added to every atom (eV).
    :param force_scale: ``[n_species]`` ``beta_a`` (1/A) of the calibration
        (:class:`~acdc_potential.model.uncertainty.Calibration`): the standard deviation of a force
        component over the atomic energy uncertainty; zeros (default) for a model without it.
    """

    def __init__(self, head: torch.nn.Module, baseline: torch.Tensor, force_scale: Optional[torch.Tensor] = None):
        super().__init__()
        self.head = head
        self.species: List[int] = list(head.density.species)
        self.cutoff = float(head.density.cutoff)
        self.register_buffer("baseline", baseline.to(torch.float64).clone())
        scale = force_scale if force_scale is not None else torch.zeros(len(self.species))
        self.register_buffer("force_scale", scale.to(torch.float64).clone())
        self.neighbors = NeighborListOptions(cutoff=self.cutoff, full_list=True, strict=True)
        self.min_distance = MIN_DISTANCE
        self.forces_uncertainty: str = FORCES_UNCERTAINTY

    @torch.jit.export
    def requested_neighbor_lists(self) -> List[NeighborListOptions]:
        return [self.neighbors]

    def pairs(self, systems: List[System]) -> Tuple[Pairs, torch.Tensor]:
        """The neighbour pairs of all atoms of ``systems`` and the system index of each atom ``[N]``."""
        vectors: List[torch.Tensor] = []
        centers: List[torch.Tensor] = []
        neighbors: List[torch.Tensor] = []
        system_index: List[torch.Tensor] = []
        types: List[torch.Tensor] = []
        offset = 0
        for i, system in enumerate(systems):
            pairs = system.get_neighbor_list(self.neighbors)
            check_system(i, system.positions, pairs.values.reshape(-1, 3), self.min_distance)
            vectors.append(pairs.values.reshape(-1, 3))
            centers.append(pairs.samples.column("first_atom").to(torch.long) + offset)
            neighbors.append(pairs.samples.column("second_atom").to(torch.long) + offset)
            system_index.append(torch.full((len(system),), i, dtype=torch.long, device=system.positions.device))
            types.append(system.types.to(torch.long))
            offset += len(system)
        species = self.head.density.species_index(torch.cat(types))
        return Pairs(torch.cat(vectors), torch.cat(centers), torch.cat(neighbors), species), torch.cat(system_index)

    def forward(
        self,
        systems: List[System],
        outputs: Dict[str, ModelOutput],
        selected_atoms: Optional[Labels] = None,
    ) -> Dict[str, TensorMap]:
        if len(systems) == 0:
            return {}
        pairs, system_index = self.pairs(systems)
        species = pairs.species
        environments = self.head.environments(pairs)
        device = species.device
        atom_index = torch.cat([torch.arange(len(s), device=device) for s in systems])
        keep = torch.ones_like(system_index, dtype=torch.bool)
        if selected_atoms is not None:
            keep = torch.zeros_like(system_index, dtype=torch.bool)
            for row in selected_atoms.values:
                keep = keep | ((system_index == row[0]) & (atom_index == row[1]))
        n_systems = len(systems)

        results: Dict[str, TensorMap] = {}
        # the atoms' energy uncertainty, computed once for both outputs that use it
        atom_sigma: Optional[torch.Tensor] = None
        for name in ["energy", "energy_uncertainty", self.forces_uncertainty]:
            if name not in outputs:
                continue
            per_atom = outputs[name].sample_kind == "atom" or name == self.forces_uncertainty
            if name == "energy":
                values = self.head(environments, species) + self.baseline.to(environments[0].dtype)[species]
                values = values[keep]
                if not per_atom:
                    values = torch.zeros(n_systems, dtype=values.dtype, device=device).index_add(0, system_index[keep], values)
            elif per_atom:
                if atom_sigma is None:
                    atom_sigma = torch.sqrt(self.head.variance(environments, species, system_index, n_systems, True).clamp_min(0.0))
                values = atom_sigma
                if name == self.forces_uncertainty:
                    values = values * self.force_scale.to(values.dtype)[species]
                values = values[keep]
            else:
                kept = [x[keep] for x in environments]
                values = torch.sqrt(self.head.variance(kept, species[keep], system_index[keep], n_systems, False).clamp_min(0.0))
            if per_atom:
                samples = Labels(["system", "atom"], torch.stack([system_index[keep], atom_index[keep]], dim=1).to(torch.int32))
            else:
                samples = Labels(["system"], torch.arange(n_systems, device=device, dtype=torch.int32).reshape(-1, 1))
            block = TensorBlock(
                values=values.reshape(-1, 1),
                samples=samples,
                components=[],
                properties=Labels(["forces" if name == self.forces_uncertainty else "energy"], torch.zeros((1, 1), dtype=torch.int32, device=device)),
            )
            results[name] = TensorMap(Labels(["_"], torch.zeros((1, 1), dtype=torch.int32, device=device)), [block])
        return results


