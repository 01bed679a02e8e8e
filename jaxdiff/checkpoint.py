"""Crash-safe checkpoints: orbax ``CheckpointManager`` with the data iterator saved alongside.

A checkpoint holds two items:

* ``state``: the whole ``TrainState`` (step, params, optimizer state, EMA params),
* ``data``: the grain iterator's state, so a resumed run sees exactly the batches an
  uninterrupted run would.

Orbax writes each checkpoint into a temporary folder and renames it into place when it is
complete, so a crash mid-write leaves no half-written checkpoint behind. If the newest visible
checkpoint still cannot be read (a disk error, a file deleted by hand), `restore_latest` warns and
falls back to the previous one.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from jaxdiff import distributed

CHECKPOINT_DIR = "checkpoints"
CONFIG_FILE = "config.json"


def make_manager(
    workdir: str | os.PathLike, *, max_to_keep: int = 3, async_save: bool = True, create: bool = True
) -> ocp.CheckpointManager:
    """A ``CheckpointManager`` for ``workdir/checkpoints`` keeping the last ``max_to_keep``.

    ``create=False`` (for readers) does not create the folder.
    """
    directory = Path(workdir).resolve() / CHECKPOINT_DIR
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        create=create,
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,
    )
    return ocp.CheckpointManager(directory, options=options, item_names=("state", "data"))


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_iterator: Any = None) -> None:
    """Saves ``state`` (and the data iterator, if given) as checkpoint ``step``."""
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
        items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    manager.save(step, args=ocp.args.Composite(**items), force=True)


def restore_latest(
    manager: ocp.CheckpointManager, abstract_state: Any, data_iterator: Any = None
) -> tuple[int | None, Any]:
    """Restores the newest readable checkpoint; returns ``(step, state)`` or ``(None, None)``.

    ``abstract_state`` gives shapes, dtypes and shardings (e.g. from ``jax.eval_shape``).
    ``data_iterator``, when given, is set to the saved position in place, also when the
    checkpoint was written by another number of processes (see
    :func:`jaxdiff.distributed.saved_iterator_state`; a position that cannot be mapped raises
    ``ProcessCountMismatchError``). A checkpoint that fails to restore is reported with a
    warning and the previous one is tried.
    """
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
            if data_iterator is not None:
                position = distributed.saved_iterator_state(
                    Path(manager.directory) / str(step) / "data", jax.process_index(), jax.process_count()
                )
        except distributed.ProcessCountMismatchError:
            raise  # readable, but not on this many processes: never resume with another data order
        except Exception as e:  # Any failure to read means: do not trust this checkpoint.
            logging.warning(
                "Checkpoint at step %d is incomplete or corrupt (%s: %s); trying the previous one.",
                step,
                type(e).__name__,
                str(e).splitlines()[0] if str(e) else "",
            )
            continue
        if data_iterator is not None:
            data_iterator.set_state(position)
            if hasattr(data_iterator, "start_prefetch"):  # as grain's own restore does
                data_iterator.start_prefetch()
        return step, restored["state"]
    return None, None


def saved_steps(workdir: str | os.PathLike) -> list[int]:
    """The steps of the finished checkpoints under ``workdir/checkpoints`` (no reading, no orbax)."""
    directory = Path(workdir) / CHECKPOINT_DIR
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit())


def write_config(workdir: str | os.PathLike, config: Any) -> None:
    """Writes the run's config as JSON, atomically (temporary file, then rename)."""
    path = Path(workdir) / CONFIG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(config.to_json_best_effort(indent=2) if hasattr(config, "to_json_best_effort") else json.dumps(config, indent=2))
    os.replace(tmp, path)


def read_config(workdir: str | os.PathLike):
    """Reads the config a run wrote with `write_config` (an ``ml_collections.ConfigDict``)."""
    import ml_collections

    path = Path(workdir) / CONFIG_FILE
    if not Path(workdir).is_dir():
        raise FileNotFoundError(f"workdir {str(workdir)!r} does not exist: pass the --workdir of a scripts/train.py run.")
    if not path.is_file():
        raise FileNotFoundError(
            f"No {CONFIG_FILE} in workdir {str(workdir)!r}: is this the --workdir of a "
            "scripts/train.py run?"
        )
    try:
        return ml_collections.ConfigDict(_tuples(json.loads(path.read_text())))
    except (ValueError, TypeError) as e:  # json.JSONDecodeError is a ValueError
        raise ValueError(f"{path} is not a readable run config ({type(e).__name__}: {e}).") from e


def _tuples(tree: Any) -> Any:
    """JSON turns tuples into lists; configs use tuples (e.g. ``hidden_dims``)."""
    if isinstance(tree, dict):
        return {k: _tuples(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return tuple(_tuples(v) for v in tree)
    return tree

