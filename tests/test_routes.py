"""Every inference route of an exported Wigner model gives the energies and forces of the per-pair sum.

A Wigner head sums its sparse environments either pair by pair
(:meth:`~acdc_potential.kernels.wigner.iteration.WignerKernels.weighted_sum`) or through
per-species tensors into which the sum folds (:meth:`~acdc_potential.kernels.wigner.features.OrderFeatures.collapse`,
every order up to 4). Both are exported here from one model (random weights on sparse
environments of real structures, no fit needed) for ``nu_max`` 2, 3, 4 and one, two and
three species, and run in a process that never imports the package.
"""

import json
import subprocess
import sys
import textwrap

import ase.build
import ase.io
import numpy as np
import pytest
import torch

from acdc_potential.descriptors.density import DensityExpansion, Layout, unflatten
from acdc_potential.descriptors.neighbors import batch_from_atoms
from acdc_potential.descriptors.radial import DensityHypers
from acdc_potential.kernels.wigner.iteration import WignerHypers
from acdc_potential.kernels.wigner.kernel import WignerKernel
from acdc_potential.model.export import export_model
from acdc_potential.inference import run_module
from acdc_potential.kernels.wigner import features as features_module
from acdc_potential.kernels.wigner.features import OrderFeatures
from acdc_potential.model.heads import WignerHead
from acdc_potential.model.potential import AtomisticPotential
from acdc_potential.model.uncertainty import SparseState

DENSITY = DensityHypers(cutoff=4.0, max_angular=2, max_radial=4)


def structures(kind):
    """Sparse environments' structures and the structure evaluated, per species set."""
    if kind == "Cu":
        bulk = ase.build.bulk("Cu", "fcc", a=3.6, cubic=True)
        cells = [bulk * (2, 1, 1), bulk * (1, 2, 1)]
        for seed, atoms in enumerate(cells):
            atoms.rattle(0.1, seed=seed)
        test = bulk * (2, 2, 1)
        test.rattle(0.07, seed=9)
        return cells, test
    names = {"CH": ["CH4", "C2H6"], "CHO": ["CH3CH2OH", "CH3OH"]}[kind]
    sparse = [ase.build.molecule(name) for name in names]
    for seed, atoms in enumerate(sparse):
        atoms.rattle(0.1, seed=seed)
    test = ase.build.molecule(names[0])
    test.rattle(0.08, seed=7)
    return sparse, test


def model(kind, nu_max, route):
    """An exported potential with random weights on the environments of :func:`structures`."""
    sparse, _ = structures(kind)
    numbers = sorted({int(z) for atoms in sparse for z in atoms.numbers})
    expansion = DensityExpansion(DENSITY, numbers)
    batch = batch_from_atoms(sparse, DENSITY.cutoff, torch.float64, "cpu")
    coefficients = expansion.compute(batch)
    layout = Layout.of(coefficients)
    kernel = WignerKernel(WignerHypers(nu_max=nu_max, lambda_max=2), {"c0": 0.5, "a": 1.3, "b": 0.8})
    kernel.set_sparse(layout.flatten(coefficients), batch.numbers, layout)
    n = kernel.n_sparse
    generator = torch.Generator().manual_seed(nu_max)
    weights = torch.randn(n, generator=generator, dtype=torch.float64)
    state = SparseState(kernel, weights, torch.eye(n, dtype=torch.float64), torch.eye(n, dtype=torch.float64), numbers)
    head = WignerHead(expansion, kernel, state, numbers, route)
    return AtomisticPotential(head, torch.zeros(len(numbers), dtype=torch.float64)), head


