"""Read a small YAML file given by a user (``--config``, ``--mic-geometry``, a stem map) so that
any problem with it is one line naming the file and what is wrong: :func:`load_yaml`.

Bounded: a file over :data:`MAX_BYTES` is refused before it is parsed, and nesting too deep for the
parser is an error, not a crash. Free of torch and numpy.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

MAX_BYTES = 1 << 20  # a config, geometry or stem map is a few KiB; 1 MiB is never one


def _where(text: str | bytes, offset: int) -> str:
    """``line L, column C`` (1-based) of ``offset`` in ``text``."""
    newline = b"\n" if isinstance(text, bytes) else "\n"
    line = text.count(newline, 0, offset) + 1  # type: ignore[arg-type]
    start = text.rfind(newline, 0, offset) + 1  # type: ignore[arg-type]
    return f"line {line}, column {offset - start + 1}"


def load_yaml(path: str | os.PathLike[str], *, what: str, mapping: bool = True) -> Any:
    """The YAML document in ``path`` (UTF-8, a BOM allowed); an empty file is ``{}`` with ``mapping``.

    ``what`` names the file in messages (``"config file"``, ``"--mic-geometry"``, ``"stem map"``).
    With ``mapping``, the top level must be a mapping. Raises :class:`~astsep.errors.ConfigError`
    with one line for: a missing file or a folder, an unreadable file, a file over 1 MiB, bytes that
    are not UTF-8 (with where), a YAML syntax error (with line and column), nesting too deep, and
    (with ``mapping``) a top level that is not a mapping.
    """
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{what} not found: {p}")
    if not p.is_file():
        raise ConfigError(f"{what} {p} is not a file")
    try:
        with open(p, "rb") as fh:
            raw = fh.read(MAX_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{what} {p} cannot be read: {exc.strerror or exc}") from None
    if len(raw) > MAX_BYTES:
        raise ConfigError(f"{what} {p} is larger than {MAX_BYTES // 1024} KiB: not a YAML file astsep reads")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{what} {p} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at {_where(raw, exc.start)}); "
                          "save it as UTF-8") from None
    if "\x00" in text:
        raise ConfigError(f"{what} {p} holds a NUL byte at {_where(text, text.index(chr(0)))}: not a text file")
    try:
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = " ".join(str(exc.problem or exc.context or "syntax error").split())
        raise ConfigError(f"{what} {p} is not valid YAML: {problem}{at}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {p} is not valid YAML: {' '.join(str(exc).split())}") from None
    except RecursionError:
        raise ConfigError(f"{what} {p} is nested too deeply to be a YAML file astsep reads") from None
    if mapping:
        if data is None:
            return {}
        if not isinstance(data, dict):
            kind = "a list" if isinstance(data, list) else f"a {type(data).__name__}"
            raise ConfigError(f"{what} {p} must hold a mapping (key: value lines) at the top level, not {kind}")
    return data
