"""The prompt policy: normalise, score categories with reasons, apply hard blocks, decide.

:func:`check_prompt` is the entry point the generate path calls before any compute::

    decision = check_prompt("a k1d in a red coat", load_policy())   # → PolicyDecision
    if decision.action == "block": raise ...            # decision.message says why
    if decision.action == "suppress": SLD on, concept = decision.sld_concept, preset = decision.sld_preset

Scoring is lexical (the word lists in ``safety/data``, matched on whole words of every normalised view,
so ``kid`` matches ``k1d``/``k.i.d``/``kiiid`` but not ``kidney``), plus an optional similarity scorer
in the loaded model's own text-encoder space (:class:`TextEncoderSimilarity`).

Hard blocks, which no policy or request relaxes:

* ``sexual_minors``: a sexual term (``sexual.txt`` weight ≥ 0.5) and a minor term (``minors.txt``, or an
  age under 18 such as "12 year old", "12yo", "aged 12") in the same prompt;
* ``real_people``: a name from the operator's name lists together with a sexual or violent term
  (weight ≥ 0.5).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from .normalize import NormalizedPrompt, normalize
from .policy_file import CATEGORIES, HARD_CATEGORIES, Policy, PromptBlockedError, default_policy, read_names

#: Word lists per category (``safety/data/<name>.txt``).
WORD_LISTS = {"sexual": "sexual", "violence": "violence", "self_harm": "self_harm", "hate": "hate"}
#: Weight from which a sexual/violent entry counts for the hard blocks.
HARD_TERM_WEIGHT = 0.5

_RUN = re.compile(r"(.)\1*")
_REPEATED_LETTER = re.compile(r"([a-z])\1+")
_LONG_RUN = re.compile(r"(.)\1{3,}")
_WORD = re.compile(r"[a-z0-9]+")
_NUMBER_WORDS = {
    "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9,
    "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14, "fifteen": 15, "sixteen": 16,
    "seventeen": 17,
}  # fmt: skip
_NUM = r"(\d{1,2}|" + "|".join(_NUMBER_WORDS) + r")"
_AGE_HINT = re.compile(r"\d|age|" + "|".join(w[:3] for w in _NUMBER_WORDS))  # cheap pre-check
_AGE_PATTERNS = (
    re.compile(rf"\b{_NUM} ?(?:yo|y o|yrs? old|years? old|yearold|yearsold|yr|yrs)\b"),
    re.compile(rf"\b(?:aged?|age of) {_NUM}\b"),
)


_RLE_CACHE: dict[str, tuple[str, tuple[int, ...]]] = {}


def _rle(token: str) -> tuple[str, tuple[int, ...]]:
    """A token's letters with runs squeezed, and each run's length: 'kiiid' → ('kid', (1, 3, 1))."""
    cached = _RLE_CACHE.get(token)
    if cached is None:
        runs = [m.group(0) for m in _RUN.finditer(token)]
        cached = ("".join(r[0] for r in runs), tuple(len(r) for r in runs))
        if len(_RLE_CACHE) > 200_000:
            _RLE_CACHE.clear()
        _RLE_CACHE[token] = cached
    return cached


def _token_matches(token: str, entry_token: str) -> bool:
    """True when ``token`` is ``entry_token`` with zero or more letters repeated (never fewer)."""
    key, counts = _rle(token)
    entry_key, entry_counts = _rle(entry_token)
    return key == entry_key and all(c >= e for c, e in zip(counts, entry_counts, strict=True))


@dataclass(frozen=True)
class Entry:
    """One word-list entry: its words, weight and the list (category) it belongs to."""

    text: str
    tokens: tuple[str, ...]
    weight: float
    category: str


@dataclass(frozen=True)
class Reason:
    """Why a category scored: the ``rule`` (``word``, ``age``, ``name``, ``similarity``, ``hard``), the list
    ``term`` that matched, the prompt text it matched (``matched``), the view, and the weight/score."""

    category: str
    rule: str
    term: str
    matched: str
    view: str = "plain"
    weight: float = 1.0

    def __str__(self) -> str:
        via = f" in the {self.view} view" if self.view != "plain" else ""
        shown = f" (as {self.matched!r}{via})" if self.matched != self.term or via else ""
        return f"{self.rule} {self.term!r}{shown}, weight {self.weight:.2f}"


def _parse_entry(line: str, category: str) -> Entry | None:
    """A word-list line → Entry ('word', 'two words', 'word @ 0.4'); None for blank/comment lines."""
    text = line.split("#", 1)[0].strip()
    if not text:
        return None
    weight = 1.0
    if "@" in text:
        text, _, raw = text.rpartition("@")
        text = text.strip()
        try:
            weight = float(raw)
        except ValueError:
            from .policy_file import PolicyFileError

            raise PolicyFileError(
                f"word list entry {line.strip()!r}: weight {raw.strip()!r} is not a number",
                "write 'word @ 0.4'",
            ) from None
    tokens = normalize(text).views["plain"]
    if not tokens:
        return None
    return Entry(text=" ".join(tokens), tokens=tokens, weight=min(max(weight, 0.0), 1.0), category=category)


@lru_cache(maxsize=16)
def _read_list(name: str) -> tuple[Entry, ...]:
    """The entries of the shipped word list ``safety/data/<name>.txt``."""
    from .policy_file import data_path

    text = data_path(f"{name}.txt").read_text(encoding="utf-8")
    entries = (_parse_entry(line, name) for line in text.splitlines())
    return tuple(e for e in entries if e is not None)


class Lexicon:
    """Word-list entries indexed by their first word's squeezed letters, for fast whole-word matching."""

    def __init__(self, entries: list[Entry]) -> None:
        """Index ``entries`` by squeezed first word, and by all words run together for spaced runs."""
        self.entries = entries
        self.index: dict[str, list[Entry]] = {}
        self._candidates: dict[str, list[Entry] | tuple[()]] = {}  # token → index entries, memoised
        for entry in entries:
            self.index.setdefault(_rle(entry.tokens[0])[0], []).append(entry)
        # Entries with their words run together ('littlegirl'), for runs of spaced letters.
        self.joined: dict[str, list[Entry]] = {}
        for entry in entries:
            if entry.category != "name" and len("".join(entry.tokens)) >= 3:
                self.joined.setdefault(_rle("".join(entry.tokens))[0], []).append(entry)
        words = sorted({"".join(e.tokens) for group in self.joined.values() for e in group}, key=len)
        parts = ["".join(f"{re.escape(ch)}{{{n},}}" for ch, n in zip(*_rle(t), strict=True)) for t in words]
        # A lookahead finds a match at every start position, so overlapping words are all found.
        self.substring = re.compile(f"(?=({'|'.join(reversed(parts))}))") if parts else None

    def find(self, tokens: tuple[str, ...], masked: set[int] = frozenset()) -> list[tuple[Entry, int, int]]:
        """Every (entry, start, end) whose words match ``tokens[start:end]`` with no masked position."""
        found = []
        cache = self._candidates
        for i, token in enumerate(tokens):
            candidates = cache.get(token)
            if candidates is None:
                candidates = self.index.get(_rle(token)[0], ())
                if len(cache) > 200_000:
                    cache.clear()
                cache[token] = candidates
            if not candidates or i in masked:
                continue
            for entry in candidates:
                end = i + len(entry.tokens)
                if end > len(tokens) or any(j in masked for j in range(i, end)):
                    continue
                if all(_token_matches(tokens[i + k], t) for k, t in enumerate(entry.tokens)):
                    found.append((entry, i, end))
        return found

    def find_in_run(self, run: str) -> list[tuple[Entry, str]]:
        """Entries found anywhere inside a joined run of spaced letters ('asexykid'), words run together."""
        if self.substring is None:
            return []
        found = []
        run = _LONG_RUN.sub(r"\1\1\1", run)  # no entry repeats a letter more than 3 times: keeps this linear
        for match in self.substring.finditer(run):
            text = match.group(1)
            for entry in self.joined.get(_rle(text)[0], ()):
                if _token_matches(text, "".join(entry.tokens)):
                    found.append((entry, text))
        return found


