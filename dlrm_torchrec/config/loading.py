"""YAML file -> nested dataclasses -> dotted `key=value` overrides.

Precedence: command line > file > defaults. Every error names the dotted key and the bad
value and is raised as `ConfigError`, which the entry points print without a traceback.
"""

import copy
import dataclasses
import math
import typing
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import yaml

from dlrm_torchrec.config.schema import Config, ConfigError
from dlrm_torchrec.config.validation import validate


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (list, List):
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin in (dict, Dict):
        return f"mapping of {_type_name(typing.get_args(tp)[1])}"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the field type `tp`; return it converted. Raises ConfigError."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:  # Optional[X]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if value is None else _coerce(value, args[0], key)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return _build(tp, value, key)
    if origin in (list, List):
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, str) and item_tp in (int, float) and "-" in value.strip("-"):
            value = value.split("-")  # the reference's "512-256-1" style
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a {_type_name(tp)}, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (dict, Dict):
        _, val_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {str(k): _coerce(v, val_tp, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, str):
            try:
                value = int(value)
            except ValueError:
                pass
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            # every float setting is a rate, size, weight or threshold: inf and nan would
            # train (or plan) until something downstream breaks
            if not math.isfinite(value):
                raise ConfigError(f"{key}: expected a finite number, got {value!r}")
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise TypeError(f"unsupported config field type {tp} at {key}")  # a bug, not a user error


def _field_types(cls: Any) -> Dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _build(cls: Any, values: Dict[str, Any], prefix: str) -> Any:
    types = _field_types(cls)
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in types:
            raise ConfigError(
                f"{key}: unknown key (known keys{' of ' + prefix if prefix else ''}: "
                f"{', '.join(types)})"
            )
        kwargs[name] = _coerce(value, types[name], key)
    return cls(**kwargs)


def _set_dotted(tree: Dict[str, Any], key: str, value: Any) -> None:
    """Set `a.b.c` in a nested dict, validating each step against the Config schema."""
    parts = key.split(".")
    cls: Any = Config
    node = tree
    for depth, part in enumerate(parts):
        path = ".".join(parts[: depth + 1])
        if cls is None:
            raise ConfigError(f"{key}: {'.'.join(parts[:depth])} is not a section")
        if dataclasses.is_dataclass(cls):
            types = _field_types(cls)
            if part not in types:
                raise ConfigError(f"{path}: unknown key (known: {', '.join(types)})")
            tp = types[part]
        else:  # Dict[str, X]
            tp = typing.get_args(cls)[1]
        if depth == len(parts) - 1:
            node[part] = value
            return
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{path}: is a value, not a section")
        cls = tp if dataclasses.is_dataclass(tp) or typing.get_origin(tp) in (dict, Dict) else None


def parse_override(text: str) -> tuple:
    """`a.b=value` -> ("a.b", parsed YAML value)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value")
    key, raw = text.split("=", 1)
    key = key.strip().lstrip("-")
    if not key:
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def load_config(path: Optional[str] = None, overrides: Sequence[str] = ()) -> Config:
    """Defaults < YAML file < overrides; then validation. Raises ConfigError."""
    tree: Dict[str, Any] = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {path}: not found")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark else path
            raise ConfigError(f"{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of sections, got {type(loaded).__name__}")
        tree = loaded
    file_tree = copy.deepcopy(tree)
    for text in overrides:
        try:
            key, value = parse_override(text)
            _set_dotted(tree, key, value)
        except ConfigError as e:
            raise ConfigError(f"command line: {e}") from None
    try:
        cfg = _build(Config, tree, "")
    except ConfigError as e:
        raise ConfigError(f"{_origin(path, file_tree, overrides, str(e))}: {e}") from None
    validate(cfg)
    return cfg


def _origin(path: Optional[str], file_tree: Dict[str, Any], overrides: Sequence[str],
            message: str) -> str:
    """Where the setting that failed to build (`message`) came from: the file when the file
    alone fails the same way, else the command line's key=value overrides."""
    if not path:
        return "command line"
    if not overrides:
        return path
    try:
        _build(Config, file_tree, "")
    except ConfigError as e:
        if str(e) == message:
            return path
    return "command line"


def to_dict(cfg: Config) -> Dict[str, Any]:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def describe(cls: Any = Config, prefix: str = "") -> List[str]:
    """`key (type, default): docstring` lines for --help, read from the field docstrings."""
    import ast
    import inspect

    docs: Dict[str, str] = {}
    try:
        tree = ast.parse(inspect.getsource(cls))
        body = tree.body[0].body  # type: ignore[attr-defined]
        for a, b in zip(body, body[1:]):
            if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(
                getattr(b, "value", None), ast.Constant
            ):
                docs[a.target.id] = " ".join(str(b.value.value).split())  # type: ignore
    except (OSError, TypeError):
        pass
    lines = []
    default = cls()
    for name, tp in _field_types(cls).items():
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(tp):
            lines.extend(describe(tp, key + "."))
        else:
            lines.append(f"  {key} ({_type_name(tp)}, default {getattr(default, name)!r}): "
                         f"{docs.get(name, '')}")
    return lines
