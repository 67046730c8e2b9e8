"""The exported metatomic model: file round trip, engines' forces and stress, errors.

The head here is a fixed quadratic function of the density coefficients, so these
tests check the export machinery (neighbour lists from the engine, autograd forces
and stress, dtype, per-atom outputs) independently of any fit.
"""

import subprocess
import sys
import textwrap
from typing import List

import ase
import ase.build
import numpy as np
import pytest
import torch
from conftest import check_forces_and_stress, random_rotation
from metatomic.torch import ModelOutput
from metatomic_ase import MetatomicCalculator

from acdc_potential.descriptors.density import DensityExpansion
from acdc_potential.model.export import export_model
from acdc_potential.model.potential import AtomisticPotential
from acdc_potential.descriptors.radial import DensityHypers
from acdc_potential.model.heads import DensityHead


class QuadraticHead(DensityHead):
    """e_i = sum_l sum_q w_lq sum_m c[i, m, q]^2 + linear l = 0 term; variance (e_i / 10)^2 per atom."""

    def __init__(self, density: DensityExpansion, sizes: List[int]):
        super().__init__(density)
        generator = torch.Generator().manual_seed(0)
        self.weights = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.randn(n, generator=generator, dtype=torch.float64), requires_grad=False) for n in sizes]
        )

    def forward(self, coefficients: List[torch.Tensor], species: torch.Tensor) -> torch.Tensor:
        energy = coefficients[0][:, 0, :].sum(1) * 0.1
        for l, w in enumerate(self.weights):
            energy = energy + ((coefficients[l] ** 2).sum(1) * w).sum(1)
        return energy

    def variance(
        self, coefficients: List[torch.Tensor], species: torch.Tensor, group: torch.Tensor, n_groups: int, per_atom: bool
    ) -> torch.Tensor:
        atomic = 0.01 * self.forward(coefficients, species).detach() ** 2
        if per_atom:
            return atomic
        return torch.zeros(n_groups, dtype=atomic.dtype).index_add(0, group, atomic)


def make_potential(species):
    hypers = DensityHypers(cutoff=4.0, max_angular=3, max_radial=4, density="wigner", C=0.3, r0=2.0)
    density = DensityExpansion(hypers, species)
    head = QuadraticHead(density, [len(species) * n for n in density.n_radial])
    return AtomisticPotential(head, torch.arange(len(species), dtype=torch.float64) - 3.0)


def ethanol():
    atoms = ase.build.molecule("CH3CH2OH")
    atoms.rattle(0.05, seed=4)
    return atoms


def copper():
    atoms = ase.build.bulk("Cu", "fcc", a=3.6, cubic=True) * (2, 1, 1)
    atoms.cell = atoms.cell.array @ np.array([[1.0, 0.03, 0.0], [0.01, 1.0, 0.02], [0.0, 0.0, 1.0]])
    atoms.rattle(0.05, seed=5)
    return atoms


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    directory = tmp_path_factory.mktemp("model")
    paths = {}
    for name, species in [("ethanol", [1, 6, 8]), ("copper", [29])]:
        potential = make_potential(species)
        for dtype in [torch.float64, torch.float32]:
            path = directory / f"{name}-{str(dtype)[6:]}.pt"
            export_model(potential, str(path), dtype=dtype)
            paths[(name, dtype)] = str(path)
        paths[(name, "potential")] = potential
    return paths


def test_file_runs_without_the_package_and_matches_memory(exported):
    """A fresh Python process that never imports acdc_potential reproduces the
    in-memory model to 1e-10 relative (energy, forces, per-atom energies)."""
    atoms = ethanol()
    potential = exported[("ethanol", "potential")]
    in_memory = MetatomicCalculator(export_model(potential, exported[("ethanol", torch.float64)]))
    atoms.calc = in_memory
    energy, forces = atoms.get_potential_energy(), atoms.get_forces()

    script = textwrap.dedent(
        f"""
        import sys, json, ase.build
        from metatomic_ase import MetatomicCalculator
        atoms = ase.build.molecule("CH3CH2OH")
        atoms.rattle(0.05, seed=4)
        atoms.calc = MetatomicCalculator({exported[("ethanol", torch.float64)]!r}, check_consistency=True)
        result = {{"energy": atoms.get_potential_energy(), "forces": atoms.get_forces().tolist(),
                   "energies": atoms.get_potential_energies().tolist(),
                   "imported": any(m.startswith("acdc_potential") for m in sys.modules)}}
        print(json.dumps(result))
        """
    )
    output = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd="/")
    import json

    result = json.loads(output.stdout.strip().splitlines()[-1])
    assert not result["imported"]
    assert abs(result["energy"] - energy) <= 1e-10 * abs(energy)
    np.testing.assert_allclose(result["forces"], forces, rtol=1e-10, atol=1e-10 * np.abs(forces).max())
    assert abs(sum(result["energies"]) - energy) <= 1e-10 * abs(energy)


