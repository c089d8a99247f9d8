"""Offline speech for tests and the demo: espeak-ng reads fixed sentences into a Common Voice-shaped folder.

No machine here can download Common Voice, so the speech recipe is exercised on synthetic speech in the target
language, laid out exactly as a Mozilla release (``train.tsv``/``dev.tsv``/``test.tsv`` with the release's
columns, clips under ``clips/``), so the reader tested on it is the one that reads real releases. Sentences are
fixed per language and assigned to splits by a seeded shuffle, and no sentence is in two splits (as in Common
Voice). "Speakers" are espeak pitch and speed variants, so repeated sentences are not identical clips.
"""

from __future__ import annotations

import hashlib
import random
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

CV_COLUMNS = (
    "client_id",
    "path",
    "sentence",
    "up_votes",
    "down_votes",
    "age",
    "gender",
    "accents",
    "locale",
    "segment",
)
"""The columns of a Common Voice release's split files (releases 8-12; later ones add a few, which readers ignore)."""

SENTENCES: dict[str, tuple[str, ...]] = {
    "en": (
        "The weather is lovely today.",
        "Please close the door behind you.",
        "My brother works at the hospital.",
        "We drink tea every morning.",
        "The train arrived on time.",
        "Children are playing in the garden.",
        'She said "yes" without a pause.',
        "Where do you live?",
        "Give me a glass of water, please.",
        "The library has many old books.",
        "It has been raining since noon.",
        "The farmer works in the field.",
        "This road goes to the market.",
        "Clouds have gathered in the sky.",
        "Today is Monday.",
        "My sister sings very well.",
        "The river water is clean.",
        "We went to the beach last summer.",
        "He reads the newspaper after lunch.",
        "The shop opens at seven o'clock.",
        'The sign on the wall read "no entry".',
        "Sleeping on time is good for your health.",
        "The dog is sleeping under the tree.",
        "I like to speak many languages.",
        "Our school has a big playground.",
        "Tomorrow we are going to the city.",
        "Mother is cooking in the kitchen.",
        "This tree is very old.",
        "The bus stopped near the station.",
        "What is your name?",
        "A cold wind blew all night.",
        "They painted the house blue.",
    ),
    "mr": (
        "मी शाळेत जातो.",
        "आज हवा छान आहे.",
        "तुमचे नाव काय आहे?",
        "माझे घर गावात आहे.",
        "आम्ही सकाळी चहा पितो.",
        "पाऊस जोरात पडत आहे.",
        "ती पुस्तक वाचत आहे.",
        "बाजारात भाज्या स्वस्त आहेत.",
        "मला मराठी बोलायला आवडते.",
        "आमच्या शाळेत मोठे मैदान आहे.",
        "तो रोज व्यायाम करतो.",
        "आई स्वयंपाकघरात जेवण बनवत आहे.",
        "हे झाड खूप जुने आहे.",
        "उद्या आम्ही पुण्याला जाणार आहोत.",
        "मुंबई हे मोठे शहर आहे.",
        "कृपया दार बंद करा.",
        "मुले बागेत खेळत आहेत.",
        "शेतकरी शेतात काम करतो.",
        "गाडी स्थानकावर थांबली.",
        "आकाशात ढग जमले आहेत.",
        "माझा भाऊ डॉक्टर आहे.",
        "आम्ही रात्री जेवण केले.",
        "नदीचे पाणी स्वच्छ आहे.",
        "तुम्ही कुठे राहता?",
        "मला एक ग्लास पाणी द्या.",
        "हा रस्ता बाजाराकडे जातो.",
        "दिवाळी हा प्रकाशाचा सण आहे.",
        "आज सोमवार आहे.",
        "माझी बहीण गाणे गाते.",
        'तो म्हणाला, "मी उद्या येतो."',
        "ग्रंथालयात खूप पुस्तके आहेत.",
        "आम्ही सुट्टीत समुद्रकिनारी गेलो.",
    ),
    "hi": (
        "मैं रोज़ सुबह टहलने जाता हूँ।",
        "आज मौसम बहुत अच्छा है।",
        "आपका नाम क्या है?",
        "यह किताब बहुत दिलचस्प है।",
        "बच्चे पार्क में खेल रहे हैं।",
        "मुझे चाय पीना पसंद है।",
        "दिल्ली भारत की राजधानी है।",
        "कृपया दरवाज़ा बंद कीजिए।",
        "हम कल बाज़ार जाएँगे।",
        "बारिश तेज़ हो रही है।",
        "मेरी माँ खाना बना रही हैं।",
        "वह स्कूल में पढ़ाता है।",
        "नदी का पानी साफ़ है।",
        "रेलगाड़ी समय पर आई।",
        "आसमान में बादल छाए हैं।",
        "मुझे एक गिलास पानी दीजिए।",
        "किसान खेत में काम करता है।",
        "यह सड़क स्टेशन तक जाती है।",
        "दीवाली रोशनी का त्योहार है।",
        "आज सोमवार है।",
    ),
    "de": (
        "Heute ist das Wetter schön.",
        "Ich trinke morgens gern Kaffee.",
        "Wie heißt du?",
        "Der Zug kommt pünktlich an.",
        "Die Kinder spielen im Garten.",
        "Bitte schließ die Tür.",
        "Wir fahren morgen nach Berlin.",
        "Das Buch liegt auf dem Tisch.",
        "Es regnet seit dem Morgen.",
        "Meine Schwester singt gern.",
        "Der Bäcker öffnet um sieben Uhr.",
        "Im Winter fällt oft Schnee.",
        "Das Wasser im See ist klar.",
        "Er arbeitet in einem Krankenhaus.",
        "Wo wohnst du?",
        "Gib mir bitte ein Glas Wasser.",
        "Die Straße führt zum Bahnhof.",
        "Am Sonntag gehen wir wandern.",
        "Der Hund schläft unter dem Baum.",
        "Heute ist Montag.",
    ),
}
"""A few dozen short everyday sentences per language (Marathi and Hindi in Devanagari); quotes included on purpose,
since real Common Voice sentences have them and a TSV reader with quoting on would mangle them."""

