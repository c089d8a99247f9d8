"""Multi-process launch for ``flora-train``: the ``deepspeed``, ``accelerate launch`` or ``torchrun`` command line.

HF Trainer runs DeepSpeed (``--deepspeed configs/ds_zero2.json``) and multi-GPU data parallelism only inside a
distributed launcher, one process per GPU. ``flora-train`` builds that command and re-runs itself under it, so
users type the same command either way; the command is a plain list so tests (and ``--print-launch``) can check it.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import torch

LAUNCHERS = ("deepspeed", "accelerate", "torchrun")
MODULE = "trainers.train"
LAUNCHED_ENV = "FLORA_TRAIN_LAUNCHED"
"""Set in the launched processes, so they never launch again."""
DISTRIBUTED_ENV = ("LOCAL_RANK", "RANK", "WORLD_SIZE", LAUNCHED_ENV)


class LaunchError(RuntimeError):
    """The launcher or DeepSpeed is missing, or the DeepSpeed config is unusable."""


def read_deepspeed_config(path: Union[str, Path]) -> dict:
    """The DeepSpeed JSON as a dict; a missing file or bad JSON raises :class:`LaunchError` naming it."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise LaunchError(
            f"DeepSpeed config {file} not found (the repository has configs/ds_zero2.json, ds_zero3.json)"
        )
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise LaunchError(f"DeepSpeed config {file} is not valid JSON: {err}") from err
    if not isinstance(config, dict) or "zero_optimization" not in config:
        raise LaunchError(f"DeepSpeed config {file} has no zero_optimization section")
    return config


def in_launched_process(env: Optional[Mapping[str, str]] = None) -> bool:
    """Whether this process was started by a distributed launcher (or by :func:`build_launch_command`)."""
    env = os.environ if env is None else env
    return any(key in env for key in DISTRIBUTED_ENV)


def gpu_count() -> int:
    try:
        return torch.cuda.device_count()
    except Exception:  # pragma: no cover - torch is a dependency
        return 0


def needs_launch(deepspeed: Optional[str], num_gpus: Optional[int], env: Optional[Mapping[str, str]] = None) -> bool:
    """DeepSpeed always runs under a launcher; plain runs only when asked for more than one GPU."""
    if in_launched_process(env):
        return False
    return bool(deepspeed) or (num_gpus or 1) > 1


def build_launch_command(
    train_args: Sequence[str],
    *,
    launcher: str = "deepspeed",
    num_gpus: Optional[int] = None,
    deepspeed: Optional[str] = None,
    module: str = MODULE,
    python: Optional[str] = None,
) -> list[str]:
    """The command that runs ``python -m trainers.train <train_args>`` on ``num_gpus`` local processes.

    ``train_args`` are passed through unchanged (they carry ``--deepspeed`` for HF Trainer, which reads the JSON
    and fills its "auto" values); ``--deepspeed`` is added when it is missing.
    """
    if launcher not in LAUNCHERS:
        raise LaunchError(f"launcher must be one of {LAUNCHERS}, got {launcher!r}")
    args = list(train_args)
    if deepspeed and "--deepspeed" not in args and not any(a.startswith("--deepspeed=") for a in args):
        args += ["--deepspeed", str(deepspeed)]
    n = num_gpus if num_gpus is not None else max(1, gpu_count())
    python = python or sys.executable
    if launcher == "deepspeed":
        # --no_local_rank: the script reads LOCAL_RANK from the environment instead of a --local_rank argument
        return ["deepspeed", "--num_gpus", str(n), "--no_local_rank", "--module", module, *args]
    if launcher == "accelerate":
        return [python, "-m", "accelerate.commands.launch", "--num_processes", str(n), "-m", module, *args]
    return [python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n), "-m", module, *args]


def check_launcher(command: Sequence[str], deepspeed: Optional[str]) -> None:
    """Fail before launching when the launcher or DeepSpeed itself is not installed, or the config is broken."""
    if deepspeed:
        read_deepspeed_config(deepspeed)
        try:
            import deepspeed as _  # noqa: F401
        except ImportError as err:
            raise LaunchError("DEEPSPEED= needs the deepspeed package: pip install 'flora-hf[deepspeed]'") from err
    if command[0] == "deepspeed" and shutil.which("deepspeed") is None:
        raise LaunchError("the deepspeed launcher is not on PATH: pip install 'flora-hf[deepspeed]'")


def launch_env(env: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    out = dict(os.environ if env is None else env)
    out[LAUNCHED_ENV] = "1"
    return out
