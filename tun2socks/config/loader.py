"""The loader: YAML file, ``--set`` overrides and flags into ``Settings``; errors name key and line.

Theory of operation
-------------------
``load_settings`` builds one plain dict from three layers, each winning over the one before:
the YAML file, then ``--set KEY=VALUE`` overrides, then explicit command-line flags. While it
builds the dict it records where each dotted key came from (``FILE:LINE``, ``--set KEY`` or
``command line``). pydantic then validates the dict against frozen models; every pydantic error
is rewritten as one friendly line located through that record, and the first one (by line) is
raised as a ``ConfigError``.

The proxy URL is kept as written (it may hold ``${VAR}``). Validation expands the variables
from the environment and parses the result into scheme, host, port and credentials, exposed as
properties of ``ProxyConfig``. The password is a ``SecretStr``; no error message, repr or str of
the settings shows it: error messages about the URL never quote any part of it.
"""

import difflib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from tun2socks.config.echo import echo, kind_of
from tun2socks.config.schema import Settings
from tun2socks.errors import UserError

try:
    from yaml import CSafeLoader as _YamlLoader
except ImportError:  # PyYAML built without libyaml
    from yaml import SafeLoader as _YamlLoader  # type: ignore[assignment]


class ConfigError(UserError):
    """A configuration problem in one line: ``FILE:LINE: key.path: what is wrong``."""

    exit_status = 2  # the same code argparse uses for usage errors

    def __init__(self, message: str, *, key: str | None = None, line: int | None = None) -> None:
        # One line whatever the user typed: a --set value may hold a newline.
        super().__init__(message.replace("\r", "\\r").replace("\n", "\\n"))
        self.key = key
        self.line = line


# --- loading -----------------------------------------------------------------------------------

KeyPath = tuple[str, ...]


@dataclass(frozen=True)
class _Origin:
    """Where a key's value came from, and how errors there sort (file lines first)."""

    label: str  # "FILE:LINE", "--set KEY" or "command line"
    rank: int
    order: int
    line: int | None = None


