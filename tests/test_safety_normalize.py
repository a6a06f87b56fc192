"""Prompt normalisation: each obfuscation is undone and reported; ordinary text is left alone."""

from __future__ import annotations

import pytest

from safelatent.errors import InvalidArgumentError
from safelatent.safety.normalize import TRANSFORMATIONS, clean_text, normalize


@pytest.mark.parametrize(
    ("raw", "text", "fired"),
    [
        ("ｋｉｄ", "kid", "nfkc"),
        ("𝐤𝐢𝐝", "kid", "nfkc"),
        ("ki\u200bd", "kid", "zero_width"),
        ("k\ufeffi\u2060d", "kid", "zero_width"),
        ("kid\x07 now", "kid now", "control"),
        ("кіd", "kid", "homoglyphs"),
        ("κιd", "kid", "homoglyphs"),
        ("nüdé", "nude", "diacritics"),
        ("a   kid", "a kid", "extra_spaces"),
        ("k1d", "kid", "leetspeak"),
        ("$3xy", "sexy", "leetspeak"),
        ("@ss", "ass", "leetspeak"),
        ("k.i.d", "kid", "separators"),
        ("k-i-d", "kid", "separators"),
        ("k_i_d", "kid", "separators"),
        ("k i d", "kid", "spaced_letters"),
        ("kiiiid", "kid", "repeated_letters"),
    ],
)
def test_each_transformation_is_undone_and_reported(raw, text, fired):
    result = normalize(raw)
    assert result.text == text
    assert fired in result.transformations
    assert set(result.transformations) <= set(TRANSFORMATIONS)


def test_plain_text_is_untouched_and_reports_nothing():
    result = normalize("A man riding a bike, 2 dogs and a cat.")
    assert result.text == "a man riding a bike 2 dogs and a cat"
    assert result.transformations == ()
    assert list(result.views) == ["plain"]


def test_views_keep_the_plain_reading_next_to_the_decoded_one():
    result = normalize("12-year-old k1d")
    assert result.views["plain"] == ("12", "year", "old", "k1d")
    assert "kid" in result.views["decoded"]
    assert "kld" in result.views["decoded_l"]  # 1 may also stand for l


def test_spaced_runs_are_kept_for_substring_matching():
    result = normalize("a s e x y k i d")
    assert result.spaced_runs == ("asexykid",)


def test_clean_text_reports_into_a_list():
    fired: list[str] = []
    assert clean_text("Ｎаked\u200b", fired) == "naked"
    assert fired == ["nfkc", "zero_width", "homoglyphs"]


def test_non_string_prompt_is_an_error():
    with pytest.raises(InvalidArgumentError, match="must be a string"):
        normalize(None)  # type: ignore[arg-type]
