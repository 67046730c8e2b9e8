"""acdc-potential: body-ordered, symmetry-adapted kernel potentials.

The pipeline, one module per stage (data flows down this list):

- :mod:`~acdc_potential.neighbors`: batches of structures and neighbour lists (vesin);
- :mod:`~acdc_potential.radial`: radial bases, densities and tabulated radial integrals;
- :mod:`~acdc_potential.harmonics`: real spherical harmonics in plain torch;
- :mod:`~acdc_potential.density`: density coefficients ``c_i[a n l m]`` in torch;
- :mod:`~acdc_potential.cg`: real-basis Clebsch-Gordan coefficients and coupling;
- :mod:`~acdc_potential.correlations`, :mod:`~acdc_potential.message_passing`: ACDC and MP-ACDC features;
- :mod:`~acdc_potential.wigner`: Wigner kernels;
- :mod:`~acdc_potential.data`, :mod:`~acdc_potential.sparse`, :mod:`~acdc_potential.regression`:
  labelled data, sparse environments and kernels against them, sparse kernel ridge regression;
- :mod:`~acdc_potential.model`: the exported metatomic model;
- :mod:`~acdc_potential.calculator`, :mod:`~acdc_potential.evaluation`, :mod:`~acdc_potential.config`,
  :mod:`~acdc_potential.cli`: ASE calculator, error tables and plots, configuration, command line.
"""

__version__ = "0.1.0"
