"""The deployable model: density expansion + energy head, as a metatomic ``AtomisticModel``.

:class:`AtomisticPotential` is a TorchScript-compatible module that reads the
neighbour lists a metatomic engine hands it (ASE, LAMMPS, i-PI, ...), computes the
density coefficients of every atom (:mod:`acdc_potential.density`) and passes them to
an *energy head*: any TorchScript module with

    forward(coefficients: List[Tensor], species: Tensor) -> Tuple[Tensor, Tensor]

returning per-atom energies ``[n_atoms]`` and per-atom predictive variances
``[n_atoms]`` (eV^2) from the coefficients (layout of :mod:`acdc_potential.density`)
and the species index of each centre. Forces and stress come from autograd in the
engine, through the distance vectors of its neighbour lists.

Outputs: ``energy`` (per system, or per atom), and ``energy_uncertainty`` (per atom:
the predictive standard deviation of each atomic energy; per system: the square root
of the summed atomic variances, i.e. atomic errors taken as independent).
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

from .density import DensityExpansion


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

    def atomic_energies(self, systems: List[System]):
        """Per-atom energies ``[N]``, variances ``[N]`` and system index ``[N]`` of all atoms."""
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
        numbers = torch.cat(types)
        species = self.density.species_index(numbers)
        all_centers = torch.cat(centers)
        coefficients = self.density(torch.cat(vectors), all_centers, species[torch.cat(neighbors)], offset)
        energies, variances = self.head(coefficients, species)
        energies = energies + self.baseline.to(energies.dtype)[species]
        return energies, variances, torch.cat(system_index)

    def forward(
        self,
        systems: List[System],
        outputs: Dict[str, ModelOutput],
        selected_atoms: Optional[Labels] = None,
    ) -> Dict[str, TensorMap]:
        if len(systems) == 0:
            return {}
        energies, variances, system_index = self.atomic_energies(systems)
        device = energies.device
        atom_index = torch.cat([torch.arange(len(s), device=device) for s in systems])
        if selected_atoms is not None:
            keep = torch.zeros_like(system_index, dtype=torch.bool)
            for row in selected_atoms.values:
                keep = keep | ((system_index == row[0]) & (atom_index == row[1]))
            energies = energies[keep]
            variances = variances[keep]
            system_index = system_index[keep]
            atom_index = atom_index[keep]

        results: Dict[str, TensorMap] = {}
        for name in ["energy", "energy_uncertainty"]:
            if name not in outputs:
                continue
            values = energies if name == "energy" else variances
            if outputs[name].sample_kind == "atom":
                samples = Labels(["system", "atom"], torch.stack([system_index, atom_index], dim=1).to(torch.int32))
                if name == "energy_uncertainty":
                    values = torch.sqrt(values)
            else:
                total = torch.zeros(len(systems), dtype=values.dtype, device=device)
                values = total.index_add(0, system_index, values)
                if name == "energy_uncertainty":
                    values = torch.sqrt(values)
                samples = Labels(["system"], torch.arange(len(systems), device=device, dtype=torch.int32).reshape(-1, 1))
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
