"""Loading and validating StrataCache configuration.

Precedence, lowest first: the packaged defaults (``default.yaml``, the repo's
config.yaml) < a YAML file (the ``path`` argument, else ``$STRATACACHE_CONFIG``)
< ``overrides`` (a nested dict, or dotted keys such as ``"tiers.cpu.capacity"``).
The models in ``schema`` validate: first each layer's structure on its own (so an
unknown key is reported with the layer it came from), then the merged config.
Errors are ``ConfigError`` naming the key path and the bad value, never an
internal traceback.

``python -m stratacache.config --tables`` regenerates the key tables of
README.md and docs/config.md from the models.
"""

from __future__ import annotations

import copy
import difflib
import os
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping, Optional, Union, get_args, get_origin

import yaml
from pydantic import ValidationError

from stratacache.config.schema import (KeyProblem, Section, StrataConfig, TypeName, _show, parse_size,
                                       section_type)
from stratacache.core.errors import ConfigError

__all__ = ["ConfigError", "StrataConfig", "Section", "load_config", "describe_config", "config_table_markdown",
           "parse_size", "read_yaml_file", "expand_dotted", "deep_merge", "validation_problems",
           "with_current_table", "TABLE_BEGIN", "TABLE_END",
           "ENV_VAR", "DEFAULT_PATH"]

ENV_VAR = "STRATACACHE_CONFIG"
DEFAULT_PATH = Path(__file__).with_name("default.yaml")


def load_config(path: Optional[str | os.PathLike] = None,
                overrides: Optional[Mapping[str, Any]] = None) -> StrataConfig:
    """Packaged defaults, then the YAML file, then overrides; validated."""
    defaults = _read_yaml(DEFAULT_PATH)
    layers = [(str(DEFAULT_PATH), defaults)]
    if path is None:
        path = os.environ.get(ENV_VAR) or None
    if path is not None:
        layers.append((str(path), _read_yaml(Path(os.path.expanduser(str(path))))))
    if overrides:
        if not isinstance(overrides, Mapping):
            raise ConfigError(f"overrides: expected a mapping, got {type(overrides).__name__}")
        layers.append(("overrides", expand_dotted(overrides)))
    merged: dict = {}
    for origin, layer in layers:
        # A layer's unknown keys and misplaced sections, on top of the defaults (its values
        # are checked once, merged: a rule between keys may span layers).
        problems = [e for e in _errors(deep_merge(copy.deepcopy(defaults), layer))
                    if e["type"] in _STRUCTURE_ERRORS]
        if problems:
            raise ConfigError(validation_problems(problems, origin))
        merged = deep_merge(merged, layer)
    try:
        cfg = StrataConfig.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(validation_problems(exc.errors(include_url=False), "the merged config")) from None
    cfg._source = tuple(origin for origin, _layer in layers)
    return cfg


def describe_config() -> list[tuple[str, str, Any, str]]:
    """Rows (key path, type, default, doc) for every key, in schema order."""
    defaults = _read_yaml(DEFAULT_PATH)
    rows = []

    def walk(model: type[Section], default: dict, prefix: str):
        for name, field in model.model_fields.items():
            sub = section_type(field)
            if sub is None:
                rows.append((prefix + name, type_name(field), default.get(name), field.description))
            else:
                walk(sub, default.get(name) or {}, f"{prefix}{name}.")

    walk(StrataConfig, defaults, "")
    return rows


def config_table_markdown() -> str:
    """The README / docs/config.md table of every key (generated, so it cannot drift)."""
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for path, type_name_, default, doc in describe_config():
        shown = "null" if default is None else str(default).lower() if isinstance(default, bool) else str(default)
        lines.append(f"| `{path}` | {type_name_.replace('|', '&#124;')} | `{shown}` | {doc} |")
    return "\n".join(lines) + "\n"


TABLE_BEGIN = ("<!-- key table: generated from stratacache/config/schema.py by "
               "`python -m stratacache.config --tables` -->")
TABLE_END = "<!-- end of key table -->"


def with_current_table(text: str, name: str) -> str:
    """``text`` (a Markdown document named ``name``) with the key table between its
    TABLE_BEGIN and TABLE_END lines regenerated."""
    begin, end = text.find(TABLE_BEGIN), text.find(TABLE_END)
    if begin < 0 or end < begin:
        raise ConfigError(f"{name}: no key table to regenerate (it needs the lines {TABLE_BEGIN!r} "
                          f"and {TABLE_END!r})")
    return f"{text[:begin]}{TABLE_BEGIN}\n{config_table_markdown()}{text[end:]}"


def type_name(field) -> str:
    """A leaf key's type as the tables name it: ``size (e.g. 4GiB)``, ``'lru' | 's3fifo'``,
    ``int or null``."""
    annotation, metadata = field.annotation, list(field.metadata)
    nullable = get_origin(annotation) is Union and type(None) in get_args(annotation)
    if nullable:
        (annotation,) = [a for a in get_args(annotation) if a is not type(None)]
        if get_origin(annotation) is Annotated:
            metadata += annotation.__metadata__
            annotation = annotation.__origin__
    named = next((m.text for m in metadata if isinstance(m, TypeName)), None)
    if named is None and get_origin(annotation) is Literal:
        named = " | ".join(_show(c) for c in get_args(annotation))
    return (named or annotation.__name__) + (" or null" if nullable else "")


