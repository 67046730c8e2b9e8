"""A linear model solved in feature space against the same model on selected sparse environments.

For every set NAME of the data directory, the linear polynomial kernel (``zeta: 1``) on the invariants of
``--orders`` is fitted twice on NAME_train with the default configuration otherwise (tuning, 1000 sparse
environments per species): with ``kernel.feature_space: true`` (each species whose features are fewer than
its sparse environments takes the feature directions as its sparse set: the exact ridge regression in
feature space) and ``false`` (1000 environments by farthest point sampling). Each fit runs in its own
process (``benchmarks/fit.py``'s worker: test MAE/RMSE on NAME_test, fit time, peak memory); the table gives
both and the ratio of fit times.

usage: python benchmarks/feature_space.py [--sets copper,methane] [--orders 2] [--data DIR] [--work DIR] [--quick]
"""

import argparse
import sys
import tempfile
from pathlib import Path

import yaml

from fit import DEFAULT_DATA, HERE, format_table, run_result_process


def fit_linear(name: str, feature_space: bool, args, work: Path) -> dict:
    """Fit and test the linear model of set ``name`` (``fit.py``'s worker, a fresh process)."""
    config = work / f"linear_{'features' if feature_space else 'selected'}.yaml"
    orders = [int(nu) for nu in args.orders.split(",")]
    config.write_text(yaml.safe_dump({"kernel": {"type": "polynomial", "zeta": 1, "orders": orders, "feature_space": feature_space}}))
    command = [sys.executable, str(HERE / "fit.py"), "--worker", "ours", "--sets", name, "--data", str(args.data), "--config", str(config)]
    if args.quick:
        command.append("--quick")
    return run_result_process(command, args.threads, f"{name}: linear, feature_space {feature_space}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", default="copper,methane", help="comma-separated set names")
    parser.add_argument("--orders", default="2", help="comma-separated body orders of the invariants (kernel.orders)")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="directory of NAME_train/NAME_test.extxyz")
    parser.add_argument("--work", default=None, help="directory of the configurations (default: a temporary one)")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the fits (default: inherited)")
    parser.add_argument("--quick", action="store_true", help="fit.py's small protocol (100 train / 50 test structures, 100 sparse)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(args.work or scratch)
        work.mkdir(parents=True, exist_ok=True)
        rows = []
        for name in args.sets.split(","):
            for feature_space in (True, False):
                rows.append((name, "feat" if feature_space else "fps", fit_linear(name, feature_space, args, work)))
    print(format_table(rows))
    for name in args.sets.split(","):
        feat, fps = [result for set_name, _, result in rows if set_name == name]
        if "failed" in feat or "failed" in fps:
            continue
        print(f"{name}: sparse environments {feat['sparse']} (feature space) and {fps['sparse']} (selected); fit time feature space / selected = {feat['fit_time'] / fps['fit_time']:.3f}")
        if feat["sparse"] == fps["sparse"]:
            print(f"{name}: the same sparse count both ways: no species has fewer features than sparse environments asked for, both fits selected environments")
    print(f"models: zeta 1 on orders [{args.orders}]; feat: kernel.feature_space true, fps: false (sparse.n environments per species by FPS)")


if __name__ == "__main__":
    main()
