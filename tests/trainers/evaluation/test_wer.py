"""Corpus-level WER on hand-computed cases, unnormalized (the paper's) and with Whisper's normalizer."""

from __future__ import annotations

import json

import pytest

from trainers.evaluation import WordCounts, corpus_wer, run_wer_eval, whisper_normalizer, word_counts


def test_one_substitution_and_one_insertion():
    # the cat sat / the cat sit on: "sat"->"sit" substituted, "on" inserted: 2 edits over 3 reference words
    result = corpus_wer(["the cat sat"], ["the cat sit on"])
    assert result.wer == pytest.approx(2 / 3)
    assert result.counts == WordCounts(substitutions=1, deletions=0, insertions=1, hits=2)
    assert result.normalized_wer == pytest.approx(2 / 3)


def test_deletions():
    result = corpus_wer(["one two three four"], ["one four"])
    assert result.counts == WordCounts(substitutions=0, deletions=2, insertions=0, hits=2)
    assert result.wer == pytest.approx(0.5)


def test_corpus_level_not_mean_of_utterances():
    refs = ["a b c d e f g h i", "yes"]
    hyps = ["a b c d e f g h i", "no"]
    result = corpus_wer(refs, hyps)
    assert result.wer == pytest.approx(1 / 10)  # one edit over ten reference words
    per_utterance = [corpus_wer([r], [h]).wer for r, h in zip(refs, hyps)]
    assert sum(per_utterance) / 2 == pytest.approx(0.5)  # what a mean of utterance WERs would wrongly report
    assert result.utterances == 2 and result.counts.reference_words == 10


def test_normalization_removes_case_and_punctuation():
    result = corpus_wer(["Hello, World!"], ["hello world"], language="mr")
    assert result.wer == pytest.approx(1.0)  # unnormalized: both words differ
    assert result.normalized_wer == 0.0
    assert result.normalizer == "BasicTextNormalizer"


def test_english_uses_whisper_english_normalizer():
    result = corpus_wer(["Mr. Smith paid twenty dollars."], ["mister smith paid $20"], language="en")
    assert result.wer > 0.5
    assert result.normalized_wer == 0.0
    assert result.normalizer == "EnglishTextNormalizer"
    spelled = corpus_wer(["the colour"], ["the color"], language="en", english_spelling_mapping={"colour": "color"})
    assert spelled.wer == pytest.approx(0.5) and spelled.normalized_wer == 0.0


def test_non_english_keeps_its_letters():
    norm = whisper_normalizer("cs")
    assert norm("Dobrý den, světe!").split() == ["dobrý", "den", "světe"]


def test_empty_references_and_hypotheses():
    # an empty reference: its hypothesis words are insertions; an empty hypothesis: all reference words deleted
    counts = word_counts(["", "a b", "c d"], ["x y", "a b", ""])
    assert counts == WordCounts(substitutions=0, deletions=2, insertions=2, hits=2)
    assert counts.wer() == pytest.approx(4 / 4)
    assert corpus_wer([""], [""]).wer == 0.0
    assert corpus_wer(["  "], ["word"]).wer == 1.0
    assert corpus_wer(["a b"], [None]).wer == 1.0
    # a reference that normalization empties ("..." has no words) is handled the same way
    assert corpus_wer(["...", "a"], ["", "a"]).normalized_wer == 0.0
    with pytest.raises(ValueError):
        corpus_wer([], [])
    with pytest.raises(ValueError):
        corpus_wer(["a"], ["a", "b"])


def test_run_wer_eval_writes_json(tmp_path):
    out = tmp_path / "wer" / "mr.json"
    result = run_wer_eval(["the cat sat"], ["the cat sit on"], language="mr", out_json=out)
    report = json.loads(out.read_text())
    assert report["wer"] == pytest.approx(result.wer) and report["language"] == "mr"
    assert report["counts"] == {"substitutions": 1, "deletions": 0, "insertions": 1, "hits": 2}
    assert report["reference_words"] == 3 and len(report["utterances_detail"]) == 1
