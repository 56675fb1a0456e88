"""Progress a person can plan by: epoch lines in a log file (proxies too), done/total and an ETA for a job,
`status` for a results folder of single runs, a stop that says what was saved, and help that names itself."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

from slurm_support import REPO

SMOKE = ["--protocol", "smoke", "--set", "epochs=2", "--wandb", "off"]


def cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    # stdout is a pipe here, as in a log file: no terminal bar, one line per epoch instead
    return subprocess.run([sys.executable, "-m", "benchmarks", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=300, **kwargs)


def test_a_run_in_a_log_file_prints_a_line_per_epoch_with_loss_evaluation_and_elapsed_time(tmp_path):
    result = cli("run", "--method", "full", *SMOKE, "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("[main] epoch")]
    assert [line.split(" loss")[0] for line in lines] == ["[main] epoch 1/2", "[main] epoch 2/2"], result.stdout
    for line in lines:
        assert re.search(r"loss \d+\.\d{4}, \d+ examples, .*test_acc 0\.\d{4}.*, \d+ s elapsed$", line), line


def test_proxy_epochs_are_logged_with_their_proxy_run(tmp_path):
    result = cli("run", "--method", "el2n", "--param", "score_runs=2", "--param", "score_epoch=1", *SMOKE,
                 "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "[scores] el2n: proxy run 1/2" in out and "[scores] el2n: proxy run 2/2" in out, out
    assert re.search(r"\[score-proxy-0\] epoch 1/2 \(of 1\) loss \d", out), out  # stops at epoch 1 of the schedule
    assert re.search(r"\[score-proxy-1\] epoch 1/2 \(of 1\) loss \d", out), out


def test_a_job_prints_done_total_failures_and_an_eta_after_each_run(tmp_path):
    result = cli("bench", "--protocol", "smoke", "--methods", "full,uniform", "--set", "epochs=1", "--wandb", "off",
                 "--out", str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    done = [line for line in result.stdout.splitlines() if re.match(r"\[\d/2\] ", line)]
    assert len(done) == 2, result.stdout
    assert "1 done, 0 not complete, 1 to go, ETA " in done[0] and done[1].endswith("2 done, 0 not complete, 0 to go")
    assert result.stdout.count("[start]") == 2 and "local_0.out" in result.stdout


def test_status_answers_for_a_results_folder_of_single_runs(tmp_path):
    assert cli("run", "--method", "full", *SMOKE, "--out", str(tmp_path)).returncode == 0
    assert cli("run", "--method", "uniform", *SMOKE, "--out", str(tmp_path)).returncode == 0
    status = cli("status", str(tmp_path))
    assert status.returncode == 0, status.stderr
    assert "total: 2 complete" in status.stdout and "progress: 2/2 complete" in status.stdout, status.stdout
    assert " full " in status.stdout and " uniform " in status.stdout


def test_a_stopped_run_says_what_was_saved_and_how_to_resume(tmp_path):
    args = [sys.executable, "-m", "benchmarks", "run", "--method", "full", "--protocol", "smoke", "--wandb", "off",
            # 12 epochs: on a loaded machine the signal may land seconds after the line; the run must still be going
            "--set", "epochs=12", "--set", "data_kwargs={n_train=6000, n_test=512, num_classes=4, size=8}",
            "--out", str(tmp_path)]
    # No PYTHONUNBUFFERED: the CLI itself writes line by line into a pipe or a log file, so the epoch line
    # arrives while the run is under way (a block buffer would hold it until the run ended).
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=env)
    for line in proc.stdout:
        if line.startswith("[main] epoch 1/12"):
            break
    proc.send_signal(signal.SIGTERM)
    rest = proc.stdout.read()
    assert proc.wait(timeout=120) == 3, rest
    assert "received SIGTERM: stopping at the next step to checkpoint" in rest, rest
    assert re.search(r"preempted: \w+ checkpointed at epoch \d(, step \d+ of the next)? \(.*\.pt\)", rest), rest
    assert "run the same command again to resume" in rest, rest
    resumed = subprocess.run(args, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert resumed.returncode == 0 and "resumed at epoch" in resumed.stdout, resumed.stdout + resumed.stderr


def test_each_command_help_names_itself_and_shows_its_own_examples():
    for command in ("run", "bench", "sweep", "status", "tables", "publish", "replicate"):
        result = cli(command, "--help")
        assert result.returncode == 0
        assert result.stdout.startswith(f"usage: python -m benchmarks {command}"), result.stdout[:80]
        examples = result.stdout.split("examples:", 1)[1]
        assert f"python -m benchmarks {command} " in examples, (command, examples)
        others = {"run", "bench", "sweep", "status", "tables", "publish", "replicate"} - {command}
        assert not any(f"python -m benchmarks {other} " in examples for other in others), (command, examples)


def test_list_prints_whole_descriptions():
    from benchmarks.core.registry import list_methods

    out = cli("list").stdout
    for name, cls in list_methods().items():
        if name.startswith("test-"):
            continue  # registered by other test modules in this process only, not in the CLI's
        first_paragraph = " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())
        assert first_paragraph in out, name
