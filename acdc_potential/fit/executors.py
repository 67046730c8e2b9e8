"""Who runs the tasks of a fit (:mod:`~acdc_potential.fit.tasks`): this process, or a Dask cluster.

The driver of a fit (:func:`~acdc_potential.fit.driver.fit_kernel`) hands an executor a task
function, the arguments every call shares, and the groups of structure positions to call it
on. :class:`InProcess` calls it here, one group after the other. :class:`DaskExecutor`
sends the shared arguments to every worker once and one task per group; the workers read
their structures from the source themselves (a file they can reach), and only small results
come back: surveys, the sample's coefficients and rows, and triangles of the final solve,
which are merged on the workers in a fixed binary tree. The tree does not depend on the
number of workers nor on the order in which tasks finish, and a task lost with its worker is
rerun by Dask, so every run gives the same weights.
"""

import contextlib
import ctypes
import logging
import os
import sys
from typing import Any, Callable, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
from tqdm import tqdm

from ..errors import ClusterError

Merge = Callable[[Any, Any], Any]


def tree_reduce(items: Iterable, merge: Merge):
    """``items`` merged pairwise in one fixed binary tree, that of a binary counter: equal-sized
    neighbours merge as soon as both exist, and what is left merges from the right. The tree
    depends only on the number of items, so any executor that follows it gives the same
    result; at most ``log2(n) + 1`` partial results exist at once. ``None`` for no items."""
    stack: List[Tuple[int, Any]] = []
    for item in items:
        stack.append((1, item))
        while len(stack) > 1 and stack[-1][0] == stack[-2][0]:
            (count, right), (_, left) = stack.pop(), stack.pop()
            stack.append((2 * count, merge(left, right)))
    if not stack:
        return None
    result = stack.pop()[1]
    while stack:
        result = merge(stack.pop()[1], result)
    return result


class Executor:
    """Runs task functions over groups of structure positions. How the structures are cut into
    tasks is the fit's, not the executor's (:class:`~acdc_potential.config.ClusterConfig`:
    it decides how rows are batched and merged, hence how they are rounded), so that every
    executor gives the same weights."""

    in_process = True

    def map(self, function: Callable, shared: Sequence, groups: Sequence[List[int]], desc: str = "") -> Iterator:
        """``function(*shared, group)`` for every group, in order, as they come (a generator)."""
        raise NotImplementedError

    def reduce(self, function: Callable, shared: Sequence, groups: Sequence[List[int]], merge: Merge, desc: str = "", kept: bool = False):
        """The results of ``function(*shared, group)`` over the groups, merged by :func:`tree_reduce`
        (``kept``: whether the tasks keep their results somewhere, which an error message says)."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what the executor started."""

    def __enter__(self):
        return self

    def __exit__(self, *error):
        self.close()


class InProcess(Executor):
    """Every task here, in order: one group's rows at a time."""

    def map(self, function, shared, groups, desc=""):
        for group in groups:
            yield function(*shared, group)

    def reduce(self, function, shared, groups, merge, desc="", kept=False):
        return tree_reduce(self.map(function, shared, groups), merge)


def worker_environment() -> dict:
    """Dask's environment for new worker processes without ``MALLOC_TRIM_THRESHOLD_``: Dask sets it
    to keep workers' memory low, but it also stops glibc from raising its mmap threshold, so every
    large temporary of the kernel rows is mapped and unmapped afresh: the rows of 40 copper cells
    took 9.3 s with it and 5.4 s without (one thread each)."""
    import dask

    return {k: v for k, v in dask.config.get("distributed.nanny.pre-spawn-environ").items() if k != "MALLOC_TRIM_THRESHOLD_"}


def worker_setup(threads: int):
    """A Dask worker plugin, run in each worker (restarted ones too): torch uses ``threads``
    threads, and where Dask's ``MALLOC_TRIM_THRESHOLD_`` reached the worker (clusters this
    package did not start, see :func:`worker_environment`), glibc serves allocations below
    64 MB from its heap again (``mallopt(M_MMAP_THRESHOLD)``), which recovers most of the speed
    (rows of 40 copper cells: 6.6 s against 9.3 s). Made here, not at import, so that fits in
    one process never import ``distributed``."""
    from distributed.diagnostics.plugin import WorkerPlugin

    class WorkerSetup(WorkerPlugin):
        def setup(self, worker) -> None:
            torch.set_num_threads(threads)
            if "MALLOC_TRIM_THRESHOLD_" in os.environ and sys.platform.startswith("linux"):
                try:
                    ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 64 << 20)
                except (OSError, AttributeError):  # not glibc
                    pass

    return WorkerSetup()


# glibc's malloc.h
M_MMAP_THRESHOLD = -3


