"""fusion-serve, offline half: train, combine, merge, align, distil and export model ensembles.

Importing this package does not import torch; the submodules that need it import it themselves,
so that the serving half can share `fusion.errors` and `fusion.bundle`.
"""

__version__ = "0.1.0"
