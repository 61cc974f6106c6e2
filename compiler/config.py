"""Typed, frozen pass configs: `--set PASS.KEY=VALUE` parsing, validation, JSON, hash.

Each pass declares its config as a frozen dataclass whose fields carry their valid
range in `field(metadata=...)`; the same metadata declares the search space. The
resolved config of a compile (pipeline + every pass's settings) is plain JSON, and its
hash names the artifact and keys every cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field

from optc.errors import UsageError


@dataclass(frozen=True)
class Space:
    """Where the search may set one config key.

    kind: "int" (low..high, step), "float" (low..high, a step or a log scale) or "choice".
    when: (key, op, value) of the same pass: the key matters only when that holds
    (`method` only when `sparsity > 0`); otherwise it stays at its default.
    bound: a name the model's anatomy resolves to an upper bound ("blocks": one less
    than the residual blocks there are, so no count exceeds what the model has;
    "encoder": the declared range on encoders, nothing to search on a decoder).
    """

    kind: str
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False
    choices: tuple = ()
    when: tuple | None = None
    bound: str | None = None

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()
                if v not in (None, False, ())}

    def holds(self, settings: dict) -> bool:
        """Whether this key is live given the pass's other settings."""
        if self.when is None:
            return True
        key, op, value = self.when
        current = settings.get(key)
        return {">": lambda a, b: a > b, ">=": lambda a, b: a >= b, "==": lambda a, b: a == b,
                "!=": lambda a, b: a != b, "in": lambda a, b: a in b}[op](current, value)


def Int(low: int, high: int, *, step: int = 1, when=None, bound: str | None = None) -> Space:
    return Space("int", low, high, step=step, when=when, bound=bound)


def Float(low: float, high: float, *, step: float | None = None, log: bool = False, when=None) -> Space:
    if log and step is not None:
        raise ValueError("a float space has a step or a log scale, not both")
    return Space("float", low, high, step=step, log=log, when=when)


def Choice(choices, *, when=None) -> Space:
    return Space("choice", choices=tuple(choices), when=when)


def knob(default, *, choices=None, low=None, high=None, search: Space | None = None, doc="", unique=True):
    """A config field with its valid range; `search` is where the search may set it
    (a Space: Int, Float or Choice), or None to leave it at what the user gives.
    A list field refuses repeated entries unless `unique=False` (a per-block schedule)."""
    if search is not None and not isinstance(search, Space):
        raise TypeError("knob(search=...) takes Int(...), Float(...) or Choice(...)")
    meta = {"choices": choices, "low": low, "high": high, "search": search, "doc": doc, "unique": unique}
    if isinstance(default, (list, tuple)):
        return field(default=tuple(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class PassConfig:
    """Base of every pass config. `enabled=False` disables the pass by name."""

    enabled: bool = knob(True, doc="run this pass at all")

    def active(self) -> bool:
        """Whether the settings ask the pass to change anything."""
        return self.enabled

    def to_dict(self) -> dict:
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, pass_name: str, values: dict) -> "PassConfig":
        fields = {f.name: f for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in values.items():
            if key not in fields:
                raise UsageError(
                    f"unknown key '{pass_name}.{key}'; {pass_name} takes: "
                    + ", ".join(f"{pass_name}.{k}" for k in fields)
                )
            kwargs[key] = _coerce(pass_name, fields[key], value)
        return cls(**kwargs)

    @classmethod
    def search_space(cls) -> dict[str, Space]:
        """{key: Space} for the fields that declare one, in declaration order."""
        return {f.name: f.metadata["search"] for f in dataclasses.fields(cls) if f.metadata.get("search")}


def _jsonable(value):
    return list(value) if isinstance(value, tuple) else value


def _coerce(pass_name: str, f: dataclasses.Field, value):
    """Check `value` against the field's type and range; name the key on failure."""
    key = f"{pass_name}.{f.name}"
    default = f.default
    meta = f.metadata
    try:
        if isinstance(default, bool):
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                value = value.lower() in ("true", "1")
            value = bool(value)
        elif isinstance(default, int):
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            value = int(value)
        elif isinstance(default, float):
            value = float(value)
        elif isinstance(default, tuple):
            if not isinstance(value, (list, tuple)):
                raise ValueError
            value = tuple(int(v) for v in value)
            if meta.get("unique", True) and len(set(value)) != len(value):
                raise UsageError(f"{key} lists an entry twice: {list(value)}")
        elif isinstance(default, str):
            value = str(value)
    except (TypeError, ValueError):
        raise UsageError(f"{key}={value!r} is not a valid {type(default).__name__}") from None
    if meta.get("choices") is not None and value not in meta["choices"]:
        raise UsageError(f"{key}={value!r} is not one of {list(meta['choices'])}")
    items = value if isinstance(value, tuple) else (value,)
    for v in items:
        if isinstance(v, str):
            continue
        if meta.get("low") is not None and v < meta["low"]:
            raise UsageError(f"{key}={value!r} is out of range (minimum {meta['low']})")
        if meta.get("high") is not None and v > meta["high"]:
            raise UsageError(f"{key}={value!r} is out of range (maximum {meta['high']})")
    return value


def parse_value(text: str):
    """A --set value: JSON where it parses (numbers, lists, true/false), else a string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_sets(items: list[str]) -> dict[str, dict]:
    """["skip_layers.count=4", ...] -> {"skip_layers": {"count": 4}}; shape errors only
    (unknown passes and keys are checked against the registry by `resolve`)."""
    out: dict[str, dict] = {}
    for item in items:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise UsageError(f"--set {item!r}: expected PASS.KEY=VALUE, e.g. skip_layers.count=4")
        lhs, rhs = item.split("=", 1)
        pass_name, key = lhs.split(".", 1)
        out.setdefault(pass_name.strip(), {})[key.strip()] = parse_value(rhs.strip())
    return out


def flat_to_nested(options: dict) -> dict[str, dict]:
    """{"skip_layers.count": 2} (torch.compile options) -> {"skip_layers": {"count": 2}}."""
    return parse_sets([f"{k}={json.dumps(v)}" for k, v in options.items()])


def config_hash(config: dict) -> str:
    """First 16 hex chars of the sha256 of canonical JSON (sorted keys, no spaces).
    A "hash" key (the config's own recorded hash) is left out."""
    body = {k: v for k, v in config.items() if k != "hash"}
    try:
        text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"config is not JSON-serialisable, so it cannot be hashed: {exc}") from exc
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
