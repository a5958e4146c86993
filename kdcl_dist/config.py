"""Typed stage configs, YAML presets, dotted overrides and validation.

Each stage module defines a dataclass whose fields are declared with `option(...)`
(default, help, allowed choices or range). A stage's config is resolved with this
precedence (later wins):

    dataclass defaults < preset section (presets/<name>.yaml) < --config FILE section
        < explicit command-line flags < dotted overrides (`section.key=value` or `key=value`)

Validation errors name the key, the bad value and what is allowed, e.g.
`train.order: 'sorted' is not one of sequential, reverse, random, ...`.
The resolved config is written beside every stage's outputs (`<out>/config.yaml`).

The fields are also the command-line flags: `add_options(parser, Config, section)` generates one
flag per field (name, type, choices, help with the default), `resolve_args(args)` resolves the
parsed command line, and `--print-config` (`add_config_args`) prints the result as YAML.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Sequence

import yaml

from kdcl_dist.errors import UserError

PRESET_DIR = Path(__file__).parent / "presets"


def option(
    default: Any = dataclasses.MISSING,
    *,
    help: str = "",
    choices: Sequence | None = None,
    min: float | None = None,
    max: float | None = None,
    default_factory: Any = dataclasses.MISSING,
    hint: str = "",
):
    """A dataclass field with validation metadata.

    `hint`: what to do instead, appended to a range or choice error (e.g. "omit --steps to train by
    epochs" for an option whose unset state, None, means something a number cannot)."""
    meta = {
        "help": help,
        "choices": tuple(choices) if choices else None,
        "min": min,
        "max": max,
        "hint": hint,
    }
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
        raise UserError(
            f"preset '{name}' not found; available: {', '.join(available_presets())} (or a path to a YAML file)"
        )
    return _read_yaml(path)


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"{path}: cannot read YAML config ({e})") from e
    if not isinstance(data, dict):
        raise UserError(
            f"{path}: a config file must be a mapping of sections, got {type(data).__name__}"
        )
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


_KNOWN_SECTIONS = {
    "shard",
    "tokenizer",
    "models",
    "score",
    "teacher_cache",
    "curriculum",
    "train",
    "eval_mlm",
    "eval_yesno",
    "experiment",
    "demo",
    "bench",
    "export",
}


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


def build(cls, data: dict | None, prefix: str = "", *, check: bool = True) -> Any:
    """Construct dataclass `cls` from a nested dict, coercing types and validating.

    check=False skips the class's own `validate()` (cross-field checks, required paths) and keeps
    the per-key checks (type, choices, range): what --print-config shows."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise UserError(f"{where}{unknown[0]}: unknown key; allowed: {', '.join(sorted(fields))}")
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
    if check and callable(post):
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


def resolve(
    cls,
    section: str,
    *,
    preset: str | None = None,
    config_file: str | None = None,
    flags: dict | None = None,
    overrides: Sequence[str] = (),
    check: bool = True,
) -> Any:
    """Resolve a stage config with the documented precedence."""
    data = _deep_merge({}, load_preset(preset).get(section, {}) if preset else {})
    if config_file:
        file_data = _read_yaml(Path(config_file))
        data = _deep_merge(
            data,
            file_data.get(
                section,
                file_data
                if section not in file_data and not (set(file_data) & _KNOWN_SECTIONS)
                else {},
            ),
        )
    data = _deep_merge(data, {k: v for k, v in (flags or {}).items() if v is not None})
    data = _deep_merge(data, parse_overrides(overrides, section))
    return build(cls, data, prefix=section, check=check)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def dump_resolved(cfg: Any, section: str) -> str:
    """`{section: cfg}` as YAML: the layout of `<out>/config.yaml` and of `--print-config`."""
    return yaml.safe_dump({section: to_dict(cfg)}, sort_keys=False)


def write_resolved(cfg: Any, out_dir: str | Path, section: str, name: str = "config.yaml") -> Path:
    """Write `{section: cfg}` to `<out_dir>/<name>` atomically."""
    from kdcl_dist.utils import atomic_path

    path = Path(out_dir) / name
    with atomic_path(path) as tmp:
        tmp.write_text(dump_resolved(cfg, section))
    return path


# ---- command-line flags generated from the config dataclasses --------------------------------
#
# One declaration per option: a stage's dataclass field (`option(default, help=, choices=, min=,
# max=)`) is also its command-line flag. Why a small generator and not jsonargparse or tyro: both
# take over parsing end to end (their own precedence of defaults, config files and flags, their own
# type coercion and error texts), which would replace resolve()'s documented precedence (preset <
# --config < flags < overrides), the one-line `section.key: ...` errors the tests pin, the
# `section.key=value` overrides and the shared multi-section config files. This generator only
# writes the argparse side of `option()`; every value still goes through resolve().


@dataclasses.dataclass
class _Options:
    """What add_options registered on a parser: resolve_args and --print-config read it."""

    cls: type
    section: str
    dests: dict  # argparse dest -> dataclass field


def flag_name(field: str) -> str:
    """`global_batch` -> `--global-batch`, `lambda_` -> `--lambda`."""
    return "--" + field.rstrip("_").replace("_", "-")


def _fmt_default(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value if value else "''"
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value)) if value else "none"
    return str(value)


def _field_default(f) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING


def option_help(f, text: str | None = None) -> str:
    """A field's help: its text, the choices or range, and the default (escaped for argparse)."""
    meta = f.metadata or {}
    parts = [text if text is not None else (meta.get("help") or "")]
    if meta.get("choices"):
        parts.append(f"one of: {', '.join(map(str, meta['choices']))}")
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and hi is not None:
        parts.append(f"range {lo}..{hi}")
    elif lo is not None:
        parts.append(f"at least {lo}")
    elif hi is not None:
        parts.append(f"at most {hi}")
    default = _field_default(f)
    tail = [p for p in parts[1:]]
    if default is not dataclasses.MISSING:
        tail.append(f"default: {_fmt_default(default)}")
    out = parts[0].strip()
    if tail:
        out = f"{out} ({'; '.join(tail)})" if out else f"({'; '.join(tail)})"
    return out.replace("%", "%%")


