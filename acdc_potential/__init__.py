"""acdc-potential: body-ordered, symmetry-adapted kernel potentials.

The pipeline, one subpackage or module per stage (data flows down this list; docs/pipeline.md
describes each stage):

- :mod:`~acdc_potential.config`: every option of a fit, with its defaults;
- :mod:`~acdc_potential.data`, :mod:`~acdc_potential.errors`: labelled structures from extxyz
  files and their validation; the error and warning types;
- :mod:`~acdc_potential.descriptors`: neighbour lists (``neighbors``), radial bases and
  tabulated radial integrals (``radial``), real spherical harmonics (``harmonics``),
  density coefficients ``c_i[a n l m]`` (``density``) and their Jacobian (``jacobian``),
  real-basis Clebsch-Gordan coefficients (``cg``), ACDC and MP-ACDC features (``acdc``,
  ``mpacdc``);
- :mod:`~acdc_potential.kernels`: the sparse-kernel interface, the polynomial kernel and the
  Wigner kernels, registered by name;
- :mod:`~acdc_potential.fit`: targets, baseline, sparse selection, design matrix, projected-process
  solve, tuning, the fitted model and its checkpoint, and the fit itself;
- :mod:`~acdc_potential.model`: the exported metatomic model (never imports ``fit``);
- :mod:`~acdc_potential.inference`: predictions of that model on structures in memory;
- :mod:`~acdc_potential.calculator`, :mod:`~acdc_potential.evaluation`, :mod:`~acdc_potential.cli`:
  ASE calculator, error tables and plots, command line.
"""

__version__ = "0.1.0"
