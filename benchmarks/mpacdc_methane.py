"""MP-ACDC seed, section II A on random methane: learning curves (Fig. 6) and GFRE (Fig. 7).

Linear models of the energy on invariant features of three kinds, all computed by the package's
descriptors (`acdc_potential.descriptors`) with the seed's truncated basis and no contraction
(n_max 6, i.e. ``max_radial`` 5, l_max 4, r_cut 3.5 A; Gaussian density of width ``--width``):

- ``nu=2``: the power-spectrum invariants ``|rho_i^{2}>`` (MP-ACDC eq. 6-7),
- ``nu=3``: the bispectrum invariants ``|rho_i^{3}>`` (eq. 5 iterated),
- ``[1<-1]``: the message-passing invariants ``|rho_i^{[1 <- 1]}>`` (eq. 12, 21-23).

Two model types per kind (the seed's full and dashed curves): *C-centred*, ``E = w_C . x_C`` (only the
carbon atom carries energy), and *multi-centre*, ``E = w_C . x_C + w_H . sum_{i in H} x_i``. The fit is
ridge regression with an intercept, solved in its dual form (``n_train <= 1500`` against up to 72,576
features): with each species' Gram block ``K_a = X_a X_a^T`` scaled to unit mean diagonal,
``K = sum_a K_a + 1``, and the regulariser chosen per training size from ``10^-k`` (k = 1..12) by the
exact leave-one-out error of the training subset (``r_i / (1 - H_ii)``, one eigendecomposition of
``K``). Training subsets are nested prefixes of one random permutation of ``methane_train``; the error is
the RMSE on ``methane_test`` as a percentage of the test energies' standard deviation.

GFRE(xi, xi') (Goscinski et al., Mach. Learn.: Sci. Technol. 2, 025028 (2021)): C-centred features of the
train split, centred by their mean and scaled to unit mean squared norm, predict ``xi'`` linearly (ridge,
regulariser by leave-one-out on the train split); GFRE is the RMS error on the test split (centred and
scaled with the train statistics), so ~1 when ``xi`` says nothing of ``xi'`` and ~0 when it predicts it.
One more source row, ``nu=3+centre``, adds to the densities an ``l = 0`` channel of constant value (the
central atom's own contribution, which the package's densities leave out).

Prints both tables, writes ``methane.yaml``, ``methane_learning_curves.png`` and ``methane_gfre.png``
under ``--out``.

usage: python benchmarks/mpacdc_methane.py [--data DIR] [--out DIR] [--sizes 25 50 100 200 400 800 1500]
       [--width 0.3] [--threads 2]
"""

import argparse
import time
from pathlib import Path

import ase.io
import numpy as np
import torch
import yaml

from acdc_potential.descriptors.acdc import acdc_features, power_spectrum
from acdc_potential.descriptors.density import DensityExpansion
from acdc_potential.descriptors.mpacdc import batch_mp_acdc_features
from acdc_potential.descriptors.neighbors import batch_from_atoms
from acdc_potential.descriptors.radial import DensityHypers

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "data"
KINDS = ("nu=2", "nu=3", "[1<-1]")
# a diagnostic source of the GFRE table only: nu = 3 from densities with one more l = 0 channel of constant
# value, the central atom's own contribution that our densities leave out (the seeds' include it)
CENTRED = "nu=3+centre"
REGULARISERS = [10.0**-k for k in range(1, 13)]


def invariants(kind: str, expansion: DensityExpansion, batch) -> torch.Tensor:
    """``[n_atoms, F]`` invariant features of every atom of ``batch``."""
    if kind == "nu=2":
        return power_spectrum(expansion.compute(batch))
    if kind == "nu=3":
        return acdc_features(expansion.compute(batch), 3, 0, invariants_only=True)[(0, 1)][:, 0]
    if kind == CENTRED:
        c = expansion.compute(batch)
        c = [torch.cat([c[0], torch.ones_like(c[0][:, :, :1])], dim=2)] + [torch.cat([x, torch.zeros_like(x[:, :, :1])], dim=2) for x in c[1:]]
        return acdc_features(c, 3, 0, invariants_only=True)[(0, 1)][:, 0]
    if kind == "[1<-1]":
        return batch_mp_acdc_features(batch, expansion, invariants_only=True)[(0, 1)][:, 0]
    raise ValueError(kind)


