"""Music training data: pieces encoded once and cached, cut into (input, target) windows.

Two collections:

* ``bach_chorales`` (the embedded default): the Bach scores that ship with music21's corpus
  (410 MusicXML works, nearly all four-part chorales; its Humdrum duplicates and Roman-numeral
  analyses are left out), converted to MIDI by music21 and encoded with :func:`~jaxdiff.music.encode_midi`.
  No download. Every tenth piece (by name) is held out as the ``validation`` split.
* ``maestro``: a MAESTRO folder (``data.path``) with its metadata: the ``split`` column of
  ``maestro-v*.csv`` when present, else the ``split`` field of ``maestro-v*.json`` (the book's
  v2.0.0 split: 967 train, 137 validation, 178 test performances).

Each piece is encoded once and kept as ``.npy`` under the cache folder (``data.cache_dir``, else
``$JAXDIFF_CACHE``, else ``~/.cache/jaxdiff``), never in the repository.

A :class:`WindowSource` turns pieces into the book's training pairs: from a window of
``seq_len + 1`` events, ``inputs`` are the first ``seq_len`` and ``targets`` the next ones; a
window that reaches the end of its piece gets the ``end`` id (388) as the target after the last
event and ``pad`` (389) after that, in both rows. ``window_stride=0`` keeps only the first
window of each piece (the book: one pair per file, its first 2048 events); a stride > 0 cuts
windows every ``stride`` events, the last one ending with the piece.
"""

from __future__ import annotations

import concurrent.futures
import csv
import hashlib
import json
import multiprocessing
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from jaxdiff.music.events import END_ID, PAD_ID, VOCAB_SIZE, encode_midi

COLLECTIONS = ("bach_chorales", "maestro")
SPLITS = ("train", "validation", "test")
CACHE_VERSION = "v1"


