"""The code demo's parts at toy sizes: corpus split, tiny model cache, one mixed-batch run over two adapters."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from trainers.data.code_corpus import corpus_fingerprint, find_code_corpus, pack_blocks, python_files
from trainers.demo.code_demo import (
    AdapterRecipe,
    add_language_adapters,
    generate_mixed,
    heldout_perplexity,
    train_adapters_mixed,
)
from trainers.offline.tiny_code_model import TinyCodeModelSpec, language_blocks, load_or_build_tiny_code_model

TOY_SPEC = TinyCodeModelSpec(
    vocab_size=320, n_layer=1, n_embd=32, n_head=2, block_size=32, pretrain_steps=3, batch_size=4, warmup_steps=1
)


def _write_language(folder: Path, n_files: int, line: str) -> Path:
    folder.mkdir(parents=True)
    for i in range(n_files):
        (folder / f"f{i:02d}.src").write_text("".join(line.format(i=i, j=j) for j in range(12)))
    return folder


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("src")
    alpha = _write_language(root / "alpha", 24, "def f{i}_{j}(x):\n    return x + {j}\n")
    beta = _write_language(root / "beta", 24, "sub g{i}_{j} {{ my $x = shift; return $x * {j}; }}\n")
    (alpha / "blob.bin").write_bytes(b"\x00\x01binary" * 40)  # dropped: not text
    _write_language(alpha / ".git", 3, "hidden {i} {j}\n")  # dropped: hidden folder
    tiny = _write_language(root / "tiny", 1, "x{j}\n")  # dropped: too little text
    return {"alpha": alpha, "beta": beta, "tiny": tiny}


def _corpus(sources: dict[str, Path], seed: int = 0):
    return find_code_corpus(
        source_dirs=sources, train_bytes=4_000, heldout_bytes=1_200, min_bytes=2_000, max_languages=None, seed=seed
    )


def test_corpus_split_is_deterministic_and_by_file(sources: dict[str, Path]) -> None:
    corpus = _corpus(sources)
    assert list(corpus) == ["alpha", "beta"]
    for lc in corpus.values():
        train = {f.path for f in lc.train}
        held = {f.path for f in lc.heldout}
        assert train and held and not train & held
        assert all(Path(p).suffix == ".src" and ".git" not in Path(p).parts for p in train | held)
        assert lc.heldout_bytes >= 1_200 and lc.train_bytes >= 4_000
    again = _corpus(sources)
    assert {k: [f.path for f in v.heldout + v.train] for k, v in again.items()} == {
        k: [f.path for f in v.heldout + v.train] for k, v in corpus.items()
    }
    assert corpus_fingerprint(again) == corpus_fingerprint(corpus)
    assert corpus_fingerprint(_corpus(sources, seed=1)) != corpus_fingerprint(corpus)


def test_corpus_rejects_unknown_language_and_small_caps(sources: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="no source files known"):
        find_code_corpus(languages=["cobol"])
    with pytest.raises(ValueError, match="min_bytes"):
        find_code_corpus(source_dirs=sources, train_bytes=10, heldout_bytes=10, min_bytes=100)


def test_python_stdlib_is_found() -> None:
    files = python_files()
    assert any(p.name == "os.py" for p in files)
    assert not any("site-packages" in p.parts for p in files)


def test_pack_blocks_drops_the_tail_and_separates_documents() -> None:
    blocks = pack_blocks([[1, 2, 3], [4, 5]], block_size=3, sep_id=0)
    assert blocks.tolist() == [[1, 2, 3], [0, 4, 5]]
    assert pack_blocks([[1]], block_size=4).shape == (0, 4)


@pytest.fixture(scope="module")
def built(sources: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    cache = tmp_path_factory.mktemp("cache") / "tiny"
    corpus = _corpus(sources)
    torch.manual_seed(0)
    model, tokenizer, info = load_or_build_tiny_code_model(cache, TOY_SPEC, corpus, progress=False)
    return cache, corpus, model, tokenizer, info


def test_tiny_model_is_cached_and_reloaded(built) -> None:
    cache, corpus, model, tokenizer, info = built
    assert not info.from_cache and info.languages == ["alpha", "beta"]
    assert len(info.pretrain_loss) == TOY_SPEC.pretrain_steps
    assert model.config.multi_query and model.config.vocab_size == len(tokenizer) <= TOY_SPEC.vocab_size
    text = corpus["alpha"].heldout[0].text
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text

    model2, tokenizer2, info2 = load_or_build_tiny_code_model(cache, TOY_SPEC, corpus, progress=False)
    assert info2.from_cache and info2.fingerprint == info.fingerprint
    assert info2.pretrain_loss == info.pretrain_loss
    assert tokenizer2(text)["input_ids"] == tokenizer(text)["input_ids"]
    reloaded = model2.state_dict()
    assert all(torch.equal(t, reloaded[k]) for k, t in model.state_dict().items())

    other_spec = TinyCodeModelSpec(**{**info.spec, "pretrain_steps": 2})
    _, _, info3 = load_or_build_tiny_code_model(cache, other_spec, corpus, progress=False)
    assert not info3.from_cache  # a different spec must not reuse the cached model


def test_mixed_batch_training_trains_each_adapter(built, tmp_path: Path) -> None:
    cache, corpus, _, _, _ = built
    # a fresh copy from the cache: get_peft_model injects layers into the model it is given
    model, tokenizer, _ = load_or_build_tiny_code_model(cache, TOY_SPEC, corpus, progress=False)
    blocks = {k: v[:2] for k, v in language_blocks(corpus, tokenizer, TOY_SPEC.block_size).items()}
    recipe = AdapterRecipe(steps=12, rows_per_language=2, lr=5e-2, warmup_steps=1)
    peft_model = add_language_adapters(model, list(blocks), recipe)
    base_before = {k: v.clone() for k, v in peft_model.named_parameters() if "flora_" not in k}
    input_ids = torch.cat(list(blocks.values()))
    names = [lang for lang, b in blocks.items() for _ in range(len(b))]

    def loss() -> float:
        with torch.no_grad():
            return peft_model(input_ids=input_ids, labels=input_ids, adapter_names=names).loss.item()

    before = loss()
    losses = train_adapters_mixed(peft_model, blocks, recipe, progress=False)
    assert len(losses) == recipe.steps
    assert loss() < before
    for lang in blocks:  # every adapter moved away from identity, and only the adapters did
        moved = [p for k, p in peft_model.named_parameters() if k.endswith(f".{lang}")]
        assert moved and any(not torch.allclose(p, torch.ones_like(p)) for p in moved)
    assert all(torch.equal(p, base_before[k]) for k, p in peft_model.named_parameters() if "flora_" not in k)

    ppl = heldout_perplexity(peft_model, blocks, ["__base__", *blocks], max_blocks=2, chunk=1)
    assert set(ppl) == set(blocks) and all(math.isfinite(v) for row in ppl.values() for v in row.values())
    texts = generate_mixed(peft_model, tokenizer, ["def f", "sub g", "def"], ["alpha", "beta", "__base__"], 4)
    assert len(texts) == 3

    # the saved adapters (PEFT format, one folder each) reproduce the trained mixed batch
    peft_model.save_pretrained(tmp_path)
    fresh, _, _ = load_or_build_tiny_code_model(cache, TOY_SPEC, corpus, progress=False)
    reloaded = PeftModel.from_pretrained(fresh, tmp_path / "alpha", adapter_name="alpha")
    reloaded.load_adapter(tmp_path / "beta", adapter_name="beta")
    with torch.no_grad():
        want = peft_model(input_ids=input_ids, adapter_names=names).logits
        got = reloaded(input_ids=input_ids, adapter_names=names).logits
    torch.testing.assert_close(got, want)