def species_sums(kind: str, expansion: DensityExpansion, frames, species, chunk: int = 100) -> torch.Tensor:
    """``[S, n_species, F]``: per structure, the features summed over the atoms of each species."""
    parts = []
    for start in range(0, len(frames), chunk):
        batch = batch_from_atoms(frames[start : start + chunk], expansion.cutoff)
        with torch.no_grad():
            x = invariants(kind, expansion, batch)
        sums = x.new_zeros((batch.n_structures, len(species), x.shape[1]))
        for a, z in enumerate(species):
            atoms = batch.numbers == z
            sums[:, a].index_add_(0, batch.structure[atoms], x[atoms])
        parts.append(sums)
    return torch.cat(parts)


def leave_one_out(kernel: torch.Tensor, target_gram: torch.Tensor, regularisers) -> tuple:
    """Ridge regression in dual form: the regulariser of least leave-one-out error, and that error.

    The residuals of ``T`` outputs ``Y [n, T]`` enter only through their Gram matrix, so features
    with more components than samples are predicted at ``n^3`` cost: with ``K = V diag(e) V^T`` and
    ``g = reg / (e + reg)``, the residuals are ``(I - H) Y = V diag(g) V^T Y`` and the squared norm of
    residual ``i`` is ``[V diag(g) (V^T Y Y^T V) diag(g) V^T]_ii``; leave-one-out divides it by ``g_ii^2``
    with ``1 - H_ii = [V diag(g) V^T]_ii``.

    :param kernel: ``[n, n]`` Gram matrix of the inputs; :param target_gram: ``[n, n]`` ``Y Y^T``.
    :return: ``(regulariser, mean squared leave-one-out residual norm)``.
    """
    eigenvalues, vectors = torch.linalg.eigh(kernel)
    projected = vectors.T @ target_gram @ vectors
    best = (None, float("inf"))
    for reg in regularisers:
        g = reg / (eigenvalues.clamp_min(0.0) + reg)
        scaled = vectors * g
        residual_norms = ((scaled @ projected) * scaled).sum(1)
        one_minus_hat = (vectors * scaled).sum(1)
        loo = float((residual_norms / one_minus_hat**2).mean())
        if loo < best[1]:
            best = (reg, loo)
    return best


def learning_curve(grams, energies, n_train_total, sizes, centres, seed):
    """Test RMSE (% of the test std) for each size; ``grams[a]`` the Gram matrix of species block ``a``
    (all structures, train first), ``centres`` the blocks that carry energy."""
    order = torch.randperm(n_train_total, generator=torch.Generator().manual_seed(seed))
    test = torch.arange(n_train_total, energies.shape[0])
    kernel = sum(grams[a] / grams[a].diagonal()[:n_train_total].mean() for a in centres) + 1.0  # + intercept
    std = float(energies[test].std())
    curve = []
    for n in sizes:
        train = order[:n]
        y = energies - energies[train].mean()
        k_nn = kernel[train][:, train]
        reg, _ = leave_one_out(k_nn, y[train, None] * y[None, train], REGULARISERS)
        eye = torch.eye(n, dtype=k_nn.dtype)
        predicted = kernel[test][:, train] @ torch.linalg.solve(k_nn + reg * eye, y[train])
        rmse = float(((predicted - y[test]) ** 2).mean().sqrt())
        curve.append({"n_train": n, "rmse_percent": 100.0 * rmse / std, "regulariser": reg})
    return curve


def normalised(x: torch.Tensor, n_train: int) -> torch.Tensor:
    """``x`` centred by its train mean and scaled to unit mean squared norm on the train rows."""
    x = x - x[:n_train].mean(0)
    return x / (x[:n_train] ** 2).sum(1).mean().sqrt()


def gfre(x: torch.Tensor, y: torch.Tensor, n_train: int) -> float:
    """GFRE(x, y): RMS test error of the ridge prediction of features ``y`` from ``x`` (both
    :func:`normalised`, train rows first).

    The regulariser comes from the leave-one-out error on the train rows (Gram form); the prediction
    is made in the primal form on the train rows' singular vectors, ``y_t = x_t W diag(s / (s^2 + reg))
    U^T y_n`` with ``x_n = U diag(s) W^T``, which stays accurate when ``x`` has more components than
    train rows (the Gram form's inverse would lose the small singular values to cancellation).
    """
    x_n, x_t, y_n, y_t = x[:n_train], x[n_train:], y[:n_train], y[n_train:]
    reg, _ = leave_one_out(x_n @ x_n.T, y_n @ y_n.T, REGULARISERS)
    u, s, wt = torch.linalg.svd(x_n, full_matrices=False)
    predicted = ((x_t @ wt.T) * (s / (s**2 + reg))) @ (u.T @ y_n)
    return float(((predicted - y_t) ** 2).sum(1).mean().sqrt())


