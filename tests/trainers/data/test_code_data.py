"""Code datasets from local folders: packing, labels, language tags, caps and a split that never moves."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from trainers.data.code import (
    CodeCollator,
    CodeSourceStats,
    build_code_dataset,
    build_mixed_code_dataset,
    folder_texts,
    is_local_source,
    split_documents,
    stack_data_dir,
)
from trainers.offline.tiny_code_model import train_tokenizer

BLOCK = 16


def _write(folder: Path, n: int, template: str, suffix: str) -> Path:
    folder.mkdir(parents=True)
    for i in range(n):
        (folder / f"f{i:02d}{suffix}").write_text("".join(template.format(i=i, j=j) for j in range(6)))
    return folder


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("code")
    perl = _write(root / "perl", 20, "sub f{i}_{j} {{ my $x = shift; return $x + {j}; }}\n", ".pl")
    lua = _write(root / "lua", 12, "function g{i}_{j}(x) return x * {j} end\n", ".lua")
    (perl / "README.md").write_text("# not perl\n")  # dropped by the extension filter
    (perl / "blob.bin").write_bytes(b"\x00\x01" * 50)  # dropped: binary
    (perl / "empty.pl").write_text("")  # dropped: empty
    _write(perl / ".git", 2, "hidden {i} {j}\n", ".pl")  # dropped: hidden folder
    return {"perl": perl, "lua": lua}


@pytest.fixture(scope="module")
def tokenizer(sources: dict[str, Path]):
    texts = [p.read_text() for folder in sources.values() for p in sorted(folder.glob("f*"))]
    return train_tokenizer(texts, vocab_size=300, block_size=BLOCK)


def test_blocks_labels_and_language_tags(sources: dict[str, Path], tokenizer) -> None:
    splits = build_code_dataset("perl", tokenizer, sources["perl"], block_size=BLOCK, eval_fraction=0.2)
    stats = splits.stats["perl"]
    assert stats.docs == 21 and stats.skipped == 2  # 20 files + README; binary and empty skipped
    assert stats.train_docs + stats.eval_docs == stats.docs and stats.eval_docs > 0
    assert len(splits.train) == stats.train_blocks > 0 and len(splits.eval) == stats.eval_blocks > 0
    item = splits.train[0]
    assert item["input_ids"].shape == (BLOCK,) and item["input_ids"].dtype == torch.long
    assert torch.equal(item["labels"], item["input_ids"]) and item["labels"] is not item["input_ids"]
    assert torch.equal(item["attention_mask"], torch.ones(BLOCK, dtype=torch.long))
    assert item["language"] == item["adapter_name"] == "perl"
    # every document is followed by EOS, so a whole split holds one EOS per document (minus the dropped tail)
    eos = (splits.train.blocks == tokenizer.eos_token_id).sum().item()
    assert stats.train_docs - 1 <= eos <= stats.train_docs
    assert "perl" in splits.summary() and "blocks" in str(stats)


def test_split_is_deterministic_and_by_document(sources: dict[str, Path], tokenizer) -> None:
    texts = list(folder_texts(sources["perl"], CodeSourceStats("perl", "x"), extensions=[".pl"]))
    train, held = split_documents(texts, 0.25, seed=0)
    assert (train, held) == split_documents(texts, 0.25, seed=0)
    assert set(train).isdisjoint(held) and sorted(train + held) == sorted(texts)
    assert (train, held) != split_documents(texts, 0.25, seed=1)
    # a document's side depends on its content only: reversed order or fewer documents never move it
    r_train, r_held = split_documents(texts[::-1], 0.25, seed=0)
    assert set(r_train) == set(train) and set(r_held) == set(held)
    few_train, few_held = split_documents(texts[:10], 0.25, seed=0)
    if set(held) & set(texts[:10]):  # (the fallback only acts when the hash leaves a side empty)
        assert set(few_held) == set(held) & set(texts[:10])
    assert split_documents(texts[:2], 0.01, seed=0)[1]  # tiny input: still one eval document
    a = build_code_dataset("perl", tokenizer, sources["perl"], block_size=BLOCK, eval_fraction=0.25)
    b = build_code_dataset("perl", tokenizer, sources["perl"], block_size=BLOCK, eval_fraction=0.25)
    assert torch.equal(a.train.blocks, b.train.blocks) and torch.equal(a.eval.blocks, b.eval.blocks)


def test_caps_and_extension_filter(sources: dict[str, Path], tokenizer) -> None:
    stats = CodeSourceStats("perl", "x")
    texts = list(folder_texts(sources["perl"], stats, extensions=["pl"], max_examples=5))
    assert len(texts) == stats.docs == 5 and all(t.startswith("sub ") for t in texts)
    stats = CodeSourceStats("perl", "x")
    one = len((sources["perl"] / "f00.pl").read_bytes())
    texts = list(folder_texts(sources["perl"], stats, extensions=[".pl"], max_bytes=3 * one))
    assert len(texts) == 3 and stats.bytes == 3 * one
    clipped = list(folder_texts(sources["perl"], CodeSourceStats("perl", "x"), [".pl"], max_file_bytes=60))
    assert all(len(t.encode()) <= 60 and t.endswith("\n") for t in clipped)
    with pytest.raises(ValueError, match="too little"):
        build_code_dataset("perl", tokenizer, sources["perl"], block_size=10_000, eval_fraction=0.0)


def test_mixed_dataset_tags_every_example(sources: dict[str, Path], tokenizer) -> None:
    mixed = build_mixed_code_dataset(
        {"perl": sources["perl"], "lua": sources["lua"]}, tokenizer, block_size=BLOCK, eval_fraction=0.2
    )
    counts = mixed.train.language_counts()
    assert set(counts) == {"perl", "lua"} and counts["perl"] > counts["lua"]
    assert counts == {lang: s.train_blocks for lang, s in mixed.stats.items()}
    for lang in ("perl", "lua"):  # each row's tag matches the language its text came from
        alone = build_code_dataset(lang, tokenizer, sources[lang], block_size=BLOCK, eval_fraction=0.2)
        rows = [mixed.train[i] for i in range(len(mixed.train)) if mixed.train[i]["language"] == lang]
        assert torch.equal(torch.stack([r["input_ids"] for r in rows]), alone.train.blocks)
        assert all(r["adapter_name"] == lang for r in rows)
    batch = CodeCollator()([mixed.train[0], mixed.train[len(mixed.train) - 1]])
    assert batch["input_ids"].shape == (2, BLOCK) and batch["adapter_names"] == ["perl", "lua"]
    assert "adapter_names" not in CodeCollator(adapter_key=None)([mixed.train[0]])

    balanced = build_mixed_code_dataset(
        {"perl": sources["perl"], "lua": sources["lua"]},
        tokenizer,
        block_size=BLOCK,
        eval_fraction=0.2,
        balance=True,
        adapter_names={"perl": "flora_perl"},
    )
    counts = balanced.train.language_counts()
    assert counts["perl"] == counts["lua"] == min(mixed.train.language_counts().values())
    assert {balanced.train[i]["adapter_name"] for i in range(len(balanced.train))} == {"flora_perl", "lua"}


def test_source_names() -> None:
    assert stack_data_dir("perl") == stack_data_dir("pl") == "data/perl"
    assert stack_data_dir("cpp") == "data/c++" and stack_data_dir("Racket") == "data/racket"
    assert is_local_source(None) is False and is_local_source("bigcode/the-stack-dedup") is False
    with pytest.raises(FileNotFoundError, match="does not exist"):
        is_local_source("./no/such/folder")
