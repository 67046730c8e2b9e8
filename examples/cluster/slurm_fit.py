"""Fit on a SLURM cluster through dask-jobqueue (``pip install -e .[cluster]``).

    python examples/cluster/slurm_fit.py TRAIN.extxyz MODEL.pt [--config CONFIG.yaml] [--jobs 64]
        [--queue NAME] [--account NAME] [--memory 8GB] [--walltime 02:00:00]

Run it on a login node (or in a small job of its own): it is the driver, which plans the fit,
tunes on a sample and solves; the workers are SLURM jobs of one core each that read their share of
TRAIN (it must be on a file system every node sees, under the same path) and build the rows. The
triangles of finished tasks are kept in MODEL.partial/ (also on the shared file system): if the
allocation ends before the fit does, running the same command again resumes from them.

The same with the command line, for a scheduler you started yourself (e.g. with this file's
``SLURMCluster`` in a notebook, or ``dask scheduler`` and ``dask worker`` in job scripts):

    acdc-potential fit TRAIN.extxyz -o MODEL.pt --config CONFIG.yaml --scheduler tcp://HOST:8786
"""

import argparse
from pathlib import Path

from dask_jobqueue import SLURMCluster
from distributed import Client

from acdc_potential.config import FitConfig
from acdc_potential.fit.driver import fit
from acdc_potential.fit.executors import DaskExecutor
from acdc_potential.fit.sources import ExtxyzSource
from acdc_potential.fit.tasks import discard_kept


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("train")
    parser.add_argument("output")
    parser.add_argument("--config")
    parser.add_argument("--jobs", type=int, default=64, help="SLURM jobs, one single-threaded worker each")
    parser.add_argument("--queue", help="partition (#SBATCH -p)")
    parser.add_argument("--account", help="account (#SBATCH -A)")
    parser.add_argument("--memory", default="8GB", help="memory per worker: cluster.task_memory plus about 1 GB")
    parser.add_argument("--walltime", default="02:00:00")
    args = parser.parse_args()

    output = Path(args.output)
    config = FitConfig.from_yaml(args.config)
    config.cluster.checkpoint = config.cluster.checkpoint or str(output.with_suffix(".partial"))
    slurm = SLURMCluster(
        cores=1, processes=1, memory=args.memory, walltime=args.walltime, queue=args.queue, account=args.account,
        # one torch thread per worker, as the tasks assume
        job_script_prologue=["export OMP_NUM_THREADS=1"],
    )
    # the context managers cancel the SLURM jobs whatever happens to the fit
    with slurm, Client(slurm) as client, DaskExecutor(client=client) as executor:
        slurm.scale(jobs=args.jobs)
        model = fit(ExtxyzSource(args.train, config.keys), config, verbose=True, executor=executor)
    model.save(str(output.with_suffix(".ckpt")))
    model.export(str(output), description=f"fitted on {args.train}")
    discard_kept(config.cluster.checkpoint)
    print(f"wrote {output} and {output.with_suffix('.ckpt')}")


if __name__ == "__main__":
    main()