@pytest.mark.parametrize("kind", ["Cu", "CH", "CHO"])
def test_collapsed_route_equals_the_pair_sum_in_a_fresh_process(kind, tmp_path):
    paths = {}
    for nu_max in (2, 3, 4):
        for route in ("pairs", "collapsed"):
            potential, head = model(kind, nu_max, route)
            assert head.collapsed == (route == "collapsed")
            paths[f"{route}-{nu_max}"] = str(tmp_path / f"{route}-{nu_max}.pt")
            export_model(potential, paths[f"{route}-{nu_max}"])
    _, test = structures(kind)
    ase.io.write(str(tmp_path / "test.extxyz"), test)
    script = textwrap.dedent(
        f"""
        import sys, json, ase.io
        from metatomic_ase import MetatomicCalculator
        out = {{}}
        for route, path in {paths!r}.items():
            atoms = ase.io.read({str(tmp_path / "test.extxyz")!r})
            atoms.calc = MetatomicCalculator(path, check_consistency=True)
            out[route] = {{"energy": atoms.get_potential_energy(), "forces": atoms.get_forces().tolist()}}
        out["imported"] = any(m.startswith("acdc_potential") for m in sys.modules)
        print(json.dumps(out))
        """
    )
    output = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd="/")
    result = json.loads(output.stdout.strip().splitlines()[-1])
    assert not result["imported"]
    for nu_max in (2, 3, 4):
        pairs, collapsed = result[f"pairs-{nu_max}"], result[f"collapsed-{nu_max}"]
        assert abs(pairs["energy"]) > 1e-3
        assert abs(collapsed["energy"] - pairs["energy"]) <= 1e-10 * abs(pairs["energy"]), nu_max
        forces = np.array(pairs["forces"])
        assert np.abs(forces).max() > 1e-3
        np.testing.assert_allclose(collapsed["forces"], forces, rtol=0, atol=1e-10 * np.abs(forces).max(), err_msg=str(nu_max))


