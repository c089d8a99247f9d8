"""A run that fails mid-way fails cleanly: a save killed half-way leaves no checkpoint that resume would pick, a full
disk or an unwritable output is one clear line naming the path, and the saved recipe reruns the run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.trainers.recipe_fixtures import cli_args, code_assets, code_overrides, trained_run
from trainers.recipes.checkpoints import STAGING_DIR, describe_write_error, latest_complete_checkpoint, output_problem
from trainers.recipes.recipe import load_recipe
from trainers.recipes.training import resolve_resume, train
from trainers.train import main

REPO = Path(__file__).resolve().parents[3]
WEIGHTS = "adapter_model.safetensors"


@pytest.fixture(scope="module")
def code_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return trained_run(tmp_path_factory, "code")


def _flora_train(args: list[str], *, prelude: str = "", wrap: list[str] | None = None) -> subprocess.CompletedProcess:
    """``flora-train`` in a fresh process (``prelude`` runs first: a patch), optionally under ``wrap`` (unshare)."""
    code = f"import sys\n{textwrap.dedent(prelude)}\nfrom trainers.train import main\nsys.exit(main({args!r}))\n"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [*(wrap or []), sys.executable, "-c", code]
    return subprocess.run(command, capture_output=True, text=True, timeout=240, env=env, cwd=REPO)


def _same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a / WEIGHTS)), load_file(str(b / WEIGHTS))
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], atol=1e-6, rtol=0.0, msg=key)


# ------------------------------------------------------------------------------------------- interrupted save
def test_resume_latest_passes_over_incomplete_checkpoints(code_run: Path, tmp_path: Path, caplog) -> None:
    run = tmp_path / "run"
    shutil.copytree(code_run, run)
    (run / "checkpoint-9").mkdir()  # what an in-place save killed at once leaves
    shutil.copytree(run / "checkpoint-6", run / "checkpoint-12")
    (run / "checkpoint-12" / "trainer_state.json").write_text('{"global_st')  # killed while writing the last file
    assert latest_complete_checkpoint(run) == run / "checkpoint-6"
    assert "checkpoint-12" in caplog.text and "checkpoint-9" in caplog.text
    recipe = load_recipe("tiny-code", {"OUTPUT_DIR": str(run), "RESUME": "latest"})
    assert resolve_resume(recipe, run) == str(run / "checkpoint-6")
    with pytest.raises(ValueError, match="incomplete checkpoint"):
        resolve_resume(load_recipe("tiny-code", {"OUTPUT_DIR": str(run), "RESUME": str(run / "checkpoint-9")}), run)


def test_a_run_killed_during_a_save_resumes_from_the_last_whole_checkpoint(
    code_run: Path, tmp_path: Path, tmp_path_factory
) -> None:
    # SIGKILL in the middle of the step-6 save: after the weights, before the optimizer state
    prelude = """
        import os, signal
        from transformers import Trainer
        original = Trainer._save_optimizer_and_scheduler
        def save_then_die(self, output_dir):
            if self.state.global_step == 6:
                os.kill(os.getpid(), signal.SIGKILL)
            original(self, output_dir)
        Trainer._save_optimizer_and_scheduler = save_then_die
    """
    overrides = code_overrides(code_assets(tmp_path_factory), tmp_path)
    killed = _flora_train(cli_args("tiny-code", overrides), prelude=prelude)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert (tmp_path / "checkpoint-3").is_dir() and not (tmp_path / "checkpoint-6").exists()
    assert list((tmp_path / STAGING_DIR).iterdir()) == [tmp_path / STAGING_DIR / "checkpoint-6"]

    assert main(cli_args("tiny-code", {**overrides, "RESUME": "latest"})) == 0
    summary = json.loads((tmp_path / "train_summary.json").read_text())
    assert summary["resumed_from"] == str(tmp_path / "checkpoint-3")
    assert not (tmp_path / STAGING_DIR).exists() and (tmp_path / "checkpoint-6" / "trainer_state.json").is_file()
    _same_weights(tmp_path / "alpha", code_run / "alpha")  # as if it had never been killed


# ---------------------------------------------------------------------------------------------- saved recipe
def test_the_saved_recipe_of_a_resumed_run_reruns_the_run(code_run: Path, tmp_path: Path, tmp_path_factory) -> None:
    resumed = tmp_path / "resumed"
    overrides = code_overrides(code_assets(tmp_path_factory), resumed, RESUME=str(code_run / "checkpoint-3"))
    train(load_recipe("tiny-code", overrides), progress=False)
    saved = resumed / "recipe.yaml"
    assert load_recipe(saved).resume is None
    rerun = tmp_path / "rerun"
    result = train(load_recipe(saved, {"OUTPUT_DIR": str(rerun)}), progress=False)
    assert result.trainer.state.global_step == 6 and not (rerun / "checkpoint-9").exists()
    assert json.loads((rerun / "train_summary.json").read_text())["resumed_from"] is None
    _same_weights(rerun / "alpha", code_run / "alpha")


# --------------------------------------------------------------------------------------------- unwritable output
def test_an_output_path_that_is_a_file_is_refused_before_loading(tmp_path: Path, tmp_path_factory, capsys) -> None:
    target = tmp_path / "out"
    target.write_text("not a folder")
    overrides = code_overrides(code_assets(tmp_path_factory), target)
    assert main(cli_args("tiny-code", overrides)) == 2
    err = capsys.readouterr().err
    assert f"the output path {target} is a file" in err and "Traceback" not in err


def _can_mount() -> bool:
    unshare = shutil.which("unshare")
    if unshare is None:
        return False
    probe = [unshare, "--user", "--map-root-user", "--mount", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"]
    return subprocess.run(probe, capture_output=True, timeout=30).returncode == 0


needs_mounts = pytest.mark.skipif(not _can_mount(), reason="needs unshare and user + mount namespaces for a tmpfs")


def _in_own_mounts(setup: str, after: str = "true") -> list[str]:
    """Run under ``unshare`` after ``setup`` (mount commands) in a private mount namespace, then ``after`` there."""
    script = f'{setup} && {{ "$@"; rc=$?; {after}; exit $rc; }}'
    return ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, "sh"]


@needs_mounts
def test_a_read_only_output_folder_is_refused_before_loading(tmp_path: Path, tmp_path_factory) -> None:
    out = tmp_path / "ro"
    out.mkdir()
    overrides = code_overrides(code_assets(tmp_path_factory), out)
    result = _flora_train(
        cli_args("tiny-code", overrides),
        wrap=_in_own_mounts(f"mount --bind {out} {out} && mount -o remount,bind,ro {out}"),
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Read-only file system" in result.stderr and str(out) in result.stderr
    assert "Traceback" not in result.stderr and "loading" not in result.stderr.lower()


@needs_mounts
def test_a_full_disk_mid_run_is_one_clear_line_and_leaves_no_partial_checkpoint(
    tmp_path: Path, tmp_path_factory
) -> None:
    out = tmp_path / "small-disk"
    out.mkdir()
    overrides = code_overrides(code_assets(tmp_path_factory), out)
    # room for the start-up probe, not for a checkpoint (its optimizer state alone is larger)
    mounts = _in_own_mounts(f"mount -t tmpfs -o size=48k tmpfs {out}", after=f"echo LEFT:; ls -A {out}")
    result = _flora_train(cli_args("tiny-code", overrides), wrap=mounts)
    assert result.returncode == 1, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("flora-train: error: checkpoint") and "no space left" in last and str(out) in last, last
    assert "Traceback" not in result.stderr and "basic_ios" not in last
    left = result.stdout.rsplit("LEFT:", 1)[1].split()
    assert not [name for name in left if "checkpoint" in name], left  # nothing partial left behind


def test_write_errors_name_the_path_and_say_no_space(tmp_path: Path) -> None:
    full = OSError(28, "No space left on device")
    assert describe_write_error(full, tmp_path / "x").startswith(f"no space left on the device holding {tmp_path}")
    torch_style = RuntimeError("basic_ios::clear: iostream error")
    assert describe_write_error(torch_style, tmp_path) == f"cannot write {tmp_path}: basic_ios::clear: iostream error"
    assert output_problem(tmp_path / "new" / "run") is None and (tmp_path / "new" / "run").is_dir()
