"""Accuracy and cost of every model type on every data set, in one table.

For every set NAME of the data directory, four models are fitted on NAME_train and tested on
NAME_test, each fit in its own process (``benchmarks/fit.py``'s workers: MAE/RMSE of energy,
forces and stress, fit time, peak memory):

- ``gap``: GAP with the fitting issue's settings (``benchmarks/gap.py``);
- ``wigner``: the default configuration (``FitConfig()``);
- ``acdc``: the polynomial kernel on ACDC invariants (:data:`MODEL_CONFIGS`, or ``--config-acdc``);
- ``mpacdc``: the same on message-passing ``[1 <- 1]`` invariants beside orders 1 and 2 (:data:`MODEL_CONFIGS`,
  or ``--config-mpacdc``).

Then each fitted model (ours: the exported file; GAP: its xml) runs velocity-Verlet MD on the set's
MD system, one thread (``benchmarks/md.py``'s workers): copper the 500-atom cell, ethanol one
molecule, every other set its largest test structure; the table gives microseconds per atom per
step of the fastest block and the ratio to GAP's.

Every (set, model) result is written to ``WORK/results.json`` with its configuration as soon as it is
measured, and a rerun reuses it when the configuration is the same (an interrupted run resumes; ``--redo``
measures again). Fitted models stay in
``WORK/MODEL/NAME.{pt,ckpt}`` and ``WORK/gap/NAME.xml``.

usage: python benchmarks/models.py --work DIR [--sets molecules,copper,...] [--models gap,wigner,acdc,mpacdc]
                                   [--config-acdc YAML] [--config-mpacdc YAML] [--data DIR] [--threads N]
                                   [--steps 20] [--blocks 3] [--quick] [--redo]
"""

import argparse
import json
import sys
from pathlib import Path

import yaml

from fit import run_result_process

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "data"
MODELS = ("gap", "wigner", "acdc", "mpacdc")
# the feature models measured best so far (README, "Feature models"); override with --config-*
MODEL_CONFIGS = {
    "wigner": {},
    "acdc": {"kernel": {"type": "polynomial", "orders": [1, 2, 3], "zeta": 2}},
    "mpacdc": {"kernel": {"type": "mpacdc", "orders": [1, 2], "zeta": 2}},
}
MD_SYSTEMS = {"copper": "cu500", "ethanol": "ethanol"}


def config_file(model: str, args) -> Path:
    """The YAML configuration of one of our models, written into the work directory."""
    given = getattr(args, f"config_{model}", None)
    if given:
        return Path(given)
    path = Path(args.work) / f"{model}.yaml"
    path.write_text(yaml.safe_dump(MODEL_CONFIGS[model]))
    return path


def fit_and_test(name: str, model: str, args) -> dict:
    """Fit ``model`` on set ``name`` and test it (``benchmarks/fit.py``'s worker, a fresh process)."""
    work = Path(args.work)
    command = [sys.executable, str(HERE / "fit.py"), "--sets", name, "--data", str(args.data)]
    if model == "gap":
        command += ["--worker", "gap", "--gap-dir", str(work / "gap")]
    else:
        command += ["--worker", "ours", "--export-dir", str(work / model), "--config", str(config_file(model, args))]
    if args.quick:
        command.append("--quick")
    return run_result_process(command, args.threads, f"{name}: fit {model}")


def md_cost(name: str, model: str, args) -> dict:
    """Microseconds per atom per MD step of the fitted ``model`` of set ``name`` (one thread)."""
    work = Path(args.work)
    tag = f"{name}_quick" if args.quick else name
    path = work / "gap" / f"{tag}.xml" if model == "gap" else work / model / f"{tag}.pt"
    system = MD_SYSTEMS.get(name, name)
    command = [
        sys.executable, str(HERE / "md.py"), "--worker", "gap" if model == "gap" else "ours", "--system", system,
        "--threads", "1", "--model", str(path), "--steps", str(args.steps), "--blocks", str(args.blocks), "--data", str(args.data),
    ]
    return {**run_result_process(command, 1, f"{name}: MD {model} on {system}"), "system": system}


def model_config(model: str, args):
    """The configuration of ``model`` this run measures (``None`` for GAP, whose settings are fixed)."""
    if model == "gap":
        return None
    given = getattr(args, f"config_{model}", None)
    return yaml.safe_load(Path(given).read_text()) if given else MODEL_CONFIGS[model]


