"""Input paths: which files a command-line run will decode.

Free of torch and numpy, so that ``infer.py`` reports a missing input in milliseconds instead of
after seconds of imports.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import AudioError

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
