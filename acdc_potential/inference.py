"""In-memory predictions: the same TorchScript module that is exported, run on ``ase.Atoms``.

:func:`predict` builds metatomic systems from the structures, lets vesin compute the
neighbour lists the module requests, runs the (scripted) module in batches and takes
forces and stress by autograd with respect to positions and a strain of positions and
cell, exactly as engines do. There is no second prediction route: the errors a fit
reports on its training set and those of the exported file on a test set come from the
same code.
"""

from typing import Dict, List, Sequence

import numpy as np
import torch
from metatomic.torch import ModelOutput, System
from vesin.metatomic import NeighborList

from .data import as_labelled, validate
from .model.potential import DIPOLE, FORCES_UNCERTAINTY


def predict(
    module: torch.nn.Module,
    species: Sequence[int],
    structures: Sequence,
    forces: bool = True,
    stress: bool = True,
    uncertainty: bool = False,
    batch_size: int = 16,
) -> Dict[str, torch.Tensor]:
    """Energies and, on request, forces, stress and uncertainties of ``ase.Atoms`` or
    :class:`~acdc_potential.data.Labelled`.

    :param module: an :class:`~acdc_potential.model.potential.AtomisticPotential` (scripted
        or not). :param species: the atomic numbers it knows (checked before it runs).
    :return: ``energy`` ``[S]`` (eV); ``forces`` ``[N, 3]`` (eV/A, atoms concatenated);
        ``stress`` ``[S, 3, 3]`` (eV/A^3, ASE sign; NaN for structures not periodic in all
        directions); ``energy_uncertainty`` ``[S]`` and ``atom_uncertainty`` ``[N]`` (eV) and,
        for a calibrated model, ``forces_uncertainty`` ``[N]`` (eV/A, of each force component):
        standard deviations (:mod:`acdc_potential.model.uncertainty`).
    """
    labelled = as_labelled(structures)
    validate(labelled, species=list(species))
    outputs: Dict[str, List[torch.Tensor]] = {}
    for start in range(0, len(labelled), batch_size):
        members = [s.atoms for s in labelled[start : start + batch_size]]
        for key, value in run_module(module, members, forces, stress, uncertainty).items():
            outputs.setdefault(key, []).append(value)
    return {key: torch.cat(values) for key, values in outputs.items()}


def predict_dipoles(module: torch.nn.Module, species: Sequence[int], structures: Sequence, batch_size: int = 16) -> torch.Tensor:
    """``[S, 3]`` dipoles (e*A) of ``ase.Atoms`` or :class:`~acdc_potential.data.Labelled` from a
    module with a dipole head (scripted or not), as :func:`predict` runs it."""
    labelled = as_labelled(structures)
    validate(labelled, species=list(species))
    values: List[torch.Tensor] = []
    requested = {DIPOLE: ModelOutput(unit="e*A", sample_kind="system")}
    buffer = next(module.buffers())
    for start in range(0, len(labelled), batch_size):
        systems, _, _ = _systems(module, [s.atoms for s in labelled[start : start + batch_size]], buffer.dtype, buffer.device, False, False)
        values.append(module(systems, requested, None)[DIPOLE].block().values[:, :, 0].detach())
    return torch.cat(values)


def _systems(module: torch.nn.Module, frames: List, dtype: torch.dtype, device: torch.device, forces: bool, stress: bool):
    """Systems of ``frames`` with neighbour lists, and the position and strain leaves of each."""
    systems, positions, strains = [], [], []
    for atoms in frames:
        x = torch.tensor(np.asarray(atoms.positions), dtype=dtype, device=device).requires_grad_(forces)
        strain = torch.zeros((3, 3), dtype=dtype, device=device, requires_grad=stress)
        deformation = torch.eye(3, dtype=dtype, device=device) + strain
        # metatomic wants no cell vector along a non-periodic direction (a cluster's box is only for show)
        cell = torch.tensor(np.asarray(atoms.cell.array) * np.asarray(atoms.pbc)[:, None], dtype=dtype, device=device)
        system = System(
            types=torch.tensor(atoms.numbers, dtype=torch.int32, device=device),
            positions=x @ deformation.T,
            cell=cell @ deformation.T,
            pbc=torch.tensor(atoms.pbc, dtype=torch.bool, device=device),
        )
        systems.append(system)
        positions.append(x)
        strains.append(strain)
    for options in module.requested_neighbor_lists():
        NeighborList(options, "angstrom").add_neighbor_list(systems)
    return systems, positions, strains


def run_module(module: torch.nn.Module, frames: List, forces: bool, stress: bool, uncertainty: bool, forces_uncertainty: bool = False) -> Dict[str, torch.Tensor]:
    """One call of ``module`` on ``frames`` (``ase.Atoms``, not validated), as :func:`predict` describes its
    results; ``forces_uncertainty`` alone (a calibrated model's, without the other uncertainties) comes
    from the same call as the energy, for MD that checks it at every step (:mod:`acdc_potential.active`)."""
    buffer = next(module.buffers())
    dtype, device = buffer.dtype, buffer.device
    systems, positions, strains = _systems(module, frames, dtype, device, forces, stress)
    requested = {"energy": ModelOutput(unit="eV", sample_kind="system")}
    if forces_uncertainty:
        requested[FORCES_UNCERTAINTY] = ModelOutput(unit="eV/A", sample_kind="atom")
    results = module(systems, requested, None)
    energy = results["energy"].block().values[:, 0]
    out = {"energy": energy.detach()}
    if forces_uncertainty:
        out["forces_uncertainty"] = results[FORCES_UNCERTAINTY].block().values[:, 0].detach()
    leaves = (positions if forces else []) + (strains if stress else [])
    if leaves:
        gradients = torch.autograd.grad(energy.sum(), leaves, allow_unused=True)
        gradients = [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, gradients)]
        if forces:
            out["forces"] = -torch.cat(gradients[: len(frames)])
        if stress:
            values = []
            for atoms, g in zip(frames, gradients[-len(frames) :]):
                if atoms.pbc.all():
                    values.append(0.5 * (g + g.T) / abs(atoms.get_volume()))
                else:
                    values.append(torch.full((3, 3), float("nan"), dtype=dtype, device=device))
            out["stress"] = torch.stack(values)
    if uncertainty:
        with torch.no_grad():
            system = {"energy_uncertainty": ModelOutput(unit="eV", sample_kind="system")}
            out["energy_uncertainty"] = module(systems, system, None)["energy_uncertainty"].block().values[:, 0].detach()
            # per atom in one call: the forces' uncertainty scales the atoms' energy uncertainty
            atoms = {"energy_uncertainty": ModelOutput(unit="eV", sample_kind="atom")}
            if bool(module.force_scale.any()):
                atoms[FORCES_UNCERTAINTY] = ModelOutput(unit="eV/A", sample_kind="atom")
            results = module(systems, atoms, None)
            out["atom_uncertainty"] = results["energy_uncertainty"].block().values[:, 0].detach()
            if FORCES_UNCERTAINTY in results:
                out["forces_uncertainty"] = results[FORCES_UNCERTAINTY].block().values[:, 0].detach()
    return out
