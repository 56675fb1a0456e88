"""Baselines every method is compared against; importing the package registers them.

Every module of the package is imported (no hand-kept list), as in methods/.
"""

import importlib
import pkgutil

for _module in pkgutil.walk_packages(__path__, __name__ + "."):
    importlib.import_module(_module.name)
