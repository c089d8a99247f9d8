"""The make recipe targets as a user types them, on a tiny local model on this CPU: no GPU guard fires."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .recipe_fixtures import code_assets, speech_assets

ROOT = Path(__file__).resolve().parents[2]
VENV = Path(sys.prefix)


def make(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the CPU path is not taken")
    if shutil.which("make") is None or not (VENV / "bin" / "flora-train").exists():
        pytest.skip("needs make and the project's console scripts in this interpreter's environment")
    # -o setup: the environment running these tests is the one to use, installed already
    command = ["make", "-s", "-C", str(ROOT), "-o", "setup", f"VENV={VENV}", *args]
    env = os.environ | {"HF_HUB_OFFLINE": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)


def test_make_train_starcoder_trains_a_small_local_model_on_the_cpu(tmp_path_factory, tmp_path: Path) -> None:
    assets = code_assets(tmp_path_factory)
    run = make(
        "train-starcoder", "LANG=alpha", f"MODEL={assets['model']}", f"DATA={assets['data']}", "MAX_STEPS=2",
        "BATCH_SIZE=2", f"OUTPUT_DIR={tmp_path / 'run'}", "SET=eval_fraction=0.2 eval_steps=100 save_steps=100",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert "needs a CUDA GPU" not in run.stderr and "too large" not in run.stderr
    assert "no CUDA GPU: training" in run.stderr and "on the CPU" in run.stderr  # the cost warning
    assert "packing 128-token blocks" in run.stderr  # the recipe's 2048 cut to the model's positions
    assert (tmp_path / "run" / "alpha" / "adapter_config.json").exists()


def test_make_train_whisper_trains_a_small_local_model_on_the_cpu(tmp_path_factory, tmp_path: Path) -> None:
    assets = speech_assets(tmp_path_factory)
    run = make(
        "train-whisper", "LANG=mr", f"MODEL={assets['model']}", f"DATA={assets['data']}", "MAX_STEPS=2",
        "BATCH_SIZE=2", f"OUTPUT_DIR={tmp_path / 'run'}",
        "SET=max_label_tokens=40 generation_max_length=12 eval_steps=100 save_steps=100",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert "needs a CUDA GPU" not in run.stderr and "no CUDA GPU: training" in run.stderr
    assert (tmp_path / "run" / "mr" / "adapter_config.json").exists()


def test_allow_cpu_reaches_flora_train_from_make() -> None:
    run = make("-n", "train-starcoder", "LANG=perl", "ALLOW_CPU=1", "SET=eval_steps=25 block_size=64")
    assert run.returncode == 0, run.stderr
    assert "--allow-cpu" in run.stdout and "--set eval_steps=25 --set block_size=64" in run.stdout


def test_trainer_flags_and_the_sandbox_opt_out_reach_the_clis_from_make() -> None:
    run = make(
        "-n", "train-starcoder", "LANG=perl", "SET=report_to=tensorboard", "LAUNCHER=torchrun", "NUM_GPUS=2",
        "NO_PROGRESS=1",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    for flag in ("--set report_to=tensorboard", "--launcher torchrun", "--num-gpus 2", "--no-progress"):
        assert flag in run.stdout, flag
    evaluate = make("-n", "eval-starcoder", "LANG=perl", "UNSAFE_NO_SANDBOX=1")
    assert evaluate.returncode == 0 and "--unsafe-no-sandbox" in evaluate.stdout, evaluate.stdout