def _flag_kwargs(f, annotation) -> dict | None:
    """argparse keywords for field `f` (no help yet), or None when its type has no flag."""
    tp, _optional = _unwrap_optional(annotation)
    origin = typing.get_origin(tp)
    kwargs: dict = {"dest": f.name, "default": None}
    choices = (f.metadata or {}).get("choices")
    metavar = flag_name(f.name)[2:].upper().replace("-", "_")
    if tp is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif tp in (int, float, str):
        kwargs.update(type=tp, metavar=metavar)
        if choices:
            kwargs["choices"] = choices
    elif origin in (list, tuple) and typing.get_args(tp)[:1] in ((str,), ()):
        # repeatable and comma-separated: `--arms a,b --arms c` is a, b, c (argparse's default
        # for a repeated flag, keeping only the last, silently dropped arms); split by resolve_args
        kwargs.update(type=str, metavar=f"{metavar}[,...]", action="append")
    else:
        return None
    return kwargs


def flag_fields(cls, *, exclude: Sequence[str] = (), only: Sequence[str] | None = None) -> dict:
    """{argparse dest: field} of the flags add_options makes for `cls` (without a parser)."""
    hints = typing.get_type_hints(cls)
    return {
        f.name: f.name
        for f in dataclasses.fields(cls)
        if f.name not in exclude
        and (only is None or f.name in only)
        and _flag_kwargs(f, hints[f.name])
    }


def add_options(
    parser,
    cls,
    section: str,
    *,
    exclude: Sequence[str] = (),
    only: Sequence[str] | None = None,
    aliases: dict | None = None,
    helps: dict | None = None,
    groups: dict | None = None,
) -> dict:
    """Add one flag per field of `cls` to `parser`; return {argparse dest: field}.

    The flag name comes from the field (`flag_name`), the type from the annotation (int, float, str;
    bool -> `--x/--no-x`; list[str] -> comma-separated; Optional[...] unwraps; other types, e.g. a
    mapping, get no flag: set them in a config file or as overrides), `choices` from the metadata
    (argparse refuses others: one line, exit 2), the help from the metadata plus the default and the
    allowed values or range. Every flag defaults to None (unset), so an absent flag overrides nothing
    (see resolve()). Ranges are checked by resolve(), with the project's error text and hint.
    `exclude`/`only`: which fields get a flag; `aliases`: field -> extra flag names; `helps`: field ->
    help text replacing the metadata's for this command; `groups`: field -> argument group title.
    """
    hints = typing.get_type_hints(cls)
    dests: dict = {}
    made_groups: dict = {}
    for f in dataclasses.fields(cls):
        if f.name in exclude or (only is not None and f.name not in only):
            continue
        kwargs = _flag_kwargs(f, hints[f.name])
        if kwargs is None:
            continue
        text = (helps or {}).get(f.name)
        kwargs["help"] = option_help(f, text)
        target = parser
        title = (groups or {}).get(f.name)
        if title:
            target = made_groups.get(title) or made_groups.setdefault(
                title, parser.add_argument_group(title)
            )
        names = [flag_name(f.name), *((aliases or {}).get(f.name, ()))]
        target.add_argument(*names, **kwargs)
        dests[f.name] = f.name
    parser.set_defaults(_options=_Options(cls, section, dests))
    return dests


