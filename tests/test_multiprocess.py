"""Multi-process training: two JAX processes on this machine, joined over 127.0.0.1 (gloo).

The runs are ``scripts/train.py`` on ``configs/digits.py:smoke`` started by
``scripts/launch_local.py`` (2 processes x 1 CPU device) or alone with 2 CPU devices; the
test process (8 devices, tests/conftest.py) only reads their workdirs.
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import REPO, load_config

import jaxdiff
from jaxdiff import checkpoint as ckpt
from jaxdiff import data as data_lib
from jaxdiff import distributed
from jaxdiff import train as train_lib

_spec = importlib.util.spec_from_file_location("launch_local", REPO / "scripts" / "launch_local.py")
launch_local = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(launch_local)

NUM_STEPS = 20
OVERRIDES = {
    "train.num_steps": NUM_STEPS,
    "train.checkpoint_every": 5,
    "train.log_every": 1,
    "eval.digits_metrics": False,
    "sample.at_end": False,
}
HEARTBEAT_SECONDS = 10


def _clean_env(**extra) -> dict[str, str]:
    """This environment without the test process's device count and distributed settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COORDINATOR", "JAX_NUM_PROCESSES",
                                                                     "JAX_PROCESS_ID", "JAXDIFF_"))}  # fmt: skip
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f)
    env["JAX_PLATFORMS"] = "cpu"
    env.update(extra)
    return env


def _train_args(workdir, **overrides) -> list[str]:
    merged = {**OVERRIDES, **overrides}
    return [
        str(REPO / "scripts" / "train.py"),
        f"--config={REPO / 'configs' / 'digits.py'}:smoke",
        f"--workdir={workdir}",
        *(f"--config.{k}={v}" for k, v in merged.items()),
    ]


