"""Active learning of copper with EMT, against MD frames picked at random or at fixed intervals.

1. **Active learning** (:class:`~acdc_potential.active.ActiveLearner`, the configuration's
   ``learn`` section with ``--temperatures`` and ``--steps``): from ``--starts`` structures of
   ``copper_train.extxyz`` (positions and cells only, labelled by EMT), Langevin MD from each at
   each temperature (NVT keeps the cell, so the starting cells span the training set's cells: by default
   their shapes and volumes, :func:`spanning_cells`; ``--cells volumes``: their volumes only,
   :func:`cells_by_volume`); the test force MAE on ``copper_test.extxyz`` of the model after each
   labelled structure of ``--counts`` (the incremental model, as the MD used it), and of a fit
   from scratch of the labelled set with the same configuration.
2. **Baselines**: the same MD protocol (starting structures, temperatures, steps, seeds) run with
   EMT itself; the starting structures plus frames of that trajectory picked at random, or at
   fixed intervals, labelled by EMT and fitted with the same configuration, for each count.
3. **Target**: the default model of the whole training set (``--full``; its test force MAE).

Prints the table (reference calculations against test force MAE, meV/A), the final model's (and
the target's) test force MAE by thirds of the test cells (by volume per atom and by RMS force: which
states the learning served) and writes ``active_learning.png`` to ``--out``.

usage: python benchmarks/active_learning.py [--out DIR] [--data DIR] [--starts 5] [--cells shapes|volumes] [--steps 400]
                                            [--temperatures 300,900,1500] [--counts 10,20,40,60,80,100] [--seed 0] [--full]
"""

import argparse
import random
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "data"


def volume_per_atom(atoms) -> float:
    return atoms.get_volume() / len(atoms)


def force_errors(model, test) -> np.ndarray:
    """``|predicted - reference|`` of every force component of the structures ``test``, ``[atoms, 3]`` (eV/A)."""
    predicted = model.predict(test, forces=True, stress=False)["forces"].numpy()
    return np.abs(predicted - np.concatenate([s.forces for s in test]))


def force_mae(model, test) -> float:
    """Test force MAE (eV/A) of a model in memory."""
    return float(force_errors(model, test).mean())


def mae_by_thirds(errors: np.ndarray, test) -> dict:
    """The mean of the force errors ``errors [atoms, 3]`` (:func:`force_errors`, eV/A) over all force
    components of the structures in each third of ``test``, ranked by volume per atom and by RMS force
    component, in meV/A: ``{"volume": [smallest, middle, largest], "rms_force": [...]}``."""
    owner = np.repeat(np.arange(len(test)), [s.n_atoms for s in test])
    ranks = {"volume": [volume_per_atom(s.atoms) for s in test], "rms_force": [float(np.sqrt(np.mean(s.forces**2))) for s in test]}
    out = {}
    for name, key in ranks.items():
        out[name] = [1000 * float(errors[np.isin(owner, third)].mean()) for third in np.array_split(np.argsort(key, kind="stable"), 3)]
    return out


def fitted(structures, config):
    """The model of ``structures`` fitted with ``config`` (quietly)."""
    from acdc_potential.fit.driver import fit
    from acdc_potential.fit.report import FitLog

    return fit(structures, config, log=FitLog(False))


def fitted_mae(structures, config, test) -> float:
    return force_mae(fitted(structures, config), test)


def cells_by_volume(structures, count: int) -> list:
    """Indices of ``count`` structures from the smallest to the largest volume per atom, evenly in rank."""
    order = np.argsort([volume_per_atom(s.atoms) for s in structures], kind="stable")
    return [int(order[int(k)]) for k in np.linspace(0, len(structures) - 1, count)]