@lru_cache(maxsize=32)
def build_lexicon(
    extra: tuple[tuple[str, tuple[str, ...]], ...] = (), names: tuple[str, ...] = ()
) -> Lexicon:
    """The lexicon of the shipped lists plus ``extra`` ((category, entries) pairs) and real-people
    ``names`` (category ``"name"``); ``minors`` and ``benign`` entries are included as categories."""
    entries: list[Entry] = []
    for name in (*WORD_LISTS.values(), "minors", "benign"):
        entries.extend(_read_list(name))
    for category, lines in extra:
        entries.extend(e for e in (_parse_entry(line, category) for line in lines) if e is not None)
    for name in names:
        tokens = normalize(name).views["plain"]
        if tokens:
            entries.append(Entry(text=" ".join(tokens), tokens=tokens, weight=1.0, category="name"))
    return Lexicon(entries)


_POLICY_LEXICONS: dict[int, tuple[Policy, Lexicon]] = {}


def _lexicon_for(policy: Policy) -> Lexicon:
    """The lexicon for ``policy``: shipped lists, its extra words, its real-people names (memoised per
    policy object; the policy is kept alive with it so that its id stays unique)."""
    cached = _POLICY_LEXICONS.get(id(policy))
    if cached is not None and cached[0] is policy:
        return cached[1]
    extra = tuple((c, p.extra_words) for c, p in policy.categories.items() if p.extra_words)
    lexicon = build_lexicon(extra, tuple(policy.names))
    if len(_POLICY_LEXICONS) > 64:
        _POLICY_LEXICONS.clear()
    _POLICY_LEXICONS[id(policy)] = (policy, lexicon)
    return lexicon