def test_order_four_tensors_are_the_weighted_gram_matrices(monkeypatch):
    """What a collapse keeps for nu = 4 is ``W = sum_m w_m F_m^T F_m / (2 lambda + 1)`` per species:
    the matrix itself where a species has at least as many feature rows as columns, else its
    exact eigenpairs (thin QR); both kinds of block occur here, each built over several chunks
    of environments."""
    monkeypatch.setattr(features_module, "COLLAPSE_CHUNK", 3)
    kinds = set()
    for kind in ("Cu", "CHO"):
        _, head = model(kind, 4, "collapsed")
        sparse = unflatten(head.state.sparse, head.state.shapes)
        species = head.state.sparse_species
        n_species = int(species.max()) + 1
        weights = torch.randn(species.shape[0], generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        tensors = OrderFeatures(head.kernels)._order4_tensors(sparse, species, weights, n_species)
        features = head.kernels.nu2_features(sparse)
        for key, matrix, values in zip(sorted(features), tensors[0::2], tensors[1::2]):
            f = features[key]
            width, d = f.shape[1], f.shape[2]
            rows_needed = int(torch.bincount(species).max()) * width
            whole = values.shape[1] == 0
            assert whole == (rows_needed >= d)
            assert matrix.shape[1:] == ((d, d) if whole else (d, rows_needed))
            kinds.add(whole)
            for s in range(n_species):
                rows = species == s
                direct = torch.einsum("m,mud,mue->de", weights[rows] / width, f[rows], f[rows])
                rebuilt = matrix[s] if whole else matrix[s] @ torch.diag(values[s]) @ matrix[s].T
                torch.testing.assert_close(rebuilt, direct, rtol=0, atol=1e-12 * direct.abs().max())
    assert kinds == {True, False}


@pytest.mark.parametrize("kind", ["Cu", "CH"])
def test_orders_above_four_add_their_pairs_to_the_collapsed_orders(kind):
    """nu_max = 5: orders up to 4 collapse, order 5 goes pair by pair; the sum equals the
    all-pairs route in energies and forces. Such a model exports in float64 only."""
    from acdc_potential.model.export import atomistic_model

    sparse, test = structures(kind)
    results = {}
    for route in ("pairs", "collapsed"):
        potential, head = model(kind, 5, route)
        assert head.pairs_left and head.plain_pairs and head.collapsed == (route == "collapsed")
        with pytest.raises(ValueError, match="export it in float64"):
            atomistic_model(potential, torch.float32)
        module = torch.jit.script(potential.eval())
        out = run_module(module, [test], forces=True, stress=False, uncertainty=False)
        results[route] = (float(out["energy"][0]), out["forces"].numpy())
    (e_pairs, f_pairs), (e_collapsed, f_collapsed) = results["pairs"], results["collapsed"]
    assert abs(e_pairs) > 1e-3 and abs(e_collapsed - e_pairs) <= 1e-10 * abs(e_pairs)
    np.testing.assert_allclose(f_collapsed, f_pairs, rtol=0, atol=1e-10 * np.abs(f_pairs).max())


def feature_model(kernel, kind, route):
    """An exported feature model (``kernel``: a polynomial or message-passing kernel) with random
    weights on the environments of :func:`structures`."""
    from acdc_potential.descriptors.neighbors import batch_from_atoms as batch_of
    from acdc_potential.model.heads import MessagePassingHead, PolynomialHead

    sparse, _ = structures(kind)
    numbers = sorted({int(z) for atoms in sparse for z in atoms.numbers})
    expansion = DensityExpansion(DENSITY, numbers)
    batch = batch_of(sparse, DENSITY.cutoff, torch.float64, "cpu")
    kernel.prepare(expansion, [batch])  # its floors
    environments, layout = kernel.environments(expansion, batch)
    kernel.set_sparse(environments, batch.numbers, layout)
    n = kernel.n_sparse
    weights = 1e3 * torch.randn(n, generator=torch.Generator().manual_seed(kernel.zeta), dtype=torch.float64)
    state = SparseState(kernel, weights, torch.eye(n, dtype=torch.float64), torch.eye(n, dtype=torch.float64), numbers)
    head = (MessagePassingHead if kernel.kind == "mpacdc" else PolynomialHead)(expansion, kernel, state, numbers, route)
    return AtomisticPotential(head, torch.zeros(len(numbers), dtype=torch.float64)), head


@pytest.mark.parametrize(
    "name, zeta, folded",
    [("orders [1], zeta 1", 1, "vector"), ("orders [1], zeta 2", 2, {"Cu": "matrix", "CHO": "eigenpairs"}),
     ("power spectrum, zeta 2", 2, "eigenpairs"), ("power spectrum, zeta 3", 3, "compensated"), ("[1 <- 1], zeta 2", 2, "eigenpairs"),
     ("[1 <- 1], zeta 4", 4, "compensated")],
)
@pytest.mark.parametrize("kind", ["Cu", "CHO"])
def test_feature_models_collapse_onto_the_pair_sum(name, zeta, folded, kind):
    """A polynomial head of zeta 1 (a linear model) or 2 folds its sum over the sparse environments
    into per-species tensors (a vector; the weighted Gram matrix where a species has at least as many
    environments as features, else its eigenpairs), one of larger zeta sums it in compensated
    arithmetic; its energies and forces equal the plain pair sum's."""
    from acdc_potential.kernels.message_passing import MessagePassingKernel, message_hypers
    from acdc_potential.kernels.polynomial import PolynomialKernel

    def kernel():
        if name.startswith("[1 <- 1]"):
            return MessagePassingKernel(message_hypers(DENSITY, 1, 1), zeta=zeta, orders=[1], mixing={"c0": 0.5, "a": 1.3})
        return PolynomialKernel(zeta=zeta, orders=[1] if name.startswith("orders [1]") else [2], mixing={"c0": 0.5, "a": 1.3})

    _, test = structures(kind)
    results = {}
    for route in ("pairs", "collapsed"):
        potential, head = feature_model(kernel(), kind, route)
        module = torch.jit.script(potential.eval())
        out = run_module(module, [test], forces=True, stress=False, uncertainty=False)
        results[route] = (float(out["energy"][0]), out["forces"].numpy())
    assert head.plain_pairs == (not head.collapsed and not head.compensated)
    if head.compensated:
        kept = "compensated"
    else:
        kept = {1: "vector", 2: "matrix" if head.values.shape[1] == 0 else "eigenpairs"}[zeta] if head.collapsed else "pairs"
    assert kept == (folded[kind] if isinstance(folded, dict) else folded)
    (e_pairs, f_pairs), (e_collapsed, f_collapsed) = results["pairs"], results["collapsed"]
    assert abs(e_pairs) > 1e-3 and abs(e_collapsed - e_pairs) <= 1e-10 * abs(e_pairs)
    np.testing.assert_allclose(f_collapsed, f_pairs, rtol=0, atol=1e-10 * np.abs(f_pairs).max())


@pytest.mark.parametrize("route", ["pairs", "collapsed"])
def test_the_constant_piece_is_the_correctly_rounded_sum_of_the_weights(route):
    """Fitted weights are large and cancel: the constant piece ``c0 sum_{m : a_m = a} w_m`` of the Wigner
    and polynomial heads, on both routes, is ``c0`` times the correctly rounded sum of each species'
    weights (exact rationals), where a plain float64 sum of weights of 1e12 errs by about 1e-4."""
    from fractions import Fraction

    from acdc_potential.kernels.base import species_sums
    from acdc_potential.kernels.polynomial import PolynomialKernel
    from acdc_potential.model.heads import PolynomialHead

    values = torch.tensor([1e16, 1.0, -1e16, 3.0, 0.5], dtype=torch.float64)
    assert species_sums(values, torch.tensor([0, 0, 0, 1, 1]), 3).tolist() == [1.0, 3.5, 0.0]
    assert float(values[:3].sum()) != 1.0  # what a plain sum gives

    sparse, test = structures("CHO")
    numbers = sorted({int(z) for atoms in sparse for z in atoms.numbers})
    expansion = DensityExpansion(DENSITY, numbers)
    batch = batch_from_atoms(sparse, DENSITY.cutoff, torch.float64, "cpu")
    coefficients = expansion.compute(batch)
    layout = Layout.of(coefficients)
    wigner = WignerKernel(WignerHypers(nu_max=2, lambda_max=2), {"c0": 0.37, "a": 1.3, "b": 0.8})
    polynomial = PolynomialKernel(orders=[1], zeta=2, mixing={"c0": 0.37, "a": 1.0})
    polynomial.prepare(expansion, [batch])
    environments, feature_layout = polynomial.environments(expansion, batch)
    for kernel, head_class, (x, x_layout) in ((wigner, WignerHead, (layout.flatten(coefficients), layout)), (polynomial, PolynomialHead, (environments, feature_layout))):
        kernel.set_sparse(x, batch.numbers, x_layout)
        n = kernel.n_sparse
        species = kernel.sparse_species
        noise = torch.randn(n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        weights = 1e12 * (noise - torch.stack([noise[species == s].mean() for s in species.tolist()])) + torch.rand(n, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        state = SparseState(kernel, weights, torch.eye(n, dtype=torch.float64), torch.eye(n, dtype=torch.float64), numbers)
        head = head_class(expansion, kernel, state, numbers, route)
        c0 = float(state.piece_weights[0])
        index = state.sparse_species  # species index 0..S-1 of each sparse environment, in the state's order
        for a in range(len(numbers)):
            exact = float(sum(Fraction(w) for w, s in zip(state.weights.tolist(), index.tolist()) if s == a))
            assert float(head.constant[a]) == c0 * exact, (head_class.__name__, a)
        plain = torch.zeros(len(numbers), dtype=torch.float64).index_add(0, index, c0 * state.weights)
        assert (plain - head.constant).abs().max() > 1e-7  # the sums the heads replaced
