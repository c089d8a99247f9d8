"""Tiny local assets for the recipe tests: a GPTBigCode and a Whisper model folder, code folders, Common Voice
folders of espeak-ng speech, and recipe overrides that make the real recipes run in seconds.

Built once per test session (cached by name under pytest's base temp folder), since several test modules use them.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any, Callable

import pytest
from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM

_BUILT: dict[str, Any] = {}


def _once(name: str, factory: pytest.TempPathFactory, build: Callable[[Path], Any]) -> Any:
    if name not in _BUILT:
        folder = factory.getbasetemp() / f"recipe-assets-{name}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        _BUILT[name] = build(folder)
    return _BUILT[name]


def _write_language(folder: Path, n_files: int, line: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        (folder / f"f{i:02d}.src").write_text("".join(line.format(i=i, j=j) for j in range(10)))
    return folder


LINES = {
    "alpha": "def f{i}_{j}(x):\n    return x + {j}\n",
    "beta": "sub g{i}_{j} {{ my $x = shift; return $x * {j}; }}\n",
}


def code_assets(factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``model``: a tiny random GPTBigCode with a BPE tokenizer; ``data``: one sub-folder of files per language."""

    def build(root: Path) -> dict[str, Path]:
        from trainers.data.code import pack_texts
        from trainers.offline.tiny_code_model import TinyCodeModelSpec, pretrain, train_tokenizer

        data = root / "code"
        for lang, line in LINES.items():
            _write_language(data / lang, 12, line)
        texts = [p.read_text() for p in sorted(data.rglob("*.src"))]
        tokenizer = train_tokenizer(texts, vocab_size=300, block_size=32)
        config = GPTBigCodeConfig(
            vocab_size=len(tokenizer), n_positions=128, n_embd=32, n_layer=2, n_head=2, n_inner=64, multi_query=True,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )  # fmt: skip
        model = GPTBigCodeForCausalLM(config)
        # a little pretraining first: adapters need a model whose layers already do something to adapt
        blocks = {lang: pack_texts(tokenizer, [p.read_text() for p in sorted((data / lang).glob("*.src"))], 32)
                  for lang in LINES}  # fmt: skip
        spec = TinyCodeModelSpec(block_size=32, pretrain_steps=40, batch_size=8, lr=3e-3, warmup_steps=4)
        pretrain(model, blocks, spec, progress=False)
        model_dir = root / "model"
        model.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        return {"model": model_dir, "data": data}

    return _once("code", factory, build)


def speech_assets(factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``model``: a tiny random Whisper (4-second windows); ``data``: a Common Voice folder of Marathi speech."""

    def build(root: Path) -> dict[str, Path]:
        from trainers.offline.synth_speech import make_common_voice_folder
        from trainers.offline.tiny_whisper_model import TinyWhisperSpec, make_tiny_whisper, pretrain_tiny_whisper

        spec = TinyWhisperSpec(
            d_model=32, encoder_layers=1, decoder_layers=1, attention_heads=2, ffn_dim=64, vocab_size=300,
            chunk_seconds=4, max_label_tokens=40,
        )  # fmt: skip
        model, tokenizer, features = make_tiny_whisper(spec)
        folder = make_common_voice_folder(root / "cv" / "mr", "mr", max_sentences=9, dev_size=2, test_size=2)
        spec = dataclasses.replace(spec, pretrain_steps=20, batch_size=5, lr=4e-3, warmup_steps=2)
        pretrain_tiny_whisper(model, tokenizer, features, {"mr": folder.folder}, spec, progress=False)
        model_dir = root / "model"
        model.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        features.save_pretrained(model_dir)
        return {"model": model_dir, "data": folder.folder}

    return _once("speech", factory, build)


def _overrides(assets: dict[str, Path], output_dir: Path, lang: str, **values: Any) -> dict[str, Any]:
    """What every tiny test run shares: the test model and data, 6 steps, evaluation and checkpoints every 3."""
    return {
        "MODEL": str(assets["model"]),
        "DATA": str(assets["data"]),
        "LANG": lang,
        "OUTPUT_DIR": str(output_dir),
        "MAX_STEPS": 6,
        "eval_steps": 3,
        "save_steps": 3,
        "logging_steps": 1,
        "warmup_steps": 0,
        "learning_rates": {"flora": 5e-2, "lora": 1e-2, "ia3": 5e-2},
        **values,
    }


def code_overrides(assets: dict[str, Path], output_dir: Path, **extra: Any) -> dict[str, Any]:
    """The tiny-code recipe on the test model and folders, small enough for a few-second run."""
    values = {"BATCH_SIZE": 4, "block_size": 32, "eval_fraction": 0.2, "max_eval_examples": 8}
    return _overrides(assets, output_dir, "alpha", **{**values, **extra})


def speech_overrides(assets: dict[str, Path], output_dir: Path, **extra: Any) -> dict[str, Any]:
    values = {"BATCH_SIZE": 3, "max_label_tokens": 40, "generation_max_length": 12}
    return _overrides(assets, output_dir, "mr", **{**values, **extra})


def cli_args(recipe: str, overrides: dict[str, Any]) -> list[str]:
    """``flora-train`` arguments for ``overrides``: make names as flags, other keys as ``--set key=json``."""
    flags = {"MODEL": "--model", "DATA": "--data", "LANG": "--lang", "LANGS": "--langs", "OUTPUT_DIR": "--output-dir"}
    flags |= {"MAX_STEPS": "--max-steps", "BATCH_SIZE": "--batch-size", "METHOD": "--method", "RESUME": "--resume"}
    args = ["--recipe", recipe, "--no-progress"]
    for key, value in overrides.items():
        args += [flags[key], str(value)] if key in flags else ["--set", f"{key}={json.dumps(value)}"]
    return args


def trained_run(factory: pytest.TempPathFactory, task: str) -> Path:
    """A finished tiny run folder (6 steps, checkpoints at 3 and 6), trained once: code through the ``flora-train``
    command line, speech through :func:`trainers.recipes.training.train`."""

    def build(root: Path) -> Path:
        from trainers.recipes.recipe import load_recipe
        from trainers.recipes.training import train
        from trainers.train import main

        if task == "code":
            assert main(cli_args("tiny-code", code_overrides(code_assets(factory), root))) == 0
        else:
            train(load_recipe("tiny-whisper", speech_overrides(speech_assets(factory), root)), progress=False)
        return root

    return _once(f"run-{task}", factory, build)
