"""Threads and devices: the choices that the command line, the fit and the calculator share.

Small molecules run fastest on one thread (a 9-atom MD step is a few hundred small operations;
on a busy 2-core machine two threads made ethanol MD 70 times slower than one), large cells and
fits use every core this process may run on.
"""

import os
from typing import Optional

import torch

# structures with fewer atoms than this run on one thread by default
SMALL_SYSTEM = 100


def usable_device(name: str) -> torch.device:
    """The torch device ``name``; a ``ValueError`` saying why this machine cannot use it (not a device
    name, no CUDA, no CUDA device of that index)."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"{name!r} is not a torch device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{name!r}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"{name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_threads(n_atoms: Optional[int] = None) -> int:
    """One thread for structures of fewer than :data:`SMALL_SYSTEM` atoms, else (and for a fit,
    ``n_atoms=None``) every available core."""
    if n_atoms is not None and n_atoms < SMALL_SYSTEM:
        return 1
    return available_cores()


def use_threads(threads: int) -> int:
    """Make torch use ``threads`` threads (at least one) for intra-op work; returns the number."""
    if threads < 1:
        raise ValueError(f"the number of threads must be at least 1, got {threads}")
    torch.set_num_threads(int(threads))
    return int(threads)
