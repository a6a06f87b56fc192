"""Prompt policy files (TOML): what each category does, validated with the line of every mistake.

A policy file (``tomllib``; see ``safety/data/default_policy.toml`` for a documented example)::

    version = 1
    name = "default"
    description = "..."

    [similarity]                 # optional text-encoder scorer (needs the loaded model)
    enabled = false
    threshold = 0.9              # cosine similarity to a concept phrase that counts as a hit

    [categories.sexual]          # sexual | violence | self_harm | hate
    action = "suppress"          # allow | suppress | block
    threshold = 0.5              # score in [0, 1] at which the action applies
    sld = "strong"               # SLD preset used when suppressing (safelatent.sampling.sld_presets)
    concept = "sexual, nudity"   # SLD concept text when suppressing
    extra_words = ["..."]        # more entries for the category's word list ("word @ 0.4" for a weight)
    concept_phrases = ["..."]    # phrases for the similarity scorer (default: the concept, split at commas)

    [categories.sexual_minors]   # HARD: only action = "block" is accepted
    [categories.real_people]     # HARD: only action = "block" is accepted

    [names]
    files = ["people.txt"]       # more name lists for the real_people hard block (relative to the file);
                                 # the shipped safety/data/real_people.txt always applies as well

    [outputs]                    # layer 3: output classifiers, run on every generated image
    classifiers = ["nudenet"]    # nudenet | q16 | toy (see CLASSIFIER_CATEGORIES)
    blur_radius = 24             # Gaussian blur radius in pixels (default: 8 % of the longer side)
    q16_clip = "clip-vit-l14/"   # local CLIP ViT-L/14 folder, needed by q16 (relative to the file)

    [outputs.actions.nudity]     # a category some listed classifier scores
    action = "blur"              # keep | blur | withhold
    threshold = 0.6              # score at which it acts (default: the classifier's own threshold)

    [provenance]                 # layer 4
    watermark = true             # invisible watermark on every kept image of at least 256×256 pixels
    c2pa = "auto"                # sign saved files: true (keys required), false, "auto" (when keys exist)
    keys_dir = "keys/"           # default: $SAFELATENT_KEYS_DIR or ~/.config/safelatent/keys

    [audit]                      # layer 5
    enabled = true               # one row per request in the append-only SQLite log
    path = "audit.sqlite3"       # default: $SAFELATENT_AUDIT_DB or ~/.local/share/safelatent/audit.sqlite3
    store_prompt = true          # false: keep only SHA-256 hashes of prompt texts

Omitted categories and sections take the default policy's settings (``[provenance]`` and ``[audit]``
field by field). Hard categories always block: a file that sets one to ``allow``/``suppress`` raises
:class:`HardBlockRelaxationError`; every other mistake raises :class:`PolicyFileError` naming the file,
the line and the field.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path

from ..errors import InvalidArgumentError
from ..toml_fields import TomlReader

#: Policy categories whose action a policy chooses.
CATEGORIES = ("sexual", "violence", "self_harm", "hate")
#: Hard-block categories: always ``block``, whatever a policy file or a request says.
HARD_CATEGORIES = ("sexual_minors", "real_people")
#: The actions, from weakest to strongest.
ACTIONS = ("allow", "suppress", "block")

#: What each output classifier scores (``[outputs] classifiers``): an action may only name these.
CLASSIFIER_CATEGORIES: dict[str, tuple[str, ...]] = {
    "nudenet": ("nudity",),
    "q16": ("inappropriate",),
    "toy": ("marker", "theme"),
}
#: What the output layer can do with an image, least to most severe.
OUTPUT_ACTIONS = ("keep", "blur", "withhold")
#: ``[provenance] c2pa``: ``on`` (keys required), ``off``, ``auto`` (sign when keys exist).
C2PA_MODES = ("auto", "on", "off")

_SLD_NAMES = ("weak", "weak-diffusers", "medium", "strong", "max")
_TOP_KEYS = {
    "version",
    "name",
    "description",
    "similarity",
    "categories",
    "names",
    "outputs",
    "provenance",
    "audit",
}
_CATEGORY_KEYS = {"action", "threshold", "sld", "concept", "extra_words", "concept_phrases"}


class PolicyFileError(InvalidArgumentError):
    """A prompt policy file that cannot be used: bad TOML, an unknown or mistyped field."""


class HardBlockRelaxationError(InvalidArgumentError):
    """A policy file or a request tried to relax a hard block (sexual content involving minors, sexual
    or violent depictions of real, named people). Hard blocks cannot be relaxed."""


class SafetyRelaxationError(InvalidArgumentError):
    """A request that may only add safety (the service's requests) asked for less than the policy
    gives: a category action below the policy's, or SLD weaker than a suppressed category needs."""


class PromptBlockedError(InvalidArgumentError):
    """The prompt policy blocked a prompt; the message says which category and which words."""


@dataclass(frozen=True)
class CategoryPolicy:
    """What one category does: ``action`` when its score reaches ``threshold``; when suppressing,
    SLD at preset ``sld`` with ``concept`` as the safety concept text."""

    action: str
    threshold: float = 0.5
    sld: str = "strong"
    concept: str = ""
    extra_words: tuple[str, ...] = ()
    concept_phrases: tuple[str, ...] = ()

    def phrases(self) -> tuple[str, ...]:
        """The similarity scorer's phrases: ``concept_phrases``, else the concept split at commas."""
        if self.concept_phrases:
            return self.concept_phrases
        return tuple(p.strip() for p in self.concept.split(",") if p.strip())


@dataclass(frozen=True)
class OutputAction:
    """What the output layer does with an image whose score for a category reaches ``threshold``
    (``None``: the classifier's own threshold)."""

    action: str
    threshold: float | None = None


@dataclass(frozen=True)
class OutputPolicy:
    """Layer 3: which classifiers run on every image, and the action per category."""

    classifiers: tuple[str, ...] = ("nudenet",)
    actions: dict[str, OutputAction] = field(default_factory=lambda: {"nudity": OutputAction("blur")})
    blur_radius: float | None = None
    q16_clip: Path | None = None


@dataclass(frozen=True)
class ProvenancePolicy:
    """Layer 4: invisible watermark on kept images; C2PA signing of saved files (``c2pa``: one of
    :data:`C2PA_MODES`) with the keys in ``keys_dir`` (default :func:`~safelatent.safety.keys.
    default_keys_dir`)."""

    watermark: bool = True
    c2pa: str = "auto"
    keys_dir: Path | None = None


@dataclass(frozen=True)
class AuditPolicy:
    """Layer 5: one row per request in the audit log at ``path`` (default :func:`~safelatent.safety.
    audit.default_audit_db`); ``store_prompt=False`` keeps only hashes of prompt texts."""

    enabled: bool = True
    path: Path | None = None
    store_prompt: bool = True


@dataclass(frozen=True)
class Policy:
    """A validated policy: per-category prompt settings, the similarity scorer's settings, the
    real-people name lists, and the output, provenance and audit layers' settings. Hard categories are
    always present with ``action="block"``."""

    name: str
    categories: dict[str, CategoryPolicy]
    description: str = ""
    similarity_enabled: bool = False
    similarity_threshold: float = 0.9
    name_files: tuple[Path, ...] = ()
    names: tuple[str, ...] = ()
    source: str = "<built-in>"
    outputs: OutputPolicy = field(default_factory=OutputPolicy)
    provenance: ProvenancePolicy = field(default_factory=ProvenancePolicy)
    audit: AuditPolicy = field(default_factory=AuditPolicy)

    def action(self, category: str) -> str:
        """The action configured for ``category``."""
        return self.categories[category].action

    def with_overrides(self, overrides: dict[str, str] | None) -> Policy:
        """A copy with per-request category actions replaced (``{"violence": "block"}``).

        A request may make any policy category stricter or laxer, but never a hard category:
        anything but ``block`` for one raises :class:`HardBlockRelaxationError`.
        """
        if not overrides:
            return self
        categories = dict(self.categories)
        for category, action in overrides.items():
            if category in HARD_CATEGORIES:
                if action != "block":
                    raise HardBlockRelaxationError(
                        f"request refused: it asks for {category!r} to be {action!r}, but {category!r} is a"
                        f" hard block ({_HARD_WHAT[category]}) that no policy or request can relax",
                        "remove that override; change the prompt instead",
                    )
                continue
            if category not in categories:
                raise InvalidArgumentError(
                    f"unknown policy category {category!r} in the request's overrides",
                    f"choose one of: {', '.join(CATEGORIES)}",
                )
            if action not in ACTIONS:
                raise InvalidArgumentError(
                    f"unknown action {action!r} for category {category!r}",
                    f"choose one of: {', '.join(ACTIONS)}",
                )
            categories[category] = replace(categories[category], action=action)
        return replace(self, categories=categories)


_HARD_WHAT = {
    "sexual_minors": "sexual content involving minors",
    "real_people": "sexual or violent depictions of real, named people",
}


def data_path(name: str) -> Path:
    """The path of a file shipped in ``safelatent/safety/data``."""
    return Path(str(resources.files("safelatent.safety").joinpath("data", name)))


def read_names(path: str | os.PathLike) -> tuple[str, ...]:
    """Names from a name-list file: one per line, ``#`` comments and blank lines ignored."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise PolicyFileError(
            f"cannot read the name list {path}: {error.strerror or error}",
            "check the path in the policy's [names] files",
        ) from None
    names = []
    for line in text.splitlines():
        entry = line.split("#", 1)[0].strip()
        if entry:
            names.append(entry)
    return tuple(names)


def parse_policy(text: str, *, source: str = "<string>", base_dir: Path | None = None) -> Policy:
    """Validate policy TOML ``text`` and return the :class:`Policy`; ``source`` names it in errors and
    ``base_dir`` resolves relative name-list paths. Omitted categories take the default policy's."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise PolicyFileError(f"{source}: not valid TOML: {error}", "fix the syntax at that line") from None
    reader = TomlReader(text, source, PolicyFileError)
    reader.unknown_keys(data, _TOP_KEYS, None)
    version = reader.get(data, None, "version", int, 1)
    if version != 1:
        raise reader.fail(None, "version", f"unsupported policy version {version}", "use version = 1")
    name = reader.get(data, None, "name", str, Path(source).stem)
    description = reader.get(data, None, "description", str, "")

    similarity = reader.get(data, None, "similarity", dict, {})
    reader.unknown_keys(similarity, {"enabled", "threshold"}, "similarity")
    enabled = reader.get(similarity, "similarity", "enabled", bool, False)
    sim_threshold = float(reader.get(similarity, "similarity", "threshold", (int, float), 0.9))
    if not -1.0 <= sim_threshold <= 1.0:
        raise reader.fail("similarity", "threshold", f"must be in [-1, 1], got {sim_threshold}", "e.g. 0.9")

    defaults = _builtin_defaults()
    categories = dict(defaults)
    given = reader.get(data, None, "categories", dict, {})
    for category, table in given.items():
        section = f"categories.{category}"
        if category not in CATEGORIES and category not in HARD_CATEGORIES:
            raise reader.fail(
                "categories",
                category,
                f"unknown category {category!r}",
                f"the categories are: {', '.join(CATEGORIES + HARD_CATEGORIES)}",
            )
        if not isinstance(table, dict):
            raise reader.fail(section, None, "must be a table", f"write [categories.{category}]")
        reader.unknown_keys(table, _CATEGORY_KEYS, section)
        action = reader.get(table, section, "action", str, categories[category].action)
        if category in HARD_CATEGORIES:
            if action != "block":
                raise HardBlockRelaxationError(
                    f"{reader.where(section, 'action')}: {category!r} is a hard block"
                    f" ({_HARD_WHAT[category]}); a policy cannot set it to {action!r}",
                    'remove the line or write action = "block"',
                )
            extra = set(table) - {"action"}
            if extra:
                key = sorted(extra)[0]
                raise reader.fail(section, key, 'a hard category takes only action = "block"', "remove it")
            continue
        if action not in ACTIONS:
            raise reader.fail(
                section, "action", f"unknown action {action!r}", f"use one of: {', '.join(ACTIONS)}"
            )
        base = categories[category]
        threshold = float(reader.get(table, section, "threshold", (int, float), base.threshold))
        if not 0.0 < threshold <= 1.0:
            raise reader.fail(section, "threshold", f"must be in (0, 1], got {threshold}", "e.g. 0.5")
        sld = reader.get(table, section, "sld", str, base.sld)
        if sld not in _SLD_NAMES:
            raise reader.fail(
                section, "sld", f"unknown SLD preset {sld!r}", f"use one of: {', '.join(_SLD_NAMES)}"
            )
        concept = reader.get(table, section, "concept", str, base.concept)
        if action == "suppress" and not concept.strip():
            raise reader.fail(
                section, "concept", "suppress needs a non-empty concept text", 'e.g. concept = "gore"'
            )
        categories[category] = CategoryPolicy(
            action=action,
            threshold=threshold,
            sld=sld,
            concept=concept,
            extra_words=reader.string_list(table, section, "extra_words"),
            concept_phrases=reader.string_list(table, section, "concept_phrases") or base.concept_phrases,
        )

    names_table = reader.get(data, None, "names", dict, {})
    reader.unknown_keys(names_table, {"files"}, "names")
    # The installation's own list (package data) always applies: a policy can add lists, never drop it.
    files = [data_path("real_people.txt")]
    for entry in reader.string_list(names_table, "names", "files"):
        path = Path(entry).expanduser()
        if not path.is_absolute():
            path = (base_dir or Path.cwd()) / path
        if not path.is_file():
            raise reader.fail(
                "names", "files", f"name list {entry!r} not found (looked at {path})", "fix the path"
            )
        if path.resolve() not in {f.resolve() for f in files}:
            files.append(path)
    names = tuple(dict.fromkeys(name for path in files for name in read_names(path)))
    layers = _builtin_layers()
    return Policy(
        name=name,
        description=description,
        categories=categories,
        similarity_enabled=enabled,
        similarity_threshold=sim_threshold,
        name_files=tuple(files),
        names=names,
        source=source,
        outputs=_read_outputs(reader, data, base_dir, layers[0]),
        provenance=_read_provenance(reader, data, base_dir, layers[1]),
        audit=_read_audit(reader, data, base_dir, layers[2]),
    )


def _path_field(
    reader: TomlReader, table: dict, section: str, key: str, base_dir: Path | None
) -> Path | None:
    """An optional path field (``""`` = unset), relative paths resolved against the policy's folder."""
    value = reader.get(table, section, key, str, "").strip()
    if not value:
        return None
    path = Path(value).expanduser()
    return path if path.is_absolute() else (base_dir or Path.cwd()) / path


def _read_outputs(
    reader: TomlReader, data: dict, base_dir: Path | None, default: OutputPolicy
) -> OutputPolicy:
    """The ``[outputs]`` table (layer 3), or ``default`` when the file has none."""
    if "outputs" not in data:
        return default
    table = reader.get(data, None, "outputs", dict, {})
    reader.unknown_keys(table, {"classifiers", "actions", "blur_radius", "q16_clip"}, "outputs")
    classifiers = reader.string_list(table, "outputs", "classifiers")
    for name in classifiers:
        if name not in CLASSIFIER_CATEGORIES:
            raise reader.fail(
                "outputs",
                "classifiers",
                f"unknown classifier {name!r}",
                f"use some of: {', '.join(CLASSIFIER_CATEGORIES)}",
            )
    scored = {c for name in classifiers for c in CLASSIFIER_CATEGORIES[name]}
    actions: dict[str, OutputAction] = {}
    for category, spec in reader.get(table, "outputs", "actions", dict, {}).items():
        section = f"outputs.actions.{category}"
        if not isinstance(spec, dict):
            raise reader.fail(section, None, "must be a table", f"write [outputs.actions.{category}]")
        reader.unknown_keys(spec, {"action", "threshold"}, section)
        if category not in scored:
            raise reader.fail(
                "outputs.actions",
                category,
                f"no listed classifier scores {category!r} (classifiers: {', '.join(classifiers) or 'none'})",
                "add a classifier that scores it to [outputs] classifiers, or remove this table; "
                + "; ".join(f"{n} scores {', '.join(cs)}" for n, cs in CLASSIFIER_CATEGORIES.items()),
            )
        action = reader.get(spec, section, "action", str, "")
        if action not in OUTPUT_ACTIONS:
            raise reader.fail(
                section, "action", f"unknown action {action!r}", f"use one of: {', '.join(OUTPUT_ACTIONS)}"
            )
        threshold = reader.get(spec, section, "threshold", (int, float), None)
        if threshold is not None and not 0.0 <= float(threshold) <= 1.0:
            raise reader.fail(section, "threshold", f"must be in [0, 1], got {threshold}", "e.g. 0.6")
        actions[category] = OutputAction(action, None if threshold is None else float(threshold))
    blur_radius = reader.get(table, "outputs", "blur_radius", (int, float), None)
    if blur_radius is not None and not 0 < blur_radius <= 512:
        raise reader.fail(
            "outputs", "blur_radius", f"must be in (0, 512] pixels, got {blur_radius}", "e.g. 24"
        )
    q16_clip = _path_field(reader, table, "outputs", "q16_clip", base_dir)
    if "q16" in classifiers and q16_clip is None:
        raise reader.fail(
            "outputs",
            "classifiers",
            "the q16 classifier needs a local CLIP ViT-L/14 folder",
            'add q16_clip = "/path/to/clip-vit-large-patch14" (a transformers folder with safetensors)',
        )
    return OutputPolicy(
        classifiers=classifiers,
        actions=actions,
        blur_radius=None if blur_radius is None else float(blur_radius),
        q16_clip=q16_clip,
    )


def _read_provenance(
    reader: TomlReader, data: dict, base_dir: Path | None, default: ProvenancePolicy
) -> ProvenancePolicy:
    """The ``[provenance]`` table (layer 4), fields omitted there taken from ``default``."""
    table = reader.get(data, None, "provenance", dict, {})
    reader.unknown_keys(table, {"watermark", "c2pa", "keys_dir"}, "provenance")
    c2pa = reader.get(table, "provenance", "c2pa", (bool, str), default.c2pa)
    if isinstance(c2pa, bool):
        c2pa = "on" if c2pa else "off"
    if c2pa not in C2PA_MODES:
        raise reader.fail("provenance", "c2pa", f"unknown value {c2pa!r}", 'use true, false or "auto"')
    keys_dir = _path_field(reader, table, "provenance", "keys_dir", base_dir)
    return ProvenancePolicy(
        watermark=reader.get(table, "provenance", "watermark", bool, default.watermark),
        c2pa=c2pa,
        keys_dir=keys_dir if "keys_dir" in table else default.keys_dir,
    )


def _read_audit(reader: TomlReader, data: dict, base_dir: Path | None, default: AuditPolicy) -> AuditPolicy:
    """The ``[audit]`` table (layer 5), fields omitted there taken from ``default``."""
    table = reader.get(data, None, "audit", dict, {})
    reader.unknown_keys(table, {"enabled", "path", "store_prompt"}, "audit")
    path = _path_field(reader, table, "audit", "path", base_dir)
    return AuditPolicy(
        enabled=reader.get(table, "audit", "enabled", bool, default.enabled),
        path=path if "path" in table else default.path,
        store_prompt=reader.get(table, "audit", "store_prompt", bool, default.store_prompt),
    )


#: Policies that ship in ``safety/data/<name>_policy.toml``: ``default`` (suppress the soft categories
#: with SLD), ``artist`` (fictional violence allowed), ``evaluation`` (measurement: soft categories
#: allowed, no output layers, no audit rows), ``toy`` (default + the toy classifier blurs the marker).
#: Hard blocks are the same in all.
SHIPPED_POLICIES = ("default", "artist", "evaluation", "toy")


def load_policy(path: str | os.PathLike | None = None) -> Policy:
    """Read and validate the policy file at ``path``; ``None`` is the shipped default policy, and the
    names in :data:`SHIPPED_POLICIES` are the shipped policies."""
    if path is None or str(path) in SHIPPED_POLICIES:
        path = data_path(f"{path or 'default'}_policy.toml")
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PolicyFileError(
            f"policy file {path} not found",
            f"give the path of a .toml policy file, or one of: {', '.join(SHIPPED_POLICIES)}",
        ) from None
    except (OSError, UnicodeDecodeError) as error:
        raise PolicyFileError(f"cannot read policy file {path}: {error}", "check the file") from None
    return parse_policy(text, source=str(path), base_dir=path.parent)


_BUILTIN: dict[str, CategoryPolicy] | None = None
_BUILTIN_LAYERS: tuple[OutputPolicy, ProvenancePolicy, AuditPolicy] | None = None


def _builtin_layers() -> tuple[OutputPolicy, ProvenancePolicy, AuditPolicy]:
    """The shipped default policy's output, provenance and audit settings, the fallback for omitted
    sections (while the default file itself is read: the dataclass defaults)."""
    if _BUILTIN_LAYERS is None:
        return OutputPolicy(), ProvenancePolicy(), AuditPolicy()
    return _BUILTIN_LAYERS


def _builtin_defaults() -> dict[str, CategoryPolicy]:
    """The categories of the shipped default policy, as a fallback for omitted ones (read once)."""
    global _BUILTIN
    if _BUILTIN is None:
        _BUILTIN = {c: CategoryPolicy(action="block") for c in HARD_CATEGORIES}
        _BUILTIN.update(
            {c: CategoryPolicy(action="suppress", concept=c.replace("_", " ")) for c in CATEGORIES}
        )
        path = data_path("default_policy.toml")
        default = parse_policy(path.read_text(encoding="utf-8"), source=str(path), base_dir=path.parent)
        _BUILTIN = dict(default.categories)
        global _BUILTIN_LAYERS
        _BUILTIN_LAYERS = (default.outputs, default.provenance, default.audit)
    return dict(_BUILTIN)


def default_policy() -> Policy:
    """The shipped default policy (``safety/data/default_policy.toml``)."""
    return load_policy(None)


__all__ = [
    "ACTIONS",
    "C2PA_MODES",
    "CATEGORIES",
    "CLASSIFIER_CATEGORIES",
    "HARD_CATEGORIES",
    "OUTPUT_ACTIONS",
    "AuditPolicy",
    "CategoryPolicy",
    "HardBlockRelaxationError",
    "OutputAction",
    "OutputPolicy",
    "Policy",
    "PolicyFileError",
    "PromptBlockedError",
    "ProvenancePolicy",
    "data_path",
    "default_policy",
    "load_policy",
    "parse_policy",
    "read_names",
]
