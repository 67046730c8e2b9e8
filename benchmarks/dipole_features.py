"""Linear dipole models on lambda = 1 features of ``molecules``: nu = 2, nu = 3 and [1 <- 1] (MP-ACDC Fig. 10).

The seed's exercise (MP-ACDC section II C) with the protocol of ``benchmarks/dipoles.py`` (same held-out
frames, same nested training subsets, same errors), so that the two tables compare: the molecular dipole is
``mu(S) = sum_a W_a x_a(S)``, ``x_a(S) = sum_{i in S, a_i = a} rho_i^{(1, +1)}`` the true-vector (lambda = 1,
sigma = +1) features of the atoms of species ``a`` (MP-ACDC eq. 5 iterated for ``nu = 2, 3``; eq. 12, 21-23
for ``[1 <- 1]``), one weight vector per species and feature kind, shared by the three components ``mu``
so that the model is equivariant. No contraction: the features as the descriptors compute them on a coarse
basis (the seed's ``n_max = 4, l_max = 2``: ``--max-radial 3 --max-angular 2``; density, cutoff and radial
basis otherwise those of ``acdc-potential fit``'s defaults).

Ridge regression in its dual form (up to 86,016 features against at most 2,400 component rows): each
species' Gram block ``X_a X_a^T`` over the rows ``(S, mu)`` is scaled to unit mean diagonal on the pool
and summed; the regulariser (``10^-k``, k = 1..12) is chosen on the same 10 % validation split of each
training subset as the Wigner models, then the subset is refitted whole. Features are written per species
to scratch files (``--scratch``, several GB for nu = 3, deleted afterwards) and the Gram blocks computed
from them, so memory stays at one species' features.

Prints a table (component MAE and norm MAE, me*A), writes ``dipole_features.yaml`` and
``dipole_features.png`` under ``--out``; with ``--wigner DIR/dipoles.yaml`` (from ``benchmarks/dipoles.py``)
the plot also shows the Wigner models' curves.

usage: python benchmarks/dipole_features.py [--data DIR] [--out DIR] [--sizes 100 200 400 800] [--held 5]
       [--max-radial 3] [--max-angular 2] [--wigner DIR/dipoles.yaml] [--threads 2]
"""

import argparse
import dataclasses
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from dipoles import DEFAULT_DATA, design_rows, errors, molecule_splits, plot_learning_curves, targets_of  # noqa: E402

KINDS = ("nu=2", "nu=3", "[1<-1]")
REGULARISERS = [10.0**-k for k in range(1, 13)]


def vector_features(kind: str, expansion, batch) -> torch.Tensor:
    """``[n_atoms, 3, F]`` the ``(1, +1)`` block of every atom of ``batch`` (``mu`` at ``m + 1``)."""
    from acdc_potential.descriptors.acdc import acdc_features
    from acdc_potential.descriptors.mpacdc import batch_mp_acdc_features

    if kind == "[1<-1]":
        return batch_mp_acdc_features(batch, expansion, lambda_max=1)[(1, 1)]
    nu = {"nu=2": 2, "nu=3": 3}[kind]
    return acdc_features(expansion.compute(batch), nu, 1)[(1, 1)]


def write_species_sums(kind: str, expansion, frames, species, scratch: Path, chunk: int = 40):
    """Per species ``a``, the ``[3 S, F]`` rows ``x_a(S)[mu]`` as a float64 file; returns the paths and ``F``."""
    from acdc_potential.descriptors.neighbors import batch_from_atoms

    files, width = None, None
    for start in range(0, len(frames), chunk):
        batch = batch_from_atoms(frames[start : start + chunk], expansion.cutoff)
        with torch.no_grad():
            x = vector_features(kind, expansion, batch)
        if files is None:
            width = x.shape[2]
            files = [np.lib.format.open_memmap(scratch / f"{kind}-{z}.npy", mode="w+", dtype=np.float64, shape=(3 * len(frames), width)) for z in species]
        for a, z in enumerate(species):
            atoms = batch.numbers == z
            sums = x.new_zeros((batch.n_structures, 3, width)).index_add_(0, batch.structure[atoms], x[atoms])
            files[a][3 * start : 3 * (start + batch.n_structures)] = sums.reshape(-1, width).numpy()
    for f in files:
        f.flush()
    return [scratch / f"{kind}-{z}.npy" for z in species], width


def species_gram(path: Path, chunk: int = 512) -> torch.Tensor:
    """``X X^T`` of the rows of one species' file, computed on its non-zero rows only."""
    x = np.load(path, mmap_mode="r")
    nonzero = np.concatenate([np.abs(x[k : k + chunk]).max(axis=1) > 0 for k in range(0, x.shape[0], chunk)])
    rows = np.flatnonzero(nonzero)
    dense = torch.from_numpy(np.ascontiguousarray(x[rows]))
    gram = torch.zeros((rows.size, rows.size), dtype=torch.float64)
    for start in range(0, rows.size, chunk):
        gram[start : start + chunk] = dense[start : start + chunk] @ dense.T
    full = torch.zeros((x.shape[0], x.shape[0]), dtype=torch.float64)
    index = torch.from_numpy(rows)
    full[index[:, None], index[None, :]] = gram
    return full


