"""Dipole models on ``molecules``: learning curves, in distribution and extrapolated to larger molecules.

The seeds' exercise (MP-ACDC section C and Fig. 10; WK Fig. 3): molecular dipoles as sums of local
``lambda = 1`` contributions, trained on small molecules and tested both on held-out frames of the
training molecules and on larger ones. ``molecules_train.extxyz`` has up to 3 heavy atoms per molecule,
``molecules_test.extxyz`` 4-6 (``../shared/data``, GFN2-xTB dipoles in e*A).

Protocol: ``--held`` frames of every training molecule are held out (in distribution); the rest is the
pool. Sparse environments (``--sparse`` per species, farthest points of the power spectrum) are chosen
once on the pool (environments only, no labels), and the kernel rows of pool, held-out and test
structures are computed once up to ``nu = 4``: their first pieces are the ``nu_max = 2, 3`` kernels.
For each training size (nested random subsets of the pool) and each model (``nu_max`` 2, 3, 4, and 4 with
atomic charges beside the local dipoles), ``b`` (and the charges' scale) and the regulariser are chosen on a 10 % validation split of the subset (:func:`acdc_potential.fit.dipole.choose`)
and the weights solved on the subset (the same functions as ``acdc-potential fit --target dipole``).
Prints a table (MAE of the components and of the norm, me*A) and, at the largest size, each larger
molecule's component MAE for every model (where the extrapolation fails), writes ``dipoles.yaml`` and
``dipoles.png`` (learning curves) under ``--out``.

usage: python benchmarks/dipoles.py [--data DIR] [--out DIR] [--sizes 100 200 400 800] [--sparse 300] [--held 5] [--threads 2]
"""

import argparse
import random
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import yaml

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "data"
# (name, nu_max, with atomic charges)
MODELS = (("nu=2", 2, False), ("nu=3", 3, False), ("nu=4", 4, False), ("nu=4+q", 4, True))


def molecule_splits(data: Path, held: int, seed: int, sizes):
    """The splits of the learning curves: ``(pool, held_out, test, sizes)``. ``held`` random frames of
    every training molecule (info ``name``) are held out, the rest of ``molecules_train`` is the pool
    the training sets are drawn from, ``molecules_test`` (larger molecules) the test; ``sizes``: those of
    the requested training-set sizes that the pool can give."""
    from acdc_potential.data import read_structures

    train = read_structures(str(data / "molecules_train.extxyz"), require_dipole=True)
    test = read_structures(str(data / "molecules_test.extxyz"), require_dipole=True)
    by_name = defaultdict(list)
    for k, s in enumerate(train):
        by_name[s.atoms.info.get("name", s.atoms.get_chemical_formula())].append(k)
    rng = random.Random(seed)
    chosen = {k for members in by_name.values() for k in rng.sample(members, min(held, len(members) - 1))}
    pool = [s for k, s in enumerate(train) if k not in chosen]
    held_out = [train[k] for k in sorted(chosen)]
    return pool, held_out, test, [n for n in sizes if n <= len(pool)]


def design_of(kernel, expansion, structures):
    from acdc_potential.fit.dipole import atom_environments, centred_positions, dipole_design

    coefficients, numbers, owner, _ = atom_environments(expansion, structures)
    return dipole_design(kernel, coefficients, numbers, owner, len(structures), centred_positions(structures))


def design_rows(structures):
    return torch.tensor([3 * a + mu for a in structures for mu in range(3)], dtype=torch.long)


def targets_of(structures):
    from acdc_potential.model.heads import SPHERICAL

    return torch.from_numpy(np.stack([s.dipole[SPHERICAL] for s in structures])).reshape(-1)


def errors(predicted: torch.Tensor, reference: torch.Tensor):
    """MAE and RMSE (me*A) of the components and MAE of the norms, from ``[3 S]`` spherical components."""
    p, r = predicted.reshape(-1, 3), reference.reshape(-1, 3)
    d = 1000 * (p - r)
    return {
        "mae": float(d.abs().mean()),
        "rmse": float(d.square().mean().sqrt()),
        "norm_mae": float(1000 * (p.norm(dim=1) - r.norm(dim=1)).abs().mean()),
        "reference_mae": float(1000 * (r - r.mean(dim=0)).abs().mean()),
    }


