"""The layer benchmark runs end to end on a tiny grid and writes complete JSON and a PNG (no timing assertions)."""

import json
import math
import shlex
from pathlib import Path

import pytest

from tests.bench.scripts import load_script

TINY = shlex.split("--device cpu --dims 64 --ranks 1,2 --shapes decode=4x1,prefill=2x8 --repeats 1 --min-sample-s 0")


@pytest.fixture(scope="module")
def layer_bench():
    yield from load_script("layer")


def _outputs(out: Path) -> tuple[dict, Path]:
    (json_path,) = out.glob("layer_cpu_float32*.json")
    return json.loads(json_path.read_text()), json_path.with_suffix(".png")


def test_tiny_grid_has_every_cell(layer_bench, tmp_path):
    layer_bench.main([*TINY, "--out", str(tmp_path)])
    doc, png = _outputs(tmp_path)
    assert png.is_file() and png.stat().st_size > 0
    cells = {(c["dim"], c["shape"], c["rank"], c["method"]): c for c in doc["cells"]}
    for shape in ("decode", "prefill"):
        for rank in (1, 2):
            methods = [m for m in layer_bench.METHODS if m != "flora_rank1" or rank == 1]
            for method in methods:
                c = cells.pop((64, shape, rank, method))
                assert c["status"] == "ok", c
                assert c["median_s"] > 0 and math.isfinite(c["median_s"])
                assert c["ratio_to_base"] > 0 and math.isfinite(c["ratio_to_base"])
                assert all(s > 0 for s in c["samples_s"])
    assert not cells, f"unexpected cells: {sorted(cells)}"
    autos = [c["path"] for c in doc["cells"] if c["method"] == "flora_auto"]
    assert set(autos) <= {"rank1", "stacked", "merged"} and "rank1" in autos
    for group in doc["agreement"]:  # all exact FLoRA paths, and both LoRA forms, compute the same function
        assert group["max_rel_err"] and max(group["max_rel_err"].values()) < group["tol"]
    assert {v["target"] for v in doc["verdict"]} == {"rank 1 decode", "rank 1 prefill", "rank 8 decode"}
    assert doc["device"]["torch"] and doc["command"].startswith("python bench/layer.py")


def test_cells_over_memory_limit_are_skipped_not_fatal(layer_bench, tmp_path):
    layer_bench.main([*TINY, "--max-gib", "0", "--out", str(tmp_path)])
    doc, png = _outputs(tmp_path)
    assert png.is_file()
    assert doc["cells"] and all(c["status"] == "skipped" and "max-gib" in c["reason"] for c in doc["cells"])
    assert all(v["status"] == "NOT MEASURED" for v in doc["verdict"])


def test_rounds_spread_every_method_sample_target(layer_bench):
    """Slow methods sample in round 0 and then evenly, so a deadline cut leaves every method its share."""
    rounds = 25
    for target in (1, 3, 7, 25):
        slot = layer_bench.Slot("base", None, None, None, 0.0, 1.0, target=target)
        picked = [r for r in range(rounds) if layer_bench.due(slot, r, rounds)]
        assert picked[0] == 0 and len(picked) == target
