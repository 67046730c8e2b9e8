"""Cost of the Wigner kernels (WK appendix D): per pair against nu_max, n_max, the number
of species and lambda_max, and time and memory of realistic (atom, sparse environment)
batches.

    OMP_NUM_THREADS=1 python benchmarks/wigner.py [--quick] [--dtype float32]

Coefficients are random (cost does not depend on their values), every centre has the
same species so that every pair is computed. Times are the best of a few repetitions,
in microseconds per pair; exponents are least-squares slopes of log(time) against log(x).
The default run takes about 3 minutes on one core (``--quick``: under a minute).
Memory is the peak resident set of a fresh process running one case, minus its resident
set just before the case (inputs already built). Times are CPU times of the benchmark process (wall time
too for the batches), which other jobs on the machine disturb less than wall time.
"""

import argparse
import multiprocessing
import resource
import time

import numpy as np
import torch

from acdc_potential.kernels.wigner.iteration import WignerHypers, WignerKernels


def coefficients(n_env, l_max, n_channels, dtype, seed=0):
    """Random density coefficients ``[n_env, 2l + 1, n_channels]`` per ``l``."""
    generator = torch.Generator().manual_seed(seed)
    return [0.1 * torch.randn(n_env, 2 * l + 1, n_channels, generator=generator, dtype=dtype) for l in range(l_max + 1)]


def time_per_pair(hypers, n_a, n_b, l_max, n_channels, dtype=torch.float64, gradient=False, repeats=3):
    """Best CPU time over ``repeats`` of the invariant kernels (and a backward pass), in us per pair."""
    module = WignerKernels(hypers, dtype)
    a = coefficients(n_a, l_max, n_channels, dtype)
    b = coefficients(n_b, l_max, n_channels, dtype, seed=1)
    species_a = torch.zeros(n_a, dtype=torch.long)
    species_b = torch.zeros(n_b, dtype=torch.long)
    best = float("inf")
    for _ in range(repeats):
        leaves = [c.clone().requires_grad_(gradient) for c in a]
        start = time.process_time()
        with torch.set_grad_enabled(gradient):
            k = module(leaves, species_a, b, species_b)
            if gradient:
                k[1:].sum().backward()
        best = min(best, time.process_time() - start)
    return best / (n_a * n_b) * 1e6


def slope(x, y):
    return float(np.polyfit(np.log(x), np.log(y), 1)[0])


def print_scan(title, name, values, times, fit_from=0):
    """Table of times per pair; the exponent is fitted on ``values[fit_from:]``, as is the
    increment per unit of ``values`` of a straight-line fit."""
    print(f"\n{title}")
    print(f"{name:>12} " + " ".join(f"{v:>10}" for v in values))
    for label, row in times.items():
        x, y = values[fit_from:], row[fit_from:]
        increment = float(np.polyfit(x, y, 1)[0])
        print(
            f"{label:>12} " + " ".join(f"{t:10.2f}" for t in row)
            + f"   exponent {slope(x, y):5.2f}   linear slope {increment:7.2f} us per unit"
        )


