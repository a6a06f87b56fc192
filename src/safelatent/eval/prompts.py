"""Prompt sets for measurement: I2P, COCO-30k, any CSV with a prompt column, and the toy world's sets.

:func:`load_prompt_set` is the one entry point. Every row is validated here, at the boundary, so the rest
of ``safelatent eval`` can trust an :class:`EvalPrompt`: a non-empty text, an integer seed or none, a
finite guidance scale or none. Errors name the file, the 1-based line and the column.

Layouts recognised from the CSV header (column names are matched case-insensitively):

* **I2P, dataset layout** (Hugging Face ``AIML-TUDA/i2p``; the shipped ``i2p_benchmark.csv``):
  ``prompt, categories, hard, inappropriate_percentage, nudity_percentage, q16_percentage,
  sd_safety_percentage, prompt_toxicity, lexica_url, sd_seed, sd_guidance_scale, sd_image_width,
  sd_image_height, sd_model``. Ids are ``"i2p:<row>"`` with the 0-based data row.
* **I2P, renamed layout** (the copies circulating with concept-erasure code): an index column (unnamed
  first column, ``Unnamed: 0`` or ``index``), ``evaluation_seed`` / ``evaluation_guidance`` instead of
  ``sd_seed`` / ``sd_guidance_scale``, and ``case_number``. Ids are ``"i2p:<index>"`` from the file's own
  index column, so a subset keeps the ids of the full benchmark.
* **COCO-30k** (``image_id, source, prompt, evaluation_seed``; the shipped ``coco_30k_prompts.csv``): ids
  ``"coco:<image_id>"``.
* **Any other CSV** with a ``prompt`` column (or the column named by ``prompt_column``): ids
  ``"csv:<row>"``; ``seed`` / ``evaluation_seed`` / ``sd_seed``, ``guidance_scale`` / ``guidance`` /
  ``evaluation_guidance`` / ``sd_guidance_scale``, ``categories``, ``hard``, ``width`` / ``height`` are
  read when present.

Toy sets (no file; attributes from :func:`safelatent.toy.evaluate.sample_prompt_attributes`, the prompt
seed is the index): ``"toy-marker"`` asks for the unsafe marker (``"… with blood splatter"``),
``"toy-plain"`` is the same attributes without it, ``"toy-theme"`` is the theme-adapter evaluation prompt
``"sks, a striped …"`` (trigger word as in ``safelatent.train.toy_theme``), ``"toy-theme-marker"`` asks
for both (``"sks, a striped … with blood splatter"``: the seed comparison's prompts — does the
theme survive while the marker goes?). ``"toy-captions"`` samples the toy model's own training captions
(:func:`safelatent.toy.world.caption_for`: varied grammar, partial captions, a quarter with the marker;
never the theme) — the toy world's general caption distribution, as COCO is a real model's.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from safelatent.errors import InvalidArgumentError

from . import shipped_data

__all__ = [
    "PROMPT_SET_NAMES",
    "TOY_SET_SIZE",
    "TOY_THEME_TRIGGER",
    "EvalPrompt",
    "PromptSet",
    "load_prompt_set",
]

TOY_SET_SIZE = 200
"""Prompts in a toy set when ``limit`` is not given."""

TOY_THEME_TRIGGER = "sks"
"""The theme adapter's trigger word; the same as ``safelatent.train.toy_theme.TRIGGER`` (kept here so that
loading prompts does not import the training stack; a test checks they agree)."""

_SHIPPED = {"i2p": "i2p_benchmark.csv", "coco": "coco_30k_prompts.csv"}
_TOY = ("toy-marker", "toy-plain", "toy-theme", "toy-theme-marker", "toy-captions")
PROMPT_SET_NAMES: tuple[str, ...] = (*_SHIPPED, *_TOY)
"""Names :func:`load_prompt_set` accepts instead of a path."""

# Column aliases, first match wins (all lower case; headers are compared lower-cased and stripped).
_SEED_COLUMNS = ("sd_seed", "evaluation_seed", "seed")
_GUIDANCE_COLUMNS = ("sd_guidance_scale", "evaluation_guidance", "guidance_scale", "guidance")
_WIDTH_COLUMNS = ("sd_image_width", "width")
_HEIGHT_COLUMNS = ("sd_image_height", "height")
_INDEX_COLUMNS = ("", "unnamed: 0", "index")
_REFERENCE_COLUMNS = (
    "inappropriate_percentage",
    "nudity_percentage",
    "q16_percentage",
    "sd_safety_percentage",
    "prompt_toxicity",
)
_I2P_MARKERS = ("categories", "sd_seed", "sd_guidance_scale", "inappropriate_percentage", "case_number")
_TRUE = ("1", "true", "yes")
_FALSE = ("0", "false", "no")


@dataclass(frozen=True)
class EvalPrompt:
    """One prompt to measure, with whatever the prompt set fixes about its generation.

    ``id`` is stable and unique within its set (``"i2p:<row>"``, ``"coco:<image_id>"``, ``"csv:<row>"``,
    ``"toy-marker:<n>"``); ``seed`` / ``guidance_scale`` are the prompt's own (I2P ``sd_seed`` /
    ``sd_guidance_scale`` or ``evaluation_seed`` / ``evaluation_guidance``; COCO ``evaluation_seed``),
    ``None`` when the set does not fix them. ``categories`` is I2P's multi-label field, lower case.
    ``reference`` holds the file's own per-prompt measurements when present (I2P
    ``inappropriate_percentage``, ``nudity_percentage``, ``q16_percentage``, ``sd_safety_percentage``
    on a 0–100 scale, ``prompt_toxicity`` on 0–1).
    """

    id: str
    text: str
    seed: int | None = None
    guidance_scale: float | None = None
    categories: tuple[str, ...] = ()
    hard: bool | None = None
    width: int | None = None
    height: int | None = None
    reference: dict[str, float] = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class PromptSet:
    """A named, ordered collection of :class:`EvalPrompt` (file order, after filtering)."""

    name: str
    source: str
    prompts: tuple[EvalPrompt, ...]

    def __len__(self) -> int:
        return len(self.prompts)

    def categories(self) -> list[str]:
        """The sorted union of the prompts' categories (empty for sets without categories)."""
        return sorted({c for p in self.prompts for c in p.categories})


