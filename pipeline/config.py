"""Typed job configs: dataclasses whose field docstrings are the `--help` text.

A job declares its config as a dataclass with a docstring string literal under each
field (the litgpt/torchtune convention) and checks in `__post_init__`. `parse()` then
builds it from, in order of precedence:

    defaults  <  --config FILE.yaml  <  --key value / --key=value flags

Nested dataclass fields (a section of a pipeline config) are set with dotted flags,
`--preprocess.num_buckets 8`, and with a mapping of the same name in YAML. A boolean
flag given alone (`--overwrite`) means true. Unknown keys are errors that name the
closest known key.
"""

from __future__ import annotations

from collections.abc import Callable

import ast
import dataclasses
import difflib
import inspect
import sys
import textwrap
import types
import typing
from typing import Any, TypeVar

import yaml

from pipeline.storage import ConfigError

T = TypeVar("T")


BOOL_WORDS = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass (collected from its whole MRO)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _resolved_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(the type without Optional, whether None is allowed)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def coerce(name: str, value: Any, tp: Any) -> Any:
    """Convert a YAML or command-line value to the field's type, or raise a ConfigError."""
    base, optional = _base_type(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null", "")):
        if optional:
            return None
        raise ConfigError(f"--{name}: a value is required (type {getattr(base, '__name__', base)})")
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in BOOL_WORDS:
                return BOOL_WORDS[text]
            raise ValueError(value)
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            return int(value)
        if base is float:
            return float(value)
        if base is str:
            return str(value)
        if typing.get_origin(base) is list:
            (item,) = typing.get_args(base)
            items = value if isinstance(value, list) else [v for v in str(value).split(",") if v]
            return [coerce(name, v, item) for v in items]
    except (TypeError, ValueError):
        kind = getattr(base, "__name__", str(base))
        hint = " (true or false)" if base is bool else ""
        raise ConfigError(f"--{name}: expected {kind}{hint}, got {value!r}") from None
    return value


def _unknown(name: str, known: list[str]) -> ConfigError:
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"; did you mean --{close[0]}?" if close else "; see --help for the fields"
    return ConfigError(f"unknown config key --{name}{hint}")


def _flatten(cls: type, prefix: str = "") -> dict[str, tuple[Any, dataclasses.Field]]:
    """Every leaf field of a (possibly nested) config dataclass, by dotted name."""
    out = {}
    hints = _resolved_types(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.update(_flatten(tp, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = (tp, f)
    return out


def _set(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        tree = tree.setdefault(p, {})
    tree[leaf] = value


def _yaml_to_flat(data: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_yaml_to_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def build(cls: type[T], values: dict[str, Any]) -> T:
    """Construct `cls` from dotted `values`, coercing types; runs every `__post_init__`."""
    leaves = _flatten(cls)
    tree: dict = {}
    for name, value in values.items():
        if name not in leaves:
            raise _unknown(name, sorted(leaves))
        _set(tree, name, coerce(name, value, leaves[name][0]))
    return _construct(cls, tree)


def _construct(cls: type[T], tree: dict) -> T:
    hints = _resolved_types(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            kwargs[f.name] = _construct(hints[f.name], tree.get(f.name, {}))
        elif f.name in tree:
            kwargs[f.name] = tree[f.name]
    missing = [f.name for f in dataclasses.fields(cls)
               if f.name not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError("missing required " + ", ".join(f"--{m}" for m in missing)
                          + "; pass it on the command line or in --config")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(str(exc)) from None


def help_text(cls: type, prog: str, description: str) -> str:
    """`--help`: every field with its type, default and docstring."""
    lines = [f"usage: {prog} [--config FILE.yaml] [--key value | --key=value ...]", "", description.strip(), "",
             "options:", "  --config FILE.yaml    a YAML preset; flags override it", "  --help                this text",
             "  --verbose             every line of Ray and the libraries on the console too (the full log",
             "                        is always kept in a file; its path is the run's last line)"]
    docs_by_cls: dict[type, dict[str, str]] = {}

    def walk(klass: type, prefix: str) -> None:
        docs = docs_by_cls.setdefault(klass, field_docs(klass))
        hints = _resolved_types(klass)
        for f in dataclasses.fields(klass):
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp):
                lines.append("")
                lines.append(f"  [{prefix}{f.name}] {docs.get(f.name, '')}")
                walk(tp, f"{prefix}{f.name}.")
                continue
            default = _default(f)
            lines.append(f"  --{prefix}{f.name} {_kind(tp).upper()}  "
                         f"({'required' if default is None else f'default: {default}'})")
            for chunk in textwrap.wrap(docs.get(f.name, ""), 80):
                lines.append(f"        {chunk}")

    walk(cls, "")
    return "\n".join(lines) + "\n"


def reference_markdown(cls: type, heading: str = "###") -> str:
    """A markdown reference of a config: a table of its own fields, then one per nested section type
    (sections of the same type, like the training stages, share a table)."""
    docs = field_docs(cls)
    hints = _resolved_types(cls)
    own, sections = [], {}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            sections.setdefault(hints[f.name], []).append(f.name)
        else:
            own.append(f)
    out = [_fields_table(cls, own, docs, "")]
    for klass, names in sections.items():
        what = " ".join((klass.__doc__ or "").split()) if len(names) > 1 else docs.get(names[0], "")
        yaml_keys, flags = ", ".join(f"`{n}:`" for n in names), " / ".join(f"`--{n}.KEY`" for n in names)
        out.append(f"{heading} {yaml_keys}\n\n{what} In YAML under {yaml_keys}; on the command line {flags}.\n")
        out.append(_fields_table(klass, dataclasses.fields(klass), field_docs(klass), ""))
    return "\n".join(out)


def _fields_table(cls: type, fields, docs: dict[str, str], prefix: str) -> str:
    hints = _resolved_types(cls)
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for f in fields:
        default = _default(f)
        doc = docs.get(f.name, "").replace("|", "\\|")
        rows.append(f"| `{prefix}{f.name}` | {_kind(hints[f.name])} | "
                    f"{'required' if default is None else f'`{default}`'} | {doc} |")
    return "\n".join(rows) + "\n"


def _default(f: dataclasses.Field) -> str | None:
    """The repr of a field's default, None when the field is required."""
    if f.default is not dataclasses.MISSING:
        return repr(f.default)
    if f.default_factory is not dataclasses.MISSING:
        return repr(f.default_factory())
    return None


def _kind(tp: Any) -> str:
    base, _ = _base_type(tp)
    return getattr(base, "__name__", str(base))


def parse(cls: type[T], argv: list[str] | None = None, prog: str = "", description: str = "",
          section: Callable[[dict[str, Any]], str] | None = None) -> T:
    """Parse `--config FILE.yaml` and `--key value` overrides into a `cls` instance.

    A preset with sections (jobs.run's, `preprocess.min_count_target: 10`) given to a config without any
    (one job's) gives that job its section: `section(flags)` names it (default: the last part of `prog`),
    and the top-level keys that mean the same to a job (corpus, model, num_cpus). Prints `--help` and exits
    0 when asked; raises ConfigError on bad input.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--help" in argv or "-h" in argv:
        print(help_text(cls, prog or sys.argv[0], description or (cls.__doc__ or "")))
        raise SystemExit(0)
    leaves = _flatten(cls)
    flags: dict[str, Any] = {}
    config_file = None
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; options look like --key value")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            is_bool = key in leaves and _base_type(leaves[key][0])[0] is bool
            if nxt is None or nxt.startswith("--"):
                if not is_bool and key != "config":
                    raise ConfigError(f"--{key}: a value is required")
                value = "true"
            elif is_bool and nxt.lower() not in BOOL_WORDS:
                value = "true"  # `--overwrite` followed by a positional-looking value is still a flag
            else:
                value = nxt
                i += 1
        i += 1
        if key == "config":
            config_file = value
        else:
            if key not in leaves:
                raise _unknown(key, sorted(leaves))
            flags[key] = value
    values: dict[str, Any] = {}
    if config_file:
        name = section(flags) if section else (prog or "").rsplit(".", 1)[-1]
        values.update(_section_of_preset(load_yaml(config_file), leaves, name))
    values.update(flags)
    return build(cls, values)


# The top-level keys of a preset with sections that mean the same to a single job. Its other top-level keys
# (output: the run's root, words, ...) are the run's own.
_SHARED_KEYS = ("corpus", "model", "num_cpus")


def _section_of_preset(values: dict[str, Any], leaves: dict, section: str) -> dict[str, Any]:
    """For a config without sections, a preset with sections (`jobs.preprocess --config jobs/configs/demo.yaml`)
    as its `section` and the shared inputs (corpus, model). Any other file as is."""
    if not any("." in k for k in values) or any("." in k for k in leaves):
        return values  # not a preset with sections, or a config with sections (jobs.run)
    picked = {k: v for k, v in values.items() if k in _SHARED_KEYS and k in leaves}
    picked.update({k.split(".", 1)[1]: v for k, v in values.items() if k.startswith(f"{section}.")})
    return picked


def load_yaml(path: str) -> dict[str, Any]:
    """A YAML preset as dotted keys; a clear error for a missing or malformed file."""
    from pipeline import storage

    try:
        text = storage.read_text(path)
    except storage.StorageError as exc:
        raise ConfigError(f"--config {path}: cannot read it ({exc})") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"--config {path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of config keys, got {type(data).__name__}")
    return _yaml_to_flat(data)


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config, for manifests and checkpoints."""
    return dataclasses.asdict(config)