def by_molecule(predicted: torch.Tensor, reference: torch.Tensor, structures):
    """``{molecule: component MAE (me*A)}`` over the frames of each molecule (info ``name``, else its
    formula), from ``predicted`` and ``reference`` dipoles ``[3 S]`` (e*A, spherical components of the
    ``S`` structures in order)."""
    error = (1000 * (predicted - reference)).abs().reshape(-1, 3).mean(dim=1)
    frames = defaultdict(list)
    for s, e in zip(structures, error.tolist()):
        frames[s.atoms.info.get("name", s.atoms.get_chemical_formula())].append(e)
    return {name: round(float(np.mean(values)), 2) for name, values in frames.items()}


def print_by_molecule(entries, structures):
    """Where the extrapolation error is: each larger molecule's component MAE for every model, its share of
    the first model's total error, and its mean dipole norm, the largest errors first.

    :param entries: the results of one training size, one per model (dicts with ``model``, ``train`` and
        ``test_by_molecule`` of :func:`by_molecule`). :param structures: the larger molecules' frames."""
    norms = defaultdict(list)
    for s in structures:
        norms[s.atoms.info.get("name", s.atoms.get_chemical_formula())].append(1000 * float(np.linalg.norm(s.dipole)))
    first = entries[0]["test_by_molecule"]
    total = sum(first[name] * len(norms[name]) for name in first)
    print(f"\nlarger molecules at {entries[0]['train']} training frames: component MAE (me*A) per molecule; share of {entries[0]['model']}'s error; mean |mu| (me*A)")
    print(f"{'molecule':>24} " + " ".join(f"{e['model']:>8}" for e in entries) + f" {'share':>6} {'|mu|':>6}")
    for name in sorted(first, key=lambda m: -first[m]):
        print(f"{name:>24} " + " ".join(f"{e['test_by_molecule'][name]:8.1f}" for e in entries)
              + f" {100 * first[name] * len(norms[name]) / total:5.1f}% {np.mean(norms[name]):6.0f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--out", default="dipole-benchmark")
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 200, 400, 800])
    parser.add_argument("--sparse", type=int, default=300)
    parser.add_argument("--held", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from acdc_potential.config import FitConfig
    from acdc_potential.data import species_of
    from acdc_potential.descriptors.density import DensityExpansion
    from acdc_potential.fit.dipole import atom_environments, choose, sparse_kernel, validation_split
    from acdc_potential.fit.solver import solve_projected_process
    from acdc_potential.kernels.wigner.iteration import WignerHypers

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pool, held, test, sizes = molecule_splits(Path(args.data), args.held, args.seed, args.sizes)
    print(f"molecules: pool {len(pool)} frames, held-out {len(held)} frames of the same molecules, test {len(test)} frames of larger ones")

    config = FitConfig()
    species = species_of(pool + held + test)
    expansion = DensityExpansion(config.density, species)
    start = time.perf_counter()
    coefficients, numbers, _, layout = atom_environments(expansion, pool)
    hypers = WignerHypers(nu_max=max(nu for _, nu, _ in MODELS), lambda_max=config.kernel.lambda_max)
    kernel = sparse_kernel(hypers, coefficients, numbers, layout, args.sparse, "fps")
    designs = {name: design_of(kernel, expansion, structures) for name, structures in (("pool", pool), ("held", held), ("test", test))}
    row_seconds = time.perf_counter() - start
    n_pairs = sum(len(s.atoms) for s in pool + held + test)
    print(f"{kernel.n_sparse} sparse environments; kernel rows of {n_pairs} atoms up to nu = {max(nu for _, nu, _ in MODELS)} in {row_seconds:.0f} s")
    y = {"pool": targets_of(pool), "held": targets_of(held), "test": targets_of(test)}

    order = random.Random(args.seed).sample(range(len(pool)), len(pool))
    results = []
    for n in sizes:
        members = sorted(order[:n])
        design = designs["pool"].rows(members)
        targets = y["pool"][design_rows(members)]
        weights = torch.ones_like(targets)
        fit_train, fit_validation = validation_split(n, config.options.validation, args.seed)
        for model, nu, charges in MODELS:
            started = time.perf_counter()
            scales = config.dipole.charge_scale if charges else [0.0]
            candidates = [{"nu_max": nu, "b": float(b), "charge_scale": float(a)} for b in config.dipole.b for a in scales]
            choice = choose(design, candidates, targets, weights, fit_train, fit_validation, 0.0)
            chosen = {key: choice[key] for key in ("nu_max", "b", "charge_scale")}
            k_nm, k_mm = design.assemble(**chosen)
            solution = solve_projected_process(k_nm, targets, weights.sqrt() / choice["regulariser"], k_mm, blocks=design.column_species(chosen["charge_scale"]))
            seconds = time.perf_counter() - started
            entry = {"train": n, "model": model, **chosen, "regulariser": choice["regulariser"], "solve_s": round(seconds, 1)}
            for name in ("held", "test"):
                entry[name] = errors(designs[name].assemble(**chosen)[0] @ solution.weights, y[name])
            if n == max(sizes):
                entry["test_by_molecule"] = by_molecule(designs["test"].assemble(**chosen)[0] @ solution.weights, y["test"], test)
            results.append(entry)
            print(f"n {n:5d} {model:7s}: b {choice['b']:g}, charge scale {choice['charge_scale']:g}, sigma {choice['regulariser']:.2g} e*A; "
                  f"held-out frames MAE {entry['held']['mae']:.1f} me*A (norm {entry['held']['norm_mae']:.1f}), "
                  f"larger molecules MAE {entry['test']['mae']:.1f} me*A (norm {entry['test']['norm_mae']:.1f})")

    print("\nMAE of dipole components, me*A (norm MAE in parentheses); mean absolute deviation of the components: "
          f"held-out {results[0]['held']['reference_mae']:.0f}, larger molecules {results[0]['test']['reference_mae']:.0f}")
    header = f"{'train':>6} " + " ".join(f"{model + ' held':>18} {model + ' larger':>18}" for model, _, _ in MODELS)
    print(header + "\n" + "-" * len(header))
    for n in sizes:
        cells = []
        for model, _, _ in MODELS:
            e = next(r for r in results if r["train"] == n and r["model"] == model)
            cells += [f"{e['held']['mae']:9.1f} ({e['held']['norm_mae']:5.1f})", f"{e['test']['mae']:9.1f} ({e['test']['norm_mae']:5.1f})"]
        print(f"{n:>6} " + " ".join(f"{c:>18}" for c in cells))
    print_by_molecule([r for r in results if r["train"] == max(sizes)], test)
    (out / "dipoles.yaml").write_text(yaml.safe_dump({"sparse": kernel.n_sparse, "row_seconds": round(row_seconds, 1), "results": results}, sort_keys=False))
    curves = [(f"Wigner {model.replace('nu=', 'nu_max = ').replace('+q', ' + charges')}", "o-", [r for r in results if r["model"] == model]) for model, _, _ in MODELS]
    plot_learning_curves(curves, out / "dipoles.png")
    print(f"\nwrote {out / 'dipoles.yaml'} and {out / 'dipoles.png'}")


def plot_learning_curves(curves, path):
    """Component MAE against training frames, held-out frames and larger molecules side by side.

    :param curves: ``(label, matplotlib line style, entries)``, ``entries`` the results of one model
        (dicts with ``train`` and the ``held`` / ``test`` errors).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(9, 3.8), sharey=True)
    for axis, name, title in zip(axes, ("held", "test"), ("held-out frames of the training molecules", "larger molecules (extrapolation)")):
        for label, style, entries in curves:
            points = sorted((r["train"], r[name]["mae"]) for r in entries)
            axis.loglog([p[0] for p in points], [p[1] for p in points], style, label=label)
        axis.set_title(title, fontsize=9)
        axis.set_xlabel("training structures")
    axes[0].set_ylabel("dipole component MAE (me*A)")
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


if __name__ == "__main__":
    main()
