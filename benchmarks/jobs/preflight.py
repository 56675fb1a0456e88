"""Check before launching: what every run of a `bench` or a `sweep` needs, before any run starts or any
job is submitted.

A missing dataset used to surface once per run, a few seconds into each, as one failed record per run
(36 of them for the CIFAR sweep; on Slurm, 36 GPU jobs). Here every run is resolved (its protocol with
overrides, its parameters alone and together, the method's fit to the protocol), each distinct dataset
is loaded once on THIS host (under Slurm, the submitting host: `--skip-data-check` skips it for data
only the compute nodes see), held-out splits are checked against the data's size, the device is
checked, and the results folder is checked last (it makes OUT/runs/). The first problem is one
BenchError line; nothing has been written.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from benchmarks.core.record import check_writable
from benchmarks.core.run import pick_device
from benchmarks.core.spec import RunSpec
from benchmarks.errors import BenchError


def check_runs(specs: Iterable[RunSpec], *, data_root: str | None = None, device: str | None = None,
               check_data: bool = True, out: str | Path | None = None) -> None:
    resolved = [spec.resolve() for spec in specs]  # protocol, overrides, parameters, method fit
    if device is not None:
        pick_device(device)
    if check_data:
        _check_data([run.protocol for run in resolved], data_root)
    if out is not None:
        check_writable(out)


def _check_data(protocols: list, data_root: str | None) -> None:
    from benchmarks.data import load_data, restrict_train

    seen: dict[str, int] = {}
    for protocol in protocols:
        key = json.dumps([protocol.dataset, protocol.data_kwargs, protocol.train_subset], sort_keys=True, default=str)
        if key not in seen:
            seen[key] = len(restrict_train(load_data(protocol.dataset, data_root, protocol.data_kwargs),
                                           protocol.train_subset).train)
        n_train, held = seen[key], protocol.holdout_size(seen[key])
        if held >= n_train:
            raise BenchError(f"protocol '{protocol.name}': holdout of {held} examples leaves nothing to train on "
                             f"({n_train} training examples)")
