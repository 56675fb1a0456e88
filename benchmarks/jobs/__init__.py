"""Many runs: sweeps, the local executor, Slurm tasks and their lifecycle, preflight checks, publishing, W&B."""
