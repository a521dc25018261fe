"""Loading a :class:`~pipeline.config.schema.Config`: defaults <- YAML file(s) <- dotted overrides.

A YAML file may name others under ``include:`` (applied first). Every key is checked: an unknown
key, a renamed key (the error names its new place) or a value of the wrong type raises
:class:`pipeline.errors.ConfigError` naming the dotted key; the result is then validated by
:func:`pipeline.config.validate.validate`.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from pipeline.config.schema import MOVED_KEYS, Config
from pipeline.config.validate import validate
from pipeline.errors import ConfigError

# ---- Loading: defaults <- YAML file(s) (with `include:`) <- dotted overrides, strictly typed ----

# Resolved annotations (the module uses postponed annotations, so `Field.type` is a string).
_FIELD_TYPES: dict[str, dict[str, Any]] = {
    name: typing.get_type_hints(cls) for name, cls in typing.get_type_hints(Config).items()
}
_ALL_KEYS: list[str] = [f"{s}.{k}" for s, keys in _FIELD_TYPES.items() for k in keys]
# PyYAML (YAML 1.1) reads `2e-3` as a string; a float field accepts such numeric strings.
_FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


_TRAIN_SPLIT = "optim, parallel, checkpoint, log, run and data"


def _suggest(dotted: str) -> str:
    """`; did you mean 'x.y'?` for a near miss on the full key or on its last part, else ''."""
    guess = difflib.get_close_matches(dotted, _ALL_KEYS, n=1, cutoff=0.6)
    if not guess:
        leaves = [k.split(".")[1] for k in _ALL_KEYS]
        leaf = difflib.get_close_matches(dotted.rsplit(".", 1)[-1], leaves, n=1, cutoff=0.75)
        guess = [k for k in _ALL_KEYS if leaf and k.endswith("." + leaf[0])]
    return f"; did you mean '{guess[0]}'?" if guess else ""


def _unknown_key(dotted: str, source: str) -> ConfigError:
    section = dotted.split(".", 1)[0]
    if dotted in MOVED_KEYS:
        return ConfigError(f"config key '{dotted}' moved to {MOVED_KEYS[dotted]}{source}")
    if section == "train":
        what = f"the train section was split into {_TRAIN_SPLIT} (configs/README.md lists every key)"
    elif "." not in dotted:
        what = "key without a section (use section.key, e.g. model.hidden)"
    elif section not in _FIELD_TYPES:
        what = f"unknown section '{section}' (sections: {', '.join(_FIELD_TYPES)})"
    else:
        what = "unknown key"
    return ConfigError(f"config key '{dotted}': {what}{_suggest(dotted)}{source}")


def _type_name(tp: Any) -> str:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    return f"list of {_type_name(args[0])}" if typing.get_origin(tp) is list else tp.__name__


def _try_coerce(value: Any, tp: Any) -> tuple[bool, Any]:
    """(ok, converted). Strict on purpose: a bool is not an int and 1.0 is not an int (a typo
    like `hidden=7.5` must not become 7), but an int is a float (`lr: 1` means 1.0)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):
            return True, None
        tries = [_try_coerce(value, a) for a in typing.get_args(tp) if a is not type(None)]
        return next((t for t in tries if t[0]), (False, None))
    if origin is list:
        if not isinstance(value, list):
            return False, None
        tries = [_try_coerce(v, typing.get_args(tp)[0]) for v in value]
        return all(ok for ok, _ in tries), [out for _, out in tries]
    if tp is bool or tp is str:
        return isinstance(value, tp), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        if isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()):
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False, None
        try:
            return math.isfinite(value), float(value)
        except OverflowError:
            return False, None
    raise TypeError(f"unsupported config annotation {tp!r}: teach _try_coerce about it")


def _set(cfg: Config, dotted: str, value: Any, source: str) -> None:
    section, _, key = dotted.partition(".")
    if key not in _FIELD_TYPES.get(section, {}):
        raise _unknown_key(dotted, source)
    tp = _FIELD_TYPES[section][key]
    ok, out = _try_coerce(value, tp)
    if not ok:
        raise ConfigError(f"config key '{dotted}': expected {_type_name(tp)}, got {value!r}{source}")
    setattr(getattr(cfg, section), key, out)