def plot_curves(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    for k, kind in enumerate(KINDS):
        for mode, style in (("C-centred", "-"), ("multi-centre", "--")):
            curve = results["learning_curves"][kind][mode]
            ax.loglog([c["n_train"] for c in curve], [c["rmse_percent"] for c in curve], style, marker="o", color=f"C{k}", label=f"{kind}, {mode}")
    ax.set_xlabel("training structures")
    ax.set_ylabel("test energy RMSE (% of std)")
    ax.set_title("random CH4 (MP-ACDC Fig. 6)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_gfre(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = np.array([[results["gfre"][a][b] for b in KINDS] for a in KINDS])
    fig, ax = plt.subplots(figsize=(4.2, 3.6))
    image = ax.imshow(table, vmin=0.0, vmax=1.0, cmap="viridis")
    for i in range(len(KINDS)):
        for j in range(len(KINDS)):
            ax.text(j, i, f"{table[i, j]:.3f}", ha="center", va="center", color="w" if table[i, j] < 0.5 else "k")
    ax.set_xticks(range(len(KINDS)), KINDS)
    ax.set_yticks(range(len(KINDS)), KINDS)
    ax.set_xlabel("predicted features xi'")
    ax.set_ylabel("from features xi")
    ax.set_title("GFRE(xi, xi'), C-centred (Fig. 7)")
    fig.colorbar(image)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--out", default="methane-benchmark")
    parser.add_argument("--sizes", type=int, nargs="+", default=[25, 50, 100, 200, 400, 800, 1500])
    parser.add_argument("--width", type=float, default=0.3, help="Gaussian width of the density (A)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_default_dtype(torch.float64)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    train = ase.io.read(Path(args.data) / "methane_train.extxyz", ":")
    test = ase.io.read(Path(args.data) / "methane_test.extxyz", ":")
    frames = train + test
    n_train = len(train)
    sizes = [n for n in args.sizes if n <= n_train]
    energies = torch.tensor([f.get_potential_energy() for f in frames])
    species = [6, 1]
    hypers = DensityHypers(cutoff=3.5, smoothing=0.5, max_angular=4, max_radial=5, basis="gto", density="gaussian", width=args.width)
    expansion = DensityExpansion(hypers, sorted(species))
    results = {
        "hypers": {"cutoff": 3.5, "max_radial": 5, "max_angular": 4, "basis": "gto", "width": args.width},
        "n_train": n_train,
        "n_test": len(test),
        "learning_curves": {},
        "features": {},
        "gfre": {},
    }
    centred = {}
    for kind in KINDS:
        start = time.perf_counter()
        sums = species_sums(kind, expansion, frames, species)
        seconds = time.perf_counter() - start
        grams = [sums[:, a] @ sums[:, a].T for a in range(len(species))]
        centred[kind] = normalised(sums[:, 0], n_train)
        results["features"][kind] = {"count": int(sums.shape[2]), "seconds": round(seconds, 1)}
        del sums
        results["learning_curves"][kind] = {
            "C-centred": learning_curve(grams, energies, n_train, sizes, [0], args.seed),
            "multi-centre": learning_curve(grams, energies, n_train, sizes, [0, 1], args.seed),
        }
        print(f"{kind}: {results['features'][kind]['count']} invariants per atom, {seconds:.0f} s", flush=True)
    centred[CENTRED] = normalised(species_sums(CENTRED, expansion, frames, species)[:, 0], n_train)
    for a in KINDS + (CENTRED,):
        results["gfre"][a] = {b: gfre(centred[a], centred[b], n_train) for b in KINDS}

    print(f"\nTest energy RMSE, % of the test std ({len(test)} test structures)")
    print("| n_train | " + " | ".join(f"{k} {m}" for k in KINDS for m in ("C", "multi")) + " |")
    print("|---" * (1 + 2 * len(KINDS)) + "|")
    for row, n in enumerate(sizes):
        cells = [
            f"{results['learning_curves'][k][m][row]['rmse_percent']:.1f}" for k in KINDS for m in ("C-centred", "multi-centre")
        ]
        print(f"| {n} | " + " | ".join(cells) + " |")
    print("\nGFRE(row -> column), C-centred features")
    print("| from \\ to | " + " | ".join(KINDS) + " |")
    print("|---" * (1 + len(KINDS)) + "|")
    for a in KINDS + (CENTRED,):
        print(f"| {a} | " + " | ".join(f"{results['gfre'][a][b]:.3f}" for b in KINDS) + " |")
    (out / "methane.yaml").write_text(yaml.safe_dump(results, sort_keys=False))
    plot_curves(results, out / "methane_learning_curves.png")
    plot_gfre(results, out / "methane_gfre.png")
    print(f"\nwrote {out / 'methane.yaml'}, {out / 'methane_learning_curves.png'}, {out / 'methane_gfre.png'}")


if __name__ == "__main__":
    main()
