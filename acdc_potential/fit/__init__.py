"""Fitting a sparse-KRR potential: row kinds, baseline, sparse selection, design matrix, projected-process
solver, tuning, checkpoints and the driver (:func:`acdc_potential.fit.driver.fit`). May import
:mod:`acdc_potential.model`; never imported by it."""
