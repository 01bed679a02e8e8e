"""MIDI <-> performance events: the book's 390-id vocabulary, its encoder and decoder.

The vocabulary is the performance encoding of Oore et al. 2018 ("This Time with Feeling") as
used by Huang et al. 2018 ("Music Transformer"), in the form the book's ``processor.py`` gives
it (itself from jason9693/midi-neural-processor):

==========  ==========  ===============================================================
ids         event       meaning
==========  ==========  ===============================================================
0-127       note_on     pitch = id
128-255     note_off    pitch = id - 128
256-355     time_shift  advance (id - 255) x 10 ms: 10 ms ... 1 s
356-387     velocity    bin = id - 356 = MIDI velocity // 4; decodes to 4 x bin
388         end         training target after the last event of a short piece
389         pad         fills short pieces; ignored by the loss
==========  ==========  ===============================================================

:func:`encode_midi` reproduces the book's encoder id for id, quirks included (each is marked
``Book quirk`` where the code does it), so weights trained with the book's code see the ids
they were trained on. ``book_quirks=False`` gives a corrected encoding instead (no dropped or
duplicated notes under the sustain pedal, velocity events only when the bin changes, times
quantised on an absolute 10 ms grid); it is not what the book's weights were trained on.

Example::

    ids = encode_midi("prelude.mid")          # np.int32 [N], every id < 388
    pm = decode_midi(ids, path="again.mid")   # pretty_midi.PrettyMIDI
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

NOTE_ON = 0
NOTE_OFF = 128
TIME_SHIFT = 256
VELOCITY = 356
END_ID = 388
PAD_ID = 389
NUM_EVENTS = 388  # ids an encoder can emit (and a sampler may draw)
VOCAB_SIZE = 390
MAX_SHIFT = 100  # time_shift steps of 10 ms: 1 ... 100
SUSTAIN_CONTROL = 64

EVENT_KINDS = ("note_on", "note_off", "time_shift", "velocity", "end", "pad")


def event_kind(ids: Any) -> np.ndarray:
    """Index into :data:`EVENT_KINDS` of each id (vectorised)."""
    ids = np.asarray(ids)
    return np.searchsorted(np.array([NOTE_OFF, TIME_SHIFT, VELOCITY, END_ID, PAD_ID]), ids, side="right")


def describe(ids: Iterable[int]) -> list[str]:
    """Readable names of ids: ``["velocity 22", "note_on 60", "time_shift 500ms", ...]``."""
    out = []
    for i in (int(x) for x in ids):
        if i < NOTE_OFF:
            out.append(f"note_on {i}")
        elif i < TIME_SHIFT:
            out.append(f"note_off {i - NOTE_OFF}")
        elif i < VELOCITY:
            out.append(f"time_shift {(i - TIME_SHIFT + 1) * 10}ms")
        elif i < END_ID:
            out.append(f"velocity {i - VELOCITY}")
        else:
            out.append("end" if i == END_ID else "pad")
    return out


# ---------------------------------------------------------------------------------------------
# Encoder.
# ---------------------------------------------------------------------------------------------


def _parse(source: Any):
    """A ``PrettyMIDI`` from a path, bytes, a binary file object or a ``PrettyMIDI``."""
    import pretty_midi

    if isinstance(source, pretty_midi.PrettyMIDI):
        return source
    if isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(bytes(source))
    elif isinstance(source, os.PathLike):
        source = os.fspath(source)
    return pretty_midi.PrettyMIDI(midi_file=source)


class _Note:
    """A mutable note (the book's pedal pass changes note ends in place, shared by duplicates)."""

    __slots__ = ("start", "end", "pitch", "velocity")

    def __init__(self, start: float, end: float, pitch: int, velocity: int):
        self.start, self.end, self.pitch, self.velocity = start, end, pitch, velocity


class _Span:
    """One sustain-pedal span and the notes that start inside it."""

    def __init__(self, start: float):
        self.start = start
        self.end: float | None = None
        self.notes: list[_Note] = []

    def release(self) -> None:
        # Walk the joined notes from the last to the first: a note ends where the nearest later
        # note of its pitch in this span starts, else where the pedal lifts (or its own end).
        later_start: dict[int, float] = {}
        for note in reversed(self.notes):
            if note.pitch in later_start:
                note.end = later_start[note.pitch]
            else:
                note.end = max(self.end, note.end)
            later_start[note.pitch] = note.start


def sustain_spans(controls: Sequence[Any]) -> list[_Span]:
    """Pedal spans from an instrument's control changes (number 64 only), in message order.

    A value >= 64 opens a span when none is open; a value < 64 closes the open one. Book
    quirk: a value < 64 with no span open moves the end of the last closed span to its time,
    and a span still open at the end of the file is dropped.
    """
    spans: list[_Span] = []
    open_span = None
    for c in controls:
        if c.number != SUSTAIN_CONTROL:
            continue
        if c.value >= 64 and open_span is None:
            open_span = _Span(c.time)
        elif c.value < 64 and open_span is not None:
            open_span.end = c.time
            spans.append(open_span)
            open_span = None
        elif c.value < 64 and spans:
            spans[-1].end = c.time
    return spans


def _book_pedal_pass(spans: list[_Span], notes: list[_Note]) -> list[_Note]:
    """The book's sustain pass over one instrument's notes, literally (quirks (a)-(c) below)."""
    if not spans:
        return sorted(notes, key=lambda n: n.start)
    out: list[_Note] = []
    remaining = notes
    for span in spans:
        for i, note in enumerate(remaining):
            if note.start < span.start:
                out.append(note)
            elif note.start > span.end:
                # Book quirk (a): the walk stops at the first note (in note-off order, pretty_midi's
                # list order) that starts after the span; only the notes from it on remain for the
                # next span. After the last span they are never output: dropped.
                # Book quirk (c): a note that starts inside the span but comes later in the list
                # than the stopping note is not joined to this span.
                remaining = remaining[i:]
                span.release()
                break
            else:
                span.notes.append(note)
        # Book quirk (b): a walk that never stops (no note starts after this span) neither
        # releases the span nor cuts the list, so the next span outputs the same notes again.
    for span in spans:
        out.extend(span.notes)
    out.sort(key=lambda n: n.start)
    return out


def _fixed_pedal_pass(spans: list[_Span], notes: list[_Note]) -> list[_Note]:
    """Sustain as a piano does it: a note released while the pedal is down sounds on until the
    pedal lifts or its key is struck again. Every note is kept exactly once."""
    starts: dict[int, list[float]] = {}
    for n in notes:
        starts.setdefault(n.pitch, []).append(n.start)
    out = []
    for n in notes:
        end = n.end
        held = next((s for s in spans if s.start <= n.end < s.end), None)
        if held is not None:
            end = held.end
            restrikes = [s for s in starts[n.pitch] if n.end < s < end]
            if restrikes:
                end = min(restrikes)
        out.append(_Note(n.start, end, n.pitch, n.velocity))
    out.sort(key=lambda n: n.start)
    return out


def _split(notes: list[_Note]) -> list[tuple[float, bool, int, int | None]]:
    """Notes -> (time, is_on, pitch, velocity) events, stably sorted by time.

    Notes are stably sorted by start first, then each gives [on, off]; at equal times the order
    of the notes decides (an off of an earlier-starting note precedes a later note's on).
    """
    events = []
    for n in sorted(notes, key=lambda n: n.start):
        events.append((n.start, True, n.pitch, n.velocity))
        events.append((n.end, False, n.pitch, None))
    events.sort(key=lambda e: e[0])
    return events


def _shift_ids(gap: int) -> list[int]:
    ids = []
    while gap >= MAX_SHIFT:
        ids.append(TIME_SHIFT + MAX_SHIFT - 1)
        gap -= MAX_SHIFT
    if gap > 0:
        ids.append(TIME_SHIFT + gap - 1)
    return ids


def encode_midi(source: Any, *, book_quirks: bool = True) -> np.ndarray:
    """MIDI -> the book's event ids, ``np.int32 [N]`` (every id < 388).

    Args:
      source: a path, the file's bytes, a binary file object or a ``pretty_midi.PrettyMIDI``.
      book_quirks: True (default) reproduces the book's ``encode_midi`` exactly; False gives
        the corrected encoding (module docstring).

    Steps: every instrument (drums too) in pretty_midi's order, each one's notes in
    pretty_midi's list order; the sustain-pedal pass per instrument; all notes merged, stably
    sorted by start and split into note_on/note_off events stably sorted by time; then
    emitted with time shifts (at most 1 s each) and velocity events. Nothing encodes
    instruments, tempo, pitch bends or controllers other than the pedal.

    Example:
      >>> ids = encode_midi(open("bach.mid", "rb").read())
      >>> describe(ids[:3])
      ['velocity 22', 'note_on 67', 'velocity 22']
    """
    pm = _parse(source)
    notes: list[_Note] = []
    for inst in pm.instruments:
        own = [_Note(float(n.start), float(n.end), int(n.pitch), int(n.velocity)) for n in inst.notes]
        spans = sustain_spans(inst.control_changes)
        notes += _book_pedal_pass(spans, own) if book_quirks else _fixed_pedal_pass(spans, own)

    ids: list[int] = []
    previous_time = 0.0
    previous_velocity: int | None = 0
    for time, is_on, pitch, velocity in _split(notes):
        if book_quirks:
            # Book quirk: each gap is rounded on its own (Python's round: half to even) from the
            # previous event's unquantised time; rounding errors do not accumulate but are not
            # carried either.
            gap = int(round((time - previous_time) * 100))
        else:
            gap = int(round(time * 100)) - int(round(previous_time * 100))
        ids += _shift_ids(gap)
        if is_on:
            bin_ = velocity // 4
            # Book quirk: the previous *raw* velocity (0-127; None after a note_off) is compared
            # with this note's *bin* (0-31), so a velocity event precedes nearly every note_on.
            if previous_velocity != bin_:
                ids.append(VELOCITY + bin_)
            ids.append(NOTE_ON + pitch)
        else:
            ids.append(NOTE_OFF + pitch)
        previous_time = time
        if book_quirks:
            previous_velocity = velocity
        elif is_on:
            previous_velocity = velocity // 4
    return np.asarray(ids, dtype=np.int32)


# ---------------------------------------------------------------------------------------------
# Decoder.
# ---------------------------------------------------------------------------------------------


def decode_notes(ids: Iterable[int]) -> list[tuple[int, int, float, float]]:
    """Event ids -> notes ``(velocity, pitch, start_s, end_s)`` sorted stably by start.

    The book's walk: time starts at 0.0 s, a time_shift adds ``(v + 1) / 100`` s, any id >= 356
    sets the velocity to ``4 x (id - 356)``; a note_on remembers its time and velocity for its
    pitch (replacing an earlier one). A note_off of a remembered pitch gives a note unless it
    falls at the on's time. Book quirk: the on stays remembered, so a second note_off gives a
    second note from the same on. A note_off with no on is ignored, and ons that are never
    switched off are dropped.
    """
    t = 0.0
    velocity = 0
    ons: dict[int, tuple[float, int]] = {}
    notes = []
    for i in (int(x) for x in ids):
        if not 0 <= i < VOCAB_SIZE:
            raise ValueError(f"event id {i} is outside the vocabulary [0, {VOCAB_SIZE}).")
        if i < NOTE_OFF:
            ons[i] = (t, velocity)
        elif i < TIME_SHIFT:
            pitch = i - NOTE_OFF
            if pitch in ons:
                on_time, on_velocity = ons[pitch]
                if t - on_time != 0:
                    notes.append((on_velocity, pitch, on_time, t))
        elif i < VELOCITY:
            t += (i - TIME_SHIFT + 1) / 100
        else:
            velocity = (i - VELOCITY) * 4  # 388 / 389 give 128 / 132 (book): not writable
    notes.sort(key=lambda n: n[2])
    return notes


def decode_midi(ids: Iterable[int], path: str | os.PathLike | None = None):
    """Event ids -> a ``pretty_midi.PrettyMIDI`` (one piano, program 1), written to ``path`` if given.

    Notes come from :func:`decode_notes`; the file has pretty_midi's defaults (220 ticks per
    beat, 120 bpm), as the book's.
    """
    import pretty_midi

    pm = pretty_midi.PrettyMIDI()
    inst = pretty_midi.Instrument(program=1, is_drum=False, name="jaxdiff music")
    inst.notes = [pretty_midi.Note(velocity=v, pitch=p, start=s, end=e) for v, p, s, e in decode_notes(ids)]
    pm.instruments.append(inst)
    if path is not None:
        pm.write(os.fspath(path))
    return pm


def event_times(ids: Sequence[int]) -> np.ndarray:
    """The decoder's clock (seconds) at each id, after applying it: ``float64 [N]``."""
    ids = np.asarray(ids)
    steps = np.where((ids >= TIME_SHIFT) & (ids < VELOCITY), ids - TIME_SHIFT + 1, 0)
    return np.cumsum(steps) / 100.0
