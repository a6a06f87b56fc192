"""Validated fields of a TOML file, with the line of every mistake (``tomllib`` keeps no positions).

Used by the policy files (:mod:`safelatent.safety.policy_file`) and the evaluation matrices
(:mod:`safelatent.eval.configs`): each mistake is an error naming the file, the line and the dotted
field, what was wrong and what to do.
"""

from __future__ import annotations

import re
from typing import Any

from .errors import InvalidArgumentError

__all__ = ["TomlReader"]


def _key_line(text: str, section: str | None, key: str | None) -> int | None:
    """The 1-based line of ``key`` inside table ``section`` (dotted, e.g. ``categories.sexual``), or of the
    table header when ``key`` is None; found by scanning the text (tomllib keeps no positions)."""
    current: str | None = None
    header = re.compile(r"^\s*\[\[?\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
    assign = re.compile(r"^\s*(\"[^\"]*\"|'[^']*'|[A-Za-z0-9_\-.]+)\s*=")
    for number, line in enumerate(text.splitlines(), start=1):
        match = header.match(line)
        if match:
            current = re.sub(r"\s*\.\s*", ".", match.group(1)).replace('"', "").replace("'", "")
            if key is None and current == section:
                return number
            continue
        match = assign.match(line)
        if match is None or key is None:
            continue
        name = match.group(1).strip("\"'")
        full = f"{current}.{name}" if current else name
        if full == (f"{section}.{key}" if section else key):
            return number
    return None


class TomlReader:
    """Validates a parsed TOML table and turns each mistake into an error that names the line and field."""

    def __init__(
        self, text: str, source: str, error: type[InvalidArgumentError] = InvalidArgumentError
    ) -> None:
        """Keep the file's text (to find lines), its name (for messages) and the error class to raise."""
        self.text = text
        self.source = source
        self.error = error

    def where(self, section: str | None, key: str | None) -> str:
        """'FILE, line N, field 'a.b'' for ``key`` in ``section`` (without the line if it is not found)."""
        line = _key_line(self.text, section, key)
        if line is None and key is not None:  # a sub-table ([categories.gore]), else the table header
            line = _key_line(self.text, f"{section}.{key}" if section else key, None)
            line = line or _key_line(self.text, section, None)
        field_name = ".".join(p for p in (section, key) if p)
        return (
            f"{self.source}, line {line}, field {field_name!r}" if line else f"{self.source}, {field_name!r}"
        )

    def fail(self, section: str | None, key: str | None, what: str, hint: str) -> InvalidArgumentError:
        """The reader's error for ``key`` in ``section``: where, what was wrong, what to do."""
        return self.error(f"{self.where(section, key)}: {what}", hint)

    def unknown_keys(self, table: dict, allowed: set[str], section: str | None) -> None:
        """Raise for the first key of ``table`` that is not in ``allowed`` (typos must not pass silently)."""
        for key in table:
            if key not in allowed:
                raise self.fail(
                    section, key, "unknown field", f"the fields here are: {', '.join(sorted(allowed))}"
                )

    def get(self, table: dict, section: str | None, key: str, kind: type | tuple, default: Any) -> Any:
        """``table[key]`` checked to be of type ``kind`` (a bool is never a number), or ``default``."""
        if key not in table:
            return default
        value = table[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
            names = " or ".join("number" if k in (int, float) else k.__name__ for k in kinds)
            raise self.fail(section, key, f"must be a {names}, got {value!r}", "fix the value")
        return value

    def string_list(self, table: dict, section: str, key: str) -> tuple[str, ...]:
        """``table[key]`` as a tuple of stripped non-empty strings (``()`` when absent)."""
        value = self.get(table, section, key, list, [])
        if not all(isinstance(item, str) and item.strip() for item in value):
            raise self.fail(section, key, "must be a list of non-empty strings", 'e.g. ["word", "two words"]')
        return tuple(item.strip() for item in value)
