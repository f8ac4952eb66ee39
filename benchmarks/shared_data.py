"""Where the benchmarks find the shared recordings: ``../shared/data`` beside the checkout (never
copied into it), or the folder in ``$ASTSEP_SHARED_DATA``. Importing this also points the random
ASTs of :mod:`astsep.testing` at the AudioSet label names there (``$ASTSEP_AUDIOSET_LABELS``)."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("ASTSEP_SHARED_DATA") or ROOT.parent / "shared" / "data")
os.environ.setdefault("ASTSEP_AUDIOSET_LABELS", str(SHARED_DATA / "audioset" / "class_labels_indices.csv"))
