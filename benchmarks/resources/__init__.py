"""Files the package ships, found the same way from an installed wheel as from a checkout.

    array.sbatch   the Slurm job-array template (`sweep --executor slurm` submits it; sbatch copies
                   the script at submission, so the installed copy is all a cluster needs)
    paper/*.toml   the papers' reference numbers ([[entry]]) and claims ([[claim]]) that `replicate`
                   and `tables --published` compare the records with (--papers names another folder)

They live inside the package, not beside it, because `pip install` copies only the package: a
folder next to it (the old slurm/array.sbatch, results/paper/) exists in a clone alone. These files
are the one copy; a clone keeps a link at results/paper for the commands and habits that name it.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def resource_path(*parts: str) -> Path:
    """A shipped file or folder as a filesystem path (pip installs packages unzipped, so it is one)."""
    return Path(str(files(__package__).joinpath(*parts)))


SBATCH_TEMPLATE = resource_path("array.sbatch")
PAPERS_DIR = resource_path("paper")
