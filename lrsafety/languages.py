"""The 23 languages of the study, their resource tiers and scripts.

Tiers follow each language's share of Common Crawl (CC-MAIN-2026-12): high above 1 %,
mid between 0.1 % and 1 %, low below 0.1 %. Every other module looks tiers up here.
"""

from __future__ import annotations

from dataclasses import dataclass

TIERS: tuple[str, ...] = ("high", "mid", "low")


@dataclass(frozen=True)
class Language:
    """One study language: ISO 639-1 code, English name, resource tier and main script."""

    code: str
    name: str
    tier: str
    script: str


_LANGUAGE_ROWS = [
    # High-resource
    ("en", "English", "high", "Latin"),
    ("de", "German", "high", "Latin"),
    ("fr", "French", "high", "Latin"),
    ("es", "Spanish", "high", "Latin"),
    ("it", "Italian", "high", "Latin"),
    ("nl", "Dutch", "high", "Latin"),
    ("pl", "Polish", "high", "Latin"),
    ("ru", "Russian", "high", "Cyrillic"),
    ("zh", "Chinese", "high", "Han"),
    ("ja", "Japanese", "high", "Japanese"),
    # Mid-resource
    ("ar", "Arabic", "mid", "Arabic"),
    ("ko", "Korean", "mid", "Hangul"),
    ("th", "Thai", "mid", "Thai"),
    ("el", "Greek", "mid", "Greek"),
    ("he", "Hebrew", "mid", "Hebrew"),
    ("hi", "Hindi", "mid", "Devanagari"),
    ("fa", "Persian", "mid", "Arabic"),
    # Low-resource
    ("sw", "Swahili", "low", "Latin"),
    ("am", "Amharic", "low", "Ethiopic"),
    ("my", "Burmese", "low", "Myanmar"),
    ("km", "Khmer", "low", "Khmer"),
    ("si", "Sinhala", "low", "Sinhala"),
    ("yo", "Yoruba", "low", "Latin"),
]

LANGUAGES: dict[str, Language] = {row[0]: Language(*row) for row in _LANGUAGE_ROWS}

# Languages whose files ship in the PolyRefuse release; the other nine were machine-translated
# for the paper and are reported as missing until translated files are supplied.
POLYREFUSE_LANGUAGES: tuple[str, ...] = (
    "ar", "de", "en", "es", "fr", "it", "ja", "ko", "nl", "pl", "ru", "th", "yo", "zh",
)


def resource_tier(language: str) -> str:
    """Return the resource tier ("high", "mid" or "low") of a language code."""
    try:
        return LANGUAGES[language].tier
    except KeyError:
        known = ", ".join(LANGUAGES)
        raise ValueError(f"unknown language code {language!r}; expected one of: {known}") from None


def languages_in_tier(tier: str) -> list[str]:
    """Return the language codes of one tier, in table order."""
    if tier not in TIERS:
        raise ValueError(f"unknown resource tier {tier!r}; expected one of {TIERS}")
    return [code for code, language in LANGUAGES.items() if language.tier == tier]


def high_resource_languages() -> list[str]:
    """Return the ten high-resource language codes, the source of every pooled direction."""
    return languages_in_tier("high")


def tier_order(languages: list[str]) -> list[str]:
    """Sort language codes by tier, then by their position in the table."""
    position = {code: index for index, code in enumerate(LANGUAGES)}
    return sorted(languages, key=lambda code: position.get(code, len(position)))
