"""The README's checkable numbers stay true: the test count it states is the suite's (within 10%)."""

import re
import subprocess
import sys

from slurm_support import REPO


def test_the_readme_states_the_test_count():
    text = (REPO / "README.md").read_text()
    stated = re.search(r"The suite has about (\d+) tests", text)
    assert stated, "README.md should say 'The suite has about N tests'"
    collected = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"],
                               capture_output=True, text=True, cwd=REPO, timeout=300)
    count = re.search(r"(\d+) tests? collected", collected.stdout)
    assert count, collected.stdout[-2000:] + collected.stderr[-2000:]
    n, readme = int(count.group(1)), int(stated.group(1))
    assert abs(n - readme) <= 0.1 * n, f"README says about {readme} tests; the suite has {n}: update README.md"
