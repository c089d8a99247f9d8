"""The on-disk cache the tiny models and speech folders share: keys, build records, staged writes."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainers.offline.model_cache import INFO_FILE, cache_root, fingerprint, read_build_info, save_build, staged_folder
from trainers.offline.step_loop import epochs, warmup_cosine


def test_cache_root_and_fingerprints(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FLORA_HF_CACHE", str(tmp_path))
    assert cache_root() == tmp_path
    monkeypatch.delenv("FLORA_HF_CACHE")
    assert cache_root().parts[-2:] == (".cache", "flora-hf")
    assert fingerprint({"b": 1, "a": 2}, 3) == fingerprint({"a": 2, "b": 1}, 3) != fingerprint({"a": 2, "b": 1}, 4)
    assert fingerprint(2, {"seed": 0}) == "8805359507cb"  # existing caches are found by these keys


class _Part:
    def __init__(self, name: str) -> None:
        self.name = name

    def save_pretrained(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / self.name).write_text(self.name)


def test_save_build_replaces_the_folder_in_one_move(tmp_path: Path) -> None:
    folder = tmp_path / "models" / "tiny"
    assert read_build_info(folder) is None
    save_build(folder, [_Part("model"), _Part("tokenizer")], {"spec": {"n": 1}})
    assert read_build_info(folder) == {"spec": {"n": 1}}
    assert sorted(p.name for p in folder.iterdir()) == sorted([INFO_FILE, "model", "tokenizer"])
    save_build(folder, [_Part("other")], {"spec": {"n": 2}})
    assert read_build_info(folder) == {"spec": {"n": 2}} and not (folder / "model").exists()  # nothing stale
    assert [p.name for p in folder.parent.iterdir()] == ["tiny"]  # no staging folder left
    (folder / INFO_FILE).write_text("{broken")
    assert read_build_info(folder) is None


def test_a_failed_build_leaves_the_old_folder_and_no_staging(tmp_path: Path) -> None:
    folder = tmp_path / "tiny"
    save_build(folder, [_Part("model")], {"v": 1})
    with pytest.raises(RuntimeError), staged_folder(folder) as staging:
        _Part("half").save_pretrained(staging)
        raise RuntimeError("crash mid-build")
    assert read_build_info(folder) == {"v": 1} and [p.name for p in tmp_path.iterdir()] == ["tiny"]


def test_schedule_and_epochs() -> None:
    factor = warmup_cosine(2, 10, floor=0.1)
    assert [factor(0), factor(1), factor(2)] == [0.5, 1.0, 1.0] and factor(10) == pytest.approx(0.1)
    batches = epochs([1, 2, 3])
    assert [next(batches) for _ in range(7)] == [1, 2, 3, 1, 2, 3, 1]


def test_a_model_just_built_names_its_folder_as_one_loaded_from_it_does(tmp_path: Path) -> None:
    # the first run of a tiny recipe builds the model in-process; PEFT must still record where it lives
    from peft import get_peft_model
    from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM

    from flora_hf import FLoRAConfig

    model = GPTBigCodeForCausalLM(GPTBigCodeConfig(vocab_size=32, n_positions=16, n_embd=8, n_layer=1, n_head=2))
    assert not model.name_or_path
    folder = tmp_path / "tiny"
    save_build(folder, [model], {"v": 1})
    built = get_peft_model(model, FLoRAConfig(r=1, target_modules=["c_attn"])).peft_config["default"]
    loaded = GPTBigCodeForCausalLM.from_pretrained(folder)
    again = get_peft_model(loaded, FLoRAConfig(r=1, target_modules=["c_attn"])).peft_config["default"]
    assert built.base_model_name_or_path == again.base_model_name_or_path == str(folder)


def test_progress_in_logs_says_how_long_is_left(capsys) -> None:
    from trainers.offline.step_loop import StepProgress

    bar = StepProgress(20, "pretrain", enabled=True)  # stderr is not a terminal here: log lines
    for _ in range(20):
        bar.update(1.0)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 10 and "step 2/20" in lines[0] and "spent, about" in lines[0] and "left" in lines[0]
    assert lines[-1].startswith("pretrain: step 20/20") and "left" not in lines[-1]
