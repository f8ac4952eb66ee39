"""The ``tagger`` config section: how a real CNN tagger guides the separator (:mod:`astsep.tagger`).

Standard library only (like every config section), so a bad value is reported before torch loads.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config_base import check_float as _float
from .config_base import check_int as _int
from .config_base import check_str as _str

TAGGER_METHODS = ("loop", "classmap")
TAGGER_ASSIGN = ("cluster", "rival", "prob")


@dataclass
class TaggerConfig:
    """How a real CNN tagger (``--model`` an EfficientAT folder, :mod:`astsep.tagger`) guides the separator.
    Read only when the guide is a tagger; an AST or an oracle ignores it."""

    method: str = "loop"  # loop: tag the window's NMF components; classmap: the head at every position
    components: int = 32  # loop: NMF components tagged per window (one tagger batch of this many signals)
    nmf_iterations: int = 50  # loop: KL multiplicative updates of that factorisation
    # loop: how components become the named sound: cluster (two groups by the tagger's embeddings of the
    # components, the surer one named); rival (log-odds of the mixture's top class against its rival);
    # prob (that class's probability)
    assign: str = "cluster"
    # cluster: two groups at least this alike (mean of their embedding and class-probability cosines)
    # are one sound, and the window is given to it (> 1: never)
    one_sound: float = 0.8  # ... in the first pass (the mixture itself)
    one_sound_later: float = 0.3  # ... in later passes (what earlier passes left: most often one sound)
    # label_by group: the group's tag probabilities weighed (geometrically) with the window's, this share
    # the window's (0: the group's alone)
    label_mix: float = 0.5
    # the named sound's label: contrast (what the window holds, times how much more the named group holds
    # it than the other) or group (its group's tags weighed with the window's by label_mix)
    label_by: str = "contrast"
    # cluster: which group is named first: sure (the tagger's top probability) or energy (the louder)
    name_by: str = "energy"
    ensemble: int = 1  # cluster: factorisations (NMF seeds) clustered and averaged per window
    sharpness: float = 1.0  # rival: the vote's slope (per unit of log-odds)
    bias: float = 0.0  # rival: added to the vote's log-odds (> 0 gives the named sound more)
    iterations: int = 0  # rival / prob: mask <-> tagger rounds (each tags the named sound and the rest, and re-votes)
    seed: int = 0  # loop: seed of the NMF start
    # a residual is named as a sound (and gets its class's category) when its top sigmoid probability
    # reaches this: the multi-label counterpart of separator.residual_confidence (the AST's softmax 0.70)
    residual_confidence: float = 0.5
    # the live alert stage fires on an alertable class at this sigmoid probability of a 1 s excerpt: the
    # multi-label counterpart of live.alert_threshold (0.5, the AST's softmax). Chosen on the training-side
    # classes' clips (benchmarks/README.md): 0.5 caught 14 % of the alertable ones, 0.05 77 % (23 % of the
    # everyday ones alerted too), the best hit-minus-false-alarm rate
    alert_threshold: float = 0.05
    # the tagger's class names (AudioSet's class_labels_indices.csv); null: found beside its weights
    labels: str | None = None

    def __post_init__(self) -> None:
        sec = "tagger"
        _str(sec, "labels", self.labels, optional=True)
        _str(sec, "method", self.method, choices=TAGGER_METHODS)
        _int(sec, "components", self.components, lo=2)
        _int(sec, "nmf_iterations", self.nmf_iterations, lo=1)
        _str(sec, "assign", self.assign, choices=TAGGER_ASSIGN)
        _float(sec, "residual_confidence", self.residual_confidence, lo=0, hi=1)
        _float(sec, "alert_threshold", self.alert_threshold, lo=0, hi=1)
        _float(sec, "one_sound", self.one_sound)
        _float(sec, "one_sound_later", self.one_sound_later)
        _float(sec, "label_mix", self.label_mix, lo=0, hi=1)
        _str(sec, "label_by", self.label_by, choices=("contrast", "group"))
        _str(sec, "name_by", self.name_by, choices=("sure", "energy"))
        _int(sec, "ensemble", self.ensemble, lo=1)
        _float(sec, "sharpness", self.sharpness, lo=0, lo_open=True)
        _float(sec, "bias", self.bias)
        _int(sec, "iterations", self.iterations, lo=0)
        _int(sec, "seed", self.seed, lo=0)
