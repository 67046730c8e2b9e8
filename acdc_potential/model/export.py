"""Export of an :class:`~acdc_potential.model.potential.AtomisticPotential` as one metatomic TorchScript file.

The file carries the model's metadata: the name ``acdc-potential`` (engines append
"model"), its authors, and the references of the methods it uses
(:func:`~acdc_potential.model.references.metatomic_references`; docs/references.md).
"""

import copy
from typing import Dict, List, Optional

import torch
from metatomic.torch import AtomisticModel, ModelCapabilities, ModelMetadata, ModelOutput

from .potential import DIPOLE, FORCES_UNCERTAINTY, AtomisticPotential
from .references import IMPLEMENTATION_REFERENCES

def model_metadata(description: str = "", references: Optional[Dict[str, List[str]]] = None) -> ModelMetadata:
    """Name, authors and ``references`` (default: the implementation's only)."""
    return ModelMetadata(
        name="acdc-potential",
        description=description,
        authors=["the acdc-potential developers"],
        references=references if references is not None else {"implementation": list(IMPLEMENTATION_REFERENCES), "architecture": [], "model": []},
    )


def export_model(
    potential: AtomisticPotential,
    path: str,
    dtype: torch.dtype = torch.float64,
    description: str = "",
    references: Optional[Dict[str, List[str]]] = None,
    extensions_directory: Optional[str] = None,
) -> AtomisticModel:
    """Wrap ``potential`` in metatomic's ``AtomisticModel`` and save it as one TorchScript file.

    ``dtype`` float64 (default) or float32 (refused for heads that sum pairs at every step: their
    weights cancel beyond float32's precision); ``references`` as
    :func:`~acdc_potential.model.references.metatomic_references` gives them. Supported
    devices are declared as cpu and cuda (``benchmarks/gpu.py`` checks cuda against the cpu).
    """
    model = atomistic_model(potential, dtype, description, references)
    model.save(path, collect_extensions=extensions_directory)
    return model


def in_dtype(potential: AtomisticPotential, dtype: torch.dtype) -> AtomisticPotential:
    """A copy of ``potential`` in ``dtype``, but for the parts of its energy head that only the
    variances use (``head.variance_parts()``), which stay float64: in float32 the unexplained
    variance of a well-fitted environment (a millionth of the prior's) is lost to rounding."""
    single = copy.deepcopy(potential).to(dtype)
    if potential.head is not None and dtype != torch.float64:
        memo: Dict[int, object] = {}  # one deep copy for all parts: tensors they share stay shared
        for name in potential.head.variance_parts():
            setattr(single.head, name, copy.deepcopy(getattr(potential.head, name), memo).to(torch.float64))
    return single


def atomistic_model(
    potential: AtomisticPotential,
    dtype: torch.dtype = torch.float64,
    description: str = "",
    references: Optional[Dict[str, List[str]]] = None,
) -> AtomisticModel:
    """``potential`` (a copy, in ``dtype``, caches cleared) in metatomic's ``AtomisticModel``."""
    if dtype != torch.float64 and potential.head is not None and potential.head.pairs_left:
        raise ValueError(
            "this model sums its sparse environments pair by pair at every step (Wigner orders above 4, or a "
            "polynomial kernel of zeta >= 3): float32 cannot hold the cancellation among its fitted weights "
            '(docs/equations.md, "Numerical precision"); export it in float64'
        )
    potential = in_dtype(potential, dtype).eval()
    outputs = {}
    for head in (potential.head, potential.dipole):
        clear_cache = getattr(head, "clear_cache", None)
        if clear_cache is not None:
            clear_cache()
    if potential.head is not None:
        outputs["energy"] = ModelOutput(unit="eV", sample_kind="atom")
        outputs["energy_uncertainty"] = ModelOutput(unit="eV", sample_kind="atom")
        if bool(potential.force_scale.any()):
            outputs[FORCES_UNCERTAINTY] = ModelOutput(unit="eV/A", sample_kind="atom")
    if potential.dipole is not None:
        outputs[DIPOLE] = ModelOutput(unit="e*A", sample_kind="atom", description="dipole moment, Cartesian components xyz (per atom: the local dipoles whose sum it is)")
    capabilities = ModelCapabilities(
        outputs=outputs,
        atomic_types=potential.species,
        interaction_range=potential.interaction_range,
        length_unit="angstrom",
        supported_devices=["cpu", "cuda"],
        dtype="float64" if dtype == torch.float64 else "float32",
    )
    return AtomisticModel(potential, model_metadata(description, references), capabilities)
