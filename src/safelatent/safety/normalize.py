"""Prompt normalisation against obfuscation, before any model compute.

A prompt is turned into *views*: token sequences that the word-list matcher in
:mod:`safelatent.safety.prompt_policy` reads. Every view starts from the same cleaned string:

1. Unicode NFKC (full-width letters, mathematical alphanumerics, ligatures → plain characters);
2. zero-width and other invisible format characters removed, control characters turned into spaces;
3. homoglyph folding: Cyrillic, Greek and other look-alikes → Latin letters;
4. diacritics removed (``nüde`` → ``nude``), case folded, runs of white space collapsed.

The **plain** view splits that string on everything that is not a letter or digit. The **decoded**
view also undoes word-level tricks: leetspeak inside words that mix letters and look-alike symbols
(``s3x``, ``k1d``, ``$ex``, ``@ss``), separators inside words (``k.i.d``, ``k-i-d``, ``k_i_d``) and runs
of single letters (``k i d``). Because ``1`` and ``!`` may stand for ``i`` or ``l``, a second decoded
view reads them as ``l`` when the prompt has any. Repeated letters (``kiiiid``) are matched by the
matcher (a word matches a list entry when it is that entry with some letters repeated); the
normalised text shows them squeezed.

:func:`normalize` returns a :class:`NormalizedPrompt`: the views, a human-readable normalised text and
the names of the transformations that fired (see :data:`TRANSFORMATIONS`).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field

#: Every transformation name a :class:`NormalizedPrompt` can report, with what it means.
TRANSFORMATIONS: dict[str, str] = {
    "nfkc": "Unicode compatibility characters folded (NFKC): full-width, styled or ligature letters",
    "zero_width": "invisible format characters (zero-width spaces/joiners, BOM, ...) removed",
    "control": "control characters replaced by spaces",
    "homoglyphs": "Cyrillic/Greek/other look-alike letters folded to Latin",
    "diacritics": "accents and other combining marks removed",
    "extra_spaces": "runs of white space collapsed",
    "leetspeak": "digits/symbols inside words read as letters (0→o, 1→i/l, 3→e, 4→a, 5→s, 7→t, @→a, $→s)",
    "separators": "separators inside a word removed (k.i.d, k-i-d, k_i_d)",
    "spaced_letters": "runs of single letters joined (k i d)",
    "repeated_letters": "letters repeated three or more times squeezed (kiiiid)",
}

# Look-alike letters → Latin. NFKC already maps full-width and mathematical letters; these are the
# cross-script confusables it leaves alone (Unicode's confusables.txt, the letters that matter).
_HOMOGLYPHS = {
    # Cyrillic lower case
    "а": "a", "в": "b", "е": "e", "ё": "e", "һ": "h", "і": "i", "ї": "i", "ј": "j", "к": "k", "ӏ": "l",
    "м": "m", "н": "h", "о": "o", "р": "p", "с": "c", "ԛ": "q", "ѕ": "s", "т": "t", "у": "y", "ү": "y",
    "х": "x", "ԝ": "w", "ь": "b", "ԁ": "d", "ɡ": "g", "п": "n", "г": "r", "д": "d", "з": "3", "ч": "4",
    # Cyrillic upper case
    "А": "a", "В": "b", "Е": "e", "Ё": "e", "Һ": "h", "І": "i", "Ї": "i", "Ј": "j", "К": "k", "Ӏ": "l",
    "М": "m", "Н": "h", "О": "o", "Р": "p", "С": "c", "Ѕ": "s", "Т": "t", "У": "y", "Ү": "y", "Х": "x",
    "Ԝ": "w", "Ь": "b", "Ԁ": "d", "П": "n", "Г": "r", "З": "3",
    # Greek
    "α": "a", "β": "b", "γ": "y", "ε": "e", "η": "n", "ι": "i", "κ": "k", "ν": "v", "ο": "o", "ρ": "p",
    "σ": "o", "ς": "s", "τ": "t", "υ": "u", "χ": "x", "ω": "w", "μ": "u", "Α": "a", "Β": "b", "Ε": "e",
    "Ζ": "z", "Η": "h", "Ι": "i", "Κ": "k", "Μ": "m", "Ν": "n", "Ο": "o", "Ρ": "p", "Τ": "t", "Υ": "y",
    "Χ": "x", "ϲ": "c", "ϳ": "j",
    # Armenian, Latin extensions and letter-like symbols
    "օ": "o", "ս": "u", "ց": "g", "հ": "h", "ո": "n", "ı": "i", "ȷ": "j", "ɑ": "a", "ɩ": "i", "ʟ": "l",
    "ɪ": "i", "ᴀ": "a", "ᴄ": "c", "ᴅ": "d", "ᴇ": "e", "ᴋ": "k", "ᴍ": "m", "ᴏ": "o", "ᴘ": "p", "ᴛ": "t",
    "ᴜ": "u", "ᴠ": "v", "ᴡ": "w", "ᴢ": "z", "ʀ": "r", "ꜱ": "s", "ɢ": "g", "ʜ": "h", "ɴ": "n", "ʏ": "y",
    "ł": "l", "ø": "o", "đ": "d", "ħ": "h", "ŧ": "t", "ß": "ss", "æ": "ae", "œ": "oe",
}  # fmt: skip
_HOMOGLYPH_TABLE = str.maketrans(_HOMOGLYPHS)

# Leetspeak: symbol → letter, applied only inside words that also contain a letter. ``1`` reads as ``i``
# in the main decoded view and as ``l`` in the alternative one.
_LEET = {"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "8": "b", "9": "g", "@": "a", "$": "s"}
_LEET.update({"!": "i", "€": "e", "£": "l", "¡": "i"})
_LEET_TABLE = str.maketrans(_LEET)
_LEET_TABLE_L = str.maketrans({**_LEET, "1": "l", "!": "l"})
_LEET_CHARS = "".join(_LEET)

# Characters used to split a word apart (``k.i.d``): removed between letters in the decoded view.
_SEPARATORS = r".\-_*~+|/\\,'`\"·•:;^=#%&<>()\[\]{}"

_WORD = re.compile(r"[a-z0-9]+")
_LETTER = re.compile(r"[a-z]")
_HAS_LEET = re.compile(f"[{re.escape(_LEET_CHARS)}]")
_INNER_SEPARATOR = re.compile(rf"(?<=[a-z0-9{re.escape(_LEET_CHARS)}])[{_SEPARATORS}]+(?=[a-z0-9@$])")
_EDGE_START = re.compile(r"[a-z0-9@$]")
_KEEP_END = frozenset("abcdefghijklmnopqrstuvwxyz0123456789$")
_RUN3 = re.compile(r"([a-z])\1{2,}")
_SPACES = re.compile(r"\s+")
_ASCII_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_ASCII_CONTROL_NOT_SPACE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
# Quick tests for "the decoded view would differ from the plain one".
_LEET_IN_WORD = re.compile(rf"[a-z][{re.escape(_LEET_CHARS)}]|[{re.escape(_LEET_CHARS)}][a-z]")
_SINGLE_RUN = re.compile(r"(?:^| )[a-z0-9](?: [a-z0-9]){2,}(?= |$)")


@dataclass(frozen=True)
class NormalizedPrompt:
    """What :func:`normalize` made of a prompt.

    ``original``: the prompt as given. ``clean``: NFKC, invisible characters removed, homoglyphs and
    diacritics folded, lower case, single spaces. ``text``: the normalised text for people (the
    decoded view, repeated letters squeezed). ``views``: name → token tuple, always ``"plain"`` and,
    when decoding changed anything, ``"decoded"`` (and ``"decoded_l"`` for the ``1``/``!`` → ``l``
    reading). ``spaced_runs``: single-letter runs joined, for substring matching. ``transformations``:
    the names from :data:`TRANSFORMATIONS` that changed something, in pipeline order.
    """

    original: str
    clean: str
    text: str
    views: dict[str, tuple[str, ...]]
    spaced_runs: tuple[str, ...] = ()
    transformations: tuple[str, ...] = field(default=())


def clean_text(text: str, fired: list[str] | None = None) -> str:
    """NFKC, drop invisible characters, fold homoglyphs and diacritics, lower-case, collapse spaces.

    Appends the names of the steps that changed the text to ``fired`` when given.
    """
    fired = fired if fired is not None else []
    if text.isascii():  # fast path: nothing for NFKC, homoglyphs or diacritics to do
        if _ASCII_CONTROL.search(text):
            if _ASCII_CONTROL_NOT_SPACE.search(text):
                fired.append("control")
            text = _ASCII_CONTROL.sub(" ", text)
        lowered = text.lower()
        collapsed = _SPACES.sub(" ", lowered).strip()
        if "  " in lowered.strip() or "\t" in lowered.strip():
            fired.append("extra_spaces")
        return collapsed
    nfkc = unicodedata.normalize("NFKC", text)
    if nfkc != text:
        fired.append("nfkc")
    kept = []
    zero_width = control = False
    for char in nfkc:
        category = unicodedata.category(char)
        if category == "Cf" or char in "\u115f\u1160\u3164\uffa0\u2800":  # format chars, Hangul fillers
            zero_width = True
            continue
        if category == "Cc" and char not in " ":
            if char not in "\t\n\r":
                control = True
            kept.append(" ")
            continue
        kept.append(char)
    text = "".join(kept)
    if zero_width:
        fired.append("zero_width")
    if control:
        fired.append("control")
    folded = text.translate(_HOMOGLYPH_TABLE)
    if folded != text:
        fired.append("homoglyphs")
    decomposed = unicodedata.normalize("NFD", folded)
    stripped = "".join(c for c in decomposed if not unicodedata.combining(c))
    if stripped != decomposed:
        fired.append("diacritics")
    # Homoglyph folding again: a stripped accent can leave a look-alike behind (й → и is not one, but
    # cheap to be sure), then case folding (which can produce new look-alikes: 'Σ' → 'σ').
    lowered = unicodedata.normalize("NFC", stripped).casefold().translate(_HOMOGLYPH_TABLE)
    collapsed = _SPACES.sub(" ", lowered).strip()
    if collapsed != lowered.strip() or "  " in text:
        fired.append("extra_spaces")
    return collapsed


def _strip_edges(chunk: str) -> str:
    """``chunk`` without leading punctuation (``@``/``$`` kept) or trailing punctuation (``$`` kept);
    linear time, unlike an anchored regex on a long run of punctuation."""
    start = _EDGE_START.search(chunk)
    if start is None:
        return ""
    end = len(chunk)
    while end > start.start() and chunk[end - 1] not in _KEEP_END:
        end -= 1
    return chunk[start.start() : end]


def _decode_chunk(chunk: str, table: dict[int, str]) -> tuple[str, bool, bool]:
    """Leet-decode and join one white-space-delimited chunk; returns (text, leet fired, seps fired)."""
    if chunk in ("@", "$"):  # a lone leet symbol, as in "s e $ $ e d"
        return chunk.translate(table), True, False
    core = _strip_edges(chunk)
    if not core:
        return chunk, False, False
    leet = False
    if _LETTER.search(core) and _HAS_LEET.search(core):
        decoded = core.translate(table)
        leet = decoded != core
        core = decoded
    joined = _INNER_SEPARATOR.sub("", core)
    return joined, leet, joined != core


def _join_single_letters(tokens: list[str], table: dict[int, str]) -> tuple[list[str], list[str]]:
    """Join runs of three or more one-character tokens (letters, or leet digits among letters: ``k 1 d``);
    returns (tokens, the joined runs). A leading article ``a``/``i`` stays a word of its own in the
    tokens (``a k i d`` → ``a kid``); the run keeps it, for substring matching."""
    out: list[str] = []
    runs: list[str] = []
    i = 0
    while i < len(tokens):
        j = i
        while j < len(tokens) and len(tokens[j]) == 1 and (tokens[j].isalpha() or tokens[j] in _LEET):
            j += 1
        if j - i >= 3 and any(t.isalpha() for t in tokens[i:j]):
            run = "".join(tokens[i:j]).translate(table)
            runs.append(run)
            if run[0] in "ai" and len(run) >= 4:
                out.extend((run[0], run[1:]))
            else:
                out.append(run)
            i = j
        elif j - i >= 3:  # a run without letters (digits only): keep as it is, move past it
            out.extend(tokens[i:j])
            i = j
        else:
            out.append(tokens[i])
            i += 1
    return out, runs


def _decoded_view(clean: str, table: dict[int, str], fired: set[str]) -> tuple[tuple[str, ...], list[str]]:
    """Tokens of the decoded view (leet, inner separators, single-letter runs) and the joined runs."""
    tokens: list[str] = []
    for chunk in clean.split(" "):
        joined, leet, seps = _decode_chunk(chunk, table)
        if leet:
            fired.add("leetspeak")
        if seps:
            fired.add("separators")
        tokens.extend(_WORD.findall(joined))
    tokens, runs = _join_single_letters(tokens, table)
    if runs:
        fired.add("spaced_letters")
    return tuple(tokens), runs


def normalize(prompt: str) -> NormalizedPrompt:
    """Normalise ``prompt`` against obfuscation; see the module docstring for the steps and views."""
    if not isinstance(prompt, str):
        from ..errors import InvalidArgumentError

        raise InvalidArgumentError(
            f"a prompt must be a string, got {type(prompt).__name__}", "pass the prompt text"
        )
    fired: list[str] = []
    clean = clean_text(prompt, fired)
    plain = tuple(_WORD.findall(clean))
    views: dict[str, tuple[str, ...]] = {"plain": plain}
    decoded_fired: set[str] = set()
    if (
        not _LEET_IN_WORD.search(clean)
        and not _INNER_SEPARATOR.search(clean)
        and not _SINGLE_RUN.search(" ".join(plain))
    ):
        decoded, runs = plain, []  # fast path: decoding would change nothing
    else:
        decoded, runs = _decoded_view(clean, _LEET_TABLE, decoded_fired)
    if decoded != plain:
        views["decoded"] = decoded
    if "leetspeak" in decoded_fired and any(c in clean for c in "1!"):
        decoded_l, _ = _decoded_view(clean, _LEET_TABLE_L, set())
        if decoded_l != decoded:
            views["decoded_l"] = decoded_l
    fired.extend(name for name in ("leetspeak", "separators", "spaced_letters") if name in decoded_fired)
    text = " ".join(decoded)
    squeezed = _RUN3.sub(r"\1", text)
    if squeezed != text:
        fired.append("repeated_letters")
    return NormalizedPrompt(
        original=prompt,
        clean=clean,
        text=squeezed,
        views=views,
        spaced_runs=tuple(runs),
        transformations=tuple(fired),
    )
