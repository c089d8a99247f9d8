"""The serving half of ``make demo`` against a real flora-serve process on loopback."""

from __future__ import annotations

from flora_hf import FLoRAConfig
from tests.serving.tiny_serving import save_random_adapter, tiny_causal_lm, tiny_tokenizer
from trainers.demo import serve_demo as demo_serve


def test_demo_serve_queries_every_adapter(tmp_path, capsys) -> None:
    model = tiny_causal_lm()
    model.save_pretrained(tmp_path / "model")
    tiny_tokenizer().save_pretrained(tmp_path / "model")
    for i, name in enumerate(["perl", "python"]):
        save_random_adapter(model, FLoRAConfig(r=1 + i), tmp_path / "adapters" / name, seed=i)
    demo_serve.main(
        ["--model-dir", str(tmp_path / "model"), "--adapters-dir", str(tmp_path / "adapters"), "--requests", "6"]
    )
    out = capsys.readouterr().out
    assert "6 concurrent requests" in out and "tokens/s" in out
    assert out.count("perl") >= 2 and "(base)" in out
    assert "unknown adapter -> " in out and "no-such-adapter" in out