def _ages(tokens: tuple[str, ...]) -> list[str]:
    """Mentions of an age under 18 in ``tokens`` ('12 year old', '12yo', 'aged 12')."""
    text = " ".join(tokens)
    if not _AGE_HINT.search(text):
        return []
    text = _REPEATED_LETTER.sub(r"\1", text)  # 'yeeear ollld' → 'year old'
    found = []
    for pattern in _AGE_PATTERNS:
        for match in pattern.finditer(text):
            raw = match.group(1)
            age = _NUMBER_WORDS.get(raw) or (int(raw) if raw.isdigit() else 99)
            if 0 < age < 18:
                found.append(match.group(0))
    return found


@dataclass(frozen=True)
class LexicalHits:
    """Everything the word lists found in a normalised prompt, per list, deduplicated by entry."""

    hits: dict[str, dict[str, Reason]]

    def weights(self, category: str) -> list[float]:
        """The weights of the distinct entries that matched ``category``."""
        return [r.weight for r in self.hits.get(category, {}).values()]

    def strong(self, category: str) -> list[Reason]:
        """Matches of ``category`` with weight ≥ :data:`HARD_TERM_WEIGHT`."""
        return [r for r in self.hits.get(category, {}).values() if r.weight >= HARD_TERM_WEIGHT]


def lexical_hits(normalized: NormalizedPrompt, lexicon: Lexicon) -> LexicalHits:
    """Match ``lexicon`` against every view of ``normalized``; benign phrases mask their words."""
    hits: dict[str, dict[str, Reason]] = {}

    def add(entry: Entry, matched: str, view: str, rule: str = "word") -> None:
        bucket = hits.setdefault(entry.category, {})
        if entry.text not in bucket:
            bucket[entry.text] = Reason(entry.category, rule, entry.text, matched, view, entry.weight)

    for view, tokens in normalized.views.items():
        found = lexicon.find(tokens)
        masked = {j for entry, i, end in found if entry.category == "benign" for j in range(i, end)}
        for entry, i, end in found:
            if entry.category == "benign":
                continue
            if masked and any(j in masked for j in range(i, end)):
                continue
            add(entry, " ".join(tokens[i:end]), view, "name" if entry.category == "name" else "word")
        for age in _ages(tokens):
            bucket = hits.setdefault("minors", {})
            bucket.setdefault(f"age: {age}", Reason("minors", "age", "age under 18", age, view, 1.0))
    for run in normalized.spaced_runs:
        for entry, matched in lexicon.find_in_run(run):
            if entry.category not in ("benign", "name"):
                add(entry, matched, "spaced")
    return LexicalHits(hits)


def _combine(weights: list[float]) -> float:
    """1 - Π(1 - w): one strong entry gives its weight, weak entries add up."""
    remaining = 1.0
    for weight in weights:
        remaining *= 1.0 - weight
    return round(1.0 - remaining, 4)


