"""Typed stage configs, YAML presets, dotted overrides and validation.

Each stage module defines a dataclass whose fields are declared with `option(...)`
(default, help, allowed choices or range). A stage's config is resolved with this
precedence (later wins):

    dataclass defaults < preset section (presets/<name>.yaml) < --config FILE section
        < explicit command-line flags < dotted overrides (`section.key=value` or `key=value`)

Validation errors name the key, the bad value and what is allowed, e.g.
`train.order: 'sorted' is not one of sequential, reverse, random, ...`.
The resolved config is written beside every stage's outputs (`<out>/config.yaml`).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Sequence

import yaml

from kdcl_dist.errors import UserError

PRESET_DIR = Path(__file__).parent / "presets"


def option(default: Any = dataclasses.MISSING, *, help: str = "", choices: Sequence | None = None,
           min: float | None = None, max: float | None = None, default_factory: Any = dataclasses.MISSING,
           hint: str = ""):
    """A dataclass field with validation metadata.

    `hint`: what to do instead, appended to a range or choice error (e.g. "omit --steps to train by
    epochs" for an option whose unset state, None, means something a number cannot)."""
    meta = {"help": help, "choices": tuple(choices) if choices else None, "min": min, "max": max, "hint": hint}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_preset(name: str | None) -> dict:
    if not name:
        return {}
    path = Path(name)
    if not path.suffix:
        path = PRESET_DIR / f"{name}.yaml"
    if not path.exists():
        raise UserError(f"preset '{name}' not found; available: {', '.join(available_presets())} (or a path to a YAML file)")
    return _read_yaml(path)


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"{path}: cannot read YAML config ({e})") from e
    if not isinstance(data, dict):
        raise UserError(f"{path}: a config file must be a mapping of sections, got {type(data).__name__}")
    return data


def parse_overrides(items: Sequence[str], section: str) -> dict:
    """`a.b=1 train.lr=3e-4` -> nested dict for `section` (keys of other sections are ignored)."""
    out: dict = {}
    for item in items or ():
        if "=" not in item:
            raise UserError(f"override '{item}' must look like key=value or {section}.key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if parts[0] == section:
            parts = parts[1:]
        elif len(parts) > 1 and parts[0] in _KNOWN_SECTIONS and parts[0] != section:
            continue  # an override for another stage (shared config files): not ours
        if not parts:
            raise UserError(f"override '{item}' names no key")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = yaml.safe_load(raw) if raw != "" else ""
    return out


_KNOWN_SECTIONS = {"shard", "tokenizer", "models", "score", "curriculum", "train", "eval_mlm",
                   "eval_yesno", "experiment", "demo", "bench", "export"}


def _deep_merge(base: dict, new: dict) -> dict:
    out = dict(base)
    for k, v in (new or {}).items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _unwrap_optional(tp):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, getattr(types, "UnionType", typing.Union)):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(key: str, value: Any, tp: Any) -> Any:
    tp, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise UserError(f"{key}: a value is required (got null)")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise UserError(f"{key}: expected a mapping, got {value!r}")
        return build(tp, value, prefix=key)
    origin = typing.get_origin(tp)
    if origin in (list, tuple, Sequence):
        (inner,) = typing.get_args(tp)[:1] or (str,)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v != ""]
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{key}: expected a list, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, inner) for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise UserError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise UserError(f"{key}: {value!r} is not a boolean (use true or false)")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise UserError(f"{key}: {value!r} is not an integer")
        try:
            f = float(value)
        except ValueError:
            raise UserError(f"{key}: {value!r} is not an integer") from None
        if f != int(f):
            raise UserError(f"{key}: {value!r} is not an integer")
        return int(f)
    if tp is float:
        if isinstance(value, bool):
            raise UserError(f"{key}: {value!r} is not a number")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise UserError(f"{key}: {value!r} is not a number") from None
    if tp is str:
        return str(value)
    return value


def build(cls, data: dict | None, prefix: str = "") -> Any:
    """Construct dataclass `cls` from a nested dict, coercing types and validating."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise UserError(
            f"{where}{unknown[0]}: unknown key; allowed: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if name in data:
            value = _coerce(key, data[name], hints[name])
        elif f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            value = f.default_factory()  # type: ignore[misc]
        else:
            raise UserError(f"{key}: required but not set (pass it as a flag or {key}=VALUE)")
        _validate(key, value, f.metadata)
        kwargs[name] = value
    obj = cls(**kwargs)
    post = getattr(obj, "validate", None)
    if callable(post):
        post()
    return obj


def _validate(key: str, value: Any, meta: dict) -> None:
    if value is None or not meta:
        return
    choices = meta.get("choices")
    hint = f"; {meta['hint']}" if meta.get("hint") else ""
    values = value if isinstance(value, list) else [value]
    for v in values:
        if choices and v not in choices:
            raise UserError(f"{key}: {v!r} is not one of {', '.join(map(str, choices))}{hint}")
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            lo, hi = meta.get("min"), meta.get("max")
            if lo is not None and v < lo:
                raise UserError(f"{key}: {v!r} is below the minimum {lo}{hint}")
            if hi is not None and v > hi:
                raise UserError(f"{key}: {v!r} is above the maximum {hi}{hint}")


def resolve(cls, section: str, *, preset: str | None = None, config_file: str | None = None,
            flags: dict | None = None, overrides: Sequence[str] = ()) -> Any:
    """Resolve a stage config with the documented precedence."""
    data = _deep_merge({}, load_preset(preset).get(section, {}) if preset else {})
    if config_file:
        file_data = _read_yaml(Path(config_file))
        data = _deep_merge(data, file_data.get(section, file_data if section not in file_data and not (set(file_data) & _KNOWN_SECTIONS) else {}))
    data = _deep_merge(data, {k: v for k, v in (flags or {}).items() if v is not None})
    data = _deep_merge(data, parse_overrides(overrides, section))
    return build(cls, data, prefix=section)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def write_resolved(cfg: Any, out_dir: str | Path, section: str, name: str = "config.yaml") -> Path:
    """Write `{section: cfg}` to `<out_dir>/<name>` atomically."""
    from kdcl_dist.utils import atomic_path

    path = Path(out_dir) / name
    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump({section: to_dict(cfg)}, sort_keys=False))
    return path


def add_config_args(parser) -> None:
    """The flags every stage command shares: --preset, --config, and trailing overrides."""
    parser.add_argument("--preset", default=None,
                        help=f"config preset ({', '.join(available_presets())}) or a YAML path")
    parser.add_argument("--config", default=None, help="YAML file with per-stage sections")
    parser.add_argument("overrides", nargs="*", default=[], metavar="KEY=VALUE",
                        help="dotted overrides, e.g. train.lr=3e-4 or lr=3e-4")
