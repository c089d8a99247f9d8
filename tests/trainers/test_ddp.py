"""Data-parallel training on the CPU: 2 gloo processes under torchrun give the gradients of one process.

MiLoRA's top-k routing leaves experts (and, in a mixed batch, whole adapters' routers) unused on some ranks, which
DistributedDataParallel without ``find_unused_parameters`` refuses at the next step; with it, DDP rebuilds the
model output from its dataclass fields, so the load-balancing loss must be one of them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trainers.recipes.launch import DISTRIBUTED_ENV
from trainers.recipes.recipe import REPO_ROOT

from .deepspeed_cpu_run import free_port
from .recipe_fixtures import code_assets

WEIGHTS = "adapter_model.safetensors"


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (*DISTRIBUTED_ENV, "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    env["CUDA_VISIBLE_DEVICES"] = ""  # gloo on the CPU even where a GPU is present
    return env


@pytest.mark.parametrize(("method", "find_unused"), [("flora", False), ("milora", False), ("milora", True)])
def test_ddp_gradients_equal_one_process(method: str, find_unused: bool, tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), "-m", "tests.trainers.ddp_grad_check", method, str(int(find_unused)), str(out)]  # fmt: skip
    done = subprocess.run(command, cwd=REPO_ROOT, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["missing"] == [] and report["nonzero_b_grad"]
    assert report["grad_max_diff"] < 1e-6 and report["weight_max_diff"] < 1e-6, report


def _flora_train(args: list[str], out: Path, processes: int, batch: int) -> None:
    command = [sys.executable, "-m", "trainers.train", *args, "--output-dir", str(out), "--batch-size", str(batch)]
    if processes > 1:  # flora-train builds the torchrun command and re-runs itself under it
        command += ["--launcher", "torchrun", "--num-gpus", str(processes)]
    env = clean_env() | {"MASTER_PORT": str(free_port())}
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]


@pytest.mark.parametrize("method", ["flora", "milora"])
def test_flora_train_under_torchrun_equals_one_process(method: str, tmp_path_factory, tmp_path: Path) -> None:
    """2 processes × batch 2 (accelerate gives rank r the batches r, r+2, ... of the same seeded order) against
    1 process × batch 4: the same examples every step, so the trained adapters must agree. MiLoRA runs without its
    balance loss and rational step here: both are nonlinear in the batch, so a per-rank value is not the
    whole batch's (DDP averages them, as intended)."""
    assets = code_assets(tmp_path_factory)
    args = ["--recipe", "tiny-code", "--no-progress", "--model", str(assets["model"]), "--data", str(assets["data"]),
            "--langs", "alpha,beta", "--method", method, "--max-steps", "3", "--set", "eval_steps=100",
            "--set", "save_steps=100", "--set", "warmup_steps=0", "--set", "block_size=32",
            "--set", "eval_fraction=0.2", "--set", "max_eval_examples=8"]  # fmt: skip
    if method == "milora":
        milora = {"r": 4, "top_k": 2, "pooler": "attention", "load_balance_coef": 0.0, "rational_lr": 0.0}
        args += ["--set", f"milora={json.dumps(milora)}"]
    _flora_train(args, tmp_path / "one", processes=1, batch=4)
    _flora_train(args, tmp_path / "two", processes=2, batch=2)
    for lang in ("alpha", "beta"):
        one, two = load_file(str(tmp_path / "one" / lang / WEIGHTS)), load_file(str(tmp_path / "two" / lang / WEIGHTS))
        assert one.keys() == two.keys()
        for key in one:
            torch.testing.assert_close(two[key], one[key], atol=1e-6, rtol=0, msg=f"{lang} {key}")
        trained = [k for k in one if "flora_out" in k or "milora_B" in k]
        init = 1.0 if method == "flora" else 0.0  # FLoRA starts at identity (ones), LoRA-style B at zero
        assert trained and any((one[k] - init).abs().max() > 1e-4 for k in trained)  # the steps did train
