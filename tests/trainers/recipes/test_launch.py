"""DeepSpeed configs and the launch command flora-train re-runs itself under; real ZeRO-2 and ZeRO-3 runs on the
CPU where DeepSpeed is installed (the dev extra installs it)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import GPTBigCodeForCausalLM

from tests.trainers.deepspeed_cpu_run import free_port
from tests.trainers.recipe_fixtures import cli_args, code_assets, code_overrides, trained_run
from trainers import REPO_ROOT
from trainers.recipes.launch import (
    DISTRIBUTED_ENV,
    LAUNCHED_ENV,
    MODULE,
    LaunchError,
    build_launch_command,
    in_launched_process,
    needs_launch,
    read_deepspeed_config,
)
from trainers.recipes.recipe import CONFIG_DIR
from trainers.recipes.training import loss_series
from trainers.train import main

WEIGHTS = "adapter_model.safetensors"


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


# ------------------------------------------------------------------------------------------ real DeepSpeed runs
def _deepspeed_launcher() -> str | None:
    """The ``deepspeed`` launcher: on PATH, or next to this Python (``make test`` runs .venv/bin/python directly)."""
    return shutil.which(
        "deepspeed", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    )


@pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None,
    reason="deepspeed is not installed (the dev extra installs it: pip install -e '.[dev]', or '.[deepspeed]')",
)
@pytest.mark.parametrize("stage, launcher", [(2, True), (3, False)], ids=["zero2-launcher", "zero3-in-process"])
def test_real_deepspeed_run_on_cpu(stage: int, launcher: bool, tmp_path_factory, tmp_path: Path) -> None:
    """The tiny code recipe for 6 steps under DeepSpeed on the CPU with the repository's ZeRO config: ZeRO-2 under
    the ``deepspeed`` launcher (the command flora-train builds), ZeRO-3 as rank 0 of 1 in one process. Losses are
    finite, DeepSpeed checkpoints are written, the adapter is saved in PEFT format (gathered from its ZeRO-3
    partitions) and equals the adapter of the same run without DeepSpeed. :mod:`.deepspeed_cpu_run` stands in for
    ``trainers.train`` so that nothing is JIT-compiled (see there)."""
    plain = trained_run(tmp_path_factory, "code")  # the same recipe and overrides, without DeepSpeed
    out = tmp_path / "run"
    args = cli_args("tiny-code", code_overrides(code_assets(tmp_path_factory), out))
    args += ["--deepspeed", str(CONFIG_DIR / f"ds_zero{stage}.json")]
    module = "tests.trainers.deepspeed_cpu_run"
    if launcher:
        script = _deepspeed_launcher()
        if script is None:
            pytest.skip("the deepspeed launcher script is not installed next to this Python nor on PATH")
        command = build_launch_command(args, launcher="deepspeed", num_gpus=1)
        command[command.index(MODULE)] = module
        command[:1] = [script, "--master_port", str(free_port())]
    else:
        command = [sys.executable, "-m", module, *args]
    env = {k: v for k, v in os.environ.items() if k not in (*DISTRIBUTED_ENV, "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    env["DS_ACCELERATOR"] = "cpu"
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]

    summary = json.loads((out / "train_summary.json").read_text())
    losses = [loss for _, loss in loss_series(summary["log_history"])["train"]]
    assert len(losses) == 6 and all(math.isfinite(loss) for loss in losses)
    assert (out / "checkpoint-6" / "global_step6").is_dir()  # DeepSpeed's own checkpoint, for --resume
    assert json.loads((out / "alpha" / "adapter_config.json").read_text())["peft_type"] == "FLORA"
    weights, expected = load_file(str(out / "alpha" / WEIGHTS)), load_file(str(plain / "alpha" / WEIGHTS))
    assert weights.keys() == expected.keys()
    for key in weights:
        torch.testing.assert_close(weights[key], expected[key], atol=1e-5, rtol=0.0, msg=key)
    base = GPTBigCodeForCausalLM.from_pretrained(summary["base_model"])
    PeftModel.from_pretrained(base, str(out / "alpha"), adapter_name="alpha")  # loads in PEFT