@dataclass
class _Layers:
    data: dict[str, Any] = field(default_factory=dict)
    origins: dict[KeyPath, _Origin] = field(default_factory=dict)

    def put(self, path: KeyPath, value: object, origin: _Origin) -> None:
        node = self.data
        for part in path[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        node[path[-1]] = value
        # Locations of what the new value replaced would point at the wrong place.
        self.origins = {p: o for p, o in self.origins.items() if p[: len(path)] != path}
        self.origins[path] = origin

    def locate(self, path: KeyPath) -> _Origin | None:
        for end in range(len(path), -1, -1):
            origin = self.origins.get(path[:end])
            if origin is not None:
                return origin
        return None


def load_settings(
    path: str | None,
    overrides: Sequence[str] = (),
    cli: Mapping[str, object] | None = None,
) -> Settings:
    """Load settings: defaults < the YAML file at ``path`` < ``overrides`` < ``cli``.

    ``overrides`` are ``KEY=VALUE`` strings with a dotted key; the value is parsed as YAML
    (``tun.addresses=[10.0.0.1/24]``), except that a text setting keeps the text as typed when
    YAML would make it something else. ``cli`` maps dotted keys to values of explicit flags;
    ``None`` values are skipped. Raises ConfigError, whose str() is one line.
    """
    layers = _read_file(path) if path is not None else _Layers()
    for index, item in enumerate(overrides):
        _apply_override(layers, item, index)
    for index, (key, value) in enumerate((cli or {}).items()):
        if value is not None:
            layers.put(_known_key(key, "command line"), value, _Origin("command line", 2, index))
    try:
        return Settings.model_validate(layers.data)
    except ValidationError as exc:
        raise _config_error(exc, layers) from None


def _read_file(path: str) -> _Layers:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a file") from None
    except PermissionError:
        raise ConfigError(f"{path}: cannot read it: permission denied") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (bad byte at offset {exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it: {exc.strerror or exc}") from None

    loader = _YamlLoader(text)
    try:
        node = loader.get_single_node()
        layers = _Layers()
        if node is not None:
            # Walk before constructing: construction flattens merge keys ('<<') in place.
            _record_lines(node, (), path, layers.origins)
            layers.data = loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        raise _yaml_error(path, text, exc) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {str(exc).splitlines()[0]}") from None
    finally:
        loader.dispose()

    if layers.data is None:  # an empty file
        layers.data = {}
    if not isinstance(layers.data, dict):
        line = node.start_mark.line + 1 if node is not None else 1
        raise ConfigError(
            f"{path}:{line}: the top level must be a mapping of sections "
            f"({', '.join(Settings.model_fields)}), not {kind_of(layers.data)}",
            line=line,
        )
    return layers


def _yaml_error(path: str, text: str, exc: yaml.MarkedYAMLError) -> ConfigError:
    """One line located where the problem starts.

    PyYAML marks the point where it gave up (``problem_mark``) and, for some errors, where the
    construct it was reading began (``context_mark``). A token the scanner could not finish (an
    unclosed quote, a key without ':') and a construct cut off by the end of the file (an
    unclosed ``[``) start at the context mark: the problem mark is then a later line, or the end
    of the file, which is no help. Otherwise (a misplaced key in a block mapping, whose context
    is the mapping's first line) the problem mark is the precise one.
    """
    problem = exc.problem or exc.context or "syntax error"
    mark = exc.problem_mark or exc.context_mark
    if exc.context_mark is not None and exc.problem_mark is not None:
        scanning = isinstance(exc, yaml.scanner.ScannerError)
        if scanning or _at_end(text, exc.problem_mark):
            if not _at_end(text, exc.problem_mark):
                problem += f" at line {exc.problem_mark.line + 1}"
            problem += f", {exc.context} that starts here"
            mark = exc.context_mark
    if mark is None:
        return ConfigError(f"{path}: invalid YAML: {problem}")
    line = mark.line + 1
    return ConfigError(f"{path}:{line}:{mark.column + 1}: invalid YAML: {problem}", line=line)


def _at_end(text: str, mark: yaml.Mark) -> bool:
    """Whether `mark` is at the end of `text` (nothing but whitespace after it)."""
    rest = text.split("\n")[mark.line :]
    if not rest:
        return True
    rest[0] = rest[0][mark.column :]
    return not "".join(rest).strip()


def _record_lines(
    node: yaml.Node,
    path: KeyPath,
    file: str,
    origins: dict[KeyPath, _Origin],
    seen: set[int] | None = None,
) -> None:
    """Map each key path under ``node`` to the line of its key; reject duplicate keys."""
    seen = set() if seen is None else seen
    if id(node) in seen:  # an alias met again (possibly a cycle)
        return
    seen.add(id(node))
    if not path:
        line = node.start_mark.line + 1
        origins[()] = _Origin(f"{file}:{line}", 0, line, line)
    if isinstance(node, yaml.MappingNode):
        first_line: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = str(key_node.value) if isinstance(key_node, yaml.ScalarNode) else "?"
            line = key_node.start_mark.line + 1
            if key == "<<":
                continue
            if key in first_line:
                dotted = ".".join((*path, key))
                raise ConfigError(
                    f"{file}:{line}: {dotted}: duplicate key (first at line {first_line[key]})",
                    key=dotted,
                    line=line,
                )
            first_line[key] = line
            origins[(*path, key)] = _Origin(f"{file}:{line}", 0, line, line)
            _record_lines(value_node, (*path, key), file, origins, seen)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            line = item.start_mark.line + 1
            origins[(*path, str(index))] = _Origin(f"{file}:{line}", 0, line, line)
            _record_lines(item, (*path, str(index)), file, origins, seen)


def _apply_override(layers: _Layers, item: str, index: int) -> None:
    key, eq, text = item.partition("=")
    key = key.strip()
    if not eq or not key:
        raise ConfigError(f"--set {_shown(item)}: expected KEY=VALUE, like tun.mtu=9000")
    path = _known_key(key, f"--set {_shown(item)}")
    is_text = _field_annotation(path) is str
    try:
        value = yaml.load(text, Loader=_YamlLoader)
    except yaml.YAMLError as exc:
        if not is_text:
            problem = getattr(exc, "problem", None) or "syntax error"
            raise ConfigError(
                f"--set {key}: the value is not valid YAML: {problem}", key=key
            ) from None
        value = text
    if is_text and not isinstance(value, str):
        value = text
    layers.put(path, value, _Origin(f"--set {key}", 1, index))


def _shown(item: str) -> str:
    """A --set argument fit for an error message: values that may hold credentials are hidden."""
    key, eq, _ = item.partition("=")
    if "@" in item or key.strip().startswith("proxy"):
        return f"{key}{eq}***" if eq else "***"
    return item


def _known_key(key: str, where: str) -> KeyPath:
    path = tuple(key.split("."))
    model: type[BaseModel] = Settings
    for depth, part in enumerate(path):
        fields = model.model_fields
        if part not in fields:
            prefix = ".".join(path[:depth])
            hint = _suggest(part, fields, prefix)
            raise ConfigError(f"{where}: unknown key {key}{hint}", key=key)
        annotation = fields[part].annotation
        if depth < len(path) - 1:
            if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
                raise ConfigError(
                    f"{where}: unknown key {key} ({'.'.join(path[: depth + 1])} has no sub-keys)",
                    key=key,
                )
            model = annotation
    return path


def _suggest(word: str, choices: Iterable[str], prefix: str) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    if not close:
        return ""
    return f" (did you mean {prefix + '.' if prefix else ''}{close[0]}?)"


def _model_at(path: KeyPath) -> type[BaseModel] | None:
    """The model holding the key at ``path``, if there is one."""
    model: type[BaseModel] = Settings
    for part in path[:-1]:
        info = model.model_fields.get(part)
        annotation = info.annotation if info is not None else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


def _field_annotation(path: KeyPath) -> object:
    model = _model_at(path)
    info = model.model_fields.get(path[-1]) if model is not None and path else None
    return info.annotation if info is not None else None


# --- errors ------------------------------------------------------------------------------------


def _config_error(exc: ValidationError, layers: _Layers) -> ConfigError:
    found: list[tuple[tuple[int, int], str, str, int | None]] = []
    for error in exc.errors(include_url=False):
        path = tuple(str(part) for part in error["loc"])
        origin = layers.locate(path)
        key, message = _describe(error, path)
        if origin is None:
            text, sort_key = f"{key}: {message}", (3, 0)
        elif origin.label == f"--set {key}":  # do not name the key twice
            text, sort_key = f"{origin.label}: {message}", (origin.rank, origin.order)
        else:
            text, sort_key = f"{origin.label}: {key}: {message}", (origin.rank, origin.order)
        found.append((sort_key, text, key, origin.line if origin else None))
    found.sort(key=lambda item: item[0])
    _, text, key, line = found[0]
    if len(found) > 1:
        text += f" (and {len(found) - 1} more)"
    return ConfigError(text, key=key, line=line)


def _describe(error: Mapping[str, Any], path: KeyPath) -> tuple[str, str]:
    """The dotted key and a friendly message for one pydantic error."""
    kind = error["type"]
    key = ".".join(path)
    secret = path[:1] in (("proxy",), ("proxies",)) or path == ("api", "token")
    got = "" if secret else echo(error.get("input"))
    ctx = error.get("ctx") or {}
    if kind == "missing":
        if path in (("proxy",), ("proxy", "url")):
            need = "a proxy URL is required, like socks5://127.0.0.1:1080 (direct:// for none)"
            return "proxy.url", f"missing: {need}"
        return key, "missing: this key is required"
    if kind == "extra_forbidden":
        model = _model_at(path)
        hint = _suggest(path[-1], model.model_fields, ".".join(path[:-1])) if model else ""
        return key, f"unknown key{hint}"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        return key, f"{_range(path)}{got}"
    if kind == "value_error":
        return key, str(ctx.get("error", error["msg"]))
    if kind == "literal_error":
        return key, f"must be {ctx.get('expected', 'one of the allowed values')}{got}"
    simple = {
        "int_type": "must be a whole number",
        "int_from_float": "must be a whole number",
        "float_type": "must be a number",
        "finite_number": "must be a finite number",
        "bool_type": "must be true or false",
        "string_type": "must be text",
        "list_type": "must be a list",
        "model_type": "must be a mapping of keys",
        "dict_type": "must be a mapping of keys",
    }
    return key, f"{simple.get(kind, error['msg'])}{got}"


def _range(path: KeyPath) -> str:
    """The full allowed range of a numeric key, from its Field constraints."""
    model = _model_at(path)
    info = model.model_fields.get(path[-1]) if model is not None else None
    bounds: dict[str, object] = {}
    for item in info.metadata if info is not None else ():
        for name in ("ge", "gt", "le", "lt"):
            if getattr(item, name, None) is not None:
                bounds[name] = getattr(item, name)
    if "ge" in bounds and "le" in bounds:
        return f"must be between {bounds['ge']} and {bounds['le']}"
    words = {"ge": "at least", "gt": "greater than", "le": "at most", "lt": "less than"}
    parts = [f"{words[name]} {bound}" for name, bound in bounds.items()]
    return "must be " + " and ".join(parts) if parts else "is out of range"
