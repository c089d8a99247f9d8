"""sweep_rates: the 1-3-10 ladder, the same grid for each method, extension past an edge, and one tiny real sweep."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

import pytest

from tests.trainers.recipe_fixtures import code_assets, code_overrides
from trainers.demo.sweep_rates import ladder_index, ladder_rate, main, markdown, sweep_method


def test_ladder_snaps_to_one_and_three() -> None:
    assert [ladder_rate(ladder_index(x)) for x in (1e-3, 3e-3, 2.9e-3, 1.1e-2, 0.1)] == [1e-3, 3e-3, 3e-3, 1e-2, 0.1]
    assert ladder_rate(ladder_index(3e-3) + 1) == 1e-2 and ladder_rate(ladder_index(1e-2) - 1) == 3e-3
    with pytest.raises(ValueError, match="positive"):
        ladder_index(0.0)


def _bowl(best: float) -> tuple[list[float], Callable[[float], float]]:
    calls: list[float] = []

    def score(rate: float) -> float:
        calls.append(rate)
        return (math.log10(rate) - math.log10(best)) ** 2

    return calls, score


def test_an_interior_best_takes_three_runs() -> None:
    calls, score = _bowl(1e-2)
    result = sweep_method("flora", 1e-2, score)
    assert calls == [3e-3, 1e-2, 3e-2] and result.best == 1e-2 and not result.at_edge and result.extended == 0


def test_an_edge_best_walks_outward_until_interior_or_the_cap() -> None:
    calls, score = _bowl(1e-1)
    result = sweep_method("ia3", 3e-3, score)  # best far above the grid: walks up
    assert calls == [1e-3, 3e-3, 1e-2, 3e-2, 1e-1] and result.best == 1e-1 and result.at_edge  # cap of 2 reached
    calls, score = _bowl(3e-4)
    result = sweep_method("lora", 3e-3, score, max_extend=3)  # best below: walks down, stops once interior
    assert calls == [1e-3, 3e-3, 1e-2, 3e-4, 1e-4] and result.best == 3e-4 and not result.at_edge


def test_a_diverged_rate_ranks_last() -> None:
    losses = {1e-3: 2.0, 3e-3: 1.5, 1e-2: math.nan, 3e-2: math.inf}
    result = sweep_method("lora", 3e-3, losses.__getitem__)
    assert result.best == 3e-3 and not result.at_edge and result.extended == 0


def test_report_marks_the_choice_and_gives_the_recipe_line() -> None:
    _, score = _bowl(1e-2)
    text = markdown([sweep_method("flora", 1e-2, score)], "python -m x", "5 steps")
    assert "| flora | 0.01 | **0.0000** |" in text and "| flora | 0.003 | 0.2" in text
    assert "learning_rates: {flora: 1.0e-02}" in text and "edge" not in text


def test_a_real_sweep_trains_each_rate_on_the_same_data(tmp_path_factory, tmp_path: Path, capsys) -> None:
    overrides = code_overrides(code_assets(tmp_path_factory), tmp_path)
    sets = [f"{k}={json.dumps(v)}" for k, v in overrides.items() if k not in ("LANG", "OUTPUT_DIR", "MAX_STEPS")]
    out = tmp_path / "sweep"
    assert main(["--recipe", "tiny-code", "--lang", "alpha", "--methods", "flora", "--steps", "2",
                 "--max-extend", "0", "--out", str(out), *(f"--set={s}" for s in sets)]) == 0  # fmt: skip
    data = json.loads((out / "sweep.json").read_text())
    (sweep,) = data["sweeps"]
    losses = list(sweep["tried"].values())
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses) and len(set(losses)) == 3  # rates matter
    assert sweep["best"] == min(map(float, sweep["tried"]), key=lambda r: sweep["tried"][f"{r:g}"])
    assert "learning_rates: {flora:" in capsys.readouterr().out
