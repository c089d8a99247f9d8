"""Checkpoints that are whole or absent, resumes that pick a whole one, and output errors a person can act on.

HF Trainer writes ``checkpoint-N/`` in place: a run killed mid-save (``kill -9``, a full disk) leaves a folder that
looks like the newest checkpoint and is not one, and ``--resume`` then crashes on it. Here every checkpoint is
written into ``<output>/.checkpoint-staging/checkpoint-N/`` and renamed into place once every process has written
its part, so a ``checkpoint-N/`` beside the others is complete; a failed save removes its staging folder. Resuming
``latest`` takes the newest complete checkpoint (one whose ``trainer_state.json``, written last, reads back) and
says which incomplete ones it passed over (written by an older flora-hf, or by hand).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

logger = logging.getLogger(__name__)

STAGING_DIR = ".checkpoint-staging"
TRAINER_STATE = "trainer_state.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class OutputWriteError(RuntimeError):
    """The run could not write to its output folder; the message names the path and the reason in one line."""


# ------------------------------------------------------------------------------------------------ resuming
def is_complete(checkpoint: Path) -> bool:
    """Whether ``checkpoint`` holds a whole save: its trainer state (written after the weights, optimizer,
    scheduler and RNG states) is there and parses."""
    try:
        json.loads((checkpoint / TRAINER_STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return True


def checkpoints_newest_first(output_dir: Path) -> list[Path]:
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if (m := _CHECKPOINT.match(p.name)) and p.is_dir()]
    return [path for _, path in sorted(found, reverse=True)]


def latest_complete_checkpoint(output_dir: Path) -> Optional[Path]:
    """The newest complete ``checkpoint-N`` in ``output_dir`` (None when there is none), warning about every newer
    incomplete one passed over."""
    for checkpoint in checkpoints_newest_first(output_dir):
        if is_complete(checkpoint):
            return checkpoint
        logger.warning(
            "resume: skipping %s: incomplete (no readable %s; a save was interrupted)", checkpoint, TRAINER_STATE
        )
    return None


# ------------------------------------------------------------------------------------------------- writing
def describe_write_error(err: BaseException, path: Path) -> str:
    """One line naming ``path`` and why writing there failed. torch's serializer reports a full disk as
    ``basic_ios::clear: iostream error`` (the errno is lost in C++), so free space is checked to say so."""
    code = getattr(err, "errno", None)
    reason = os.strerror(code) if isinstance(code, int) else None
    if code != errno.ENOSPC:
        free = free_bytes(path)
        if free is not None and free < (1 << 20):
            code, reason = errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} ({free // 1024} KiB free)"
    if code == errno.ENOSPC:
        return (
            f"no space left on the device holding {path}: {reason}; free some space "
            "or choose another OUTPUT_DIR, then resume (RESUME=latest)"
        )
    return f"cannot write {path}: {reason or err}"


def free_bytes(path: Path) -> Optional[int]:
    for folder in (path, *path.parents):
        try:
            return shutil.disk_usage(folder).free
        except OSError:
            continue
    return None


def output_problem(output_dir: Path) -> Optional[str]:
    """Why the run could not write its outputs to ``output_dir`` (a file there, a read-only or full filesystem, no
    permission), found before any model or data loads; None when a probe file can be written there."""
    if output_dir.exists() and not output_dir.is_dir():
        return f"the output path {output_dir} is a file, not a folder: choose another OUTPUT_DIR"
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=output_dir, prefix=".flora-write-probe-") as probe:
            probe.write(b"\0" * 4096)
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as err:
        where = Path(err.filename) if getattr(err, "filename", None) else output_dir
        return f"the output folder cannot be written: {describe_write_error(err, where)}"
    return None


def clear_staging(output_dir: Path) -> None:
    """Remove what an interrupted save left in the staging folder."""
    shutil.rmtree(output_dir / STAGING_DIR, ignore_errors=True)


class StagedCheckpointsMixin:
    """For a ``transformers.Trainer`` subclass: each checkpoint is staged, then renamed into place (see module)."""

    _flora_staging: Optional[str] = None

    def _get_output_dir(self, trial: Any) -> str:
        return self._flora_staging or super()._get_output_dir(trial)  # type: ignore[misc]

    def _save_checkpoint(self, model: Any, trial: Any) -> None:

        run_dir = Path(super()._get_output_dir(trial))  # type: ignore[misc]
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"  # type: ignore[attr-defined]
        staging = run_dir / STAGING_DIR
        staged, final = staging / name, run_dir / name
        self._flora_staging = str(staging)
        try:
            super()._save_checkpoint(model, trial)  # type: ignore[misc]
            self.accelerator.wait_for_everyone()  # type: ignore[attr-defined]  # every rank wrote its part
        except (OSError, RuntimeError) as err:
            message = f"checkpoint {final} not saved: {describe_write_error(err, staged)}"
            clear_staging(run_dir)  # it held only this checkpoint
            raise OutputWriteError(message) from err
        finally:
            self._flora_staging = None
        args = self.args  # type: ignore[attr-defined]
        if args.should_save:
            if final.exists():  # a checkpoint of the same step from an earlier run in this folder
                shutil.rmtree(final)
            os.replace(staged, final)
            with contextlib.suppress(OSError):
                staging.rmdir()  # empty now: the output folder shows only whole checkpoints
            state = self.state  # type: ignore[attr-defined]
            if state.best_model_checkpoint and Path(state.best_model_checkpoint) == staged:
                state.best_model_checkpoint = str(final)
                state.save_to_json(str(final / TRAINER_STATE))
            rotate_checkpoints(
                output_dir=str(run_dir),
                save_total_limit=args.save_total_limit,
                best_model_checkpoint=state.best_model_checkpoint,
                use_mtime=False,
            )
        self.accelerator.wait_for_everyone()  # type: ignore[attr-defined]
