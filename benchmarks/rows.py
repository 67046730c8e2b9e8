"""Cost of the force and stress rows of the design matrix: the per-atom-invariant path of the
Wigner kernel against the per-pair reverse passes, on the same structures and sparse set.

For every set NAME in the data directory, ``--sparse`` environments are drawn at random from
the first ``--candidates`` training structures (all species mixed) and the derivative rows of
the next ``--structures`` ones are built both ways (``WignerKernel.structure_derivatives`` and
``SparseKernel.structure_derivatives``), after one warm-up call of each; the Wigner order is
the one ``nu_max: auto`` chose in our fits (4 for gold, 3 elsewhere) unless ``--nu-max`` is
given. Both take the Jacobian along each structure's kept columns, as a fit does
(``internal_columns``). Prints milliseconds per structure and their ratio; the two results agree to 1e-10.

usage: python benchmarks/rows.py [--sets ethanol,gold] [--sparse 1000] [--structures 20] [--threads 1]
"""

import argparse
import time
from pathlib import Path

import torch

DEFAULT_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
AUTO_NU_MAX = {"gold": 4}


def timed(function, repeat: int = 1):
    start = time.perf_counter()
    for _ in range(repeat):
        out = function()
    return out, (time.perf_counter() - start) / repeat


def measure(name: str, args) -> dict:
    from acdc_potential.config import FitConfig
    from acdc_potential.data import read_structures, species_of
    from acdc_potential.descriptors.density import DensityExpansion
    from acdc_potential.descriptors.neighbors import batch_from_atoms
    from acdc_potential.descriptors.jacobian import batch_density, internal_columns, structure_jacobian
    from acdc_potential.fit.sources import MemorySource
    from acdc_potential.fit.tasks import coefficients as atom_coefficients
    from acdc_potential.kernels.base import SparseKernel
    from acdc_potential.kernels.wigner.kernel import WignerKernel
    from acdc_potential.kernels.wigner.iteration import WignerHypers

    structures = read_structures(str(Path(args.data) / f"{name}_train.extxyz"))
    candidates, measured = structures[: args.candidates], structures[args.candidates : args.candidates + args.structures]
    expansion = DensityExpansion(FitConfig().density, species_of(structures))
    coefficients, species, layout = atom_coefficients(MemorySource(candidates), expansion, False, range(len(candidates)))
    chosen = torch.randperm(len(species), generator=torch.Generator().manual_seed(0))[: args.sparse]
    nu_max = args.nu_max or AUTO_NU_MAX.get(name, 3)
    kernel = WignerKernel(WignerHypers(nu_max=nu_max, lambda_max=3))
    kernel.set_sparse(coefficients[chosen], species[chosen], layout)
    batch = batch_from_atoms([s.atoms for s in measured], expansion.cutoff)
    c, _ = batch_density(expansion, batch)
    # the kept columns of each structure, as build_design_matrix differentiates (stress rows only if periodic)
    columns = internal_columns(batch, all(s.atoms.pbc.all() for s in measured))
    jacobian = structure_jacobian(expansion, batch, columns=columns)
    arguments = (c, batch.numbers, jacobian, batch.structure, len(measured), columns.counts)
    kernel.structure_derivatives(*arguments)  # warm-up: the sparse invariants are kept between calls
    (_, features), seconds_features = timed(lambda: kernel.structure_derivatives(*arguments))
    (_, pairs), seconds_pairs = timed(lambda: SparseKernel.structure_derivatives(kernel, *arguments))
    agreement = float((features - pairs).abs().max() / pairs.abs().max())
    return {
        "nu_max": nu_max,
        "dimension": sum(kernel.feature_sizes()),
        "features": 1e3 * seconds_features / len(measured),
        "pairs": 1e3 * seconds_pairs / len(measured),
        "agreement": agreement,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", default="ethanol,methane,gold,copper")
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--sparse", type=int, default=1000, help="sparse environments (all species)")
    parser.add_argument("--candidates", type=int, default=300, help="structures the sparse set is drawn from")
    parser.add_argument("--structures", type=int, default=20, help="structures whose rows are timed")
    parser.add_argument("--nu-max", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{'set':<9} {'nu_max':>6} {'d':>8} {'invariants':>11} {'per pair':>9} {'ratio':>6} {'max rel. diff':>13}")
    print(f"{'':<9} {'':>6} {'':>8} {'ms/struct.':>11} {'ms/str.':>9}")
    for name in args.sets.split(","):
        r = measure(name, args)
        print(
            f"{name:<9} {r['nu_max']:>6} {r['dimension']:>8} {r['features']:>11.1f} {r['pairs']:>9.1f}"
            f" {r['features'] / r['pairs']:>6.2f} {r['agreement']:>13.1e}",
            flush=True,
        )


if __name__ == "__main__":
    main()