@dataclass(frozen=True)
class Piece:
    name: str
    ids: np.ndarray  # int32 [N]


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where encoded pieces are kept: ``cache_dir``, else ``$JAXDIFF_CACHE``, else ``~/.cache/jaxdiff``."""
    root = cache_dir or os.environ.get("JAXDIFF_CACHE") or Path.home() / ".cache" / "jaxdiff"
    return Path(root) / "music"


def _save_atomic(path: Path, ids: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, ids.astype(np.int32))
    os.replace(tmp, path)


def _encode_cached(jobs: list[tuple[str, Path, Any]], convert, workers: int) -> list[Piece]:
    """``jobs``: (name, cache file, argument of ``convert``); encodes the missing ones."""
    missing = [(i, arg) for i, (_, path, arg) in enumerate(jobs) if not path.is_file()]
    if missing:
        from jaxdiff.tasks import log

        log(f"Encoding {len(missing)} pieces once (cached under {jobs[0][1].parent})...")
        if workers > 1 and len(missing) > 32:  # worker start-up (imports) outweighs a few pieces
            # spawn, not fork: the parent has JAX's threads running.
            context = multiprocessing.get_context("spawn")
            with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
                results = pool.map(convert, [arg for _, arg in missing], chunksize=4)
                for (i, _), ids in zip(missing, results):
                    _save_atomic(jobs[i][1], ids)
        else:
            for i, arg in missing:
                _save_atomic(jobs[i][1], convert(arg))
    return [Piece(name, np.load(path).astype(np.int32)) for name, path, _ in jobs]


def chorale_paths() -> list[Path]:
    """The music21 corpus files of the Bach scores, sorted by name: the MusicXML files (410 works;
    the 3 Humdrum files repeat MusicXML ones and the 20 Roman-numeral analyses are not scores)."""
    from music21 import corpus

    paths = (Path(p) for p in corpus.getComposer("bach"))
    return sorted((p for p in paths if p.suffix in (".mxl", ".xml")), key=lambda p: p.name)


def chorale_midi(path: str | os.PathLike) -> bytes:
    """A corpus score as a MIDI file (music21's conversion: one track per part, velocity 90).

    A score whose repeat marks music21 cannot expand is converted without its repeats.
    """
    from music21 import bar, converter, midi, repeat

    score = converter.parse(str(path))
    try:
        return midi.translate.streamToMidiFile(score).writestr()
    except repeat.ExpanderException:
        for mark in list(score.recurse().getElementsByClass((bar.Repeat, repeat.RepeatExpression))):
            mark.activeSite.remove(mark)
        return midi.translate.streamToMidiFile(score).writestr()


def _encode_chorale(path: str) -> np.ndarray:
    return encode_midi(chorale_midi(path))


def _split_of(index: int) -> str:
    return "validation" if index % 10 == 9 else "train"


def bach_chorales(split: str = "train", *, max_pieces: int = 0, cache_dir=None, workers: int = 2) -> list[Piece]:
    """The encoded chorales of ``split`` ("train": 9 of every 10 pieces by name; "validation": the
    rest); ``max_pieces > 0`` keeps the first that many of the collection (before splitting)."""
    if split not in ("train", "validation", "train+validation"):
        raise ValueError(f"config.data.split={split!r}: the chorales have 'train' and 'validation'.")
    import music21

    paths = chorale_paths()
    if max_pieces:
        paths = paths[:max_pieces]
    folder = cache_root(cache_dir) / f"bach_chorales_{CACHE_VERSION}_music21-{music21.__version__}"
    chosen = [p for i, p in enumerate(paths) if split == "train+validation" or _split_of(i) == split]
    jobs = [(p.stem, folder / f"{p.name}.npy", str(p)) for p in chosen]
    return _encode_cached(jobs, _encode_chorale, workers)


def maestro_files(path: str | os.PathLike, split: str) -> list[str]:
    """MIDI files (relative to ``path``) of a MAESTRO split, from its csv (else json) metadata."""
    root = Path(path)
    if not str(path) or not root.is_dir():
        raise FileNotFoundError(
            f"config.data.path={str(path)!r} is not a folder: pass the MAESTRO folder (the one holding "
            "maestro-v*.csv or maestro-v*.json) with --config.data.path=DIR."
        )
    csvs, jsons = sorted(root.glob("maestro-v*.csv")), sorted(root.glob("maestro-v*.json"))
    if csvs:
        with open(csvs[-1], newline="") as f:
            rows = [(r["split"], r["midi_filename"]) for r in csv.DictReader(f)]
    elif jsons:
        meta = json.loads(jsons[-1].read_text())
        if isinstance(meta, dict):  # v3 json: column -> {row: value}
            rows = [(meta["split"][k], meta["midi_filename"][k]) for k in meta["split"]]
        else:  # v2 json (the book's): a list of records
            rows = [(r["split"], r["midi_filename"]) for r in meta]
    else:
        raise FileNotFoundError(f"no maestro-v*.csv or maestro-v*.json in config.data.path={str(path)!r}.")
    files = sorted(name for s, name in rows if s == split)
    if not files:
        raise ValueError(f"config.data.split={split!r} names no MAESTRO files; use one of {SPLITS}.")
    return files


def maestro(split: str = "train", *, path: str | os.PathLike = "", max_pieces: int = 0, cache_dir=None,
            workers: int = 2) -> list[Piece]:  # fmt: skip
    """The encoded MAESTRO performances of ``split`` (sorted by file name)."""
    files = maestro_files(path, split)
    if max_pieces:
        files = files[:max_pieces]
    key = hashlib.sha1(str(Path(path).resolve()).encode()).hexdigest()[:12]
    folder = cache_root(cache_dir) / f"maestro_{CACHE_VERSION}_{key}"
    jobs = [(f, folder / (f.replace("/", "__") + ".npy"), str(Path(path) / f)) for f in files]
    return _encode_cached(jobs, encode_midi, workers)


def load_pieces(data_config: Any, split: str) -> list[Piece]:
    """The pieces ``config.data`` names, for ``split``."""
    name = data_config["name"]
    kwargs = dict(max_pieces=int(data_config.get("max_pieces", 0)), cache_dir=data_config.get("cache_dir") or None)
    if name == "bach_chorales":
        return bach_chorales(split, **kwargs)
    if name == "maestro":
        return maestro(split, path=data_config.get("path", ""), **kwargs)
    raise ValueError(f"config.data.name={name!r} is not one of {COLLECTIONS}.")


# ---------------------------------------------------------------------------------------------
# Windows.
# ---------------------------------------------------------------------------------------------


def window_offsets(length: int, seq_len: int, stride: int) -> list[int]:
    """Start offsets of the windows of a piece of ``length`` events.

    ``stride=0``: ``[0]`` (the book). Else every ``stride`` events while a window still holds
    ``seq_len + 1`` events, plus one that ends with the piece (its targets end with ``end``).
    """
    if stride == 0 or length <= seq_len:
        return [0]
    last = length - seq_len  # this window's targets end with the end id
    offsets = list(range(0, last, stride))
    return offsets + [last]


def make_pair(ids: np.ndarray, offset: int, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """``(inputs, targets)`` int32 ``[seq_len]`` of the window at ``offset`` (the book's padding).

    Full window: ``ids[o : o + S]`` and ``ids[o + 1 : o + S + 1]``. A window reaching the end
    (``m`` events left, ``m <= S``): inputs ``ids[o:] + [pad] * (S - m)``, targets
    ``ids[o + 1:] + [end] + [pad] * (S - m)``.
    """
    chunk = np.asarray(ids[offset : offset + seq_len + 1], np.int32)
    if len(chunk) == seq_len + 1:
        return chunk[:-1], chunk[1:]
    m = len(chunk)
    inputs = np.full(seq_len, PAD_ID, np.int32)
    targets = np.full(seq_len, PAD_ID, np.int32)
    inputs[:m] = chunk
    targets[: m - 1] = chunk[1:]
    targets[m - 1] = END_ID
    return inputs, targets


class WindowSource:
    """Random-access ``{"inputs", "targets"}`` windows of a list of pieces (for the grain pipeline)."""

    def __init__(self, pieces: list[Piece], seq_len: int, stride: int):
        self.pieces = pieces
        self.seq_len = seq_len
        self.index = [(p, o) for p, piece in enumerate(pieces) for o in window_offsets(len(piece.ids), seq_len, stride)]
        if not self.index:
            raise ValueError("no pieces to make windows from.")

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        piece, offset = self.index[i]
        inputs, targets = make_pair(self.pieces[piece].ids, offset, self.seq_len)
        return {"inputs": inputs, "targets": targets}


def unigram_log_probs(pieces: list[Piece]) -> np.ndarray:
    """Log frequencies ``[390]`` of the training targets (each piece's events and its end id),
    add-one smoothed: the baseline a network must beat."""
    counts = np.ones(VOCAB_SIZE, np.float64)
    counts[PAD_ID] = 0.0
    for piece in pieces:
        counts += np.bincount(piece.ids, minlength=VOCAB_SIZE)[:VOCAB_SIZE]
        counts[END_ID] += 1
    with np.errstate(divide="ignore"):
        return np.log(counts / counts.sum())
