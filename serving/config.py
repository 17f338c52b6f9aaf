"""Service configuration: one frozen dataclass per service, and its flags and environment derived from it.

A setting is written once, as a dataclass field made with `setting(default, help)`. From that field come
its command-line flag (`max_queue` -> `--max-queue`), its environment variable (`I2S_VLM_MAX_QUEUE`: a
per-service prefix, so services sharing a pod or a machine do not read each other's `PORT`), its type,
default and help. Fields of nested dataclasses (`ServerOptions`, limits) are flattened into the same
flag namespace. Fields made without `setting` are fixed in code, not configurable. A `tuple[int, ...]` or
`tuple[float, ...]` field is a comma list ("4,10,30"): sizes of buckets, so positive, sorted, no repeats; a
`check` rejects what the type alone cannot (a list that must start at 1), as a flag error before start-up.

Precedence: flag, then the service's variable, then the pre-prefix name `I2S_<NAME>` (read with a
deprecation warning, for one release), then the default.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import types
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence, TypeVar

log = logging.getLogger(__name__)

ENV_ROOT = "I2S_"
C = TypeVar("C")


def setting(default: Any, help: str, *, flag: str | None = None, choices: Sequence[Any] | None = None,
            check: Callable[[Any], None] | None = None) -> Any:
    """A configurable dataclass field. `flag` overrides the name derived from the field's
    (`--vlm` for `vlm_target`); `choices` restricts the values; `check` raises ValueError on a bad value."""
    return field(default=default, metadata={"help": help, "flag": flag, "choices": choices, "check": check})


def comma_list(raw: str, element: type) -> tuple:
    """"10, 4,30" -> (4, 10, 30) for `element` int or float: positive, sorted, no repeats; "" -> ()."""
    try:
        values = [element(part.strip()) for part in raw.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"not a comma list of {element.__name__}s: {raw!r}") from None
    if any(not math.isfinite(v) or v <= 0 for v in values):
        raise ValueError(f"not a comma list of positive numbers: {raw!r}")
    return tuple(sorted(set(values)))


def show_value(value: Any) -> str:
    """A setting's value as it would be typed: comma lists without their brackets."""
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


@dataclass(frozen=True)
class Setting:
    """One configurable field, as the command line and the environment see it."""

    path: tuple[str, ...]  # field names from the top-level dataclass down, e.g. ("server", "port")
    flag: str  # without dashes: "max-queue"
    type: type
    optional: bool  # None is a valid value
    default: Any
    help: str
    choices: tuple[Any, ...] | None
    check: Callable[[Any], None] | None = None

    def env_name(self, prefix: str) -> str:
        """`I2S_VLM_MAX_QUEUE` for prefix "VLM"."""
        return f"{ENV_ROOT}{prefix}_{self.flag.replace('-', '_').upper()}"

    def legacy_env_name(self) -> str:
        return f"{ENV_ROOT}{self.flag.replace('-', '_').upper()}"

    def convert(self, raw: str) -> Any:
        """A string from the command line or the environment to the field's type."""
        if self.optional and raw.strip().lower() in ("", "none"):
            return None
        if self.type is bool:
            word = raw.strip().lower()
            if word in ("1", "true", "yes", "on"):
                return True
            if word in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"not a boolean: {raw!r}")
        if typing.get_origin(self.type) is tuple:
            return comma_list(raw, typing.get_args(self.type)[0])
        return self.type(raw)


def _base_type(hint: Any) -> tuple[type, bool]:
    """(the type, whether None is allowed) of `int`, `str | None`, `Optional[float]`."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"unsupported setting type {hint}")
        return args[0], True
    return hint, False


def settings(cls: type, defaults: Any = None, path: tuple[str, ...] = ()) -> Iterator[Setting]:
    """Every configurable field of the dataclass `cls`, nested dataclasses flattened, in field order."""
    defaults = cls() if defaults is None else defaults
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        value = getattr(defaults, f.name)
        if dataclasses.is_dataclass(value):
            yield from settings(type(value), value, path + (f.name,))
        elif "help" in f.metadata:
            kind, optional = _base_type(hints[f.name])
            choices = f.metadata.get("choices")
            yield Setting(
                path=path + (f.name,),
                flag=f.metadata.get("flag") or f.name.replace("_", "-"),
                type=kind,
                optional=optional or value is None,
                default=value,
                help=f.metadata["help"],
                choices=tuple(choices) if choices else None,
                check=f.metadata.get("check"),
            )


def _from_environment(s: Setting, prefix: str, environ: Mapping[str, str]) -> tuple[str, str] | None:
    """(variable name, raw value) from the service's variable, or the deprecated unprefixed one."""
    name = s.env_name(prefix)
    if name in environ:
        return name, environ[name]
    legacy = s.legacy_env_name()
    if legacy in environ:
        log.warning("%s is deprecated and will be ignored in the next release: use %s", legacy, name)
        return legacy, environ[legacy]
    return None


