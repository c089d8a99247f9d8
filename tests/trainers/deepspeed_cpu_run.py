"""flora-train under DeepSpeed on the CPU without compiling anything: the tests' stand-in for ``trainers.train``.

    python -m tests.trainers.deepspeed_cpu_run FLORA-TRAIN-ARGS... --deepspeed CONFIG.json

Run directly it is rank 0 of 1 itself (gloo); under the ``deepspeed`` launcher it keeps the rank the launcher gave.
Either way it is its own process, so DeepSpeed's process group and HF's global ZeRO-3 flag never reach the test
process. Two of DeepSpeed's C++ ops, which it would JIT-compile on first use (a minute or two each on two cores,
and only with a C++ compiler), are kept out; neither changes what is computed:

* the shared-memory all-reduce (``deepspeed_shm_comm``), a fast path between processes on one host: its builder
  answers "not available", DeepSpeed's own fallback to plain torch.distributed;
* FusedAdam: the config's optimizer gets ``"torch_adam": true``, DeepSpeed's switch to ``torch.optim.AdamW``. The
  changed copy of the config is written next to the output folder; everything else in it is the repository's.
"""

from __future__ import annotations

import importlib
import json
import os
import socket
import sys
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_config(config: Path, folder: Path) -> Path:
    """``config`` with DeepSpeed's torch AdamW instead of FusedAdam, written into ``folder``."""
    values = json.loads(config.read_text())
    values["optimizer"]["params"]["torch_adam"] = True
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / f"cpu-{config.name}"
    out.write_text(json.dumps(values, indent=1))
    return out


def main(argv: list[str]) -> int:
    args = list(argv)
    at = args.index("--deepspeed") + 1
    output_dir = Path(args[args.index("--output-dir") + 1])
    args[at] = str(cpu_config(Path(args[at]), output_dir.parent / f"{output_dir.name}-ds-config"))
    os.environ["DS_ACCELERATOR"] = "cpu"
    for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1").items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    # the attribute deepspeed.comm.torch is the torch package (re-exported there), so reach the module itself
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None

    from trainers.train import main as flora_train

    return flora_train(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