def validation_problems(errors: list[dict], origin: str, *, model: type = StrataConfig,
                        key_path: Optional[str] = None) -> str:
    """pydantic's errors of ``model`` as one line: ``key.path: what is wrong`` for each,
    ``; ``-separated. ``origin`` names the layer an unknown or missing key is reported in;
    ``key_path`` replaces the path of an error of a one-key validation."""
    return "; ".join(_problem(error, origin, model, key_path) for error in errors)


_STRUCTURE_ERRORS = ("extra_forbidden", "missing", "model_type", "model_attributes_type", "dict_type")
_EXPECTED = {"int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer",
             "float_type": "a number", "float_parsing": "a number", "finite_number": "a number",
             "bool_type": "true or false", "bool_parsing": "true or false", "string_type": "a string"}


def _problem(error: dict, origin: str, model: type, key_path: Optional[str]) -> str:
    loc = [str(part) for part in error["loc"]]
    kind, value, ctx = error["type"], error.get("input"), error.get("ctx") or {}
    cause = ctx.get("error")
    if isinstance(cause, KeyProblem):
        section = ".".join(loc)
        return f"{'.'.join(loc + [cause.key])}: {str(cause).replace('{section}', section)}"
    where = key_path or ".".join(loc) or "(top level)"
    if kind == "extra_forbidden":
        valid = list(_section_at(model, loc[:-1]).model_fields)
        prefix = "".join(f"{part}." for part in loc[:-1])
        close = difflib.get_close_matches(loc[-1], valid, n=1, cutoff=0.5)
        hint = f"did you mean {prefix}{close[0]}?" if close else f"valid keys here: {', '.join(valid)}"
        return f"{where}: unknown key (in {origin}); {hint}"
    if kind == "missing":
        return f"{where}: missing from {origin}"
    if kind in _STRUCTURE_ERRORS:
        return f"{where}: expected a mapping of keys, got {type(value).__name__} {value!r}"
    if kind.endswith("_type") and value is None:
        text = "got null, which is not allowed here"
    elif kind in _EXPECTED:
        text = f"expected {_EXPECTED[kind]}, got {type(value).__name__} {_show(value)}"
    elif kind == "greater_than_equal":
        text = f"{_show(value)} is below the minimum {_show(ctx['ge'])}"
    elif kind == "less_than_equal":
        text = f"{_show(value)} is above the maximum {_show(ctx['le'])}"
    elif kind == "value_error":
        text = str(cause)
    else:
        text = error["msg"]
    field = _section_at(model, loc[:-1]).model_fields[loc[-1]]
    hint = "" if get_origin(field.annotation) is Literal else f" (expected {type_name(field)})"
    return f"{where}: {text}{hint}"


def _section_at(model: type, loc: list[str]) -> type:
    for part in loc:
        model = section_type(model.model_fields[part])
    return model


def _errors(data: dict) -> list[dict]:
    try:
        StrataConfig.model_validate(data)
    except ValidationError as exc:
        return exc.errors(include_url=False)
    return []


# ----------------------------------------------------------------- YAML and layering

class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (YAML's "last one
    wins" would silently drop the first value)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node)
            except TypeError:   # an unhashable key: let the base class report it
                continue
            if first is not key_node:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first at line {first.start_mark.line + 1})",
                    key_node.start_mark)
        return super().construct_mapping(node, deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
                                 _UniqueKeyLoader.construct_mapping)


def read_yaml_file(path) -> Any:
    """The YAML document in ``path`` (UTF-8, no duplicate keys); ConfigError naming the file."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {str(path)!r} is a directory") from None
    except OSError as exc:
        raise ConfigError(f"config file {str(path)!r} cannot be read: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError(f"config file {str(path)!r} is not UTF-8 text (byte {exc.start}, "
                          f"line {line}: {raw[exc.start:exc.start + 1]!r})") from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"config file {str(path)!r} is not valid YAML{where}: {problem}") from None


def _read_yaml(path: Path) -> dict:
    data = read_yaml_file(path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r}: the top level must be a mapping of keys, "
                          f"got {type(data).__name__}")
    return data


def expand_dotted(overrides: Mapping[str, Any]) -> dict:
    """Dotted keys (``"tiers.cpu.capacity"``) as nested mappings, merged with nested ones."""
    out: dict = {}
    for key, value in overrides.items():
        if not isinstance(key, str):
            raise ConfigError(f"overrides: keys must be strings, got {key!r}")
        parts = key.split(".")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"overrides: {key} conflicts with another override")
        leaf = parts[-1]
        if isinstance(value, Mapping) and isinstance(node.get(leaf), dict):
            deep_merge(node[leaf], expand_dotted(value))
        else:
            node[leaf] = expand_dotted(value) if isinstance(value, Mapping) else value
    return out


def deep_merge(base: dict, update: Mapping) -> dict:
    """``update`` merged into ``base`` (in place, returned): mappings key by key, anything
    else replaced by a copy of the new value."""
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            deep_merge(base[key], value)
        else:
            base[key] = copy.deepcopy(dict(value) if isinstance(value, Mapping) else value)
    return base