def _build(cls: type, defaults: Any, values: Mapping[tuple[str, ...], Any], path: tuple[str, ...] = ()) -> Any:
    changes = {}
    for f in dataclasses.fields(cls):
        current = getattr(defaults, f.name)
        if dataclasses.is_dataclass(current):
            changes[f.name] = _build(type(current), current, values, path + (f.name,))
        elif path + (f.name,) in values:
            changes[f.name] = values[path + (f.name,)]
    return dataclasses.replace(defaults, **changes)


# Titles of the --help groups: nested option sets by their field name, top-level flags by a shared first word.
GROUP_TITLES = {"server": "network, TLS and tokens", "threads": "CPU threads", "limits": "pipeline limits",
                "image_limits": "image limits"}
NOT_A_GROUP = {"max", "default"}  # first words that many unrelated flags share


def program_name(fallback: str) -> str:
    """The name the user typed: `i2s-vlm` for the console script, else `fallback` (`python -m vlm_service`)."""
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return name if name and not name.endswith(".py") and name not in ("-c", "-m") else fallback


def _group_key(s: Setting, first_words: Mapping[str, int]) -> str:
    if len(s.path) > 1:
        return s.path[0]
    word = s.flag.split("-")[0]
    return word if first_words.get(word, 0) >= 2 and word not in NOT_A_GROUP and word != s.flag else ""


def _help_text(s: Setting, prefix: str) -> str:
    if s.default is None or s.default in ("", ()):
        shown = ""
    elif s.type is bool:
        shown = f"default: {'true' if s.default else 'false'}; "
    else:
        shown = f"default: {show_value(s.default)}; "
    return f"{s.help} ({shown}env {s.env_name(prefix)})".replace("%", "%%")


def _converter(s: Setting):
    """The flag's type: converts, and checks choices itself so that --help shows no None among them."""

    def convert(raw: str) -> Any:
        try:
            value = s.convert(raw)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        if s.choices and value is not None and value not in s.choices:
            raise argparse.ArgumentTypeError(f"{raw!r}: choose from {', '.join(map(str, s.choices))}")
        if s.check is not None and value is not None:
            try:
                s.check(value)
            except ValueError as exc:
                raise argparse.ArgumentTypeError(f"{raw!r}: {exc}") from None
        return value

    convert.__name__ = s.type.__name__
    return convert


def parse_config(
    cls: type[C],
    argv: Sequence[str] | None = None,
    *,
    prefix: str,
    prog: str,
    description: str,
    environ: Mapping[str, str] | None = None,
) -> C:
    """The config `cls` from flags (`argv`, default sys.argv) and the environment (`environ`, default
    os.environ). Bad values end the program with a message naming the flag or the variable. --help lists
    the flags in groups, each with its default and variable."""
    environ = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(
        prog=program_name(prog),
        usage="%(prog)s [options]",
        description=description,
        epilog=f"Every flag can also be set as {ENV_ROOT}{prefix}_<FLAG> in the environment "
        f"(e.g. {ENV_ROOT}{prefix}_PORT); a flag wins over the variable.",
    )
    table = list(settings(cls))
    first_words: dict[str, int] = {}
    for s in table:
        if len(s.path) == 1:
            word = s.flag.split("-")[0]
            first_words[word] = first_words.get(word, 0) + 1
    groups: dict[str, argparse._ArgumentGroup] = {"": parser.add_argument_group("service settings")}
    seen: dict[str, Setting] = {}
    for s in table:
        if s.flag in seen:
            raise TypeError(f"{cls.__name__}: {s.path} and {seen[s.flag].path} both want --{s.flag}")
        seen[s.flag] = s
        key = _group_key(s, first_words)
        if key not in groups:
            groups[key] = parser.add_argument_group(GROUP_TITLES.get(key, f"{key.replace('_', ' ')} settings"))
        group = groups[key]
        default = s.default
        source = _from_environment(s, prefix, environ)
        if source is not None:
            name, raw = source
            try:
                default = _converter(s)(raw)
            except argparse.ArgumentTypeError as exc:
                parser.error(f"{name}={raw!r}: {exc}")
        dest = "__".join(s.path)
        if s.type is bool:  # --engine, --engine false, --no-engine
            group.add_argument(f"--{s.flag}", dest=dest, nargs="?", const=True, type=_converter(s), default=default,
                               metavar="true|false", help=_help_text(s, prefix))
            group.add_argument(f"--no-{s.flag}", dest=dest, action="store_false", help=argparse.SUPPRESS)
        else:
            metavar = "{" + ",".join(map(str, s.choices)) + "}" if s.choices else s.flag.split("-")[-1].upper()
            group.add_argument(f"--{s.flag}", dest=dest, type=_converter(s), default=default, metavar=metavar,
                               help=_help_text(s, prefix))
    namespace = vars(parser.parse_args(argv))
    values = {s.path: namespace["__".join(s.path)] for s in table}
    return _build(cls, cls(), values)