class TextEncoderSimilarity:
    """Cosine similarity, in a loaded model's own text-encoder space, between a prompt and each
    category's concept phrases.

    ``tokenizer`` and ``text_encoder`` are a CLIP tokenizer and ``CLIPTextModel`` (e.g.
    ``api.load().components.tokenizer`` / ``.text_encoder``). ``pooling``: ``"mean"`` averages the last
    hidden states over the prompt's tokens (start to end-of-text), ``"pooled"`` takes the end-of-text
    state (``pooler_output``). Phrase embeddings are computed once per phrase set.
    """

    def __init__(self, tokenizer: Any, text_encoder: Any, *, pooling: str = "mean") -> None:
        """Keep the tokenizer and text encoder; ``pooling`` is ``"mean"`` or ``"pooled"``."""
        if pooling not in ("mean", "pooled"):
            from ..errors import InvalidArgumentError

            raise InvalidArgumentError(f"unknown pooling {pooling!r}", "use 'mean' or 'pooled'")
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.pooling = pooling
        self._cache: dict[tuple[str, ...], Any] = {}

    def embed(self, texts: list[str]):
        """Unit-length embeddings ``[len(texts), d]`` of ``texts``."""
        import torch

        batch = self.tokenizer(
            list(texts),
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        device = self.text_encoder.device
        ids = batch["input_ids"].to(device)
        mask = batch["attention_mask"].to(device)
        with torch.no_grad():
            out = self.text_encoder(ids, attention_mask=mask)
        if self.pooling == "pooled":
            vectors = out.pooler_output.float()
        else:
            hidden = out.last_hidden_state.float()
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            vectors = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return torch.nn.functional.normalize(vectors, dim=-1).cpu()

    def similarities(self, text: str, phrases: dict[str, tuple[str, ...]]) -> dict[str, tuple[float, str]]:
        """category → (highest cosine similarity of ``text`` to one of its phrases, that phrase)."""
        flat = [(c, p) for c, ps in phrases.items() for p in ps]
        if not flat:
            return {}
        key = tuple(f"{c}\x00{p}" for c, p in flat)
        if key not in self._cache:
            self._cache[key] = self.embed([p for _, p in flat])
        sims = (self._cache[key] @ self.embed([text])[0]).tolist()
        best: dict[str, tuple[float, str]] = {}
        for (category, phrase), sim in zip(flat, sims, strict=True):
            if category not in best or sim > best[category][0]:
                best[category] = (round(float(sim), 4), phrase)
        return best


@dataclass(frozen=True)
class PolicyDecision:
    """The policy's verdict on one prompt.

    ``action``: ``allow`` / ``suppress`` / ``block`` (block if any category blocks, else suppress if any
    suppresses). ``actions``: per category, hard ones included. ``scores`` and ``reasons``: per category.
    When suppressing, ``sld_concept`` is the union of the suppressed categories' concept texts and
    ``sld_preset`` the strongest of their SLD presets. ``message``: a one-line explanation for a block.
    """

    prompt: str
    normalized_text: str
    transformations: tuple[str, ...]
    scores: dict[str, float]
    reasons: dict[str, tuple[Reason, ...]]
    actions: dict[str, str]
    action: str
    policy: str
    hard_blocks: tuple[str, ...] = ()
    suppressed: tuple[str, ...] = ()
    sld_concept: str | None = None
    sld_preset: str | None = None
    message: str = ""
    similarities: dict[str, tuple[float, str]] = field(default_factory=dict)

    @property
    def blocked(self) -> bool:
        """True when the prompt must not be generated."""
        return self.action == "block"

    def raise_if_blocked(self) -> PolicyDecision:
        """Raise :class:`~safelatent.safety.policy_file.PromptBlockedError` (with :attr:`message`) for a
        blocked prompt; return the decision otherwise, so that calls chain."""
        if self.blocked:
            hint = "hard blocks cannot be relaxed" if self.hard_blocks else "rephrase the prompt"
            raise PromptBlockedError(self.message, hint)
        return self

    def as_dict(self) -> dict:
        """A JSON-ready summary (for audit logs and sidecars)."""
        return {
            "action": self.action,
            "policy": self.policy,
            "normalized_text": self.normalized_text,
            "transformations": list(self.transformations),
            "scores": self.scores,
            "actions": self.actions,
            "reasons": {c: [str(r) for r in rs] for c, rs in self.reasons.items() if rs},
            "hard_blocks": list(self.hard_blocks),
            "sld_concept": self.sld_concept,
            "sld_preset": self.sld_preset,
            "message": self.message,
        }


_SLD_ORDER = ("weak-diffusers", "weak", "medium", "strong", "max")
_HARD_MESSAGES = {
    "sexual_minors": "sexual content involving minors",
    "real_people": "a sexual or violent depiction of a real, named person",
}


def check_prompt(
    prompt: str,
    policy: Policy | None = None,
    *,
    overrides: dict[str, str] | None = None,
    similarity: TextEncoderSimilarity | None = None,
) -> PolicyDecision:
    """Decide what to do with ``prompt`` under ``policy`` (default: the shipped default policy).

    ``overrides``: per-request category actions (``{"violence": "block"}``); trying to relax a hard
    category raises :class:`~safelatent.safety.policy_file.HardBlockRelaxationError`. ``similarity``: a
    :class:`TextEncoderSimilarity`, used when the policy enables the similarity scorer.
    """
    policy = (policy or _default()).with_overrides(overrides)
    normalized = normalize(prompt)
    hits = lexical_hits(normalized, _lexicon_for(policy))

    scores: dict[str, float] = {}
    reasons: dict[str, tuple[Reason, ...]] = {}
    actions: dict[str, str] = {}
    sims: dict[str, tuple[float, str]] = {}
    if similarity is not None and policy.similarity_enabled:
        phrases = {c: policy.categories[c].phrases() for c in CATEGORIES}
        sims = similarity.similarities(normalized.text, phrases)
    elif not hits.hits:  # fast path: nothing matched, nothing to score
        every = (*CATEGORIES, *HARD_CATEGORIES)
        return PolicyDecision(
            prompt=prompt,
            normalized_text=normalized.text,
            transformations=normalized.transformations,
            scores=dict.fromkeys(every, 0.0),
            reasons=dict.fromkeys(every, ()),
            actions=dict.fromkeys(every, "allow"),
            action="allow",
            policy=policy.name,
        )

    for category in CATEGORIES:
        settings = policy.categories[category]
        found = list(hits.hits.get(category, {}).values())
        score = _combine(hits.weights(category))
        triggered = score >= settings.threshold
        if category in sims and sims[category][0] >= policy.similarity_threshold:
            sim, phrase = sims[category]
            found.append(Reason(category, "similarity", phrase, normalized.text, "text-encoder", sim))
            score = max(score, sim)
            triggered = True
        scores[category] = score
        reasons[category] = tuple(found)
        actions[category] = settings.action if triggered else "allow"

    # Hard blocks: lexical, on the normalised views; no threshold or action can change them.
    sexual = hits.strong("sexual")
    minors = list(hits.hits.get("minors", {}).values())
    hard_minor = tuple(sexual + minors) if sexual and minors else ()
    named = list(hits.hits.get("name", {}).values())
    violent = hits.strong("violence")
    hard_people = tuple(named + sexual + violent) if named and (sexual or violent) else ()
    for category, found in (("sexual_minors", hard_minor), ("real_people", hard_people)):
        scores[category] = 1.0 if found else 0.0
        reasons[category] = found
        actions[category] = "block" if found else "allow"

    hard_blocks = tuple(c for c in HARD_CATEGORIES if actions[c] == "block")
    blocked = tuple(c for c in (*CATEGORIES, *HARD_CATEGORIES) if actions[c] == "block")
    suppressed = tuple(c for c in CATEGORIES if actions[c] == "suppress")
    action = "block" if blocked else "suppress" if suppressed else "allow"
    concept = preset = None
    if suppressed:
        parts: list[str] = []
        for c in suppressed:
            parts.extend(p.strip() for p in policy.categories[c].concept.split(",") if p.strip())
        concept = ", ".join(dict.fromkeys(parts))
        preset = max((policy.categories[c].sld for c in suppressed), key=_SLD_ORDER.index)
    message = ""
    if blocked:
        what = []
        for c in blocked:
            terms = ", ".join(sorted({repr(r.term) for r in reasons[c]}))
            label = _HARD_MESSAGES.get(c, f"category {c!r} is set to block in policy {policy.name!r}")
            what.append(f"{label} ({terms})")
        kind = "hard block: " if hard_blocks else ""
        message = f"prompt blocked — {kind}{'; '.join(what)}. " + (
            "Hard blocks cannot be relaxed by any policy or request." if hard_blocks else "Rephrase it."
        )
    return PolicyDecision(
        prompt=prompt,
        normalized_text=normalized.text,
        transformations=normalized.transformations,
        scores=scores,
        reasons=reasons,
        actions=actions,
        action=action,
        policy=policy.name,
        hard_blocks=hard_blocks,
        suppressed=suppressed,
        sld_concept=concept,
        sld_preset=preset,
        message=message,
        similarities=sims,
    )


_DEFAULT: Policy | None = None


def _default() -> Policy:
    """The shipped default policy, read once."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = default_policy()
    return _DEFAULT


__all__ = [
    "Entry",
    "Lexicon",
    "PolicyDecision",
    "Reason",
    "TextEncoderSimilarity",
    "build_lexicon",
    "check_prompt",
    "lexical_hits",
    "read_names",
]
