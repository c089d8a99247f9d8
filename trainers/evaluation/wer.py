"""Word error rate as the FLoRA paper reports it, and with Whisper's text normalizer.

Corpus-level: total word edits (substitutions + deletions + insertions) over total reference words, never a mean of
per-utterance rates (which would weigh a one-word clip like a long sentence). The paper scores the unnormalized
text; the normalized number (Whisper's ``EnglishTextNormalizer`` for English, ``BasicTextNormalizer`` otherwise,
as Whisper's own evaluation does) is the one comparable across papers. Note that Whisper's basic normalizer turns
combining marks into spaces, so it splits words of scripts such as Devanagari (Marathi, Hindi): there the normalized
number follows Whisper's convention rather than counting linguistic words.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence, Union

from transformers.models.whisper.english_normalizer import BasicTextNormalizer, EnglishTextNormalizer

ENGLISH = {"en", "english", "eng"}


@dataclass(frozen=True)
class WordCounts:
    """jiwer's alignment counts summed over a corpus."""

    substitutions: int = 0
    deletions: int = 0
    insertions: int = 0
    hits: int = 0

    @property
    def reference_words(self) -> int:
        return self.substitutions + self.deletions + self.hits

    @property
    def errors(self) -> int:
        return self.substitutions + self.deletions + self.insertions

    def wer(self) -> float:
        """errors / reference words; with no reference words at all: 0 if nothing was hypothesized, else 1."""
        if self.reference_words == 0:
            return 0.0 if self.insertions == 0 else 1.0
        return self.errors / self.reference_words

    def __add__(self, other: WordCounts) -> WordCounts:
        return WordCounts(*(a + b for a, b in zip(asdict(self).values(), asdict(other).values())))


@dataclass(frozen=True)
class WERResult:
    """Unnormalized (the paper's) and normalized corpus WER, as fractions (multiply by 100 for the paper's table)."""

    wer: float
    normalized_wer: float
    counts: WordCounts
    normalized_counts: WordCounts
    utterances: int
    normalizer: str

    def to_dict(self) -> dict:
        out = asdict(self)
        out["reference_words"] = self.counts.reference_words
        out["normalized_reference_words"] = self.normalized_counts.reference_words
        return out


def whisper_normalizer(
    language: Optional[str] = None, english_spelling_mapping: Optional[Mapping[str, str]] = None
) -> Callable[[str], str]:
    """Whisper's normalizer: English rules (numbers, spellings, contractions) for English, the basic one otherwise.

    ``english_spelling_mapping`` is Whisper's ``normalizer.json`` (British to American spellings); without it the
    English normalizer still does everything else.
    """

    if language is not None and language.lower() in ENGLISH:
        return EnglishTextNormalizer(dict(english_spelling_mapping or {}))
    return BasicTextNormalizer()


def word_counts(references: Sequence[str], hypotheses: Sequence[Optional[str]]) -> WordCounts:
    """Alignment counts over a corpus. Empty references count the hypothesis words as insertions, empty hypotheses
    the reference words as deletions (done here, since older jiwer versions reject empty strings)."""
    try:
        import jiwer  # an extra (flora-hf[train]): scoring code without it still imports
    except ImportError as exc:
        raise RuntimeError("WER needs jiwer: pip install jiwer (or flora-hf[train])") from exc
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    total = WordCounts()
    pairs_ref, pairs_hyp = [], []
    for ref, hyp in zip(references, hypotheses):
        ref_words, hyp_words = (ref or "").split(), (hyp or "").split()
        if not ref_words or not hyp_words:
            total = total + WordCounts(deletions=len(ref_words), insertions=len(hyp_words))
        else:
            pairs_ref.append(" ".join(ref_words))
            pairs_hyp.append(" ".join(hyp_words))
    if pairs_ref:
        out = jiwer.process_words(pairs_ref, pairs_hyp)
        total = total + WordCounts(out.substitutions, out.deletions, out.insertions, out.hits)
    return total


def corpus_wer(
    references: Sequence[str],
    hypotheses: Sequence[Optional[str]],
    *,
    language: Optional[str] = None,
    normalizer: Optional[Callable[[str], str]] = None,
    english_spelling_mapping: Optional[Mapping[str, str]] = None,
) -> WERResult:
    """Corpus WER of ``hypotheses`` against ``references``, unnormalized and normalized.

    ``language`` (``"en"``, ``"mr"``, ...) picks Whisper's normalizer; ``normalizer`` overrides it.
    """
    if not references:
        raise ValueError("no utterances to score")
    norm = normalizer or whisper_normalizer(language, english_spelling_mapping)
    raw = word_counts(references, hypotheses)
    normalized = word_counts([norm(r or "") for r in references], [norm(h or "") for h in hypotheses])
    name = getattr(norm, "__name__", None) or type(norm).__name__
    return WERResult(raw.wer(), normalized.wer(), raw, normalized, len(references), name)


def run_wer_eval(
    references: Sequence[str],
    hypotheses: Sequence[Optional[str]],
    language: Optional[str] = None,
    out_json: Union[str, Path, None] = None,
    *,
    english_spelling_mapping: Optional[Mapping[str, str]] = None,
) -> WERResult:
    """:func:`corpus_wer`, also written to ``out_json`` (with the per-utterance pairs) when given."""
    result = corpus_wer(references, hypotheses, language=language, english_spelling_mapping=english_spelling_mapping)
    if out_json is not None:
        report = {"language": language, **result.to_dict()}
        report["utterances_detail"] = [{"reference": r, "hypothesis": h} for r, h in zip(references, hypotheses)]
        Path(out_json).parent.mkdir(parents=True, exist_ok=True)
        Path(out_json).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return result
