"""agent-ctl on bad input: one line and exit 2, never a traceback; on a reader that goes away, quiet."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import MODELS, REPO


def ctl(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # this checkout's agent, from whatever directory
    return subprocess.run([sys.executable, "-m", "agent.ctl", "--broker", "mqtt://127.0.0.1:1", *args],
                          capture_output=True, text=True, cwd=cwd, timeout=60, env=env)


@pytest.mark.parametrize("args, says", [
    (["keygen", "--out", "/nonexistent-dir/k"], "--out /nonexistent-dir/k: cannot write /nonexistent-dir/k.key"),
    (["snapshot", "--out", "/nonexistent-dir/x.jpg"], "--out /nonexistent-dir/x.jpg: no directory /nonexistent-dir"),
    (["bench", str(MODELS / "blazeface.tflite"), "--seconds", "0"], "--seconds: must be at least 1, got 0"),
    (["deploy", str(MODELS / "blazeface.tflite"), "--chunk-kb", "0"], "--chunk-kb: must be at least 16, got 0"),
    (["deploy", str(MODELS / "blazeface.tflite"), "--chunk-kb", "129"], "--chunk-kb: must be at most 128, got 129"),
    (["deploy", str(MODELS / "blazeface.tflite"), "--timeout", "-1"], "--timeout: must be more than 0, got -1"),
    (["rollback", "--timeout", "nan"], "--timeout: expected a finite number, got 'nan'"),
    (["watch", "--count", "-3"], "--count: must be at least 0, got -3"),
    (["status", "--wait", "soon"], "--wait: expected a number, got 'soon'"),
])
def test_bad_input_is_one_line_and_exit_2(args, says):
    r = ctl(*args)
    assert r.returncode == 2, r.stderr
    assert says in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_a_reader_that_stops_reading_ends_agent_ctl_quietly():
    # `agent-ctl probe --json | head -1` with the probe's output not yet written when head exits
    ctl_proc = subprocess.Popen([sys.executable, "-m", "agent.ctl", "probe", "--json"], cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    ctl_proc.stdout.close()  # the reader is gone before a byte is written
    err = ctl_proc.stderr.read().decode()
    assert ctl_proc.wait(60) == 1
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_bench_takes_a_model_path_relative_to_where_it_runs(tmp_path):
    # the model and source paths are resolved here: the bare child and the agent run from the repo root
    r = ctl("bench", "blazeface.tflite", "--seconds", "1", "--source", "synthetic", "--json",
            cwd=MODELS)
    assert r.returncode == 0, r.stderr
    assert '"ratio"' in r.stdout
