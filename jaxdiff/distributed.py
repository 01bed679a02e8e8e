"""Multi-process runs: joining JAX's distributed runtime, and what differs with several processes.

JAX's multi-controller model: one Python process per host (or per GPU), every process runs the
same program, arrays are global over the devices of all processes, and each process feeds its
own part of every batch. :func:`initialize_from_env` joins the processes of a run
(``jax.distributed.initialize``) from what the environment says:

* explicitly: ``JAX_COORDINATOR_ADDRESS`` (``host:port`` of process 0), ``JAX_NUM_PROCESSES``
  and ``JAX_PROCESS_ID`` (as ``scripts/launch_local.py`` sets them), and
* JAX's cluster auto-detection for what is not set: SLURM (``srun``), Open MPI (``mpirun``),
  Cloud TPU pod slices (``--worker=all``).

``train_and_evaluate`` calls it when ``config.train.distributed`` is true or ``JAXDIFF_DISTRIBUTED=1``
(set by the launcher). On CPU the processes' collectives go over gloo (JAX's default;
``JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo`` makes it explicit).

Example (two processes on one machine; see ``scripts/launch_local.py``)::

    JAX_COORDINATOR_ADDRESS=127.0.0.1:12345 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=0 python -c \\
        "from jaxdiff import distributed; distributed.initialize_from_env(); import jax; print(jax.device_count())"
    # ... and the same with JAX_PROCESS_ID=1 in a second shell: both print 2.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

COORDINATOR_ENV = "JAX_COORDINATOR_ADDRESS"
NUM_PROCESSES_ENV = "JAX_NUM_PROCESSES"
PROCESS_ID_ENV = "JAX_PROCESS_ID"
EXPLICIT_ENV = (COORDINATOR_ENV, NUM_PROCESSES_ENV, PROCESS_ID_ENV)
REQUEST_ENV = "JAXDIFF_DISTRIBUTED"
"""``JAXDIFF_DISTRIBUTED=1`` asks ``train_and_evaluate`` to initialise as ``config.train.distributed`` does."""
HEARTBEAT_ENV = "JAXDIFF_HEARTBEAT_TIMEOUT_SECONDS"
"""Seconds without a heartbeat after which the runtime declares a process dead and stops the others."""
DEFAULT_HEARTBEAT_TIMEOUT_SECONDS = 100  # jax.distributed.initialize's own default


class ProcessCountMismatchError(ValueError):
    """A checkpoint's data position cannot be mapped onto this run's number of processes."""


def _int_env(environ: Mapping[str, str], name: str, low: int) -> int:
    raw = environ[name]
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not an integer; set it to an integer >= {low}.") from None
    if value < low:
        raise ValueError(f"{name}={raw!r} must be >= {low}.")
    return value


def explicit_arguments(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """``jax.distributed.initialize`` arguments from those of ``JAX_COORDINATOR_ADDRESS``,
    ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` that are set; JAX's cluster auto-detection
    (SLURM, Open MPI, TPU) fills in the others (``{}``: all of them).

    Raises:
      ValueError: naming the variable, when one is malformed.

    Example:
      >>> explicit_arguments({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "2",
      ...                     "JAX_PROCESS_ID": "1"})
      {'coordinator_address': '10.0.0.1:1234', 'num_processes': 2, 'process_id': 1}
    """
    environ = os.environ if environ is None else environ
    kwargs: dict[str, Any] = {}
    if address := environ.get(COORDINATOR_ENV):
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"{COORDINATOR_ENV}={address!r} is not host:port (e.g. 10.0.0.1:1234, process 0's address).")
        kwargs["coordinator_address"] = address
    if environ.get(NUM_PROCESSES_ENV):
        kwargs["num_processes"] = _int_env(environ, NUM_PROCESSES_ENV, 1)
    if environ.get(PROCESS_ID_ENV):
        kwargs["process_id"] = _int_env(environ, PROCESS_ID_ENV, 0)
    if "num_processes" in kwargs and kwargs.get("process_id", 0) >= kwargs["num_processes"]:
        raise ValueError(
            f"{PROCESS_ID_ENV}={kwargs['process_id']} is not below {NUM_PROCESSES_ENV}={kwargs['num_processes']}; "
            f"process ids are 0..{kwargs['num_processes'] - 1}."
        )
    return kwargs


def requested(config: Any = None, environ: Mapping[str, str] | None = None) -> bool:
    """Whether a run should join the distributed runtime: ``config.train.distributed`` or
    ``JAXDIFF_DISTRIBUTED=1`` (set by ``scripts/launch_local.py``)."""
    environ = os.environ if environ is None else environ
    flag = environ.get(REQUEST_ENV, "")
    if flag not in ("", "0", "1"):
        raise ValueError(f"{REQUEST_ENV}={flag!r} must be 1 (join the distributed runtime) or 0.")
    from_config = bool(config is not None and config.get("train", {}).get("distributed", False))
    return from_config or flag == "1"


def initialize_from_env(
    *, heartbeat_timeout_seconds: int | None = None, environ: Mapping[str, str] | None = None
) -> None:
    """Joins this process to the run's other processes (``jax.distributed.initialize``).

    Must run before anything touches a JAX device. Uses :func:`explicit_arguments` for the
    ``JAX_*`` variables that are set, JAX's auto-detection (SLURM, Open MPI, TPU) for the
    others. Does nothing if this process has already joined. ``heartbeat_timeout_seconds``
    (default ``JAXDIFF_HEARTBEAT_TIMEOUT_SECONDS``, else JAX's 100): how long the runtime waits
    for a silent process before it declares it dead and stops the others with an error.

    Raises:
      ValueError: a malformed ``JAX_*`` / ``JAXDIFF_*`` variable (named).
      RuntimeError: no cluster found (naming the variables to set), or JAX was already used
        in this process.

    Example::

        # in every process, before any other JAX call:
        from jaxdiff import distributed
        distributed.initialize_from_env()
    """
    if jax.distributed.is_initialized():
        return
    environ = os.environ if environ is None else environ
    kwargs = explicit_arguments(environ)
    if heartbeat_timeout_seconds is None:
        heartbeat_timeout_seconds = DEFAULT_HEARTBEAT_TIMEOUT_SECONDS
        if environ.get(HEARTBEAT_ENV):
            heartbeat_timeout_seconds = _int_env(environ, HEARTBEAT_ENV, 1)
    try:
        jax.distributed.initialize(**kwargs, heartbeat_timeout_seconds=int(heartbeat_timeout_seconds))
    except ValueError as e:  # JAX: "coordinator_address should be defined." and the like
        missing = [name for name in EXPLICIT_ENV if not environ.get(name)]
        raise RuntimeError(
            f"Distributed training was asked for (config.train.distributed or {REQUEST_ENV}=1) but "
            f"no cluster was detected to give what {', '.join(missing)} would ({e}). Set "
            f"{', '.join(EXPLICIT_ENV)} in every process, launch with srun (SLURM) or mpirun (Open "
            "MPI) or on every worker of a TPU pod slice, or try it on one machine with "
            "scripts/launch_local.py."
        ) from e
    except RuntimeError as e:
        if "before any JAX calls" in str(e):
            raise RuntimeError(
                f"{e} Call jaxdiff.distributed.initialize_from_env() (or train_and_evaluate with "
                "config.train.distributed=True) first in the process."
            ) from e
        raise


def local_replica(tree: Any) -> Any:
    """The tree with every array that spans other processes replaced by this process's copy.

    For host-side work on one process (process 0's sample grids): a computation on arrays with
    devices of other processes would wait for those processes. Arrays must be fully replicated
    (as params are in data-parallel training). Single-process arrays are returned unchanged.
    """

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            if not x.is_fully_replicated:
                raise ValueError(
                    f"An array of shape {x.shape} is sharded over several processes; only replicated "
                    "arrays have a whole copy on each process."
                )
            return x.addressable_data(0)
        return x

    return jax.tree.map(one, tree)


def agreed_stop(received: bool, step: int, every: int) -> bool:
    """Whether every process stops after ``step``, given whether this one received SIGTERM.

    One process: ``received``. Several: the processes must stop (and save their last
    checkpoint, a collective) after the same step, though a signal reaches each at its own
    moment; so they compare their flags every ``every`` steps (an all-gather of one int, at
    the steps where the loop syncs with the host anyway) and all stop if any received one.

    Example:
      >>> agreed_stop(True, 7, 50)   # one process
      True
    """
    if jax.process_count() == 1:
        return received
    if step % max(int(every), 1):
        return False
    from jax.experimental import multihost_utils

    flags = multihost_utils.process_allgather(np.asarray(int(received), np.int32))
    return bool(np.max(flags))


class PeerFailureError(RuntimeError):
    """A collective with another process of the run failed: that process most likely died."""


# Words of the errors XLA raises when a collective's peer or the coordination service is gone.
_PEER_FAILURE_MARKERS = ("gloo", "connection reset", "socket closed", "heartbeat", "coordination service",
                         "unavailable", "deadline_exceeded", "nccl", "barrier")  # fmt: skip


@contextlib.contextmanager
def explain_peer_failure(last_checkpoint: Any = None) -> Iterator[None]:
    """Re-raises a runtime error that means "another process died" as :class:`PeerFailureError`.

    In a multi-process run, a process whose peer was killed fails inside a collective with
    XLA's low-level words ("Gloo AllGather failed: ... Connection reset by peer"); this says
    what happened and what to do. ``last_checkpoint``: a callable returning the newest complete
    checkpoint step (for the message). Other errors, and single-process runs, pass unchanged.

    Example::

        with explain_peer_failure():
            state, metrics = step_fn(state, batch, key)
    """
    try:
        yield
    except jax.errors.JaxRuntimeError as e:
        text = str(e)
        if jax.process_count() == 1 or not any(m in text.lower() for m in _PEER_FAILURE_MARKERS):
            raise
        step = last_checkpoint() if callable(last_checkpoint) else last_checkpoint
        kept = f"the last complete checkpoint is step {step}" if step is not None else "no checkpoint was written yet"
        first = text.splitlines()[0] if text else type(e).__name__
        raise PeerFailureError(
            f"Process {jax.process_index()} of {jax.process_count()}: another process of this run probably "
            f"died (a collective with it failed: {first}). Stopping; {kept}. See the other processes' "
            "output for the cause, then relaunch every process with the same command to resume."
        ) from e


# ---------------------------------------------------------------------------------------------
# The data position across process counts.
# ---------------------------------------------------------------------------------------------


def _saved_process_files(data_dir: Path) -> dict[int, dict[int, Path]]:
    """``{process_count: {process_index: file}}`` of grain's ``process_<i>-of-<n>.json`` files."""
    found: dict[int, dict[int, Path]] = {}
    for path in data_dir.glob("process_*-of-*.json"):
        index, _, count = path.stem.removeprefix("process_").partition("-of-")
        if index.isdigit() and count.isdigit():
            found.setdefault(int(count), {})[int(index)] = path
    return found


def saved_iterator_state(data_dir: str | os.PathLike, process_index: int, process_count: int) -> Any:
    """The data iterator state this process resumes from, out of a checkpoint's ``data`` item.

    grain saves one ``process_<i>-of-<n>.json`` per process. With the same process count each
    process reads its own. With another count the position still maps exactly when every
    process saved the same state: jaxdiff's pipeline (:func:`jaxdiff.data.make_dataset`) makes
    global batch ``k`` the same examples whatever the process count (process ``i`` of ``n``
    reads rows ``[i B/n, (i+1) B/n)`` of it), so its state -- the number of global batches
    consumed -- is the same in every process and is taken as is.

    Raises:
      ProcessCountMismatchError: when the saved states differ between processes (a pipeline
        whose position depends on the process count): relaunch with the saved process count.
      FileNotFoundError: when the checkpoint holds no data iterator state.
    """
    data_dir = Path(data_dir)
    files = _saved_process_files(data_dir)
    if process_count in files and process_index in files[process_count]:
        return json.loads(files[process_count][process_index].read_text())
    if not files:
        raise FileNotFoundError(f"{data_dir} holds no data iterator state (process_<i>-of-<n>.json).")
    saved_count = max(files)
    by_process = files[saved_count]
    if len(by_process) != saved_count:
        raise FileNotFoundError(
            f"{data_dir} holds the data positions of processes {sorted(by_process)} of {saved_count}: incomplete."
        )
    states = [json.loads(by_process[i].read_text()) for i in range(saved_count)]
    if any(s != states[0] for s in states[1:]):
        raise ProcessCountMismatchError(
            f"The checkpoint in {data_dir.parent} was written by {saved_count} processes whose data "
            f"positions differ, so it cannot resume on {process_count}: relaunch with "
            f"{saved_count} processes (or start over deliberately in a new --workdir)."
        )
    return states[0]
