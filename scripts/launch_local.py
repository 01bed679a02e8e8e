"""Run a jaxdiff script as N JAX processes on this machine: multi-host training on one computer.

    python scripts/launch_local.py --num_processes=2 -- \\
        scripts/train.py --config=configs/digits.py:smoke --workdir=runs/digits_2proc

Like ``torchrun --standalone``: starts ``--num_processes`` copies of the command, each a JAX
process of one distributed run (coordinator on a free port of 127.0.0.1; ``JAX_COORDINATOR_ADDRESS``,
``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID`` and ``JAXDIFF_DISTRIBUTED=1`` set, so
``train_and_evaluate`` joins them without ``--config.train.distributed``). Every process gets
``--devices_per_process`` CPU devices (``--xla_force_host_platform_device_count``) and CPU
collectives over gloo, so 2 processes x 1 device form the same 2-device mesh as 1 process x 2
devices. For trying multi-host code paths and for tests; real clusters launch one process per
host with srun, mpirun or the TPU VM tooling (see the README's Multi-host section).

Process 0's output is shown here; the others' goes to ``--log_dir`` (default: a new temporary
folder), and the tail of a process that fails is printed. If any process fails, the others are
stopped (SIGTERM, then SIGKILL after ``--grace_seconds``) and the launcher exits with the failed
process's status (128 + signal for a killed one). SIGTERM / Ctrl-C to the launcher is passed on
to every process (``train_and_evaluate`` then saves a checkpoint and stops).

A command starting with a ``.py`` file or with ``-m`` is run with this Python interpreter.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def process_env(
    process_id: int,
    num_processes: int,
    port: int,
    *,
    devices_per_process: int = 1,
    heartbeat_timeout_seconds: int | None = None,
    base: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment of process ``process_id`` of a local run (``base``: default ``os.environ``).

    Example:
      >>> env = process_env(1, 2, 12345, base={})
      >>> env["JAX_COORDINATOR_ADDRESS"], env["JAX_PROCESS_ID"], env["XLA_FLAGS"]
      ('127.0.0.1:12345', '1', '--xla_force_host_platform_device_count=1')
    """
    env = dict(os.environ if base is None else base)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(DEVICE_COUNT_FLAG)]
    env.update(
        JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
        JAX_COORDINATOR_BIND_ADDRESS=f"127.0.0.1:{port}",  # not every interface, as JAX's default
        JAX_NUM_PROCESSES=str(num_processes),
        JAX_PROCESS_ID=str(process_id),
        JAXDIFF_DISTRIBUTED="1",
        JAX_PLATFORMS="cpu",
        JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
        XLA_FLAGS=" ".join([*flags, f"{DEVICE_COUNT_FLAG}={devices_per_process}"]),
    )
    if heartbeat_timeout_seconds is not None:
        env["JAXDIFF_HEARTBEAT_TIMEOUT_SECONDS"] = str(heartbeat_timeout_seconds)
    return env


def command_line(command: Sequence[str]) -> list[str]:
    """``command`` with this Python in front when it starts with a ``.py`` file or ``-m``."""
    command = list(command)
    if command and (command[0].endswith(".py") or command[0] == "-m"):
        return [sys.executable, *command]
    return command


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no output)"


def _status(code: int) -> int:
    """A ``Popen.returncode`` as a shell exit status (``-9`` -> ``137``)."""
    return 128 - code if code < 0 else code


def _stop(procs: list[subprocess.Popen], grace_seconds: float) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_seconds
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def launch(
    command: Sequence[str],
    *,
    num_processes: int,
    devices_per_process: int = 1,
    log_dir: str | os.PathLike | None = None,
    heartbeat_timeout_seconds: int | None = 10,
    grace_seconds: float = 10.0,
) -> int:
    """Runs ``command`` as ``num_processes`` processes of one JAX run; returns the exit status.

    0 when every process succeeded, else the first failure's status (the others are stopped).
    """
    if num_processes < 1:
        raise ValueError(f"--num_processes={num_processes} must be >= 1.")
    if devices_per_process < 1:
        raise ValueError(f"--devices_per_process={devices_per_process} must be >= 1.")
    if not command:
        raise ValueError("No command given: put it after --, e.g. -- scripts/train.py --config=... --workdir=...")
    argv = command_line(command)
    log_dir = Path(tempfile.mkdtemp(prefix="jaxdiff_launch_") if log_dir is None else log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    procs: list[subprocess.Popen] = []
    logs: list[Path | None] = []
    stop_signal: list[int] = []

    def forward(signum, frame):
        del frame
        stop_signal.append(signum)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        for i in range(num_processes):
            env = process_env(i, num_processes, port, devices_per_process=devices_per_process,
                              heartbeat_timeout_seconds=heartbeat_timeout_seconds)  # fmt: skip
            if i == 0:
                procs.append(subprocess.Popen(argv, env=env))
                logs.append(None)
            else:
                path = log_dir / f"process_{i}.log"
                with open(path, "wb") as out:
                    procs.append(subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT))
                logs.append(path)
        if num_processes > 1:
            print(f"[launch_local] {num_processes} processes x {devices_per_process} CPU device(s), coordinator "
                  f"127.0.0.1:{port}; processes 1.. log to {log_dir}", file=sys.stderr, flush=True)  # fmt: skip
        while True:
            codes = [p.poll() for p in procs]
            failed = [i for i, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                i = failed[0]
                others = [p for j, p in enumerate(procs) if j != i]
                _stop(others, grace_seconds)
                where = f"its output: {logs[i]}" if logs[i] else "its output is above"
                print(f"[launch_local] process {i} failed with exit status {_status(codes[i])} ({where}); "
                      "stopped the others.", file=sys.stderr)  # fmt: skip
                if logs[i] is not None:
                    print(f"[launch_local] last lines of process {i}:\n{_tail(logs[i])}", file=sys.stderr)
                return _status(codes[i])
            if all(c == 0 for c in codes):
                return 0
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" in argv:
        split = argv.index("--")
        own, command = argv[:split], argv[split + 1 :]
    else:
        own, command = argv, []
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], usage="%(prog)s [options] -- COMMAND [ARGS...]"
    )
    add = parser.add_argument
    add("--num_processes", type=int, default=2, help="JAX processes to start (default 2).")
    add("--devices_per_process", type=int, default=1, help="CPU devices of each process (default 1).")
    add("--log_dir", default=None, help="Where processes 1.. write their output (default: a temp folder).")
    add("--heartbeat_timeout", type=int, default=10,
        help="Seconds after which a silent process is declared dead and the others stop (default 10).")  # fmt: skip
    add("--grace_seconds", type=float, default=10.0,
        help="After a failure, seconds the others get to exit after SIGTERM before SIGKILL.")  # fmt: skip
    args = parser.parse_args(own)
    try:
        return launch(
            command,
            num_processes=args.num_processes,
            devices_per_process=args.devices_per_process,
            log_dir=args.log_dir,
            heartbeat_timeout_seconds=args.heartbeat_timeout,
            grace_seconds=args.grace_seconds,
        )
    except ValueError as e:
        parser.error(str(e))
        return 2


if __name__ == "__main__":
    sys.exit(main())
