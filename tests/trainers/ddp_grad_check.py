"""Two DistributedDataParallel steps of a mixed-adapter batch on the CPU (gloo), compared with one process.

    python -m torch.distributed.run --standalone --nproc_per_node 2 -m tests.trainers.ddp_grad_check \\
        METHOD FIND_UNUSED OUT.json

Each rank trains on its half of a fixed batch whose rows use different adapters (rank 0 sees only adapter "a", so
adapter "b" and, for MiLoRA, its router and every unselected expert are unused there). Rank 0 also runs the same
two steps in-process without DDP on both halves and writes the largest gradient and weight differences to OUT.
"""

from __future__ import annotations

import datetime
import json
import os
import sys

import torch
import torch.distributed as dist
from peft import get_peft_model
from torch.nn.parallel import DistributedDataParallel

from flora_hf import FLoRAConfig, MiLoRAConfig, set_trainable_adapters
from tests.models import tiny_llama

NAMES = [["a", "a"], ["b", "a"]]  # rows of rank 0, rank 1


def build(method: str):
    torch.manual_seed(0)
    make = {
        "flora": lambda: FLoRAConfig(r=2, init_weights=False),
        "milora": lambda: MiLoRAConfig(r=2, top_k=2, init_weights=False),
    }[method]
    model = get_peft_model(tiny_llama(), make(), adapter_name="a")
    model.add_adapter("b", make())
    set_trainable_adapters(model)
    return model.train()


def batch(rank: int) -> torch.Tensor:
    return torch.randint(1, 90, (4, 6), generator=torch.Generator().manual_seed(7))[2 * rank : 2 * rank + 2]


def trainable(model) -> dict[str, torch.nn.Parameter]:
    return {n.replace("module.", "", 1): p for n, p in model.named_parameters() if p.requires_grad}


def main(method: str, find_unused: bool, out: str) -> int:
    # a bounded wait: a rank that lost its peer fails in a minute instead of hanging the test run
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank = dist.get_rank()
    model = build(method)
    ddp = DistributedDataParallel(model, find_unused_parameters=find_unused)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    ids = batch(rank)
    grads = []
    for _ in range(2):  # step 2 is where unused parameters broke DDP without find_unused_parameters
        optimizer.zero_grad()
        ddp(input_ids=ids, labels=ids, adapter_names=NAMES[rank]).loss.backward()
        grads.append({n: p.grad.clone() for n, p in trainable(model).items() if p.grad is not None})
        optimizer.step()
    if rank == 0:
        reference = build(method)
        ref_optimizer = torch.optim.SGD(reference.parameters(), lr=0.5)
        report = {"grad_max_diff": 0.0, "weight_max_diff": 0.0, "missing": [], "nonzero_b_grad": False}
        for step in range(2):
            ref_optimizer.zero_grad()
            losses = [reference(input_ids=batch(r), labels=batch(r), adapter_names=NAMES[r]).loss for r in (0, 1)]
            (sum(losses) / 2).backward()  # what DDP's gradient averaging computes
            for name, p in trainable(reference).items():
                if p.grad is None:
                    continue
                if name not in grads[step]:
                    report["missing"].append(name)
                    continue
                diff = (grads[step][name] - p.grad).abs().max().item()
                report["grad_max_diff"] = max(report["grad_max_diff"], diff)
                report["nonzero_b_grad"] |= ".b" in name and bool(p.grad.abs().sum() > 0)
            ref_optimizer.step()
        mine = trainable(model)
        for name, p in trainable(reference).items():
            report["weight_max_diff"] = max(report["weight_max_diff"], (mine[name] - p).abs().max().item())
        with open(out, "w", encoding="utf-8") as f:
            json.dump(report, f)
    dist.barrier()
    # Leave without tearing gloo down: the report is written and every rank is past the barrier, and a teardown
    # racing the peer's exit has been seen to hang one rank (a test harness has nothing else to clean up).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2] == "1", sys.argv[3]))
