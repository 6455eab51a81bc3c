"""One config system for every verb: typed dataclasses, presets as data, files, ``--set``.

A config is a dataclass whose fields are plain values or nested config dataclasses (a
field may name its own builder in ``metadata["build"]``, e.g. the objective, whose class
depends on its ``kind``). Every verb resolves its config the same way::

    preset (a row of a table, possibly on top of another row)  ->  YAML/JSON file  ->  --set key=value

and writes the resolved result into its run folder with :meth:`Config.save`, so a run is
rebuilt from its folder alone. Unknown keys are errors that list the valid ones.
"""

from __future__ import annotations

import copy
import dataclasses
import typing
from pathlib import Path
from typing import Any, ClassVar

import yaml

from neurofm.errors import ConfigError

FREE_SECTIONS = ("kwargs", "extra")  # mappings whose keys are not fields: new keys may be set


def build(cls: type, d: dict[str, Any] | Any, section: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, recursively; an instance passes through."""
    if isinstance(d, cls):
        return d
    if not isinstance(d, dict):
        raise ConfigError(f"{section or cls.__name__} should be a mapping of settings, got {d!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    bad = sorted(set(d) - set(fields))
    if bad:
        where = f"{section} " if section else ""
        raise ConfigError(f"unknown {where}option(s) {bad}; valid: {sorted(fields)}")
    kwargs = {}
    for name, value in d.items():
        f, hint = fields[name], hints.get(name)
        sub = f"{section}.{name}" if section else name
        if "build" in f.metadata:
            value = f.metadata["build"](value)
        elif isinstance(hint, type) and dataclasses.is_dataclass(hint):
            value = build(hint, value, sub)
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{section or cls.__name__}: {e}") from None


def split_assignment(assignment: str) -> tuple[str, Any]:
    """``"optim.lr=3e-4"`` -> ``("optim.lr", 3e-4)`` (values parsed as YAML)."""
    if "=" not in assignment:
        raise ConfigError(f"--set expects key=value (e.g. optim.lr=3e-4), got {assignment!r}")
    key, raw = assignment.split("=", 1)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def assign(d: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``d[a][b][c] = value`` for ``dotted = "a.b.c"``; only existing keys (but inside ``kwargs``/``extra``)."""
    parts = dotted.split(".")
    node = d
    for i, p in enumerate(parts[:-1]):
        if not isinstance(node, dict) or p not in node:
            raise ConfigError(f"unknown setting {dotted!r}: no section {'.'.join(parts[: i + 1])!r}")
        node = node[p]
    leaf = parts[-1]
    free = len(parts) >= 2 and parts[-2] in FREE_SECTIONS
    if not isinstance(node, dict) or (leaf not in node and not free):
        valid = sorted(node) if isinstance(node, dict) else []
        raise ConfigError(f"unknown setting {dotted!r}; valid keys here: {valid}")
    node[leaf] = coerce(node.get(leaf), value, dotted)


def coerce(old: Any, new: Any, dotted: str) -> Any:
    """Give a value the type of the setting it replaces (YAML reads ``3e-4`` as text)."""
    if isinstance(new, str) and isinstance(old, int | float) and not isinstance(old, bool):
        try:
            return float(new) if isinstance(old, float) or any(c in new for c in ".eE") else int(new)
        except ValueError:
            raise ConfigError(f"{dotted} should be a number, got {new!r}") from None
    if isinstance(old, float) and isinstance(new, int) and not isinstance(new, bool):
        return float(new)
    return new


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{'optim': {'lr': 1}}`` -> ``{'optim.lr': 1}`` (``kwargs`` and ``extra`` stay whole)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and k not in FREE_SECTIONS:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """Deep merge of two setting mappings (``top`` wins; ``kwargs``/``extra`` merge key by key too)."""
    out = copy.deepcopy(base)
    for k, v in top.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def load_file(path: str | Path) -> dict[str, Any]:
    """Settings from a YAML or JSON file (JSON is YAML)."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML/JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings")
    return data


def preset_row(table: dict[str, dict[str, Any]], name: str, what: str = "preset") -> dict[str, Any]:
    """A preset's settings: its row merged over the rows it names as ``base`` (meta keys dropped)."""
    if name not in table:
        raise ConfigError(f"unknown {what} {name!r}; choose from {', '.join(sorted(table))}")
    row = table[name]
    base = preset_row(table, row["base"], what) if row.get("base") else {}
    own = {k: v for k, v in row.items() if k not in ("base", "help")}
    return merge(base, own)


class Config:
    """Mixin for the top-level config dataclasses (a pretraining recipe, a fine-tuning run).

    Subclasses set ``PRESETS`` (name -> row) lazily through :meth:`preset_table`.
    """

    NAME_FIELD: ClassVar[str | None] = None  # the field that records the preset's name

    @classmethod
    def preset_table(cls) -> dict[str, dict[str, Any]]:
        return {}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Any:
        return build(cls, copy.deepcopy(d))

    @classmethod
    def from_name(cls, name: str) -> Any:
        row = preset_row(cls.preset_table(), name)
        if cls.NAME_FIELD:
            row[cls.NAME_FIELD] = name
        return cls.from_dict(row)

    @classmethod
    def resolve(
        cls,
        name: str | None = None,
        file: str | Path | None = None,
        overrides: list[str] | dict[str, Any] | None = None,
        base: dict[str, Any] | Any | None = None,
        values: dict[str, Any] | None = None,
    ) -> Any:
        """preset (or a saved config / an instance as ``base``) -> file -> ``values`` (typed command-line
        flags) -> ``--set`` overrides; validated once everything is in."""
        if base is not None:
            d = base.to_dict() if isinstance(base, cls) else copy.deepcopy(base)
        elif name is not None:
            d = preset_row(cls.preset_table(), name)
            if cls.NAME_FIELD:
                d[cls.NAME_FIELD] = name
        else:
            raise ConfigError(f"give a preset (one of {', '.join(sorted(cls.preset_table()))})")
        if file is not None:
            loaded = load_file(file)
            if cls.NAME_FIELD:
                loaded.pop(cls.NAME_FIELD, None)
            d = merge(d, loaded)
        if values:
            d = merge(d, values)
        cfg = cls.from_dict(d)
        return cfg.override(overrides) if overrides else cfg

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    def override(self, assignments: list[str] | dict[str, Any]) -> Any:
        """Apply ``section.key=value`` assignments and re-validate (a new config; this one is unchanged)."""
        d = self.to_dict()
        items = assignments.items() if isinstance(assignments, dict) else (split_assignment(a) for a in assignments)
        for key, value in items:
            assign(d, key, value)
        return type(self).from_dict(d)

    def save(self, path: str | Path, **extra: Any) -> dict[str, Any]:
        """Write the resolved config (plus ``extra`` top-level entries: what the run derived) as JSON,
        atomically; returns what was written."""
        from neurofm.utils import to_jsonable, write_json

        settings = self.to_dict()
        clash = sorted(set(extra) & set(settings))
        if clash:  # what a run derived must not pass for a setting (a resumed or reused run would read it as one)
            raise ValueError(f"{', '.join(clash)}: a setting of {type(self).__name__}; record derived values elsewhere")
        record = to_jsonable({**settings, **extra})
        write_json(path, record)
        return record