def _apply_mapping(cfg: Config, data: Any, source: str) -> None:
    """Apply a nested `{section: {key: value}}` mapping onto `cfg` in place."""
    if not isinstance(data, dict):
        raise ConfigError(f"expected a mapping of sections (model:, optim:, ...), got {data!r}{source}")
    for section, values in data.items():
        section = str(section)
        if section not in _FIELD_TYPES:  # name the first key too, so `modle: {hidden: 8}` gets a hint
            first = next(iter(values), None) if isinstance(values, dict) else None
            raise _unknown_key(section if first is None else f"{section}.{first}", source)
        if values is None:  # `demo:` with only comments below it
            continue
        if not isinstance(values, dict):
            want = f"expected a mapping of {section}.* keys"
            raise ConfigError(f"config key '{section}': {want}, got {values!r}{source}")
        for key, value in values.items():
            _set(cfg, f"{section}.{key}", value, source)


def _apply_override(cfg: Config, text: str) -> None:
    """`section.key=value`; the value is parsed as YAML (`8`, `0.1`, `true`, `[2,4]`, `null`)."""
    key, sep, raw = text.partition("=")
    key, source = key.strip(), f" (from override '{text}')"
    if not sep or not key:
        raise ConfigError(f"malformed override '{text}': expected section.key=value, e.g. model.hidden=128")
    section, _, name = key.partition(".")
    value = _yaml_load(raw, source)
    if _FIELD_TYPES.get(section, {}).get(name) is str and not isinstance(value, str):
        value = raw  # a str field takes the text verbatim: `demo.out_dir=2024` means "2024"
    _set(cfg, key, value, source)


def _yaml_load(text: str, source: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"cannot parse YAML{source}: {' '.join(str(exc).split())}") from exc


def _file_layers(path: Path, stack: tuple[Path, ...] = ()) -> list[tuple[dict, str]]:
    """The mappings of `path` and of its includes, in application order (includes first)."""
    resolved, source = path.resolve(), f" (in {path})"
    if resolved in stack:
        raise ConfigError(f"config include cycle: {' -> '.join(str(p) for p in (*stack, resolved))}")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    data = _yaml_load(text, source)
    data = {} if data is None else data  # a non-mapping is reported by _apply_mapping
    includes = (data.pop("include", None) if isinstance(data, dict) else None) or []
    includes = [includes] if isinstance(includes, str) else includes
    if not isinstance(includes, list) or not all(isinstance(i, str) for i in includes):
        raise ConfigError(f"'include' must be a file name or a list of file names{source}")
    layers = [layer for inc in includes for layer in _file_layers(path.parent / inc, (*stack, resolved))]
    return [*layers, (data, source)]


def load_config(paths: list[str] | str | None = None, overrides: list[str] | None = None,
                base: Config | None = None) -> Config:
    """defaults (or a copy of ``base``) <- each YAML file in order (each after its `include:`s)
    <- overrides; validated."""
    cfg = copy.deepcopy(base) if base is not None else Config()
    for p in [paths] if isinstance(paths, str | Path) else paths or []:
        for data, source in _file_layers(Path(p)):
            _apply_mapping(cfg, data, source)
    for text in overrides or []:
        _apply_override(cfg, text)
    validate(cfg)
    return cfg


def config_from_dict(d: dict) -> Config:
    """Rebuild a Config from a (possibly partial) nested dict, e.g. one stored in a checkpoint;
    as strict as `load_config`, so a stale or hand-edited dict fails loudly."""
    if isinstance(d, dict) and "train" in d:
        raise ConfigError(f"this config predates the split of its train section into {_TRAIN_SPLIT}: a checkpoint "
                          "or model file written before that does not load; retrain it, or rename its keys "
                          "as configs/README.md lists them")
    cfg = Config()
    _apply_mapping(cfg, d, " (in config dict)")
    validate(cfg)
    return cfg


def to_dict(cfg: Config) -> dict:
    """Nested plain dict, sections and keys in dataclass order."""
    return dataclasses.asdict(cfg)


class _Dumper(yaml.SafeDumper):
    """Block-style sections with one-line lists (`steps_grid: [2, 4, 8, 16]`)."""


_Dumper.add_representer(list, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))


def dump_yaml(cfg: Config) -> str:
    """The resolved config as YAML; `load_config` of it gives back an equal Config."""
    return yaml.dump(to_dict(cfg), Dumper=_Dumper, sort_keys=False, default_flow_style=False)