ESPEAK_VOICES = {"en": "en", "mr": "mr", "hi": "hi", "de": "de"}
"""Language code to espeak-ng voice (``espeak-ng --voices`` lists them); unknown codes are passed through, so an
accent (``en-us``, ``en-gb-scotland``, ``en-029``) is its own espeak voice."""

ENGLISH_ACCENTS = ("en-us", "en-gb-scotland", "en-029", "en-gb-x-rp")
"""espeak-ng English voices that stand in for "languages" for an English-only Whisper: the same sentences in
American, Scottish, Caribbean and Received Pronunciation accents."""


def sentence_language(language: str) -> str:
    """The language whose :data:`SENTENCES` a voice reads: itself, else its base (``en-gb-scotland`` -> ``en``)."""
    return language if language in SENTENCES else language.split("-")[0]


CORRUPT_BYTES = b"ID3\x04\x00corrupt clip: not audio\x00" * 32


class EspeakNotFound(RuntimeError):
    """espeak-ng is not installed."""


def espeak_binary() -> str:
    """The espeak-ng executable, or an error naming the Debian/Ubuntu package."""
    found = shutil.which("espeak-ng")
    if found is None:
        raise EspeakNotFound(
            "espeak-ng is needed to synthesize speech offline: apt-get install -y espeak-ng (package espeak-ng), "
            "or pass a real Common Voice folder"
        )
    return found


