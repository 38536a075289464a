"""OpenAI's audio response formats (json, text, srt, vtt, verbose_json) from a Transcript.

Pure functions, no engine import: the gateway or node can render whichever format the client
asked for from the one Transcript the engine returns.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .base import EngineError

if TYPE_CHECKING:
    from .faster_whisper import Transcript

RESPONSE_FORMATS = ("json", "text", "srt", "verbose_json", "vtt")

# Whisper's language codes and the names OpenAI's verbose_json reports ("language": "english").
LANGUAGES = {
    "en": "english", "zh": "chinese", "de": "german", "es": "spanish", "ru": "russian", "ko": "korean",
    "fr": "french", "ja": "japanese", "pt": "portuguese", "tr": "turkish", "pl": "polish", "ca": "catalan",
    "nl": "dutch", "ar": "arabic", "sv": "swedish", "it": "italian", "id": "indonesian", "hi": "hindi",
    "fi": "finnish", "vi": "vietnamese", "he": "hebrew", "uk": "ukrainian", "el": "greek", "ms": "malay",
    "cs": "czech", "ro": "romanian", "da": "danish", "hu": "hungarian", "ta": "tamil", "no": "norwegian",
    "th": "thai", "ur": "urdu", "hr": "croatian", "bg": "bulgarian", "lt": "lithuanian", "la": "latin",
    "mi": "maori", "ml": "malayalam", "cy": "welsh", "sk": "slovak", "te": "telugu", "fa": "persian",
    "lv": "latvian", "bn": "bengali", "sr": "serbian", "az": "azerbaijani", "sl": "slovenian", "kn": "kannada",
    "et": "estonian", "mk": "macedonian", "br": "breton", "eu": "basque", "is": "icelandic", "hy": "armenian",
    "ne": "nepali", "mn": "mongolian", "bs": "bosnian", "kk": "kazakh", "sq": "albanian", "sw": "swahili",
    "gl": "galician", "mr": "marathi", "pa": "punjabi", "si": "sinhala", "km": "khmer", "sn": "shona",
    "yo": "yoruba", "so": "somali", "af": "afrikaans", "oc": "occitan", "ka": "georgian", "be": "belarusian",
    "tg": "tajik", "sd": "sindhi", "gu": "gujarati", "am": "amharic", "yi": "yiddish", "lo": "lao",
    "uz": "uzbek", "fo": "faroese", "ht": "haitian creole", "ps": "pashto", "tk": "turkmen", "nn": "nynorsk",
    "mt": "maltese", "sa": "sanskrit", "lb": "luxembourgish", "my": "myanmar", "bo": "tibetan", "tl": "tagalog",
    "mg": "malagasy", "as": "assamese", "tt": "tatar", "haw": "hawaiian", "ln": "lingala", "ha": "hausa",
    "ba": "bashkir", "jw": "javanese", "su": "sundanese", "yue": "cantonese",
}  # fmt: skip


def _timestamp(seconds: float, separator: str) -> str:
    millis = max(0, round(seconds * 1000))
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{millis:03d}"


def to_text(transcript: Transcript) -> str:
    return transcript.text + "\n"


def to_json(transcript: Transcript) -> dict[str, Any]:
    return {"text": transcript.text}


def to_srt(transcript: Transcript) -> str:
    """SubRip: numbered cues from 1, ``HH:MM:SS,mmm --> HH:MM:SS,mmm``, a blank line after each."""
    cues = [
        f"{i}\n{_timestamp(s.start, ',')} --> {_timestamp(s.end, ',')}\n{s.text.strip()}\n"
        for i, s in enumerate(transcript.segments, start=1)
    ]
    return "\n".join(cues)


def to_vtt(transcript: Transcript) -> str:
    """WebVTT: the ``WEBVTT`` header, then ``HH:MM:SS.mmm --> HH:MM:SS.mmm`` cues."""
    cues = [f"{_timestamp(s.start, '.')} --> {_timestamp(s.end, '.')}\n{s.text.strip()}\n" for s in transcript.segments]
    return "WEBVTT\n\n" + "\n".join(cues)


def to_verbose_json(transcript: Transcript) -> dict[str, Any]:
    """OpenAI's verbose_json: task, language (a name), duration, text, segments, words (if asked)."""
    # Translations are English text, and OpenAI reports the output language for them.
    code = "en" if transcript.task == "translate" else transcript.language
    body: dict[str, Any] = {
        "task": transcript.task,
        "language": LANGUAGES.get(code, code),
        "duration": round(transcript.duration, 3),
        "text": transcript.text,
        "segments": [
            {
                "id": s.id,
                "seek": s.seek,
                "start": s.start,
                "end": s.end,
                "text": s.text,
                "tokens": list(s.tokens),
                "temperature": s.temperature,
                "avg_logprob": s.avg_logprob,
                "compression_ratio": s.compression_ratio,
                "no_speech_prob": s.no_speech_prob,
            }
            for s in transcript.segments
        ],
    }
    if transcript.words is not None:
        body["words"] = [{"word": w.word, "start": w.start, "end": w.end} for w in transcript.words]
    return body


def render(transcript: Transcript, response_format: str) -> str | dict[str, Any]:
    """The body for ``response_format``: a dict for the JSON formats, text for the others."""
    renderers = {"json": to_json, "text": to_text, "srt": to_srt, "vtt": to_vtt, "verbose_json": to_verbose_json}
    if response_format not in renderers:
        raise EngineError(
            f"response_format must be one of {', '.join(RESPONSE_FORMATS)}, not {response_format!r}",
            param="response_format",
        )
    return renderers[response_format](transcript)
