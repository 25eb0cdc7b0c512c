"""Config validation helpers shared by both applications' loaders.

Both config loaders (MoEFsDiC's YAML, SeisMoE's pick-benchmark JSON) report the same kinds of
mistakes — an unknown key, a value of the wrong type, a choice that does not exist — and should
word them alike: the key, what was given, what is allowed and the closest valid spelling. The
matching and the type checks live here once; the loaders only say where in their files a value is.
`check_output` refuses an output path that cannot be written (both applications' commands).
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from moelab.errors import ConfigError

_TYPE_NAMES: dict[type, str] = {
    int: "an integer",
    float: "a number",
    str: "a string",
    bool: "true/false",
    dict: "a mapping",
    list: "a list",
    type(None): "null",
}


def closest(word: str, options: Iterable[str], cutoff: float = 0.5) -> str | None:
    """The valid spelling nearest to ``word`` (case-insensitive as a fallback), or ``None``."""
    options = [str(o) for o in options]
    match = difflib.get_close_matches(str(word), options, n=1, cutoff=cutoff)
    if match:
        return match[0]
    upper = {o.upper(): o for o in options}
    match = difflib.get_close_matches(str(word).upper(), list(upper), n=1, cutoff=cutoff)
    return upper[match[0]] if match else None


def did_you_mean(word: str, options: Iterable[str], cutoff: float = 0.5) -> str:
    """``" (did you mean 'x'?)"`` for the closest option, or ``""`` when nothing is close."""
    match = closest(word, options, cutoff)
    return f" (did you mean '{match}'?)" if match else ""


def type_name(types: tuple[type, ...]) -> str:
    """``(int, float)`` -> ``"a number"``; ``(str, type(None))`` -> ``"a string or null"``."""
    if float in types:
        types = tuple(t for t in types if t is not int)
    return " or ".join(dict.fromkeys(_TYPE_NAMES.get(t, t.__name__) for t in types))


def is_instance(value: Any, types: tuple[type, ...]) -> bool:
    """``isinstance`` where a boolean is not a number (YAML/JSON ``true`` is no integer)."""
    if isinstance(value, bool) and bool not in types:
        return False
    return isinstance(value, types)


def check_type(where: str, value: Any, types: tuple[type, ...], desc: str = "") -> None:
    """Raise a `ConfigError` naming ``where``, the expected type(s) and the value given."""
    if not is_instance(value, types):
        about = f" ({desc})" if desc else ""
        raise ConfigError(f"{where} must be {type_name(types)}{about}, got {json.dumps(value, default=repr)}")


def distinct_names(value: Any) -> bool:
    """Whether ``value`` is a non-empty list (or tuple) of distinct, non-blank strings."""
    if not isinstance(value, (list, tuple)) or not value:
        return False
    return all(isinstance(n, str) and n.strip() for n in value) and len(set(value)) == len(value)


def check_choice(where: str, value: Any, options: Iterable[str]) -> None:
    """Raise a `ConfigError` unless ``value`` is one of ``options`` (closest option suggested)."""
    options = [str(o) for o in options]
    if value not in options:
        raise ConfigError(f"{where}={value!r} is not allowed{did_you_mean(str(value), options)}; use one of: {', '.join(options)}")


def unknown_key(what: str, key: str, options: Iterable[str]) -> ConfigError:
    """The error for a key no schema knows: ``unknown <what>; did you mean '<closest>'?``.

    ``what`` names the key as the user wrote it (e.g. ``"key 'moe.num_expert'"``), ``key`` is the
    part matched against ``options``; when nothing is close every valid key is listed.
    """
    options = [str(o) for o in options]
    match = closest(key, options)
    hint = f"; did you mean '{match}'?" if match else f"; valid keys: {', '.join(options)}"
    return ConfigError(f"unknown {what}{hint}")


def check_output(where: str, path: Any, folder: bool = False) -> Path:
    """Refuse an output path that cannot be written, before any work is done: a folder where a file
    goes (or a file where a folder goes), or a path under an existing file. ``where`` names the
    option (e.g. ``"--out"``)."""
    p = Path(path)
    if folder and p.exists() and not p.is_dir():
        raise ConfigError(f"{where} '{p}' is a file: give a folder to write into")
    if not folder and p.is_dir():
        raise ConfigError(f"{where} '{p}' is a folder: give the path of a file (e.g. one inside that folder)")
    for parent in p.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"{where} '{p}' lies under '{parent}', which is a file, not a folder: choose another path")
            break
    return p


def at_least_one(*flags: tuple[str, int | float]) -> None:
    """Refuse a count flag below 1 (``("--threads", 0)``): one `ConfigError` naming the flag."""
    for flag, value in flags:
        if value < 1:
            raise ConfigError(f"{flag} {value} must be at least 1")


def read_json_record(path: Any, required: Iterable[str], fix: str) -> dict[str, Any]:
    """A JSON object from ``path`` holding every key in ``required`` (a results file a script
    wrote); unreadable, not an object or missing keys: one `ConfigError` ending in ``fix``."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read '{path}' ({e}); {fix}") from None
    missing = [k for k in required if not isinstance(doc, dict) or k not in doc]
    if missing:
        raise ConfigError(f"'{path}' lacks {', '.join(missing)}; {fix}")
    return doc
