"""Decoding, downmix and resampling: 16 kHz mono float32 out, the frequency of a tone preserved, bad clips typed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from trainers.data.audio import ClipError, ClipStats, load_clip, probe_audio, read_audio, resample, to_mono

sf = pytest.importorskip("soundfile")


def _peak_hz(signal: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(signal * np.hanning(len(signal))))
    return float(np.fft.rfftfreq(len(signal), 1 / rate)[np.argmax(spectrum)])


@pytest.mark.parametrize("rate", [8_000, 22_050, 44_100, 48_000])
def test_resampling_keeps_frequency_and_duration(rate: int) -> None:
    seconds, tone = 1.0, 440.0
    t = np.arange(int(rate * seconds)) / rate
    out = resample(np.sin(2 * np.pi * tone * t).astype(np.float32), rate, 16_000)
    assert out.dtype == np.float32 and out.ndim == 1
    assert abs(len(out) - 16_000 * seconds) <= 2
    assert abs(_peak_hz(out, 16_000) - tone) <= 1.0
    # band-limited: the tone's amplitude survives (no aliasing loss, no gain)
    assert 0.95 < np.abs(out[100:-100]).max() < 1.05


def test_resampling_removes_content_above_new_nyquist() -> None:
    rate = 44_100
    t = np.arange(rate) / rate
    out = resample(np.sin(2 * np.pi * 12_000 * t).astype(np.float32), rate, 16_000)  # above 8 kHz
    assert np.abs(out[200:-200]).max() < 0.01  # filtered, not aliased to 4 kHz


def test_load_clip_downmixes_stereo_file(tmp_path: Path) -> None:
    rate = 44_100
    t = np.arange(rate // 2) / rate
    left, right = np.sin(2 * np.pi * 300 * t), np.sin(2 * np.pi * 300 * t) * 0.5
    sf.write(tmp_path / "stereo.flac", np.stack([left, right], axis=1), rate)
    audio = load_clip(tmp_path / "stereo.flac")
    assert audio.dtype == np.float32 and audio.ndim == 1 and abs(len(audio) - 8_000) <= 2
    assert abs(_peak_hz(audio, 16_000) - 300) <= 2 and 0.7 < np.abs(audio[100:-100]).max() < 0.8
    assert to_mono(np.ones((4, 2), dtype=np.float32)).shape == (4,)
    assert probe_audio(tmp_path / "stereo.flac") == pytest.approx(0.5, abs=1e-3)
    data, sr = read_audio((tmp_path / "stereo.flac").read_bytes())  # hub datasets hand over encoded bytes
    assert sr == rate and data.shape == (rate // 2, 2)


def test_bad_clips_raise_typed_errors(tmp_path: Path) -> None:
    (tmp_path / "empty.wav").write_bytes(b"")
    (tmp_path / "junk.mp3").write_bytes(b"\x00junk" * 100)
    sf.write(tmp_path / "silent.wav", np.zeros((0, 1), dtype=np.float32), 16_000)
    cases = {"missing.wav": "missing", "empty.wav": "empty", "junk.mp3": "unreadable", "silent.wav": "empty"}
    stats = ClipStats(name="t")
    for name, reason in cases.items():
        with pytest.raises(ClipError) as info:
            load_clip(tmp_path / name)
        assert info.value.reason == reason, name
        stats.skip(info.value.reason, name)
    with pytest.raises(ClipError, match="empty"):
        read_audio(b"")
    assert stats.total_skipped == 4 and stats.skipped["empty"] == 2
    assert "4 skipped" in str(stats) and "junk.mp3" in str(stats)


def test_a_damaged_mp3_does_not_print_decoder_noise(tmp_path: Path, capfd) -> None:
    # libmpg123 (inside libsndfile) writes one line per damaged frame straight to fd 2
    rate = 16_000
    tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(rate) / rate)).astype(np.float32)
    clip = tmp_path / "damaged.mp3"
    sf.write(clip, tone, rate, format="MP3")
    data = bytearray(clip.read_bytes())
    rng = np.random.default_rng(0)
    for i in range(200, len(data), 7):
        data[i] = int(rng.integers(256))
    clip.write_bytes(bytes(data))
    capfd.readouterr()
    try:
        load_clip(clip)
    except ClipError as err:
        assert err.reason == "unreadable"
    assert capfd.readouterr().err == ""
    print("fd 2 works again", file=__import__("sys").stderr)
    assert "works again" in capfd.readouterr().err
