"""Input paths: which files a command-line run will decode, and the output folder each one gets.

* :func:`find_inputs` – files and folders → the list of files;
* :func:`output_names` – one subfolder name per input that always stays inside ``-o``: names made of
  dots (``..wav`` → ``.``), separators, control characters or bytes that are not UTF-8 are made safe;
* :func:`check_inputs_outside_outputs` – refuses an input that lies inside a folder the run replaces.

File names are ``str`` as Python decodes them (bytes that are not UTF-8 become lone surrogates,
``os.fsencode`` gives the bytes back). Free of torch and numpy, so that ``infer.py`` reports a
missing input in milliseconds instead of after seconds of imports.
"""

from __future__ import annotations

import os
import unicodedata
from pathlib import Path

from .errors import AudioError, OutputError

AUDIO_SUFFIXES = {".wav", ".flac", ".ogg", ".oga", ".mp3", ".aiff", ".aif", ".au", ".w64", ".caf", ".opus"}


def find_inputs(paths: list[str | os.PathLike]) -> list[Path]:
    """Expand files and folders (audio files directly inside, sorted) into a list of files."""
    out: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.is_file() and q.suffix.lower() in AUDIO_SUFFIXES)
            if not found:
                raise AudioError(f"no audio files ({', '.join(sorted(AUDIO_SUFFIXES))}) in folder {p}")
            out.extend(found)
        elif not p.exists():
            raise AudioError(f"input not found: {p}")
        else:
            out.append(p)
    return out


MAX_NAME_BYTES = 120  # of a subfolder name: the staging sibling ".<name>.astsep-new-XXXXXXXX" must fit in 255


def safe_name(text: str, fallback: str = "input") -> str:
    """``text`` as one plain folder name: separators (``/``, ``\\``), control characters, and bytes
    that were not UTF-8 (lone surrogates) become ``_``; leading and trailing dots and spaces go (so
    ``.``, ``..``, ``...`` and hidden names cannot be made); at most :data:`MAX_NAME_BYTES` UTF-8
    bytes; ``fallback`` when nothing is left."""
    out = []
    for ch in text:
        cat = unicodedata.category(ch)
        out.append("_" if ch in "/\\" or cat in ("Cc", "Cs", "Cf", "Zl", "Zp") else ch)
    name = "".join(out).strip(". \t")
    while len(name.encode("utf-8")) > MAX_NAME_BYTES:
        name = name[:-1]
    name = name.rstrip(". ")
    return name or fallback


def output_names(inputs: list[Path]) -> list[str]:
    """One subfolder name per input, unique within the run (also for filesystems that ignore case),
    each a plain name (:func:`safe_name`) that stays inside the output folder.

    An input whose safe stem no other input shares keeps it; inputs sharing one get ``stem_ext``,
    and ``_2``, ``_3``, … on top while that is still taken (``a.wav a.flac a_1.wav`` → ``a_wav``,
    ``a_flac``, ``a_1``; ``..wav`` → ``input``)."""
    stems = [safe_name(p.stem or p.name) for p in inputs]
    counts: dict[str, int] = {}
    for st in stems:
        counts[st.casefold()] = counts.get(st.casefold(), 0) + 1
    names: list[str | None] = [st if counts[st.casefold()] == 1 else None for st in stems]
    used = {n.casefold() for n in names if n is not None}
    for i, (st, p) in enumerate(zip(stems, inputs)):
        if names[i] is not None:
            continue
        base = safe_name(f"{st}_{safe_name(p.suffix.lstrip('.'), 'noext')}")
        name, k = base, 2
        while name.casefold() in used:
            name, k = f"{base}_{k}", k + 1
        used.add(name.casefold())
        names[i] = name
    return [n for n in names if n is not None]


def check_inputs_outside_outputs(inputs: list[Path], out_dirs: list[Path]) -> None:
    """Refuse (:class:`~astsep.errors.OutputError`, exit code 4) an input that lies inside one of the
    output folders: a run replaces its output folder as a whole, so ``-i out/01_residual.wav -o out``
    would replace the very file it reads."""
    roots = {Path(os.path.realpath(d)) for d in out_dirs}
    for p in inputs:
        real = Path(os.path.realpath(p))
        for root in roots:
            if root == real or root in real.parents:
                raise OutputError(f"input {p} is inside the output folder {root}, which this run replaces: "
                                  "choose another --output (or move the input out of it)")