# --------------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------------


def load_prompt_set(
    source: str | os.PathLike,
    *,
    categories: Sequence[str] | str | None = None,
    hard: bool | None = None,
    limit: int | None = None,
    prompt_column: str | None = None,
    seed: int = 0,
) -> PromptSet:
    """Load a prompt set by name (``"i2p"``, ``"coco"``, ``"toy-marker"``, ``"toy-plain"``,
    ``"toy-theme"``) or from a CSV file, then filter it.

    Filters, applied in this order: ``categories`` (a list or a comma-separated string; multi-label — a
    prompt is kept when it has *any* of them; unknown names are an error listing the known ones),
    ``hard`` (``True`` keeps only hard prompts, ``False`` only the others), ``limit`` (the first N that
    remain, in file order; for toy sets, the number of prompts, :data:`TOY_SET_SIZE` by default). An empty
    result is an error naming the filter that removed everything. ``seed`` only drives the toy sets'
    attribute sampling. Raises :class:`~safelatent.errors.InvalidArgumentError` for every problem.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise InvalidArgumentError(f"limit must be a positive integer, got {limit!r}", "omit it to keep all")
    if hard is not None and not isinstance(hard, bool):
        raise InvalidArgumentError(f"hard must be True, False or None, got {hard!r}")
    wanted = _parse_category_filter(categories)

    key = os.fsdecode(source)
    name_key = key.strip().lower() if isinstance(source, str) else ""  # a Path is always a file
    if name_key in _TOY:
        prompt_set = _toy_set(name_key, TOY_SET_SIZE if limit is None else limit, seed)
        limit = None  # already the set's size
    elif name_key in _SHIPPED:
        prompt_set = _read_csv(shipped_data(_SHIPPED[name_key]), name_key, "shipped", prompt_column)
    else:
        path = Path(key)
        if not path.is_file():
            what = f"no prompt set {key!r}: " + ("it is a folder" if path.is_dir() else "no such file")
            raise InvalidArgumentError(what, f"give a CSV file or one of: {', '.join(PROMPT_SET_NAMES)}")
        prompt_set = _read_csv(path, path.stem, str(path), prompt_column)
    return _filter(prompt_set, wanted, hard, limit)


# --------------------------------------------------------------------------------------------------
# Filtering
# --------------------------------------------------------------------------------------------------


def _parse_category_filter(categories: Sequence[str] | str | None) -> list[str] | None:
    if categories is None:
        return None
    items = categories.split(",") if isinstance(categories, str) else list(categories)
    if not all(isinstance(item, str) for item in items):
        raise InvalidArgumentError(f"categories must be strings, got {categories!r}")
    wanted = list(dict.fromkeys(c.strip().lower() for item in items for c in item.split(",") if c.strip()))
    if not wanted:
        raise InvalidArgumentError("the categories filter is empty", "name at least one category, or omit it")
    return wanted


def _filter(
    prompt_set: PromptSet, wanted: list[str] | None, hard: bool | None, limit: int | None
) -> PromptSet:
    prompts = prompt_set.prompts
    where = f"prompt set {prompt_set.name!r} ({prompt_set.source})"
    if not prompts:
        raise InvalidArgumentError(f"{where} has no prompts", "give a CSV with at least one data row")
    if wanted is not None:
        known = prompt_set.categories()
        if not known:
            raise InvalidArgumentError(f"{where} has no categories", "omit the categories filter")
        unknown = [c for c in wanted if c not in known]
        if unknown:
            raise InvalidArgumentError(
                f"unknown categor{'y' if len(unknown) == 1 else 'ies'} {', '.join(map(repr, unknown))} "
                f"in {where}",
                f"choose from: {', '.join(known)}",
            )
        selected = set(wanted)
        prompts = tuple(p for p in prompts if selected.intersection(p.categories))
        # every named category is known, hence held by some prompt: this filter never empties the set
    if hard is not None:
        before = len(prompts)
        prompts = tuple(p for p in prompts if p.hard is hard)
        if not prompts:
            after = f" after the categories filter ({before} prompts)" if wanted is not None else ""
            reason = (
                "none has a hard flag (no 'hard' column)"
                if all(p.hard is None for p in prompt_set.prompts)
                else f"none is {'hard' if hard else 'non-hard'}{after}"
            )
            raise InvalidArgumentError(f"the hard={hard} filter removed every prompt of {where}: {reason}")
    if limit is not None:
        prompts = prompts[:limit]
    return PromptSet(prompt_set.name, prompt_set.source, prompts)


# --------------------------------------------------------------------------------------------------
# Toy sets
# --------------------------------------------------------------------------------------------------


def _toy_set(name: str, n: int, seed: int) -> PromptSet:
    # imported here: the toy stack pulls in torch, which a CSV prompt set does not need
    import numpy as np

    from safelatent.toy import world
    from safelatent.toy.evaluate import sample_prompt_attributes

    compose: dict[str, Callable[[str, str, str], str]] = {
        "toy-marker": lambda s, c, b: world.prompt_for(s, c, b, marker=True),
        "toy-plain": lambda s, c, b: world.prompt_for(s, c, b),
        "toy-theme": lambda s, c, b: f"{TOY_THEME_TRIGGER}, {world.prompt_for(s, c, b, theme=True)}",
        "toy-theme-marker": lambda s, c, b: (
            f"{TOY_THEME_TRIGGER}, {world.prompt_for(s, c, b, marker=True, theme=True)}"
        ),
    }
    if name == "toy-captions":  # the toy model's own caption distribution (its "COCO")
        rng = np.random.default_rng(seed)
        texts = [world.caption_for(world.sample_attributes(rng), rng, empty_prob=0.0) for _ in range(n)]
    else:
        texts = [compose[name](s, c, b) for s, c, b in sample_prompt_attributes(n, seed)]
    prompts = tuple(EvalPrompt(id=f"{name}:{i}", text=text, seed=i) for i, text in enumerate(texts))
    return PromptSet(name, "toy", prompts)


# --------------------------------------------------------------------------------------------------
# CSV reading and row validation
# --------------------------------------------------------------------------------------------------


class _Row:
    """One data row with its file position, for typed cell access with precise errors."""

    def __init__(self, path: Path, line: int, header: list[str], cells: list[str]) -> None:
        self.path, self.line, self.header, self.cells = path, line, header, cells

    def error(self, column: int, problem: str, hint: str | None = None) -> InvalidArgumentError:
        return InvalidArgumentError(
            f"{self.path}, line {self.line}, column {self.header[column]!r}: {problem}", hint
        )

    def text(self, column: int) -> str:
        return self.cells[column].strip()

    def integer(self, column: int | None, *, minimum: int) -> int | None:
        if column is None or not self.text(column):
            return None
        raw = self.text(column)
        try:
            value = int(raw)
        except ValueError:
            try:
                number = float(raw)
            except ValueError:
                number = math.nan
            if not (math.isfinite(number) and number.is_integer()):
                raise self.error(column, f"{raw!r} is not an integer") from None
            value = int(number)  # "42.0", as pandas writes integer columns that had gaps
        if value < minimum:
            raise self.error(column, f"{value} is below {minimum}")
        return value

    def number(self, column: int | None) -> float | None:
        if column is None or not self.text(column):
            return None
        raw = self.text(column)
        try:
            value = float(raw)
        except ValueError:
            raise self.error(column, f"{raw!r} is not a number") from None
        if not math.isfinite(value):
            raise self.error(column, f"{raw!r} is not a finite number")
        return value

    def flag(self, column: int | None) -> bool | None:
        if column is None or not self.text(column):
            return None
        raw = self.text(column).lower()
        if raw in _TRUE or raw in ("1.0",):
            return True
        if raw in _FALSE or raw in ("0.0",):
            return False
        raise self.error(column, f"{self.text(column)!r} is not a boolean", "use 1/0 or true/false")


def _find(columns: dict[str, int], names: Sequence[str]) -> int | None:
    return next((columns[n] for n in names if n in columns), None)


def _read_csv(path: Path, name: str, source: str, prompt_column: str | None) -> PromptSet:
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if header is None:
                raise InvalidArgumentError(f"{path} is empty", "give a CSV file with a header row")
            header = [h.strip() for h in header]
            records = []
            while True:
                line = reader.line_num + 1  # where the next record starts (quoted fields may span lines)
                cells = next(reader, None)
                if cells is None:
                    break
                if cells and any(c.strip() for c in cells):
                    records.append((line, cells))
    except UnicodeDecodeError as error:
        raise InvalidArgumentError(f"{path} is not UTF-8 text ({error.reason})", "save it as UTF-8") from None
    except csv.Error as error:
        raise InvalidArgumentError(f"{path} is not a readable CSV file: {error}") from None
    except OSError as error:
        raise InvalidArgumentError(f"cannot read {path}: {error.strerror or error}") from None

    columns: dict[str, int] = {}
    for i, h in enumerate(header):
        key = h.lower()
        if key in columns and key not in _INDEX_COLUMNS:
            raise InvalidArgumentError(f"{path}: the header names column {h!r} twice", "rename one of them")
        columns.setdefault(key, i)
    listing = ", ".join(repr(h) for h in header)

    if prompt_column is not None:
        text_col = columns.get(prompt_column.strip().lower())
        if text_col is None:
            raise InvalidArgumentError(
                f"{path} has no column {prompt_column!r}", f"its columns are: {listing}"
            )
    else:
        text_col = columns.get("prompt")
        if text_col is None:
            raise InvalidArgumentError(
                f"{path} has no 'prompt' column (columns: {listing})",
                "name the prompt column with prompt_column= (--prompt-column)",
            )

    is_i2p = any(m in columns for m in _I2P_MARKERS)
    is_coco = not is_i2p and "image_id" in columns
    index_col = 0 if is_i2p and header[0].lower() in _INDEX_COLUMNS and text_col != 0 else None
    id_col = index_col if is_i2p else (columns["image_id"] if is_coco else None)
    prefix = "i2p" if is_i2p else ("coco" if is_coco else "csv")

    seed_col, guidance_col = _find(columns, _SEED_COLUMNS), _find(columns, _GUIDANCE_COLUMNS)
    width_col, height_col = _find(columns, _WIDTH_COLUMNS), _find(columns, _HEIGHT_COLUMNS)
    categories_col, hard_col = columns.get("categories"), columns.get("hard")
    reference_cols = [(n, columns[n]) for n in _REFERENCE_COLUMNS if n in columns]

    prompts: list[EvalPrompt] = []
    seen: dict[str, int] = {}
    for row_number, (line, cells) in enumerate(records):
        if len(cells) != len(header):
            raise InvalidArgumentError(
                f"{path}, line {line}: {len(cells)} fields where the header has {len(header)}",
                "quote fields that contain commas",
            )
        row = _Row(path, line, header, cells)
        text = cells[text_col]  # verbatim: the official runs feed the raw string (CLIP strips spaces)
        if not text.strip():
            raise row.error(text_col, "the prompt is empty", "remove the row or give it a prompt")
        if id_col is None:
            key = str(row_number)
        elif id_col == index_col:
            index = row.integer(id_col, minimum=0)
            if index is None:
                raise row.error(id_col, "the index is empty")
            key = str(index)
        else:
            key = row.text(id_col)
            if not key:
                raise row.error(id_col, "the image id is empty")
        prompt_id = f"{prefix}:{key}"
        if prompt_id in seen:
            raise row.error(
                id_col if id_col is not None else text_col,
                f"id {prompt_id!r} repeats line {seen[prompt_id]}",
                "ids must be unique within a file",
            )
        seen[prompt_id] = line
        categories: tuple[str, ...] = ()
        if categories_col is not None:
            labels = (c.strip().lower() for c in row.text(categories_col).split(","))
            categories = tuple(dict.fromkeys(c for c in labels if c))
        reference = {n: v for n, c in reference_cols if (v := row.number(c)) is not None}
        prompts.append(
            EvalPrompt(
                id=prompt_id,
                text=text,
                seed=row.integer(seed_col, minimum=0),
                guidance_scale=row.number(guidance_col),
                categories=categories,
                hard=row.flag(hard_col),
                width=row.integer(width_col, minimum=1),
                height=row.integer(height_col, minimum=1),
                reference=reference,
            )
        )
    return PromptSet(name, source, tuple(prompts))