def spanning_cells(structures, count: int) -> list:
    """Indices of ``count`` structures whose cells span the cells of ``structures``: farthest-point
    sampling (:func:`~acdc_potential.fit.selection.farthest_point_sampling`, which stops before
    repeating a cell), from the most compressed cell, of the six components of the cell's metric tensor
    ``h h^T / N^(2/3)`` (volume and shape, the same for any rotation of the atoms and cell together), each in units of its
    spread over the structures. NVT MD keeps its cell, so the starting cells are all the learning
    sees of strain: by volume alone, five cells leave the shears of a strained set out."""
    from acdc_potential.fit.selection import farthest_point_sampling

    metric = np.array([(s.atoms.cell.array @ s.atoms.cell.array.T / s.n_atoms ** (2 / 3))[np.triu_indices(3)] for s in structures])
    scaled = (metric - metric.mean(0)) / np.where(metric.std(0) > 0, metric.std(0), 1.0)
    return farthest_point_sampling(torch.from_numpy(scaled), count, first=cells_by_volume(structures, 1)[0]).tolist()


def reference_trajectory(starts, config, reference):
    """Frames of the learning's MD protocol run with ``reference``, every ``interval`` steps."""
    from acdc_potential.active import bare, langevin, thermalize

    options = config.learn
    frames = []
    segments = [(t, k) for t in options.temperatures for k in range(len(starts))]
    for number, (temperature, k) in enumerate(segments):
        atoms = starts[k].copy()
        atoms.calc = reference
        thermalize(atoms, temperature, options.seed + number)
        dynamics = langevin(atoms, temperature, options, options.seed + 1000 * (number + 1))
        for _ in range(options.steps // options.interval):
            dynamics.run(options.interval)
            frames.append(bare(atoms))
    return frames


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="active-learning-benchmark")
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--starts", type=int, default=5)
    parser.add_argument("--cells", choices=["shapes", "volumes"], default="shapes",
                        help="starting cells spanning the training cells' shapes and volumes (spanning_cells), or their volumes only (cells_by_volume)")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--temperatures", default="300,900,1500")
    parser.add_argument("--counts", default="10,20,40,60,80,100")
    parser.add_argument("--threshold", type=float, help="learn.threshold (default: the configuration's)")
    parser.add_argument("--new-sparse", type=int, help="learn.new_sparse (default: the configuration's)")
    parser.add_argument("--seed", type=int, default=0, help="learn.seed: the MD's initial velocities and thermostat noise")
    parser.add_argument("--learning-only", action="store_true", help="skip the refits and the baselines")
    parser.add_argument("--full", action="store_true", help="also fit the whole training set (the target)")
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from ase.calculators.emt import EMT

    from acdc_potential.active import ActiveLearner, bare, label
    from acdc_potential.config import FitConfig
    from acdc_potential.data import read_structures

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = Path(args.data)
    train = read_structures(str(data / "copper_train.extxyz"))
    test = read_structures(str(data / "copper_test.extxyz"))
    counts = [int(c) for c in args.counts.split(",")]
    learn = {"temperatures": [float(t) for t in args.temperatures.split(",")], "steps": args.steps, "timestep": 2.0, "interval": 1, "max_labels": max(counts), "seed": args.seed}
    if args.threshold is not None:
        learn["threshold"] = args.threshold
    if args.new_sparse is not None:
        learn["new_sparse"] = args.new_sparse
    # nu_max fixed at what `auto` chooses for the whole copper set, so that all fits compare one model class
    config = FitConfig.from_dict({"kernel": {"nu_max": 3}, "learn": learn})
    starts = [bare(train[k].atoms) for k in (spanning_cells if args.cells == "shapes" else cells_by_volume)(train, args.starts)]
    volumes = [volume_per_atom(a) for a in starts]
    print(f"copper with EMT: {len(starts)} starting structures ({args.cells}: {min(volumes):.2f}-{max(volumes):.2f} A^3 per atom), MD at {learn['temperatures']} K, {args.steps} steps of 2 fs each; test: {len(test)} structures")

    # 1. active learning, with the test error of the model after the labelled structures of each count
    curve = {}

    class Measured(ActiveLearner):
        def check(self, atoms, number, start):
            labelled = super().check(atoms, number, start)
            if labelled and self.label_count() in counts:
                curve[self.label_count()] = force_mae(self.incremental.model(), test)
                print(f"active learning: {self.label_count()} reference calculations, test force MAE {1000 * curve[self.label_count()]:.2f} meV/A "
                      f"({self.incremental.kernel.n_sparse} sparse environments, {self.log.elapsed():.0f} s)", flush=True)
            return labelled

    folder = out / "learn"
    start = time.perf_counter()
    learner = Measured(starts, EMT(), config, str(folder))
    final = learner.run()
    seconds = time.perf_counter() - start
    labelled = learner.incremental.structures
    final_errors = force_errors(final, test)
    curve.setdefault(len(labelled), float(final_errors.mean()))
    steps = len(learn["temperatures"]) * len(starts) * args.steps
    print(f"active learning: {len(labelled)} reference calculations in {steps} MD steps, {seconds:.0f} s")
    refit = {} if args.learning_only else {n: fitted_mae(labelled[:n], config, test) for n in counts if n <= len(labelled)}

    # 2. baselines from the reference's own MD under the same protocol
    pool = reference_trajectory(starts, config, EMT())
    rng = random.Random(1)
    baselines = {"random": {}, "fixed interval": {}}
    for n in [] if args.learning_only else counts:
        extra = n - len(starts)
        picks = {"random": sorted(rng.sample(range(len(pool)), extra)), "fixed interval": [int(k) for k in np.linspace(0, len(pool) - 1, extra)]}
        for name, chosen in picks.items():
            structures = [label(a, EMT(), True) for a in starts + [pool[k] for k in chosen]]
            baselines[name][n] = fitted_mae(structures, config, test)
            print(f"{name}: {n} reference calculations, test force MAE {1000 * baselines[name][n]:.2f} meV/A", flush=True)
    target = None
    by_thirds = {f"active learning, {len(labelled)} labels": (mae_by_thirds(final_errors, test), 1000 * float(final_errors.mean()))}
    if args.full:
        start = time.perf_counter()
        errors = force_errors(fitted(train, config), test)
        target = float(errors.mean())
        by_thirds[f"all {len(train)} training structures"] = (mae_by_thirds(errors, test), 1000 * target)
        print(f"default model of all {len(train)} training structures: test force MAE {1000 * target:.2f} meV/A ({time.perf_counter() - start:.0f} s)")

    print("\n| reference calculations | active learning (incremental) | active learning (refit) | random frames | fixed-interval frames |")
    print("| --- | --- | --- | --- | --- |")
    for n in counts:
        cells = [curve.get(n), refit.get(n), baselines["random"].get(n), baselines["fixed interval"].get(n)]
        print(f"| {n} | " + " | ".join("" if c is None else f"{1000 * c:.2f}" for c in cells) + " |")
    if target is not None:
        print(f"| {len(train)} (whole training set) | | | | {1000 * target:.2f} |")
    print("\n| model | volume per atom: smallest / middle / largest third | RMS force: smallest / middle / largest third | all |")
    print("| --- | --- | --- | --- |")
    for name, (values, everything) in by_thirds.items():
        print(f"| {name} | " + " / ".join(f"{v:.2f}" for v in values["volume"]) + " | " + " / ".join(f"{v:.2f}" for v in values["rms_force"]) + f" | {everything:.2f} |")

    figure, axis = plt.subplots(figsize=(6, 4))
    for name, values, style in [("active learning", curve, "o-"), ("active learning, refit", refit, "o--"), ("random frames", baselines["random"], "s-"), ("fixed-interval frames", baselines["fixed interval"], "^-")]:
        keys = sorted(values)
        axis.plot(keys, [1000 * values[k] for k in keys], style, label=name)
    if target is not None:
        axis.axhline(1000 * target, color="k", linestyle=":", label=f"all {len(train)} training structures")
    axis.set_xlabel("reference calculations")
    axis.set_ylabel("test force MAE (meV/A)")
    axis.set_title("copper, EMT reference")
    axis.legend()
    figure.tight_layout()
    figure.savefig(out / "active_learning.png", dpi=150)
    print(f"plot: {out / 'active_learning.png'}")


if __name__ == "__main__":
    main()
