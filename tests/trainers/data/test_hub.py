"""Hub datasets: without network a clear error naming the local alternative, not a bare ConnectionError; with
data in hub layout, the same rows as from a local folder.

The offline check runs in a child process, because ``datasets`` and ``huggingface_hub`` read the offline switches
at import time and another test may have imported them already.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]

CHILD = r"""
import importlib.util, sys
from trainers.data.hub import HubDataUnavailable

from trainers.data.code import build_code_dataset
from trainers.data.speech import build_speech_dataset

has_datasets = importlib.util.find_spec("datasets") is not None
expected = HubDataUnavailable if has_datasets else ImportError
calls = {
    "code": lambda: build_code_dataset("perl", None, "bigcode/the-stack-dedup", max_examples=10),
    "speech": lambda: build_speech_dataset("someone/common-voice-mr", None, None, "train", language="mr"),
}
for name, call in calls.items():
    try:
        call()
    except expected as err:
        print(f"{name}: {type(err).__name__}: {err}".replace("\n", " | "))
    else:
        sys.exit(f"{name}: no error")
"""


def test_hub_datasets_offline_give_a_clear_error() -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=str(REPO))
    done = subprocess.run(
        [sys.executable, "-c", CHILD], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = dict(line.split(": ", 1) for line in done.stdout.splitlines() if ": " in line)
    assert set(lines) == {"code", "speech"}, done.stdout
    if lines["code"].startswith("ImportError"):  # no `datasets` installed: the error says how to get it
        assert all("pip install" in msg and "local folder" in msg for msg in lines.values())
        return
    code, speech = lines["code"], lines["speech"]
    assert code.startswith("HubDataUnavailable") and "bigcode/the-stack-dedup" in code
    assert "HF_HUB_OFFLINE" in code and "folder of perl source files" in code
    assert speech.startswith("HubDataUnavailable") and "someone/common-voice-mr" in speech
    assert "train.tsv" in speech and "clips/" in speech


def _audio_bytes(seconds: float = 1.0, rate: int = 22_050) -> bytes:
    import numpy as np
    import soundfile as sf

    buf = io.BytesIO()
    t = np.arange(int(seconds * rate)) / rate
    sf.write(buf, (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), rate, format="WAV")
    return buf.getvalue()


def test_hub_format_datasets_through_the_same_path(tmp_path: Path) -> None:
    """The hub readers on local datasets in hub layout (``load_dataset`` accepts a folder): The Stack's
    ``data/<lang>`` parquet files streamed, and a speech dataset with audio bytes, read lazily or streamed."""
    datasets = pytest.importorskip("datasets")
    pytest.importorskip("soundfile")
    from transformers import WhisperFeatureExtractor

    from trainers.data.code import CodeSourceStats, stack_texts
    from trainers.data.speech import WhisperSpeechDataset, hub_speech_rows
    from trainers.offline.tiny_whisper import build_tiny_whisper_tokenizer

    stack = tmp_path / "stack"
    (stack / "data" / "perl").mkdir(parents=True)
    code = [f"sub f{i} {{ return {i}; }}\n" for i in range(30)]
    datasets.Dataset.from_dict({"content": code}).to_parquet(str(stack / "data" / "perl" / "train-0.parquet"))
    stats = CodeSourceStats("perl", str(stack))
    texts = stack_texts("pl", stats, str(stack), max_examples=7, cache_dir=str(tmp_path / "cache"))
    assert list(texts) == code[:7] and stats.docs == 7

    hub = tmp_path / "speech"
    (hub / "data").mkdir(parents=True)
    good = _audio_bytes()
    table = datasets.Dataset.from_dict(
        {"audio": [{"bytes": good, "path": "a.wav"}, {"bytes": b"junk" * 8, "path": "b.wav"}], "text": ["hi", "x"]}
    ).cast_column("audio", datasets.Audio(decode=False))
    table.to_parquet(str(hub / "data" / "validation-0.parquet"))
    tokenizer, features = build_tiny_whisper_tokenizer(), WhisperFeatureExtractor()
    for streaming in (False, True):
        rows = hub_speech_rows(str(hub), "dev", streaming=streaming, cache_dir=str(tmp_path / "cache"))
        assert [r.text for r in rows] == ["hi", "x"]
        ds = WhisperSpeechDataset(rows, features, tokenizer, "en")
        assert len(ds) == 1 and ds.stats.skipped == {"unreadable": 1}
        assert ds[0]["input_features"].shape == (80, 3000)