def test_float32_export_close_to_float64(exported):
    atoms = copper()
    energies = {}
    for dtype in [torch.float64, torch.float32]:
        atoms.calc = MetatomicCalculator(exported[("copper", dtype)])
        energies[dtype] = atoms.get_potential_energy()
    assert abs(energies[torch.float32] - energies[torch.float64]) <= 1e-5 * abs(energies[torch.float64])


def test_forces_and_stress_equal_finite_differences(exported):
    atoms = copper()
    atoms.calc = MetatomicCalculator(exported[("copper", torch.float64)])
    check_forces_and_stress(atoms, [(0, 0), (3, 2), (5, 1)], [(0, 0), (1, 2), (2, 0)], 1e-5, 1e-6, 1e-7)


def test_energy_invariant_and_forces_equivariant_under_rotation(exported):
    atoms = ethanol()
    calculator = MetatomicCalculator(exported[("ethanol", torch.float64)])
    atoms.calc = calculator
    energy, forces = atoms.get_potential_energy(), atoms.get_forces()
    rotation = random_rotation(11)
    rotated = atoms.copy()
    rotated.positions = atoms.positions @ rotation.T
    rotated.calc = calculator
    assert abs(rotated.get_potential_energy() - energy) < 1e-10 * abs(energy)
    np.testing.assert_allclose(rotated.get_forces(), forces @ rotation.T, atol=1e-10)


def test_periodic_supercell_is_extensive(exported):
    atoms = copper()
    calculator = MetatomicCalculator(exported[("copper", torch.float64)])
    atoms.calc = calculator
    energy = atoms.get_potential_energy()
    supercell = atoms * (2, 2, 1)
    supercell.calc = calculator
    assert abs(supercell.get_potential_energy() - 4 * energy) < 1e-9 * abs(energy)


def test_uncertainty_outputs(exported):
    atoms = ethanol()
    potential = exported[("ethanol", "potential")]
    calculator = MetatomicCalculator(exported[("ethanol", torch.float64)])
    outputs = calculator.run_model(
        atoms,
        {
            "energy": ModelOutput(unit="eV", sample_kind="atom"),
            "energy_uncertainty": ModelOutput(unit="eV", sample_kind="atom"),
        },
    )
    atomic = outputs["energy"].block().values[:, 0]
    sigma = outputs["energy_uncertainty"].block().values[:, 0]
    baseline = potential.baseline[potential.head.density.species_index(torch.tensor(atoms.numbers))]
    torch.testing.assert_close(sigma, 0.1 * (atomic - baseline).abs(), atol=1e-12, rtol=1e-10)


def test_unknown_species_is_a_clear_error(exported):
    atoms = ase.build.molecule("CH3Cl")
    atoms.calc = MetatomicCalculator(exported[("ethanol", torch.float64)])
    with pytest.raises(ValueError, match="atomic type '17'"):
        atoms.get_potential_energy()


def test_calculator_errors_for_missing_corrupt_and_foreign_files(tmp_path):
    from acdc_potential.calculator import ACDCCalculator, ModelFileError

    with pytest.raises(ModelFileError, match="does not exist"):
        ACDCCalculator(tmp_path / "missing.pt")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a model")
    with pytest.raises(ModelFileError, match="not a usable exported model"):
        ACDCCalculator(corrupt)
    foreign = tmp_path / "foreign.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(foreign))
    with pytest.raises(ModelFileError, match="not a usable exported model"):
        ACDCCalculator(foreign)


def test_calculator_uncertainties(exported):
    from acdc_potential.calculator import ACDCCalculator

    atoms = ethanol()
    calculator = ACDCCalculator(exported[("ethanol", torch.float64)], uncertainty_threshold=None)
    atoms.calc = calculator
    per_atom = calculator.get_uncertainty(atoms, per_atom=True)
    total = calculator.get_uncertainty(atoms)
    assert per_atom.shape == (len(atoms),) and np.all(per_atom > 0)
    assert abs(total - np.sqrt(np.sum(per_atom**2))) < 1e-12 * total
