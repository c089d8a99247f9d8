"""reproduce-small: the verdict on the paper's ordering, the report files, and one tiny pass over every method."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.trainers.recipe_fixtures import code_assets, code_overrides
from trainers.demo.reproduce_small import (
    Report,
    Row,
    loss_change,
    markdown,
    parse_args,
    run_task,
    summarize,
    verdict,
    verdicts_for,
    write,
)


def test_verdict_on_the_papers_ordering() -> None:
    assert verdict("code", "perl", "loss", {"flora": 1.00, "lora": 1.01, "ia3": 1.2}).holds
    worse = verdict("code", "perl", "loss", {"flora": 1.3, "lora": 1.0, "ia3": 1.2})
    assert not worse.holds and "LoRA better than FLoRA" in worse.note and "IA3" in worse.note
    ia3_best = verdict("speech", "mr", "wer", {"flora": 0.5, "lora": 0.5, "ia3": 0.4})
    assert ia3_best.flora_matches_lora and not ia3_best.both_beat_ia3 and not ia3_best.holds


def test_report_files(tmp_path: Path) -> None:
    rows = [Row("speech", "mr", "base", 3.0, wer=1.0, cer=0.8)]
    rows += [
        Row("speech", "mr", m, x, wer=w, normalized_wer=w, cer=0.5, steps=5)
        for m, x, w in [("flora", 2.0, 0.6), ("lora", 2.01, 0.61), ("ia3", 2.5, 0.7), ("milora", 1.0, 0.1)]
    ]
    summaries = summarize(rows)
    report = Report(
        rows=rows, verdicts=verdicts_for(summaries), summaries=summaries, settings={"command": "python -m x"},
        seconds={"total": 3},
    )  # fmt: skip
    # a method outside the paper's claim gets its row, and no say in the verdict
    assert [v.metric for v in report.verdicts] == ["loss", "wer", "cer"]
    assert all(set(v.values) == {"flora", "lora", "ia3"} for v in report.verdicts)
    assert loss_change(report, rows[1]) == pytest.approx(-1 / 3) and loss_change(report, rows[0]) is None
    write(report, tmp_path)
    data = json.loads((tmp_path / "results.json").read_text())
    assert len(data["rows"]) == 5 and data["verdicts"][0]["holds"] is True
    text = (tmp_path / "results.md").read_text()
    assert text.startswith("`python -m x` (total 3 s)")
    assert "| speech | mr | flora | 0 | 2.0000 | -33.33 | 60.0 | 60.0 | 50.0 |" in text
    assert "| speech | mr | milora | 0 | 1.0000 |" in text and "holds in 2 of 3 comparisons" in text
    assert "Mean ± standard deviation" not in text  # one seed: nothing to spread
    assert text == markdown(report)


def test_default_methods_are_the_papers() -> None:
    args = parse_args([])
    assert args.methods == "flora,lora,ia3" and args.code_steps > 50 and args.speech_steps > 80


def test_every_method_runs_with_the_same_budget(tmp_path_factory, tmp_path: Path) -> None:
    extra = code_overrides(code_assets(tmp_path_factory), tmp_path)
    extra = {k: v for k, v in extra.items() if k not in ("LANG", "OUTPUT_DIR", "MAX_STEPS")}
    rows = run_task("code", "tiny-code", ["alpha"], ["flora", "lora", "ia3"], 2, tmp_path, extra)
    assert [r.method for r in rows] == ["base", "flora", "lora", "ia3"]
    assert all(r.steps == 2 and r.loss > 0 for r in rows[1:])
    from trainers.recipes.base_models import load_base
    from trainers.recipes.recipe import apply_overrides, load_recipe

    blocks = load_base(apply_overrides(load_recipe("tiny-code"), extra)).model.transformer.h
    ia3 = sum(b.attn.c_attn.out_features + b.mlp.c_proj.in_features for b in blocks)  # PEFT's default modules
    assert rows[1].trainable_params and rows[3].trainable_params == ia3


def test_rank_column_is_the_trained_rank() -> None:
    from trainers.demo.reproduce_small import _rank
    from trainers.recipes.recipe import load_recipe

    assert _rank(load_recipe("tiny-whisper", {"METHOD": "flora"}), "mr") == 4
    assert _rank(load_recipe("tiny-whisper", {"METHOD": "ia3"}), "mr") is None
    assert _rank(load_recipe("tiny-code", {"METHOD": "milora"}), "perl") == 8  # MiLoRA's experts, not `rank`


def test_seeds_give_mean_and_spread_and_the_verdict_uses_the_means(tmp_path: Path) -> None:
    rows = []
    for seed, (f, lo, i) in enumerate([(0.20, 0.30, 0.40), (0.40, 0.30, 0.40), (0.30, 0.30, 0.50)]):
        rows.append(Row("speech", "en-029", "base", 3.0, wer=0.9, cer=0.5, seed=seed))
        rows += [
            Row("speech", "en-029", m, 1.0, wer=w, cer=0.2, seed=seed)
            for m, w in [("flora", f), ("lora", lo), ("ia3", i)]
        ]
    summaries = summarize(rows)
    flora = next(m for m in summaries if m.method == "flora")
    assert flora.seeds == 3 and flora.mean["wer"] == pytest.approx(0.3) and flora.std["wer"] == pytest.approx(0.1)
    wer = next(v for v in verdicts_for(summaries) if v.metric == "wer")
    assert wer.values["flora"] == pytest.approx(0.3) and wer.holds  # per seed FLoRA wins, loses, ties: mean ≈
    report = Report(rows=rows, summaries=summaries, verdicts=verdicts_for(summaries))
    assert loss_change(report, rows[1]) == pytest.approx(-2 / 3)  # against the same seed's base row
    assert "| speech | en-029 | flora | 3 | 1.0000 ± 0.0000 | 30.0 ± 10.0 |" in markdown(report)


def test_the_real_whisper_runs_per_accent_by_default() -> None:
    args = parse_args(["--speech-recipe", "whisper-tiny-en", "--seeds", "0,1,2"])
    assert args.speech_recipe == "whisper-tiny-en" and args.seeds == "0,1,2" and args.speech_languages is None


def test_runs_of_one_seed_each_merge_into_means_and_verdicts(tmp_path: Path) -> None:
    from trainers.demo.reproduce_small import main

    for seed, shift in ((0, 0.0), (1, 0.2)):
        rows = [Row("speech", "en-029", "base", 3.0 + shift, wer=0.5, cer=0.3, seed=seed)]
        rows += [Row("speech", "en-029", m, x + shift, wer=w, cer=c, seed=seed, steps=4)
                 for m, x, w, c in [("flora", 1.0, 0.2, 0.1), ("lora", 1.01, 0.2, 0.1), ("ia3", 2.0, 0.4, 0.2)]]  # fmt: skip
        write(
            Report(rows=rows, settings={"command": f"run seed {seed}"}, seconds={"speech": 10}), tmp_path / str(seed)
        )
    out = tmp_path / "merged"
    assert main(["--merge", str(tmp_path / "0"), str(tmp_path / "1"), "--out", str(out)]) == 0
    data = json.loads((out / "results.json").read_text())
    assert len(data["rows"]) == 8 and data["seconds"] == {"speech": 20}
    flora = next(s for s in data["summaries"] if s["method"] == "flora")
    assert flora["seeds"] == 2 and flora["mean"]["loss"] == pytest.approx(1.1)
    assert flora["std"]["loss"] == pytest.approx(0.1414, abs=1e-4)
    assert [v["holds"] for v in data["verdicts"]] == [True, True, True]
    text = (out / "results.md").read_text()
    assert "Merged from: `run seed 0`; `run seed 1`" in text and "Mean ± standard deviation" in text
    with pytest.raises(ValueError, match="same seed twice"):
        main(["--merge", str(tmp_path / "0"), str(tmp_path / "0"), "--out", str(out)])
