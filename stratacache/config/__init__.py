"""Loading and validating StrataCache configuration.

Precedence, lowest first: the packaged defaults (``default.yaml``, the repo's
config.yaml) < a YAML file (the ``path`` argument, else ``$STRATACACHE_CONFIG``)
< ``overrides`` (a nested dict, or dotted keys such as ``"tiers.cpu.capacity"``).
Every layer is validated against ``schema.SCHEMA``; errors are ``ConfigError``
naming the key path and the bad value, never an internal traceback.
"""

from __future__ import annotations

import copy
import difflib
import os
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

import yaml

from stratacache.config.schema import CROSS_CHECKS, HOST_CHECKS, SCHEMA, ConfigError, Key, parse_size

__all__ = ["ConfigError", "StrataConfig", "Section", "load_config", "describe_config", "config_table_markdown",
           "parse_size", "read_yaml_file", "ENV_VAR", "DEFAULT_PATH"]

ENV_VAR = "STRATACACHE_CONFIG"
DEFAULT_PATH = Path(__file__).with_name("default.yaml")


class Section(Mapping):
    """A read-only validated config section with attribute and item access."""

    __slots__ = ("_path", "_data")

    def __init__(self, data: dict, path: str = ""):
        object.__setattr__(self, "_path", path)
        object.__setattr__(self, "_data", {
            k: Section(v, f"{path}{k}.") if isinstance(v, dict) else v for k, v in data.items()})

    def __getattr__(self, name: str) -> Any:
        try:
            return self._data[name]
        except KeyError:
            raise AttributeError(f"config has no key {self._path}{name}") from None

    def __setattr__(self, name, value):
        raise AttributeError("config sections are read-only; pass overrides to load_config")

    def __getitem__(self, name: str) -> Any:
        try:
            return self._data[name]
        except KeyError:
            raise KeyError(f"config has no key {self._path}{name}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return f"Section({self.to_dict()!r})"

    def to_dict(self) -> dict:
        """Plain nested dict (YAML-serialisable; sizes as ints, file modes as octal strings)."""
        out = {}
        for k, v in self._data.items():
            out[k] = v.to_dict() if isinstance(v, Section) else v
        return out


class StrataConfig(Section):
    """The whole validated config (``cfg.tiers.cpu.capacity`` etc.)."""

    __slots__ = ("source",)

    def __init__(self, data: dict, source: tuple[str, ...] = ()):
        super().__init__(data)
        object.__setattr__(self, "source", source)

    def to_dict(self) -> dict:
        out = super().to_dict()
        for tier in out["tiers"].values():
            if "file_mode" in tier:
                tier["file_mode"] = f"{tier['file_mode']:04o}"
        return out


def load_config(path: Optional[str | os.PathLike] = None,
                overrides: Optional[Mapping[str, Any]] = None) -> StrataConfig:
    """Packaged defaults, then the YAML file, then overrides; validated."""
    merged = _read_yaml(DEFAULT_PATH)
    _check_tree(merged, SCHEMA, "", require_all=True, origin=str(DEFAULT_PATH))
    sources = [str(DEFAULT_PATH)]
    if path is None:
        path = os.environ.get(ENV_VAR) or None
    if path is not None:
        user = _read_yaml(Path(os.path.expanduser(str(path))))
        if user is not None:
            _check_tree(user, SCHEMA, "", require_all=False, origin=str(path))
            _merge(merged, user)
        sources.append(str(path))
    if overrides:
        if not isinstance(overrides, Mapping):
            raise ConfigError(f"overrides: expected a mapping, got {type(overrides).__name__}")
        nested = _expand_dotted(overrides)
        _check_tree(nested, SCHEMA, "", require_all=False, origin="overrides")
        _merge(merged, nested)
        sources.append("overrides")
    normalised = _normalise(merged, SCHEMA, "")
    for key_path, ok, message in CROSS_CHECKS:
        if not ok(normalised):
            raise ConfigError(f"{key_path}: {message}")
    for key_path, problem in HOST_CHECKS:
        message = problem(normalised)
        if message:
            raise ConfigError(f"{key_path}: {message}")
    return StrataConfig(normalised, tuple(sources))


def describe_config() -> list[tuple[str, str, Any, str]]:
    """Rows (key path, type, default, doc) for every key, in schema order."""
    defaults = _read_yaml(DEFAULT_PATH)
    rows = []

    def walk(node: dict, default: dict, prefix: str):
        for name, sub in node.items():
            if isinstance(sub, Key):
                rows.append((prefix + name, sub.type_name, default.get(name), sub.doc))
            else:
                walk(sub, default.get(name) or {}, f"{prefix}{name}.")

    walk(SCHEMA, defaults, "")
    return rows


def config_table_markdown() -> str:
    """The README / docs/config.md table of every key (generated, so it cannot drift)."""
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for path, type_name, default, doc in describe_config():
        shown = "null" if default is None else str(default).lower() if isinstance(default, bool) else str(default)
        lines.append(f"| `{path}` | {type_name.replace('|', '&#124;')} | `{shown}` | {doc} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------- internals

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


def _expand_dotted(overrides: Mapping[str, Any]) -> dict:
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
            _merge(node[leaf], _expand_dotted(value))
        else:
            node[leaf] = _expand_dotted(value) if isinstance(value, Mapping) else value
    return out


def _check_tree(data: Any, schema: dict, prefix: str, *, require_all: bool, origin: str) -> None:
    """Structure only: unknown keys (with suggestions), sections that are not mappings."""
    where = prefix[:-1] if prefix else "(top level)"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, got {type(data).__name__} {data!r}")
    for name in data:
        if not isinstance(name, str):
            raise ConfigError(f"{where}: key {name!r} is not a string")
        if name not in schema:
            close = difflib.get_close_matches(name, list(schema), n=1, cutoff=0.5)
            hint = f"; did you mean {prefix}{close[0]}?" if close else \
                f"; valid keys here: {', '.join(schema)}"
            raise ConfigError(f"{prefix}{name}: unknown key (in {origin}){hint}")
        sub = schema[name]
        if not isinstance(sub, Key):
            _check_tree(data[name], sub, f"{prefix}{name}.", require_all=require_all, origin=origin)
    if require_all:
        for name in schema:
            if name not in data:
                raise ConfigError(f"{prefix}{name}: missing from {origin}")


def _merge(base: dict, update: dict) -> None:
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = copy.deepcopy(v)


def _normalise(data: dict, schema: dict, prefix: str) -> dict:
    out = {}
    for name, sub in schema.items():
        value = data[name]
        if isinstance(sub, Key):
            try:
                out[name] = sub.normalise(value)
            except ValueError as exc:
                hint = "" if sub.kind == "choice" else f" (expected {sub.type_name})"
                raise ConfigError(f"{prefix}{name}: {exc}{hint}") from None
        else:
            out[name] = _normalise(value, sub, f"{prefix}{name}.")
    return out
