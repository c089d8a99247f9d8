"""DeepSpeed configs and the launch command flora-train re-runs itself under; a real ZeRO step where DeepSpeed is
installed (it is not part of the dev install: pip install 'flora-hf[deepspeed]')."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from trainers.launch import (
    LAUNCHED_ENV,
    LaunchError,
    build_launch_command,
    in_launched_process,
    needs_launch,
    read_deepspeed_config,
)
from trainers.recipe import CONFIG_DIR, REPO_ROOT
from trainers.train import main

from .recipe_fixtures import code_assets


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_configs_load_with_auto_values(stage: int) -> None:
    config = read_deepspeed_config(CONFIG_DIR / f"ds_zero{stage}.json")
    assert config["zero_optimization"]["stage"] == stage
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        assert config[key] == "auto"  # HF Trainer fills these from the recipe
    assert config["gradient_clipping"] == "auto" and config["bf16"]["enabled"] == "auto"
    assert config["optimizer"]["params"]["lr"] == "auto"
    assert "scheduler" not in config  # the recipe's schedule (HF's) is kept


def test_bad_deepspeed_configs(tmp_path: Path) -> None:
    with pytest.raises(LaunchError, match="not found"):
        read_deepspeed_config(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(LaunchError, match="not valid JSON"):
        read_deepspeed_config(tmp_path / "bad.json")
    (tmp_path / "nozero.json").write_text(json.dumps({"train_batch_size": "auto"}))
    with pytest.raises(LaunchError, match="zero_optimization"):
        read_deepspeed_config(tmp_path / "nozero.json")


def test_launch_commands() -> None:
    args = ["--recipe", "whisper", "--lang", "mr"]
    ds = build_launch_command(args, launcher="deepspeed", num_gpus=4, deepspeed="configs/ds_zero2.json")
    head = ["deepspeed", "--num_gpus", "4", "--no_local_rank", "--module", "trainers.train"]
    assert ds == [*head, *args, "--deepspeed", "configs/ds_zero2.json"]  # HF Trainer reads it in each process
    ds = build_launch_command([*args, "--deepspeed", "configs/ds_zero3.json"], num_gpus=2)
    assert ds.count("--deepspeed") == 1 and ds[-1] == "configs/ds_zero3.json"
    acc = build_launch_command(args, launcher="accelerate", num_gpus=2, python="py")
    assert acc == ["py", "-m", "accelerate.commands.launch", "--num_processes", "2", "-m", "trainers.train", *args]
    run = build_launch_command(args, launcher="torchrun", num_gpus=8, python="py")
    assert run[:6] == ["py", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "8"]
    with pytest.raises(LaunchError):
        build_launch_command(args, launcher="mpirun")


def test_when_to_launch() -> None:
    assert needs_launch("configs/ds_zero2.json", None, env={})
    assert needs_launch(None, 2, env={}) and not needs_launch(None, 1, env={}) and not needs_launch(None, None, env={})
    assert not needs_launch("configs/ds_zero2.json", 8, env={"LOCAL_RANK": "0"})  # already launched
    assert in_launched_process({LAUNCHED_ENV: "1"}) and not in_launched_process({})


def test_print_launch_from_the_cli(capsys, monkeypatch) -> None:
    for key in ("LOCAL_RANK", "RANK", "WORLD_SIZE", LAUNCHED_ENV):
        monkeypatch.delenv(key, raising=False)
    argv = ["--recipe", "whisper", "--lang", "mr", "--deepspeed", "configs/ds_zero2.json", "--num-gpus", "2"]
    assert main([*argv, "--print-launch"]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed.startswith("deepspeed --num_gpus 2 --no_local_rank --module trainers.train --recipe whisper")
    assert "--deepspeed configs/ds_zero2.json" in printed


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
@pytest.mark.skipif(shutil.which("deepspeed") is None, reason="the deepspeed launcher is not on PATH")
def test_real_deepspeed_zero2_step_on_cpu(tmp_path_factory, tmp_path: Path) -> None:
    """flora-train re-launched under the deepspeed launcher, one process, ZeRO-2, on the tiny code model."""
    assets = code_assets(tmp_path_factory)
    out = tmp_path / "run"
    command = [sys.executable, "-m", "trainers.train", "--recipe", "tiny-code", "--model", str(assets["model"])]
    command += ["--data", str(assets["data"]), "--lang", "alpha", "--max-steps", "2", "--output-dir", str(out)]
    command += ["--set", "block_size=32", "--set", "eval_fraction=0.2", "--set", "save_steps=2", "--no-progress"]
    command += ["--deepspeed", str(CONFIG_DIR / "ds_zero2.json"), "--num-gpus", "1"]
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE", LAUNCHED_ENV)}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "alpha" / "adapter_model.safetensors").is_file()
    assert (out / "checkpoint-2" / "global_step2").is_dir()  # a DeepSpeed checkpoint