def fit_predict(kernel: torch.Tensor, y: torch.Tensor, train_rows: torch.Tensor, predict_rows: torch.Tensor, reg: float) -> torch.Tensor:
    """Dual ridge: ``K_pt (K_tt + reg I)^-1 y_t``."""
    k_tt = kernel[train_rows][:, train_rows]
    alpha = torch.linalg.solve(k_tt + reg * torch.eye(k_tt.shape[0], dtype=k_tt.dtype), y[train_rows])
    return kernel[predict_rows][:, train_rows] @ alpha


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--out", default="dipole-feature-benchmark")
    parser.add_argument("--scratch", default=None, help="folder for the feature files (default: OUT/scratch, removed at the end)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 200, 400, 800])
    parser.add_argument("--held", type=int, default=5)
    parser.add_argument("--max-radial", type=int, default=3)
    parser.add_argument("--max-angular", type=int, default=2)
    parser.add_argument("--wigner", default=None, help="dipoles.yaml of benchmarks/dipoles.py, drawn beside")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from acdc_potential.config import FitConfig
    from acdc_potential.data import species_of
    from acdc_potential.descriptors.density import DensityExpansion
    from acdc_potential.fit.dipole import validation_split

    out = Path(args.out)
    scratch = Path(args.scratch) if args.scratch else out / "scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    pool, held, test, sizes = molecule_splits(Path(args.data), args.held, args.seed, args.sizes)
    structures = pool + held + test
    frames = [s.atoms for s in structures]
    offsets = {"pool": 0, "held": len(pool), "test": len(pool) + len(held)}
    n_pool = len(pool)
    y = targets_of(structures)
    print(f"molecules: pool {len(pool)} frames, held-out {len(held)}, test {len(test)} frames of larger molecules")

    config = FitConfig()
    density = dataclasses.replace(config.density, max_radial=args.max_radial, max_angular=args.max_angular)
    species = species_of(structures)
    expansion = DensityExpansion(density, species)
    order = random.Random(args.seed).sample(range(len(pool)), len(pool))

    def rows_of(name, members):
        return design_rows([offsets[name] + k for k in members])

    results, features = [], {}
    for kind in KINDS:
        start = time.perf_counter()
        paths, width = write_species_sums(kind, expansion, frames, species, scratch)
        feature_s = time.perf_counter() - start
        kernel = torch.zeros((3 * len(structures),) * 2, dtype=torch.float64)
        for path in paths:
            gram = species_gram(path)
            scale = gram.diagonal()[: 3 * n_pool].mean()
            kernel += gram / scale if scale > 0 else gram
            path.unlink()
        features[kind] = {"count": int(width), "feature_s": round(feature_s, 1), "gram_s": round(time.perf_counter() - start - feature_s, 1)}
        print(f"{kind}: {width} lambda = 1 features per atom; features {feature_s:.0f} s, Gram {features[kind]['gram_s']:.0f} s", flush=True)
        for n in sizes:
            members = sorted(order[:n])
            fit_train, fit_validation = validation_split(n, config.options.validation, args.seed)
            train_rows = rows_of("pool", [members[k] for k in fit_train])
            validation_rows = rows_of("pool", [members[k] for k in fit_validation])
            scores = [float((fit_predict(kernel, y, train_rows, validation_rows, reg) - y[validation_rows]).square().mean()) for reg in REGULARISERS]
            reg = REGULARISERS[int(np.argmin(scores))]
            entry = {"train": n, "model": kind, "regulariser": reg}
            for name, count in (("held", len(held)), ("test", len(test))):
                rows = rows_of(name, range(count))
                entry[name] = errors(fit_predict(kernel, y, rows_of("pool", members), rows, reg), y[rows])
            results.append(entry)
            print(f"n {n:5d} {kind:7s}: reg {reg:.0e}; held-out frames MAE {entry['held']['mae']:.1f} me*A, larger molecules MAE {entry['test']['mae']:.1f} me*A", flush=True)
        del kernel
    shutil.rmtree(scratch, ignore_errors=True)

    print("\nMAE of dipole components, me*A (norm MAE in parentheses), linear models on lambda = 1 features")
    header = f"{'train':>6} " + " ".join(f"{kind + ' held':>18} {kind + ' larger':>18}" for kind in KINDS)
    print(header + "\n" + "-" * len(header))
    for n in sizes:
        cells = []
        for kind in KINDS:
            e = next(r for r in results if r["train"] == n and r["model"] == kind)
            cells += [f"{e['held']['mae']:9.1f} ({e['held']['norm_mae']:5.1f})", f"{e['test']['mae']:9.1f} ({e['test']['norm_mae']:5.1f})"]
        print(f"{n:>6} " + " ".join(f"{c:>18}" for c in cells))
    summary = {"density": dataclasses.asdict(density), "features": features, "results": results}
    (out / "dipole_features.yaml").write_text(yaml.safe_dump(summary, sort_keys=False))
    wigner = yaml.safe_load(Path(args.wigner).read_text())["results"] if args.wigner else []
    curves = [(f"linear, {kind} features", "o-", [r for r in results if r["model"] == kind]) for kind in KINDS]
    curves += [(f"Wigner {model}", "s--", [r for r in wigner if r["model"] == model]) for model in sorted({r["model"] for r in wigner})]
    plot_learning_curves(curves, out / "dipole_features.png")
    print(f"\nwrote {out / 'dipole_features.yaml'} and {out / 'dipole_features.png'}")


if __name__ == "__main__":
    main()