def measure(name: str, model: str, args) -> dict:
    fitted = fit_and_test(name, model, args)
    if "failed" in fitted:
        return fitted
    return {**fitted, "md": md_cost(name, model, args), "config": model_config(model, args)}


def format_table(results: dict, sets, models) -> str:
    header = (
        f"{'set':<10} {'model':<7} {'E MAE':>8} {'E RMSE':>8} {'F MAE':>8} {'F RMSE':>8} {'S MAE':>8} {'S RMSE':>8}"
        f" {'fit (s)':>8} {'mem GB':>7} {'MD system':>10} {'us/at/step':>10} {'/ GAP':>6}"
    )
    lines = [header, f"{'':<18} {'meV/atom':>17} {'meV/A':>17} {'meV/A^3':>17}", "-" * len(header)]
    for name in sets:
        gap_md = results.get(f"{name}/gap", {}).get("md", {}).get("us_per_atom_step")
        for model in models:
            result = results.get(f"{name}/{model}")
            if result is None:
                continue
            if "failed" in result:
                lines.append(f"{name:<10} {model:<7} failed ({result['failed']})")
                continue
            cells = []
            for quantity in ("energy", "forces", "stress"):
                error = result["errors"].get(quantity)
                cells += [f"{error['mae']:>8.3f}", f"{error['rmse']:>8.3f}"] if error else [f"{'-':>8}"] * 2
            md = result.get("md", {})
            cost = md.get("us_per_atom_step")
            ratio = f"{cost / gap_md:>6.2f}" if cost and gap_md else f"{'-':>6}"
            mark = "*" if result.get("reused") else " "
            lines.append(
                f"{name:<10} {model:<7} " + " ".join(cells) + f" {result['fit_time']:>7.0f}{mark} {result['peak_memory'] / 1024:>7.2f}"
                + f" {md.get('system', '-'):>10} " + (f"{cost:>10.1f}" if cost else f"{'failed':>10}") + f" {ratio}"
            )
    return "\n".join(lines)


def parse_arguments():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", required=True, help="directory of fitted models and results.json (reused by reruns)")
    parser.add_argument("--sets", default="ethanol,methane,gold,copper,molecules", help="comma-separated set names")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated, of " + ", ".join(MODELS))
    parser.add_argument("--config-acdc", default=None, help="configuration of the ACDC model (YAML; default MODEL_CONFIGS)")
    parser.add_argument("--config-mpacdc", default=None, help="configuration of the MP-ACDC model (YAML; default MODEL_CONFIGS)")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="directory of NAME_train/NAME_test.extxyz")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the fits (default: inherited)")
    parser.add_argument("--steps", type=int, default=20, help="MD steps per timed block")
    parser.add_argument("--blocks", type=int, default=3, help="timed MD blocks (the fastest is reported)")
    parser.add_argument("--quick", action="store_true", help="fit.py's small protocol (100 train / 50 test structures, 100 sparse); use another --work")
    parser.add_argument("--redo", action="store_true", help="measure again what results.json already has")
    return parser.parse_args()


def main():
    args = parse_arguments()
    sets, models = args.sets.split(","), args.models.split(",")
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        raise SystemExit(f"unknown models {unknown}: choose from {', '.join(MODELS)}")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results_path = work / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    for name in sets:
        for model in models:
            key = f"{name}/{model}"
            done = key in results and "failed" not in results[key] and "failed" not in results[key].get("md", {})
            # a result of another configuration is measured again (those written before configurations were recorded are kept)
            done = done and results[key].get("config", model_config(model, args)) == model_config(model, args)
            if done and not args.redo:
                continue
            results[key] = measure(name, model, args)
            results_path.write_text(json.dumps(results, indent=1))
    print(format_table(results, sets, models))
    configs = {model: (getattr(args, f"config_{model}", None) or MODEL_CONFIGS[model]) for model in models if model != "gap"}
    print("configurations: " + "; ".join(f"{model} {config}" for model, config in configs.items()))
    if any(result.get("reused") for result in results.values()):
        print("* GAP fit reused from WORK/gap: its fit time and memory as recorded when it was fitted")


if __name__ == "__main__":
    main()
