"""What ships in the ``.pt`` file: the metatomic module (:mod:`.potential`), its energy heads
(:mod:`.heads`), the projected-process variance (:mod:`.uncertainty`) and the export
(:mod:`.export`). Imports :mod:`acdc_potential.descriptors` and :mod:`acdc_potential.kernels`,
never :mod:`acdc_potential.fit`."""
