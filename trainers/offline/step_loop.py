"""The plain training loop behind the tiny models' pretraining and the demo's adapter training (HF Trainer is the
recipes' loop; these are small enough not to need it): AdamW as the caller builds it, warmup then cosine decay,
optional gradient clipping, a progress bar or log lines, and the loss of every step."""

from __future__ import annotations

import math
import sys
import time
from typing import Callable, Iterable, Iterator, Optional, TypeVar

import torch
from tqdm.auto import tqdm

T = TypeVar("T")


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class StepProgress:
    """A tqdm bar (with its ETA) on a terminal; in logs (CI, redirected output) one line per tenth of the run
    instead, each with the time spent and an estimate of the time left."""

    def __init__(self, total: int, desc: str, enabled: bool = True) -> None:
        self.total, self.desc, self.step = total, desc, 0
        self.tty = enabled and sys.stderr.isatty()
        self.enabled = enabled
        self.start = time.monotonic()
        self.bar = tqdm(total=total, desc=desc, leave=False) if self.tty else None

    def update(self, loss: float) -> None:
        self.step += 1
        if self.bar is not None:
            self.bar.update()
            self.bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
        elif self.enabled and (self.step % max(1, self.total // 10) == 0 or self.step == self.total):
            spent = time.monotonic() - self.start
            left = spent / self.step * (self.total - self.step)
            timing = f"{_duration(spent)} spent" + (f", about {_duration(left)} left" if left > 0 else "")
            line = f"{self.desc}: step {self.step}/{self.total} loss {loss:.3f} ({timing})"
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def warmup_cosine(warmup: int, total: int, floor: float = 0.1) -> Callable[[int], float]:
    """Learning-rate factor: linear warmup over ``warmup`` steps, then cosine down to ``floor`` at ``total``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def epochs(loader: Iterable[T]) -> Iterator[T]:
    """``loader``'s batches again and again, each pass a fresh iteration (a shuffling loader reshuffles)."""
    while True:
        yield from loader


def run_steps(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    step_loss: Callable[[int], torch.Tensor],
    steps: int,
    warmup_steps: int,
    desc: str,
    progress: bool = True,
    clip_norm: Optional[float] = None,
) -> list[float]:
    """``steps`` optimizer steps on ``step_loss(step)`` under :func:`warmup_cosine`, gradients clipped to
    ``clip_norm`` (over the optimizer's parameters) when given; the model is left in eval mode. Returns every
    step's loss."""
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(warmup_steps, steps))
    params = [p for group in optimizer.param_groups for p in group["params"]]
    model.train()
    losses: list[float] = []
    bar = StepProgress(steps, desc, progress)
    for step in range(steps):
        loss = step_loss(step)
        loss.backward()
        if clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, clip_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.update(losses[-1])
    bar.close()
    model.eval()
    return losses
