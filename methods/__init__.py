"""Data-efficiency methods, one module each; importing the package registers them.

Every module of the package is imported (no hand-kept list): adding `methods/mymethod.py` with an
`@register("my-method")` class is enough for the CLI, sweeps and Slurm tasks to know it.
"""

import importlib
import pkgutil

for _module in pkgutil.walk_packages(__path__, __name__ + "."):
    importlib.import_module(_module.name)
