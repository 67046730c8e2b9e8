"""Wigner kernels (WK; docs/equations.md, "Wigner iteration"): the TorchScript iterations
(:mod:`.iteration`), per-atom invariants and the collapse of nu <= 4 models (:mod:`.features`),
fit-only summed derivatives (:mod:`.gradients`) and the fit-time kernel with per-species order
scales (:mod:`.kernel`)."""
