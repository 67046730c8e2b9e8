"""Reading labelled extxyz files: keys, conventions, and clear errors for bad structures."""

import ase
import ase.io
import numpy as np
import pytest
from ase.calculators.singlepoint import SinglePointCalculator

from acdc_potential.data import LabelKeys, Labelled, labels_of, read_structures, species_of, validate
from acdc_potential.descriptors.neighbors import StructureError

COPPER = "../shared/data/copper_train.extxyz"
METHANE = "../shared/data/methane_train.extxyz"


@pytest.fixture
def data_dir(request):
    return request.config.rootpath


def test_reads_energy_forces_and_stress_in_ase_conventions(data_dir):
    structures = read_structures(str(data_dir / COPPER), index=":3")
    reference = ase.io.read(str(data_dir / COPPER), index=0)
    first = structures[0]
    assert first.energy == reference.get_potential_energy()
    np.testing.assert_array_equal(first.forces, reference.get_forces())
    np.testing.assert_allclose(first.stress, reference.get_stress(voigt=False), rtol=0, atol=0)
    np.testing.assert_allclose(first.stress, first.stress.T)
    assert [s.index for s in structures] == [0, 1, 2]
    assert species_of(structures) == [29]


def test_custom_keys_and_virial(tmp_path):
    atoms = ase.Atoms("Cu2", positions=[[0, 0, 0], [1.3, 1.2, 0.1]], cell=np.diag([3.0, 3.1, 3.2]), pbc=True)
    stress = np.array([[0.1, 0.02, 0.0], [0.02, -0.05, 0.01], [0.0, 0.01, 0.03]])
    atoms.info["REF_energy"] = -3.5
    atoms.info["REF_virial"] = -stress * atoms.get_volume()
    atoms.info["weight"] = 2.0
    atoms.arrays["REF_forces"] = np.array([[0.1, 0.2, 0.3], [-0.1, -0.2, -0.3]])
    path = tmp_path / "ref.extxyz"
    ase.io.write(str(path), [atoms, atoms])
    keys = LabelKeys(energy="REF_energy", forces="REF_forces", stress="REF_stress", virial="REF_virial")
    structures = read_structures(str(path), keys=keys, require_energy=True, require_forces=True)
    assert len(structures) == 2 and structures[1].energy == -3.5 and structures[1].weight == 2.0
    np.testing.assert_allclose(structures[0].stress, stress, atol=1e-12)
    np.testing.assert_allclose(structures[0].forces, atoms.arrays["REF_forces"])


def test_structures_without_forces_or_energy_are_allowed():
    atoms = ase.Atoms("H2", positions=[[0, 0, 0], [0.74, 0, 0]])
    only_energy = labels_of(atoms.copy())
    only_energy.energy = -1.0
    only_forces = Labelled(atoms=atoms, forces=np.zeros((2, 3)), index=1)
    validate([only_energy, only_forces])
    assert only_energy.forces is None and only_forces.energy is None


@pytest.mark.parametrize(
    "structure, options, message",
    [
        (Labelled(ase.Atoms("H2", positions=[[0, 0, 0], [np.nan, 0, 0]]), energy=1.0), {}, "positions contain NaN"),
        (Labelled(ase.Atoms("H2", positions=[[0, 0, 0], [1, 0, 0]]), energy=np.nan), {}, "energy is NaN"),
        (Labelled(ase.Atoms("H2", positions=[[0, 0, 0], [1, 0, 0]])), {"require_energy": True}, "missing energy"),
        (Labelled(ase.Atoms("H2", positions=[[0, 0, 0], [1, 0, 0]]), forces=np.zeros((3, 3))), {}, r"forces have shape \(3, 3\)"),
        (Labelled(ase.Atoms("H2", positions=[[0, 0, 0], [1, 0, 0]]), forces=np.full((2, 3), np.inf)), {}, "forces contain NaN"),
        (Labelled(ase.Atoms("H2", positions=[[0, 0, 0], [1, 0, 0]]), stress=np.zeros((3, 3))), {}, "not periodic"),
        (Labelled(ase.Atoms("HO", positions=[[0, 0, 0], [1, 0, 0]]), energy=1.0), {"species": [1, 6]}, r"atomic numbers \[8\]"),
        (Labelled(ase.Atoms("H2", positions=[[0, 0, 0], [1, 0, 0]]), energy=1.0, weight=-1.0), {}, "weight"),
    ],
    ids=["nan-positions", "nan-energy", "missing-energy", "forces-shape", "inf-forces", "stress-molecule", "species", "weight"],
)
def test_bad_structures_are_named_with_their_problem(structure, options, message):
    good = Labelled(ase.Atoms("H2", positions=[[0, 0, 0], [0.74, 0, 0]]), energy=1.0, index=0)
    structure.index = 1
    with pytest.raises(StructureError, match=rf"structure 1 \({structure.atoms.get_chemical_formula()}\): .*{message}"):
        validate([good, structure], **options)


def test_read_reports_the_index_of_a_bad_frame(tmp_path, data_dir):
    frames = ase.io.read(str(data_dir / METHANE), index=":3")
    for atoms in frames:
        atoms.calc = SinglePointCalculator(atoms, energy=atoms.get_potential_energy(), forces=atoms.get_forces())
    frames[2].calc.results["energy"] = np.nan
    path = tmp_path / "bad.extxyz"
    ase.io.write(str(path), frames)
    with pytest.raises(StructureError, match=r"structure 2 \(CH4\): energy is NaN"):
        read_structures(str(path))
