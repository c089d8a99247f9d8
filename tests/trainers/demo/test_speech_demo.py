"""The speech half of ``make demo``: the pretrained tiny.en, a FLoRA adapter per accent, transcripts side by side."""

from __future__ import annotations

import pytest

from trainers.demo import speech_demo
from trainers.offline.synth_speech import EspeakNotFound


def test_transcripts_of_base_and_adapter_beside_the_reference(tmp_path, capsys) -> None:
    if speech_demo.missing_requirement():
        pytest.skip(speech_demo.missing_requirement())
    assert speech_demo.main(["--accents", "en-029", "--steps", "3", "--output-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "en-029: held-out sentences" in out and "base tiny.en" in out and "+ FLoRA en-029" in out
    assert "WER on held-out sentences" in out and out.count("%") >= 2
    assert (tmp_path / "en-029" / "adapter_config.json").is_file()


def test_without_espeak_it_says_why_and_exits_cleanly(monkeypatch, capsys) -> None:
    def missing():
        raise EspeakNotFound("espeak-ng is needed")

    monkeypatch.setattr(speech_demo, "espeak_binary", missing)
    assert speech_demo.main([]) == 0
    assert "speech demo skipped: espeak-ng is needed" in capsys.readouterr().out
