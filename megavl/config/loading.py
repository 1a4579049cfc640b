"""Loading a Config: YAML files, ``key.path=value`` overrides and command-line options.

Values are converted to the schema's field types here, and every problem of a
file and its overrides is reported at once (field, value, expected type). The
result is type-checked only; megavl/config/checks.py cross-checks it.
"""

import argparse
import dataclasses
import os
import typing
from typing import Any, Literal, Optional, Sequence, Union

import yaml

from megavl.config.stages import with_stage_preset
from megavl.config.errors import ConfigError, report_problems
from megavl.config.schema import Config


def field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _section_name(prefix: str) -> str:
    return prefix if prefix else "the top level"


def _optional_inner(tp: Any) -> Optional[Any]:
    """The X of Optional[X], or None when tp is not optional."""
    if typing.get_origin(tp) is Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0]
    return None


def _describe(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return f"str (one of {', '.join(typing.get_args(tp))})"
    inner = _optional_inner(tp)
    if inner is not None:
        return f"{_describe(inner)} or null"
    if typing.get_origin(tp) is list:
        (elem,) = typing.get_args(tp)
        return f"a list of {_describe(elem)}"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return tp.__name__


class _TypeMismatch(Exception):
    pass


def _convert_scalar(value: Any, tp: Any) -> Any:
    if typing.get_origin(tp) is Literal:
        # Any string loads; validate() names the valid values together with
        # every other problem, so a typo in a choice is reported like the rest.
        tp = str
    # bool is a subclass of int, but `true` for a layer count is a typo,
    # never intent, so it is refused for numeric fields.
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # YAML 1.1 reads "1e-3" (no dot) as a string; accept it as a number.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"unsupported config field type {tp!r}")
    raise _TypeMismatch


def _convert(value: Any, tp: Any, path: str, problems: list[str]) -> Any:
    if dataclasses.is_dataclass(tp):
        return build_section(tp, value, path, problems)
    target = tp
    inner = _optional_inner(tp)
    if inner is not None:
        if value is None:
            return None
        target = inner
    try:
        if typing.get_origin(target) is list:
            if not isinstance(value, (list, tuple)):
                raise _TypeMismatch
            (elem,) = typing.get_args(target)
            return [_convert_scalar(v, elem) for v in value]
        return _convert_scalar(value, target)
    except _TypeMismatch:
        problems.append(f"{path} = {value!r}: expected {_describe(tp)}")
        return None


def build_section(cls: type, data: Any, prefix: str, problems: list[str]) -> Any:
    """Build dataclass `cls` from a mapping, recording problems instead of
    stopping at the first so one run of the loader reports them all."""
    if data is None:
        # An empty YAML section (`train:` with nothing under it).
        data = {}
    if not isinstance(data, dict):
        problems.append(
            f"{_section_name(prefix)} = {data!r}: expected a mapping of "
            f"{', '.join(field_types(cls))}"
        )
        return cls()
    types = field_types(cls)
    kwargs = {}
    for key, value in data.items():
        path = _join(prefix, str(key))
        if key not in types:
            problems.append(
                f"unknown key {path!r} (value {value!r}); valid keys in "
                f"{_section_name(prefix)}: {', '.join(types)}"
            )
            continue
        converted = _convert(value, types[key], path, problems)
        if converted is not None or value is None:
            kwargs[key] = converted
    return cls(**kwargs)


def config_from_dict(d: Optional[dict]) -> Config:
    """Build a Config from nested plain data (as read from YAML)."""
    problems: list[str] = []
    config = build_section(Config, d, "", problems)
    if problems:
        raise report_problems(problems, "invalid configuration")
    return config


def config_to_dict(c: Config) -> dict:
    """Nested plain data that yaml.safe_dump accepts and config_from_dict
    turns back into an equal Config."""
    return dataclasses.asdict(c)


def dump_config(c: Config) -> str:
    return yaml.safe_dump(config_to_dict(c), sort_keys=False, default_flow_style=None)



def _parse_override(text: str) -> tuple[list[str], Any]:
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE, e.g. train.lr=3e-4")
    parts = key.split(".")
    if any(not p for p in parts):
        raise ConfigError(f"override {text!r}: key {key!r} has an empty component")
    try:
        # YAML parsing lets `4`, `true`, `[1, 2]` and `null` mean what they
        # would in the config file.
        value = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value {raw!r} is not valid YAML: {e}") from e
    return parts, value


def apply_override(data: dict, text: str) -> None:
    """Sets one `key.path=value` override in a config's dict form, checking the key."""
    parts, value = _parse_override(text)
    cls: Any = Config
    node = data
    prefix = ""
    for i, part in enumerate(parts):
        types = field_types(cls)
        path = _join(prefix, part)
        if part not in types:
            raise ConfigError(
                f"override {text!r}: unknown key {path!r}; valid keys in "
                f"{_section_name(prefix)}: {', '.join(types)}"
            )
        if i == len(parts) - 1:
            node[part] = value
            return
        cls = types[part]
        if not dataclasses.is_dataclass(cls):
            raise ConfigError(
                f"override {text!r}: {path} is a field of type {_describe(cls)}, "
                f"not a section, so it has no key {parts[i + 1]!r}"
            )
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(
                f"override {text!r}: {path} = {child!r} in the config file is "
                "not a mapping"
            )
        node = child
        prefix = path


def _read_yaml(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"cannot read config file {path!r}: {e}") from e
    except yaml.YAMLError as e:
        # Includes tags such as !!python/object, which safe_load refuses.
        raise ConfigError(f"config file {path!r} is not valid safe YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {path!r}: top level is {type(data).__name__}, expected "
            f"a mapping with keys {', '.join(field_types(Config))}"
        )
    return data


def load_config(path: Optional[str], overrides: Sequence[str] = ()) -> Config:
    """Read a YAML file (None or an empty file gives the defaults), apply
    `key.path=value` overrides in order and build a typed Config.

    The result is type-checked but not cross-checked; call validate() once
    the world size is known.
    """
    data = _read_yaml(path) if path is not None else {}
    if isinstance(overrides, str):
        # A lone string would otherwise be applied one character at a time.
        overrides = [overrides]
    for text in overrides:
        apply_override(data, text)
    return config_from_dict(with_stage_preset(data))




def add_config_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add --config FILE and --set KEY=VALUE ... to parser."""
    parser.add_argument("--config", metavar="FILE", default=None, help="YAML config file")
    parser.add_argument(
        "--set",
        dest="overrides",
        metavar="KEY=VALUE",
        nargs="*",
        action="extend",
        default=None,
        help="override a config field, e.g. --set train.lr=3e-4 parallel.tensor=2; "
        "values are parsed as YAML; may be repeated",
    )
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    """Load the Config named by add_config_args' options."""
    path = getattr(args, "config", None)
    if path is not None:
        path = os.fspath(path)
    return load_config(path, getattr(args, "overrides", None) or ())


def replace_field(config: Config, path: str, value: Any) -> Config:
    """A new Config with the dotted field path set to value; config itself is left as it is.

    For values resolved at start-up (e.g. data.image_backend = auto -> pillow), so
    that every reader of the resolved config sees the same value and no reader of
    the original sees it change.
    """
    head, _, rest = path.partition(".")
    if head not in field_types(type(config)):
        raise ConfigError(f"replace_field: no field {head!r} in {type(config).__name__}")
    if not rest:
        return dataclasses.replace(config, **{head: value})
    return dataclasses.replace(config, **{head: replace_field(getattr(config, head), rest, value)})