def split_overrides(inputs: list[str], overrides: list[str]) -> tuple[list[str], list[str]]:
    """`--input a.jsonl max_length=64`: argparse gives both to --input; move KEY=VALUE back."""
    keep, extra = [], []
    for item in inputs or ():
        if (
            "=" in item
            and not Path(item).exists()
            and item.split("=", 1)[0].replace(".", "").replace("_", "").isalnum()
        ):
            extra.append(item)
        else:
            keep.append(item)
    return keep, extra + list(overrides or ())


def resolve_args(args, overrides: Sequence[str] | None = None, *, check: bool = True) -> Any:
    """The config of the parsed command line `args` (flags made by add_options, --preset, --config,
    overrides; `overrides` replaces args.overrides, e.g. after split_overrides)."""
    o: _Options = args._options
    flags = {field: getattr(args, dest, None) for dest, field in o.dests.items()}
    flags = {k: ",".join(v) if isinstance(v, list) else v for k, v in flags.items()}
    return resolve(
        o.cls,
        o.section,
        preset=getattr(args, "preset", None),
        config_file=getattr(args, "config", None),
        flags=flags,
        overrides=args.overrides if overrides is None else overrides,
        check=check,
    )


def print_config(args, file=None) -> None:
    """--print-config: the resolved config as YAML (the layout of <out>/config.yaml); no work done.

    Per-key checks (type, choices, range) apply; the stage's cross-field checks (required paths,
    batch divisibility, ...) are left to the real run, so a partial config can be printed."""
    import sys

    overrides = args.overrides
    if isinstance(getattr(args, "input", None), list):
        _, overrides = split_overrides(args.input, overrides)
    cfg = resolve_args(args, overrides, check=False)
    (file or sys.stdout).write(dump_resolved(cfg, args._options.section))


def _preset_sections(name: str) -> dict:
    try:
        return load_preset(name)
    except UserError:
        return {}


def preset_help(section: str | None, note: str = "") -> str:
    """--preset's help: the packaged presets and what each sets for `section` (None: every section)."""
    items = []
    for name in available_presets():
        data = _preset_sections(name)
        if section is None:
            keys = [k for k in data if k in _KNOWN_SECTIONS]
            items.append(f"{name} (sections {', '.join(keys)})" if keys else f"{name} (empty)")
            continue
        keys = list(data.get(section) or {})
        items.append(
            f"{name} (sets {section}: {', '.join(keys)})"
            if keys
            else f"{name} (sets nothing for {section})"
        )
    text = f"config preset, or a path to a YAML file with per-stage sections; packaged: {'; '.join(items)}"
    return (text + (f". {note}" if note else "")).replace("%", "%%")


def add_config_args(parser, section: str | None = None, *, preset_note: str = "") -> None:
    """The flags every stage command shares: --preset, --config, --print-config and trailing overrides.

    `section`: the config section this command reads (for --preset's help); None lists every section
    of each preset (a command that runs several stages)."""
    parser.add_argument(
        "--preset", default=None, metavar="NAME|PATH", help=preset_help(section, preset_note)
    )
    parser.add_argument(
        "--config",
        default=None,
        metavar="FILE",
        help="YAML file with per-stage sections (e.g. a run's config.yaml or --print-config output)",
    )
    parser.add_argument(
        "--print-config",
        dest="print_config",
        action="store_true",
        help="print the resolved config (preset < --config < flags < overrides) as YAML, in the "
        "layout of <out>/config.yaml, and exit without doing any work; required paths may "
        "be omitted",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="dotted overrides, e.g. train.lr=3e-4 or lr=3e-4 (win over flags)",
    )