def scans(quick):
    n_a, n_b = (2, 1000) if quick else (4, 1000)
    nu_values = [2, 3, 4, 5, 6, 8]
    times = {
        "full path": [time_per_pair(WignerHypers(nu, 3, invariant_only=False), n_a, n_b, 3, 40) for nu in nu_values],
        "inv.-only": [time_per_pair(WignerHypers(nu, 3, invariant_only=True), n_a, n_b, 3, 40) for nu in nu_values],
    }
    # nu_max = 2 needs no iteration and k^2 = iterate(k^1, k^1) is half price (symmetric,
    # parity +1 input only): iterations cost the same from nu_max = 4 on, so fit there
    print_scan(
        "us per pair against nu_max (lambda_max = l_max = 3, Q = 40; WK: linear; fit on nu_max >= 4)",
        "nu_max",
        nu_values,
        times,
        fit_from=2,
    )

    n_max_values = [4, 8, 16, 25]
    times = {"inv.-only": [time_per_pair(WignerHypers(), n_a, n_b, 3, n) for n in n_max_values]}
    print_scan("us per pair against n_max (1 species, nu_max = 4, lambda_max = 3; WK: flat)", "n_max", n_max_values, times)

    species_values = [1, 2, 4, 8]
    times = {"inv.-only": [time_per_pair(WignerHypers(), n_a, n_b, 3, 10 * s) for s in species_values]}
    print_scan("us per pair against species (n_max = 10, nu_max = 4, lambda_max = 3; WK: flat)", "species", species_values, times)

    lambda_values = [1, 2, 3, 4]
    times = {
        "full path": [time_per_pair(WignerHypers(4, lam, invariant_only=False), n_a, n_b, lam, 40) for lam in lambda_values],
        "inv.-only": [time_per_pair(WignerHypers(4, lam), n_a, n_b, lam, 40) for lam in lambda_values],
    }
    print_scan("us per pair against lambda_max = l_max (nu_max = 4, Q = 40; WK: <= lambda^7)", "lambda_max", lambda_values, times)


def resident_megabytes():
    """Current resident set size of this process (Linux)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


def run_case(n_a, n_b, mode, dtype_name, queue):
    """One batch in a fresh process: ``mode`` is ``kernels`` (no gradient), ``gradient``
    (kernels, then backward of their sum) or ``weighted`` (:meth:`weighted_sum` and its
    backward, the MD path)."""
    torch.set_num_threads(1)
    dtype = getattr(torch, dtype_name)
    module = WignerKernels(WignerHypers(), dtype)
    a = coefficients(n_a, 3, 100, dtype)
    b = coefficients(n_b, 3, 100, dtype, seed=1)
    species_a = torch.zeros(n_a, dtype=torch.long)
    species_b = torch.zeros(n_b, dtype=torch.long)
    leaves = [c.requires_grad_(mode != "kernels") for c in a]
    before = resident_megabytes()
    start = time.perf_counter()
    cpu_start = time.process_time()
    if mode == "kernels":
        with torch.no_grad():
            module(leaves, species_a, b, species_b)
    elif mode == "gradient":
        module(leaves, species_a, b, species_b)[1:].sum().backward()
    else:
        weights = torch.ones(5, n_b, dtype=dtype)
        module.weighted_sum(leaves, species_a, b, species_b, weights).sum().backward()
    elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu_start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    queue.put((elapsed, cpu, peak - before))


def batches(dtype_name, quick):
    print(f"\nbatches at nu_max = 4, lambda_max = 3, invariant-only path, Q = 100 channels, {dtype_name}, 1 thread")
    print(f"{'pairs':>12} {'mode':>9} {'wall s':>9} {'CPU s':>9} {'CPU us/pair':>12} {'extra MB':>9}")
    context = multiprocessing.get_context("spawn")
    sizes = [(9, 3000)] if quick else [(9, 3000), (864, 1000)]
    for n_a, n_b in sizes:
        for mode in ("kernels", "gradient", "weighted"):
            queue = context.Queue()
            process = context.Process(target=run_case, args=(n_a, n_b, mode, dtype_name, queue))
            process.start()
            elapsed, cpu, megabytes = queue.get()
            process.join()
            label = f"{n_a}x{n_b}"
            per_pair = cpu / (n_a * n_b) * 1e6
            print(f"{label:>12} {mode:>9} {elapsed:9.2f} {cpu:9.2f} {per_pair:12.2f} {megabytes:9.1f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller scans, skip the 864 x 1000 batches")
    parser.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    parser.add_argument("--skip-scans", action="store_true")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    if not args.skip_scans:
        scans(args.quick)
    batches(args.dtype, args.quick)


if __name__ == "__main__":
    main()