def _launch(workdir, num_processes: int, env: dict[str, str], timeout: float = 300, **overrides):
    """``launch_local.py --num_processes=N -- train.py ...``; returns the CompletedProcess."""
    cmd = [sys.executable, str(REPO / "scripts" / "launch_local.py"), f"--num_processes={num_processes}",
           f"--log_dir={workdir}_logs", f"--heartbeat_timeout={HEARTBEAT_SECONDS}", "--",
           *_train_args(workdir, **overrides)]  # fmt: skip
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def _one_process(workdir, devices: int, env: dict[str, str], timeout: float = 300, **overrides):
    env = dict(env, XLA_FLAGS=f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip())
    cmd = [sys.executable, *_train_args(workdir, **overrides)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def _ok(proc) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


def _losses(workdir) -> dict[int, float]:
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert len(steps) == len(set(steps)), f"metrics.jsonl written more than once per step: {steps}"
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def _state(workdir):
    return train_lib.restore_state(workdir, ckpt.read_config(workdir))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Subprocess environment; one compilation cache for every run of this module."""
    cache = tmp_path_factory.mktemp("jax_cache")
    return _clean_env(JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, env):
    """The same 20-step run on 1 process x 2 devices and on 2 processes x 1 device (with a sample grid)."""
    root = tmp_path_factory.mktemp("runs")
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # both at once: compiling is single-threaded
        one = pool.submit(_one_process, root / "one", 2, env)
        _ok(_launch(root / "two", 2, env, **{"sample.at_end": True}))
        _ok(one.result())
    print(f"\n[multiprocess] 1 process x 2 devices and 2 processes x 1 device: {time.perf_counter() - t0:.1f} s")
    return root / "one", root / "two"


# ---------------------------------------------------------------------------------------------
# In-process pieces.
# ---------------------------------------------------------------------------------------------


class _RecordingSource:
    def __init__(self, n: int):
        self.n, self.read = n, []

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        self.read.append(int(i))
        return {"image": np.full((2, 2, 1), float(i), np.float32), "label": np.int32(i % 10)}


def test_global_batches_do_not_depend_on_the_process_count():
    """Process i of n reads only rows [i B/n, (i+1) B/n) of each global batch, and only those examples."""
    b, n_batches = 8, 6  # 48 examples from a 20-example source: several epochs
    single = iter(data_lib.make_dataset(_RecordingSource(20), batch_size=b, seed=3, random_flip=True,
                                        num_threads=0, process_index=0, process_count=1))  # fmt: skip
    expected = [next(single) for _ in range(n_batches)]
    for count in (2, 4):
        sources = [_RecordingSource(20) for _ in range(count)]
        its = [iter(data_lib.make_dataset(src, batch_size=b, seed=3, random_flip=True, num_threads=0,
                                          process_index=i, process_count=count)) for i, src in enumerate(sources)]  # fmt: skip
        for k in range(n_batches):
            parts = [next(it) for it in its]
            for key in ("image", "label"):
                np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), expected[k][key])
        # Each process read only the examples of its rows: together, each row exactly once.
        reads = [len(src.read) for src in sources]
        assert sum(reads) == b * n_batches and len(set(reads)) == 1, reads
        for i, src in enumerate(sources):
            rows = np.concatenate([e["image"][i * b // count : (i + 1) * b // count, 0, 0, 0] for e in expected])
            assert sorted(src.read) == sorted(rows.astype(int).tolist())


def test_explicit_environment_and_its_errors():
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    assert distributed.explicit_arguments(env) == {
        "coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3}  # fmt: skip
    assert distributed.explicit_arguments({}) == {}  # JAX auto-detects SLURM, Open MPI, TPU
    # Only some set: JAX's cluster detection gives the rest (e.g. SLURM's process count and id).
    assert distributed.explicit_arguments({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}) == {
        "coordinator_address": "10.0.0.1:1234"}  # fmt: skip
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES='two' is not an integer"):
        distributed.explicit_arguments(dict(env, JAX_NUM_PROCESSES="two"))
    with pytest.raises(ValueError, match="JAX_PROCESS_ID=4 is not below JAX_NUM_PROCESSES=4"):
        distributed.explicit_arguments(dict(env, JAX_PROCESS_ID="4"))
    with pytest.raises(ValueError, match="JAX_COORDINATOR_ADDRESS='10.0.0.1' is not host:port"):
        distributed.explicit_arguments(dict(env, JAX_COORDINATOR_ADDRESS="10.0.0.1"))
    with pytest.raises(ValueError, match="JAXDIFF_DISTRIBUTED='yes'"):
        distributed.requested(None, {"JAXDIFF_DISTRIBUTED": "yes"})
    config = load_config("digits", "smoke")
    assert not distributed.requested(config, {}) and distributed.requested(config, {"JAXDIFF_DISTRIBUTED": "1"})
    config.train.distributed = True
    assert distributed.requested(config, {})


def test_initialize_errors_say_what_to_do():
    code = "from jaxdiff import distributed; distributed.initialize_from_env()"
    proc = subprocess.run([sys.executable, "-c", code], env=_clean_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "no cluster was detected" in proc.stderr and "scripts/launch_local.py" in proc.stderr, proc.stderr[-2000:]
    jax.devices()  # this test process has started JAX already
    explicit = {"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}
    with pytest.raises(RuntimeError, match="initialize_from_env\\(\\) .* first"):
        distributed.initialize_from_env(environ=explicit)


def test_data_position_maps_across_process_counts(tmp_path):
    for i in range(2):
        (tmp_path / f"process_{i}-of-2.json").write_text(json.dumps({"next_index": 7}))
    assert distributed.saved_iterator_state(tmp_path, 0, 1) == {"next_index": 7}
    assert distributed.saved_iterator_state(tmp_path, 2, 4) == {"next_index": 7}
    (tmp_path / "process_1-of-2.json").write_text(json.dumps({"next_index": 8}))
    assert distributed.saved_iterator_state(tmp_path, 1, 2) == {"next_index": 8}  # same count: its own
    with pytest.raises(distributed.ProcessCountMismatchError, match="relaunch with 2 processes"):
        distributed.saved_iterator_state(tmp_path, 0, 1)


def test_launcher_stops_the_others_and_reports_a_failure(tmp_path):
    """Process 1 fails at once; process 0 (which would run a minute) is stopped; exit status 3."""
    code = "import os, sys, time; pid = os.environ['JAX_PROCESS_ID']; print('process', pid); " \
           "sys.exit(3) if pid == '1' else time.sleep(60)"
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "launch_local.py"), "--num_processes=2", f"--log_dir={tmp_path}",
         "--grace_seconds=2", "--", sys.executable, "-c", code],
        capture_output=True, text=True, timeout=60, env=_clean_env(),
    )  # fmt: skip
    assert proc.returncode == 3, proc.stderr
    assert time.perf_counter() - t0 < 30
    assert "process 1 failed with exit status 3" in proc.stderr and "process 1" in (tmp_path / "process_1.log").read_text()
    assert "process 0" in proc.stdout


# ---------------------------------------------------------------------------------------------
# Two processes.
# ---------------------------------------------------------------------------------------------


def test_two_processes_equal_one_process_with_two_devices(runs):
    one, two = runs
    params_1, step_1 = jaxdiff.load_params(one, use_ema=False)
    params_2, step_2 = jaxdiff.load_params(two, use_ema=False)
    assert step_1 == step_2 == NUM_STEPS
    diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
                                         params_1, params_2))  # fmt: skip
    print(f"\n[multiprocess] max |params(2 processes) - params(1 process, 2 devices)| = {max(diffs):.3g}")
    assert max(diffs) <= 1e-6
    losses_1, losses_2 = _losses(one), _losses(two)
    assert sorted(losses_1) == sorted(losses_2) == list(range(1, NUM_STEPS + 1))
    np.testing.assert_allclose([losses_2[s] for s in sorted(losses_2)], [losses_1[s] for s in sorted(losses_1)],
                               rtol=1e-5, atol=1e-7)  # fmt: skip
    # Process 0 alone writes metrics (once per step, checked above), config.json and the grid.
    assert json.loads((two / "config.json").read_text())["train"]["num_steps"] == NUM_STEPS
    assert sorted(p.name for p in (two / "samples").iterdir()) == [f"step_{NUM_STEPS}.png"]
    # One checkpoint per save, each with both processes' data positions (the same: global batches).
    assert ckpt.saved_steps(two) == [10, 15, 20]
    data_files = sorted(p.name for p in (two / "checkpoints" / "20" / "data").glob("*.json"))
    assert data_files == ["process_0-of-2.json", "process_1-of-2.json"]
    positions = {(two / "checkpoints" / "20" / "data" / f).read_text() for f in data_files}
    assert len(positions) == 1


def test_killed_processes_resume_bit_identical(runs, env, tmp_path):
    """kill -9 of both processes after checkpoint 5; relaunch: the uninterrupted run's state, bit for bit."""
    _, two = runs
    killed = tmp_path / "killed"
    proc = _launch(killed, 2, dict(env, JAXDIFF_TEST_KILL_AT_STEP="7"))
    assert proc.returncode == 128 + signal.SIGKILL, proc.stderr[-3000:]
    assert ckpt.saved_steps(killed) == [5], proc.stderr[-3000:]

    resumed = _launch(killed, 2, env)
    _ok(resumed)
    assert "Resumed from checkpoint step 5" in resumed.stdout
    step_a, state_a = _state(two)
    step_b, state_b = _state(killed)
    assert step_a == step_b == NUM_STEPS
    for a, b in zip(jax.tree.leaves(state_a), jax.tree.leaves(state_b), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # The loss curve after the resume is the uninterrupted one's, data position included (steps
    # 6-7 were logged twice: before the kill and again after the resume).
    np.testing.assert_array_equal([_losses_last(killed)[s] for s in range(6, NUM_STEPS + 1)],
                                  [_losses(two)[s] for s in range(6, NUM_STEPS + 1)])  # fmt: skip


def _losses_last(workdir) -> dict[int, float]:
    """Step -> loss, the last record of each step winning (a resumed run repeats steps)."""
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_killed_peer_stops_the_survivor_and_the_run_resumes_on_one_process(runs, env, tmp_path):
    """kill -9 of process 1 at step 7: process 0 stops with an error within a bounded time, the
    checkpoints left are complete, and the run resumes on 1 process x 2 devices at the same
    global batch (the data position is a count of global batches), ending within 1e-6 of the
    uninterrupted 2-process run."""
    _, two = runs
    workdir = tmp_path / "run"
    port = launch_local.free_port()
    procs, logs = [], []
    try:
        for i in range(2):
            logs.append(open(tmp_path / f"process_{i}.log", "w"))
            penv = launch_local.process_env(i, 2, port, heartbeat_timeout_seconds=HEARTBEAT_SECONDS, base=env)
            if i == 1:
                penv["JAXDIFF_TEST_KILL_AT_STEP"] = "7"  # SIGKILLs itself after dispatching step 7
            argv = launch_local.command_line(_train_args(workdir))
            procs.append(subprocess.Popen(argv, env=penv, stdout=logs[-1], stderr=subprocess.STDOUT))
        victim, survivor = procs[1], procs[0]
        assert victim.wait(timeout=300) == -signal.SIGKILL, (tmp_path / "process_1.log").read_text()[-3000:]
        t0 = time.perf_counter()
        code = survivor.wait(timeout=HEARTBEAT_SECONDS + 110)
        elapsed = time.perf_counter() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()
    output = (tmp_path / "process_0.log").read_text()
    print(f"\n[multiprocess] process 1 killed: process 0 stopped {elapsed:.1f} s later, exit status {code}")
    assert code != 0
    assert elapsed < HEARTBEAT_SECONDS + 30
    assert "another process of this run probably died" in output, output[-3000:]
    assert ckpt.saved_steps(workdir) == [5]

    _ok(_one_process(workdir, 2, env))
    _, state_a = _state(two)
    _, state_c = _state(workdir)
    diffs = [float(np.max(np.abs(np.asarray(a) - np.asarray(c))))
             for a, c in zip(jax.tree.leaves(state_a), jax.tree.leaves(state_c), strict=True)]  # fmt: skip
    print(f"[multiprocess] resumed on 1 process x 2 devices: max |state - 2-process state| = {max(diffs):.3g}")
    assert max(diffs) <= 1e-6
