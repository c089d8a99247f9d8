"""Audio clips to 16 kHz mono float32, with every unusable clip counted instead of crashing a run.

Decoding is ``soundfile`` (libsndfile, bundled in its wheels since 0.12 with MP3, FLAC, Ogg Vorbis/Opus and WAV):
one library for Common Voice's MP3s and for local WAVs, no FFmpeg, no torchaudio/torchcodec (which have no builds
for every torch). Resampling is ``soxr`` (libsoxr's polyphase resampler, the one librosa uses by default): a single
small wheel needing only numpy, band-limited and exact for any rate pair (22,050 -> 16,000 included), and far
lighter than pulling scipy in for ``resample_poly``.
"""

from __future__ import annotations

import io
import logging
import os
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import numpy as np

logger = logging.getLogger(__name__)

TARGET_SAMPLING_RATE = 16_000
"""Whisper's input rate."""

AUDIO_EXTENSIONS = (".mp3", ".wav", ".flac", ".ogg", ".opus")
"""Clip formats read (Common Voice ships MP3; converted copies are usually WAV or FLAC)."""

AudioSource = Union[str, Path, bytes]
"""A file path or the encoded bytes of a file (what hub datasets hold with ``Audio(decode=False)``)."""

SKIP_REASONS = ("missing", "empty", "unreadable", "too_long", "no_text", "text_too_long")


class ClipError(Exception):
    """A clip that cannot be used; ``reason`` is one of :data:`SKIP_REASONS`."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass
class ClipStats:
    """Counts of used and skipped clips, per reason, with a few example names; printable by the trainer.

    Note that DataLoader worker processes count in their own copies: use ``num_workers=0`` or ``preload`` for
    exact counts of clips that fail only when decoded."""

    name: str = "speech"
    loaded: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    max_examples: int = 5

    def skip(self, reason: str, what: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < self.max_examples:
            shown.append(what)

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    def __str__(self) -> str:
        text = f"{self.name}: {self.loaded} clips used, {self.total_skipped} skipped"
        if self.skipped:
            parts = [
                f"{n} {reason} (e.g. {', '.join(self.examples.get(reason, []))})" for reason, n in self.skipped.items()
            ]
            text += ": " + "; ".join(parts)
        return text


def _handle(source: AudioSource) -> tuple[object, str]:
    """What soundfile opens, and a name for messages; missing and 0-byte files are told apart from corrupt ones."""
    if isinstance(source, (bytes, bytearray)):
        if not source:
            raise ClipError("empty", "no bytes")
        return io.BytesIO(source), "<bytes>"
    path = Path(source)
    if not path.is_file():
        raise ClipError("missing", str(path))
    if path.stat().st_size == 0:
        raise ClipError("empty", f"{path} has 0 bytes")
    return str(path), str(path)


class NativeStderr:
    """What C code wrote to file descriptor 2 inside a ``with`` block, kept instead of shown.

    libsndfile's MP3 decoder (libmpg123) reports damaged frames by writing straight to fd 2 ("[layer3.c:...] error:
    dequantization failed!"), which Python's ``sys.stderr`` redirection cannot catch: one such line per bad frame
    buried every evaluation's output. The text is kept here for the clip's own message and for debug logging.
    Captures are serialized (fd 2 is the process's); when fd 2 cannot be duplicated, nothing is captured.
    """

    _lock = threading.Lock()

    def __init__(self) -> None:
        self.text = ""

    def __enter__(self) -> NativeStderr:
        self._lock.acquire()
        try:
            sys.stderr.flush()
            self._sink = tempfile.TemporaryFile()
            self._saved = os.dup(2)
            os.dup2(self._sink.fileno(), 2)
        except (OSError, ValueError):
            self._saved = None
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self._saved is not None:
                os.dup2(self._saved, 2)
                os.close(self._saved)
                self._sink.seek(0)
                self.text = self._sink.read().decode("utf-8", errors="replace").strip()
                self._sink.close()
        finally:
            self._lock.release()


def read_audio(source: AudioSource) -> tuple[np.ndarray, int]:
    """Decoded samples as float32 ``(frames, channels)`` and the file's rate. Raises :class:`ClipError`."""
    import soundfile as sf

    handle, name = _handle(source)
    decoder = NativeStderr()
    try:
        with decoder:
            data, rate = sf.read(handle, dtype="float32", always_2d=True)
    except (RuntimeError, OSError, ValueError, EOFError, TypeError) as err:  # LibsndfileError is a RuntimeError
        said = f" (decoder: {decoder.text.splitlines()[0]})" if decoder.text else ""
        raise ClipError("unreadable", f"{name}: {err}{said}") from err
    if decoder.text:
        logger.debug("%s decoded with errors: %s", name, decoder.text.replace("\n", "; "))
    if data.size == 0:
        raise ClipError("empty", f"{name} has no samples")
    if not np.isfinite(data).all():
        raise ClipError("unreadable", f"{name} has non-finite samples")
    return data, int(rate)


def probe_audio(source: AudioSource) -> float:
    """Duration in seconds from the header only (cheap: for a first pass over a whole release). Raises
    :class:`ClipError` for missing, empty and unrecognised files."""
    import soundfile as sf

    handle, name = _handle(source)
    try:
        with NativeStderr():
            info = sf.info(handle)
    except (RuntimeError, OSError, ValueError, EOFError, TypeError) as err:
        raise ClipError("unreadable", f"{name}: {err}") from err
    if info.frames <= 0 or info.samplerate <= 0:
        raise ClipError("empty", f"{name} has no samples")
    return info.frames / info.samplerate


def to_mono(data: np.ndarray) -> np.ndarray:
    """``(frames, channels)`` or ``(frames,)`` to ``(frames,)`` by averaging the channels."""
    return data.mean(axis=1, dtype=np.float32) if data.ndim == 2 else data.astype(np.float32, copy=False)


def resample(audio: np.ndarray, orig_rate: int, target_rate: int = TARGET_SAMPLING_RATE) -> np.ndarray:
    """Band-limited resampling of a 1-d signal (soxr, high quality); a no-op at the target rate."""
    audio = np.ascontiguousarray(audio, dtype=np.float32)
    if orig_rate == target_rate:
        return audio
    import soxr

    return soxr.resample(audio, orig_rate, target_rate, quality="HQ").astype(np.float32, copy=False)


def load_clip(source: AudioSource, target_rate: int = TARGET_SAMPLING_RATE) -> np.ndarray:
    """A clip as 1-d float32 mono at ``target_rate``. Raises :class:`ClipError`."""
    data, rate = read_audio(source)
    return resample(to_mono(data), rate, target_rate)