def synthesize(text: str, out_wav: Union[str, Path], voice: str = "en", speed: int = 175, pitch: int = 50) -> Path:
    """``text`` spoken by espeak-ng into a WAV file (22,050 Hz mono, espeak's native rate)."""
    out = Path(out_wav)
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [espeak_binary(), "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(out), "--", text]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if done.returncode != 0 or not out.is_file() or out.stat().st_size <= 44:
        raise RuntimeError(f"espeak-ng failed for voice {voice!r}: {done.stderr.strip() or 'no audio written'}")
    return out


def mp3_encoder() -> Optional[str]:
    """``lame`` or ``ffmpeg`` when installed (apt-get install -y lame), else None."""
    return shutil.which("lame") or shutil.which("ffmpeg")


def encode_mp3(wav: Path, mp3: Path) -> Path:
    """Encode a WAV file to MP3 as Common Voice ships clips."""
    encoder = mp3_encoder()
    if encoder is None:
        raise RuntimeError("no MP3 encoder: apt-get install -y lame (or ffmpeg)")
    if Path(encoder).name == "lame":
        cmd = [encoder, "--quiet", "-b", "48", str(wav), str(mp3)]
    else:
        cmd = [encoder, "-loglevel", "error", "-y", "-i", str(wav), "-b:a", "48k", str(mp3)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if done.returncode != 0 or not mp3.is_file():
        raise RuntimeError(f"MP3 encoding failed: {done.stderr.strip()}")
    return mp3


@dataclass
class SynthSpeechFolder:
    """What :func:`make_common_voice_folder` wrote."""

    folder: Path
    language: str
    rows: dict[str, int] = field(default_factory=dict)  # split -> rows in its TSV
    corrupt: list[str] = field(default_factory=list)  # ``path`` values whose clip is deliberately broken
    audio_format: str = "wav"


def _speaker(rng: random.Random, index: int) -> tuple[str, int, int]:
    """A client_id and the espeak speed and pitch of one synthetic speaker."""
    client = hashlib.sha256(f"speaker-{index}".encode()).hexdigest()
    return client, rng.randint(150, 190), rng.randint(35, 65)


def make_common_voice_folder(
    folder: Union[str, Path],
    language: str = "mr",
    sentences: Optional[Sequence[str]] = None,
    dev_size: int = 4,
    test_size: int = 4,
    max_sentences: Optional[int] = None,
    train_repeats: int = 1,
    audio_format: str = "wav",
    corrupt_clips: int = 0,
    voice: Optional[str] = None,
    seed: int = 0,
) -> SynthSpeechFolder:
    """A Common Voice-shaped folder of synthetic speech in ``language``.

    Sentences (default :data:`SENTENCES`, optionally the first ``max_sentences`` after a seeded shuffle) are split
    into test, dev and train in that order; each train sentence is read by ``train_repeats`` speakers.
    ``audio_format`` is "wav" or "mp3" (needs ``lame`` or ``ffmpeg``). The first ``corrupt_clips`` train rows point
    at clips overwritten with bytes no decoder accepts, as a test of the reader's skipping.
    """
    if audio_format not in ("wav", "mp3"):
        raise ValueError(f"audio_format must be 'wav' or 'mp3', got {audio_format!r}")
    if audio_format == "mp3" and mp3_encoder() is None:
        raise RuntimeError("audio_format='mp3' needs an MP3 encoder: apt-get install -y lame (or ffmpeg)")
    texts = list(sentences if sentences is not None else SENTENCES.get(sentence_language(language), ()))
    if not texts:
        raise ValueError(f"no sentences for language {language!r}; pass sentences=")
    texts = [" ".join(t.split()) for t in texts]  # a tab or newline would break the TSV
    rng = random.Random(f"{seed}:{language}")
    rng.shuffle(texts)
    if max_sentences is not None:
        texts = texts[:max_sentences]
    if len(texts) <= dev_size + test_size:
        raise ValueError(f"{len(texts)} sentences leave none for train after dev {dev_size} and test {test_size}")
    plan = {
        "test": texts[:test_size],
        "dev": texts[test_size : test_size + dev_size],
        "train": [t for t in texts[test_size + dev_size :] for _ in range(train_repeats)],
    }
    root = Path(folder)
    clips = root / "clips"
    clips.mkdir(parents=True, exist_ok=True)
    voice = voice or ESPEAK_VOICES.get(language, language)
    result = SynthSpeechFolder(root, language, audio_format=audio_format)
    number = 0
    for split in ("train", "dev", "test"):
        rows = []
        for k, text in enumerate(plan[split]):
            number += 1
            client, speed, pitch = _speaker(rng, number % 7)
            name = f"common_voice_{language}_{number:06d}.{audio_format}"
            wav = clips / (name if audio_format == "wav" else f".{name}.wav")
            synthesize(text, wav, voice, speed, pitch)
            if audio_format == "mp3":
                encode_mp3(wav, clips / name)
                wav.unlink()
            if split == "train" and k < corrupt_clips:
                (clips / name).write_bytes(CORRUPT_BYTES)
                result.corrupt.append(name)
            rows.append(
                {
                    "client_id": client,
                    "path": name,
                    "sentence": text,
                    "up_votes": 2,
                    "down_votes": 0,
                    "age": "",
                    "gender": "",
                    "accents": "",
                    "locale": language,
                    "segment": "",
                }
            )
        lines = ["\t".join(CV_COLUMNS)] + ["\t".join(str(row[c]) for c in CV_COLUMNS) for row in rows]
        (root / f"{split}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")  # quotes kept as is
        result.rows[split] = len(rows)
    return result