class DaskExecutor(Executor):
    """Tasks on a Dask cluster (``dask.distributed``).

    :param client: a connected ``distributed.Client`` to use (e.g. on a dask-jobqueue
        ``SLURMCluster``); else one is made, and closed by :meth:`close`:
    :param scheduler: the address of a running scheduler (``tcp://host:8786``), or
    :param workers: the number of worker processes of a ``LocalCluster`` on this machine.
    :param threads_per_worker: torch threads of each worker (the cluster's, or the local one's).

    :meth:`map` keeps at most ``2 x workers`` tasks in flight, so that results waiting to be
    collected (rows of the tuning sample) stay within about two tasks' worth per worker.
    """

    in_process = False

    def __init__(self, client=None, scheduler: Optional[str] = None, workers: int = 2, threads_per_worker: int = 1):
        try:
            import dask
            import distributed
        except ImportError:  # pragma: no cover - dask is a dependency
            raise ClusterError("fitting on a Dask cluster needs dask and distributed (pip install dask distributed)") from None
        self._owned = []
        try:
            if client is None:
                if scheduler:
                    client = distributed.Client(scheduler, timeout="30s")
                else:
                    with dask.config.set({"distributed.nanny.pre-spawn-environ": worker_environment()}):
                        cluster = distributed.LocalCluster(
                            n_workers=workers, threads_per_worker=threads_per_worker, processes=True, dashboard_address=":0", silence_logs=logging.ERROR
                        )
                    self._owned.append(cluster)
                    client = distributed.Client(cluster)
                self._owned.insert(0, client)
            client.register_plugin(worker_setup(threads_per_worker), name="acdc-potential-worker")
        except (OSError, TimeoutError) as error:
            self.close()
            raise ClusterError(f"could not reach the Dask scheduler {scheduler or '(local cluster)'}: {error}") from None
        self.client = client

    def _shared(self, shared: Sequence) -> List:
        """Large shared arguments sent once to every worker (futures), small ones as they are."""
        small = (bool, int, float, str, tuple, type(None))
        return [x if isinstance(x, small) else self.client.scatter(x, broadcast=True, hash=False) for x in shared]

    def _window(self) -> int:
        return 2 * max(1, len(self.client.scheduler_info().get("workers", {})))

    def map(self, function, shared, groups, desc=""):
        groups = [list(group) for group in groups]
        pending = []
        with _cluster_failures(desc or function.__name__, kept=False), tqdm(total=len(groups), desc=desc, unit="task", disable=not desc) as bar:
            arguments = self._shared(shared)
            try:
                submitted = 0
                for _ in range(len(groups)):
                    while submitted < len(groups) and len(pending) < self._window():
                        pending.append(self.client.submit(function, *arguments, groups[submitted], pure=False))
                        submitted += 1
                    future = pending.pop(0)
                    bar.update()
                    yield future.result()
            finally:
                self.client.cancel(pending)

    def reduce(self, function, shared, groups, merge, desc="", kept: bool = False):
        if not groups:
            return None
        import distributed

        with _cluster_failures(desc or function.__name__, kept):
            arguments = self._shared(shared)
            leaves = [self.client.submit(function, *arguments, list(group), pure=False) for group in groups]
            root = tree_reduce(leaves, lambda left, right: self.client.submit(merge, left, right, pure=False))
            try:
                with tqdm(total=len(leaves), desc=desc, unit="task", disable=not desc) as bar:
                    for leaf in distributed.as_completed(leaves):
                        if leaf.status == "error":
                            leaf.result()  # raises the task's error now, not after every other task
                        bar.update()
                del leaves, leaf
                return root.result()
            except BaseException:
                self.client.cancel([root])
                raise

    def close(self) -> None:
        for thing in self._owned:
            thing.close()
        self._owned = []


@contextlib.contextmanager
def _cluster_failures(step: str, kept: bool):
    """Errors of the data and of the tasks reach the user as they are; the cluster's own failures
    (a task that killed its workers too often, a lost connection, cancelled work) become one
    :class:`~acdc_potential.errors.ClusterError` naming the step and what is kept."""
    import distributed

    try:
        yield
    except (distributed.KilledWorker, distributed.comm.CommClosedError, distributed.client.FutureCancelledError, TimeoutError) as error:
        resume = (
            "the triangles of the tasks that finished are kept in cluster.checkpoint, and running the same fit again resumes from them"
            if kept else "nothing of this step is kept"
        )
        raise ClusterError(f"the fit could not complete on the Dask cluster ({step}: {type(error).__name__}: {error}); {resume}") from error


def make_executor(cluster) -> Executor:
    """The executor that a :class:`~acdc_potential.config.ClusterConfig` asks for."""
    if not cluster.scheduler and cluster.workers == 0:
        return InProcess()
    return DaskExecutor(
        scheduler=cluster.scheduler or None,
        workers=cluster.workers,
        threads_per_worker=cluster.threads_per_worker,
    )
