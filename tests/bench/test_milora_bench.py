"""The MiLoRA decode benchmark runs end to end at a tiny size and reports every variant (no timing assertions)."""

import json
import math
import shlex

import pytest

from tests.bench.scripts import load_script

LAYERS, NEW_TOKENS, BATCHES = 2, 4, (1, 3)
TINY = shlex.split(
    f"--device cpu --hidden 32 --intermediate 48 --layers {LAYERS} --heads 4 --vocab 97 --rank 8 --moe-experts 4 "
    f"--moe-top-k 2 --prompt-len 6 --new-tokens {NEW_TOKENS} --batch-sizes 1,3 --repeats 2 --warmup 1"
)


@pytest.fixture(scope="module")
def milora_bench():
    yield from load_script("milora")


def test_tiny_run_reports_every_variant(milora_bench, tmp_path, capsys):
    returned = milora_bench.main([*TINY, "--out", str(tmp_path)])
    doc = json.loads((tmp_path / "milora_cpu_float32.json").read_text())  # what is written, keys as JSON has them
    assert doc["command"] == returned["command"] and doc["command"].startswith("python bench/milora.py")
    variants = list(milora_bench.VARIANTS)
    assert {(r["batch"], r["variant"]) for r in doc["rows"]} == {(b, v) for b in BATCHES for v in variants}
    assert len(doc["samples"]) == 2 * len(BATCHES) * len(variants)
    for r in doc["rows"]:
        assert r["decode_tok_s"]["n"] == 2 and r["decode_tok_s"]["min"] > 0, r
        for key in ("vs_base", "vs_base_cpu"):
            assert math.isfinite(r[key]["median"]) and r[key]["median"] > 0, r
        if r["variant"] == "base":
            assert r["vs_base"]["median"] == 1.0
    assert {(sp["batch"], sp["other"]) for sp in doc["speedups"]} == {
        (b, v) for b in BATCHES for v in variants if v not in ("base", "milora")
    }
    assert all(sp["wall"]["median"] > 0 and sp["e2e"]["median"] > 0 for sp in doc["speedups"])

    # The same LoRA budget everywhere (rank 8 on the 7 projections of each layer); routers on top.
    params = doc["params"]
    budget = LAYERS * 8 * (4 * (32 + 32) + 3 * (32 + 48))
    assert all(params[v]["lora_factors"] == budget for v in variants if v != "base")
    assert params["base"] == {"lora_factors": 0, "router": 0, "magnitude": 0, "adapter_bytes": 0}
    assert params["lora"]["router"] == params["lora"]["magnitude"] == 0
    assert params["dora"]["magnitude"] == LAYERS * (4 * 32 + 2 * 48 + 32)  # one per output feature of each module
    assert params["dora"]["adapter_bytes"] == 4 * (budget + params["dora"]["magnitude"])  # fp32
    assert params["moelora"]["router"] == LAYERS * 4 * (6 * 32 + 48)  # experts x d_in per module
    assert 7 * 32 * LAYERS < params["milora"]["router"] == params["milora_per_token"]["router"] < 9 * 32 * LAYERS

    # Routing counted in the warm-up generate: MiLoRA once per layer at prefill, the per-token designs every step.
    calls = doc["router_calls_per_generate"]
    for b in map(str, BATCHES):
        assert calls["milora"][b] == LAYERS
        assert calls["milora_per_token"][b] == LAYERS * NEW_TOKENS
        assert calls["moelora"][b] == calls["moelora_loop"][b] == 7 * LAYERS * NEW_TOKENS
        assert calls["lora"][b] == calls["dora"][b] == calls["base"][b] == 0
        # prefill routes identically, so both MiLoRA variants pick the same first token; both MOELoRA forms agree
        assert doc["first_tokens"]["milora"][b] == doc["first_tokens"]["milora_per_token"][b]
        assert doc["first_tokens"]["moelora"][b] == doc["first_tokens"]["moelora_loop"][b]
    printed = capsys.readouterr().out
    assert all(label in printed for label in milora_bench.LABELS.values())


def test_variants_subset_always_includes_base(milora_bench, tmp_path):
    doc = milora_bench.main(
        [*TINY, "--batch-sizes", "2", "--repeats", "1", "--variants", "milora,lora", "--out", str(tmp_path)]
    )
    assert [r["variant"] for r in doc["rows"]] == ["base", "milora", "lora"]
    assert [sp["other"] for sp in doc["speedups"]] == ["lora"]


def test_rank_must_split_into_moelora_experts(milora_bench, tmp_path):
    with pytest.raises(SystemExit, match="multiple of --moe-experts"):
        milora_bench.main([*TINY, "--rank", "6", "--out", str(tmp_path)])


def test_beam_search_is_timed_per_beam_size(milora_bench, tmp_path, capsys):
    """The paper's Table 4 has beam 1 and beam 3: beam rows are whole-generate tok/s, paired with base and MiLoRA."""
    doc = milora_bench.main([*TINY, "--beams", "1,3", "--variants", "lora,dora,milora", "--out", str(tmp_path)])
    assert {(r["batch"], r["beams"], r["variant"]) for r in doc["beam_rows"]} == {
        (b, 3, v) for b in BATCHES for v in ("base", "lora", "dora", "milora")
    }
    for r in doc["beam_rows"]:
        assert r["e2e_tok_s"]["min"] > 0 and r["vs_base"]["median"] > 0
        assert r["milora_over"]["median"] > 0
    assert len(doc["samples"]) == 2 * len(BATCHES) * 2 * 4  # rounds x batches x beam sizes x variants
    assert "| 3 | 3 | DoRA (PEFT use_dora), 7 modules |" in capsys.readouterr().out
