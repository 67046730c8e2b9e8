"""How the retuning of active learning chooses: held-out structures or the evidence, on the labelled sets of a run.

A finished ``acdc-potential learn`` run (``--run DIR``: its ``resume.pt`` and ``labelled.extxyz``) fixes
the labelled structures and the sparse environments each brought. For each ``--counts`` n, the model of
the first n labelled structures with their sparse environments (what the run's model had after n
labels, its kernel scales, its last mixing and regularisers as the starting point) is retuned
(:meth:`~acdc_potential.fit.incremental.IncrementalFit.retune`, which also recalibrates) by

- ``validation``: a held-out ``--validation`` fraction, for each split seed of ``--seeds``;
- ``5-fold``: five-fold cross-validation over the structures;
- ``evidence``: the marginal likelihood of every structure (no split: one number);

and the test force MAE (meV/A) on ``--test`` of each model is printed. The run's MD does not enter:
every method sees the same structures, so the spread over split seeds is that of the choice alone.

usage: python benchmarks/retuning.py --run DIR [--counts 20,40,60,80] [--seeds 0,1,2] [--validation 0.1]
                                     [--test ../shared/data/copper_test.extxyz]
"""

import argparse
import copy
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DEFAULT_TEST = HERE.parent.parent / "shared" / "data" / "copper_test.extxyz"


def force_mae(model, test) -> float:
    """Test force MAE (meV/A) of a model in memory."""
    predicted = model.predict(test, forces=True, stress=False)["forces"].numpy()
    return 1000.0 * float(np.abs(predicted - np.concatenate([s.forces for s in test])).mean())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="the folder of a finished acdc-potential learn run")
    parser.add_argument("--counts", default="20,40,60,80")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--validation", type=float, default=0.1)
    parser.add_argument("--test", default=str(DEFAULT_TEST))
    args = parser.parse_args()

    import torch

    from acdc_potential.data import read_structures
    from acdc_potential.fit.checkpoint import SparseKRRModel
    from acdc_potential.fit.incremental import IncrementalFit
    from acdc_potential.fit.report import FitLog

    run = Path(args.run)
    saved = torch.load(run / "resume.pt", weights_only=True)
    final = SparseKRRModel.from_dict(saved["model"])
    owners = torch.tensor(saved["sparse_owners"], dtype=torch.long)
    labelled = read_structures(str(run / "labelled.extxyz"))
    test = read_structures(args.test)
    seeds = [int(s) for s in args.seeds.split(",")]
    counts = [int(c) for c in args.counts.split(",") if int(c) <= len(labelled)]
    print(f"{run}: {len(labelled)} labelled structures, {final.kernel.n_sparse} sparse environments; test: {len(test)} structures")

    methods = [f"validation, seed {s}" for s in seeds] + ["5-fold", "evidence"]
    table = {}
    for n in counts:
        kept = torch.nonzero(owners < n).flatten()
        model = copy.copy(final)
        model.kernel = final.kernel.sparse_subset(kept)
        start = time.perf_counter()
        incremental = IncrementalFit(model, labelled[:n], sparse_owners=owners[kept].tolist())
        print(f"{n} structures, {kept.numel()} sparse environments: rows in {time.perf_counter() - start:.0f} s", flush=True)
        mixing, regularisers = dict(incremental.kernel.mixing), incremental.regularisers
        for method in methods:
            incremental.kernel.mixing, incremental.regularisers = dict(mixing), regularisers
            start = time.perf_counter()
            if method == "5-fold":
                incremental.retune(args.validation, 0, FitLog(False), folds=5)
            elif method == "evidence":
                incremental.retune(args.validation, 0, FitLog(False), method="evidence")
            else:
                incremental.retune(args.validation, int(method.split()[-1]), FitLog(False))
            table[n, method] = force_mae(incremental.model(), test)
            chosen = ", ".join(f"{k} {v:.3g}" for k, v in {**incremental.kernel.mixing, **vars(incremental.regularisers)}.items())
            print(f"  {method}: {table[n, method]:.2f} meV/A ({chosen}; {time.perf_counter() - start:.0f} s)", flush=True)

    print("\n| labelled structures | " + " | ".join(methods) + " |")
    print("| --- |" + " --- |" * len(methods))
    for n in counts:
        print(f"| {n} | " + " | ".join(f"{table[n, m]:.2f}" for m in methods) + " |")


if __name__ == "__main__":
    main()
