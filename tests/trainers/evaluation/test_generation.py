"""Completions for problems of several languages share batches, each row through its own adapter; or via a server."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from tests.flora.helpers import adapted
from tests.serving.fake_engine import FakeEngine, make_tokenizer
from tests.serving.live_server import LiveServer
from trainers.evaluation import (
    Problem,
    adapter_names_for,
    generate_completions,
    generate_completions_via_server,
    read_completions_jsonl,
)
from trainers.evaluation.generation import StopOnStrings

from .helpers import PL_PROBLEM, PY_PROBLEM

# the fake tokenizer knows a small vocabulary; these prompts tokenize to different lengths
PROBLEMS = [
    Problem("p0", "py", "def add(a, b):\n    return", "tests", ("\ndef",)),
    Problem("p1", "pl", "the quick brown fox jumps over", "tests", ("\nsub",)),
    Problem("p2", "py", "hello world", "tests", ("\ndef",)),
]
ADAPTERS = {"py": "python", "pl": "perl"}


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture()
def model(tokenizer):
    cfg = GPT2Config(
        n_layer=2, n_embd=32, n_head=4, vocab_size=len(tokenizer), n_positions=512, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    peft_model, _ = adapted(GPT2LMHeadModel(cfg).eval(), {"python": 1, "perl": 1})
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # far from identity, so each adapter visibly changes what the model writes
        for name, param in peft_model.named_parameters():
            if ".flora_" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 3)
    return peft_model.eval()


def test_adapter_choice():
    problems = [PY_PROBLEM, PL_PROBLEM]
    assert adapter_names_for(problems, None) == ["__base__", "__base__"]
    assert adapter_names_for(problems, "perl") == ["perl", "perl"]
    assert adapter_names_for(problems, {"python": "a", "perl": "b"}) == ["a", "b"]  # aliases accepted
    assert adapter_names_for(problems, lambda p: None if p.language == "py" else "b") == ["__base__", "b"]
    with pytest.raises(ValueError, match="no adapter for language"):
        adapter_names_for(problems, {"py": "a"})


def test_languages_share_batches_each_row_through_its_adapter(model, tokenizer, monkeypatch):
    seen: list[list[str]] = []
    original = model.generate

    def spy(*args, **kwargs):
        seen.append(list(kwargs["adapter_names"]))
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "generate", spy)
    completions = generate_completions(
        model, tokenizer, PROBLEMS, n_samples=2, temperature=0.0, adapter_for_problem=ADAPTERS, batch_size=6,
        max_new_tokens=4,
    )  # fmt: skip
    assert [len(c) for c in completions] == [2, 2, 2]
    assert all(isinstance(text, str) for c in completions for text in c)
    assert len(seen) == 1 and sorted(seen[0]) == sorted(["python"] * 4 + ["perl"] * 2)  # one mixed batch

    # each row of the mixed batch got what its own adapter alone produces
    monkeypatch.undo()
    for problem, texts in zip(PROBLEMS, completions):
        alone = generate_completions(
            model, tokenizer, [problem], n_samples=1, temperature=0.0, adapter_for_problem=ADAPTERS,
            max_new_tokens=4,
        )  # fmt: skip
        assert texts == alone[0] * 2


def test_adapters_change_the_completions(model, tokenizer):
    kwargs = dict(n_samples=1, temperature=0.0, max_new_tokens=6)
    with_adapters = generate_completions(model, tokenizer, PROBLEMS, adapter_for_problem=ADAPTERS, **kwargs)
    base = generate_completions(model, tokenizer, PROBLEMS, adapter_for_problem=None, **kwargs)
    assert with_adapters != base


def test_one_adapter_per_batch_when_not_mixing(model, tokenizer, monkeypatch):
    seen: list[str] = []
    original = model.set_adapter

    def spy(name):
        seen.append(name)
        return original(name)

    monkeypatch.setattr(model, "set_adapter", spy)
    completions = generate_completions(
        model, tokenizer, PROBLEMS, n_samples=2, temperature=0.7, adapter_for_problem=ADAPTERS, batch_size=8,
        max_new_tokens=3, mix_adapters=False, seed=0,
    )  # fmt: skip
    assert [len(c) for c in completions] == [2, 2, 2]
    assert {"python", "perl"} <= set(seen)


def test_rows_stop_at_their_own_stop_tokens(tokenizer):
    prompt = tokenizer("hello", add_special_tokens=False)["input_ids"]
    tail = tokenizer(" world\ndef", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt + tail, prompt + tail])
    stop = StopOnStrings(tokenizer, len(prompt), [("\ndef",), ("\nsub",)])
    assert stop(ids, None).tolist() == [True, False]  # the Perl row does not stop at Python's stop token
    no_stops = StopOnStrings(tokenizer, len(prompt), [()])
    assert no_stops(ids[:1], None).tolist() == [False]


def test_completions_via_server_route_each_problem_to_its_adapter():
    engine = FakeEngine(adapters={"perl": "/adapters/perl"})
    problems = [
        Problem("p0", "py", "hello world", "tests", ("\ndef", "\n#", "\nif", "\nclass", "\nprint")),
        Problem("p1", "pl", "the quick brown fox", "tests", ("brown",)),
    ]
    with LiveServer(engine) as live:
        completions = generate_completions_via_server(
            live.url, problems, {"py": "__base__", "pl": "perl"}, n_samples=3, temperature=0.1, max_new_tokens=6,
            seed=7, concurrency=4,
        )  # fmt: skip
    assert [len(c) for c in completions] == [3, 3]
    by_prompt = {}
    for request in engine.requests:
        by_prompt.setdefault(request.inputs, []).append(request)
    assert {r.adapter_id for r in by_prompt["hello world"]} == {None}
    assert {r.adapter_id for r in by_prompt["the quick brown fox"]} == {"perl"}
    assert sorted(r.sampling.seed for r in by_prompt["hello world"]) == [7, 8, 9]
    assert all(len(r.stopping.stop_sequences) == 4 for r in by_prompt["hello world"])  # TGI's default limit
    assert all("brown" not in text for text in completions[1])  # cut at the problem's stop token


def test_transformers_model_with_added_adapters(tokenizer):
    from flora_hf import FLoRAConfig

    cfg = GPT2Config(
        n_layer=1, n_embd=32, n_head=4, vocab_size=len(tokenizer), n_positions=64, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    model = GPT2LMHeadModel(cfg).eval()
    model.add_adapter(FLoRAConfig(r=1), adapter_name="python")
    model.add_adapter(FLoRAConfig(r=1), adapter_name="perl")
    completions = generate_completions(
        model, tokenizer, PROBLEMS, n_samples=1, temperature=0.0, adapter_for_problem=ADAPTERS, max_new_tokens=3
    )
    assert [len(c) for c in completions] == [1, 1, 1]
    with pytest.raises(ValueError, match="non-existing adapter"):
        generate_completions(model, tokenizer, PROBLEMS[:1], n_samples=1, adapter_for_problem="ruby", max_new_tokens=2)


def test_run_passk_eval_with_a_local_model(model, tokenizer, tmp_path):
    from trainers.evaluation import SandboxLimits, run_passk_eval

    path = tmp_path / "problems.jsonl"
    path.write_text("".join(json.dumps(p.to_dict()) + "\n" for p in (PY_PROBLEM, PL_PROBLEM)))
    out = tmp_path / "out" / "passk.json"
    report = run_passk_eval(
        model, path, ADAPTERS, n_samples=2, temperature=0.0, out_json=out, tokenizer=tokenizer, max_new_tokens=4,
        limits=SandboxLimits(timeout_s=5),
    )  # fmt: skip
    assert set(report["languages"]) == {"py", "pl"}
    for summary in report["languages"].values():  # a random model writes no working code, but it was judged
        assert summary["toolchain"] == "available" and summary["samples"] == 2 and summary["pass@1"] == 0.0
    assert report["generation"]["adapter"] == ADAPTERS and report["generation"]["n_samples"] == 2
    assert json.loads(out.read_text())["languages"]["pl"]["samples"] == 2
    problems, completions = read_completions_jsonl(out.with_name("passk.json.completions.jsonl"))
    assert [p.language for p in problems] == ["py", "pl"] and [len(c) for c in completions] == [2, 2]


def test_run_passk_eval_through_a_server():
    from trainers.evaluation import run_passk_eval

    engine = FakeEngine(adapters={"perl": "/adapters/perl"})
    with LiveServer(engine) as live:
        report = run_passk_eval(live.url, [PL_PROBLEM], "perl", n_samples=2, temperature=0.1, max_new_tokens=4)
    assert report["languages"]["pl"]["samples"] == 2 and report["generation"]["source"] == live.url
    assert {r.adapter_id for r in engine.requests} == {"perl"}
