"""The config sections of live mode, its direction of arrival and delivery: ``live``, ``doa``,
``delivery`` (part of :class:`astsep.config.AstsepConfig`; importable from :mod:`astsep.config`)."""

from __future__ import annotations

from dataclasses import dataclass

from .config_base import MAX_WINDOW_SEC, SAMPLE_RATE, check_bool, check_float, check_int, check_str
from .errors import ConfigError

@dataclass
class LiveConfig:
    """Live mode (``infer.py --live``, :mod:`astsep.live`): capture, trigger, analysis, merging.

    It does not change what a window's separation gives, only which windows are separated and how
    their events become alerts (YAML section ``live``, options ``--live.KEY``)."""

    # seconds of audio per analysis; the reference records 4.096 s after its level trigger
    window_sec: float = 4.096
    trigger: str = "level"  # level: on a rise above trigger_dbfs, then every hop_sec while loud | hop: every hop_sec
    # the reference's level trigger: a 50 ms frame of the (channel-averaged) input above this wakes analysis
    trigger_dbfs: float = -40.0
    release_db: float = 6.0  # the trigger re-arms once the level stays this far below trigger_dbfs ...
    release_sec: float = 0.3  # ... for this long
    hop_sec: float = 2.0  # seconds between analyses (hop trigger; level trigger while the sound lasts)
    # the first analysis after an onset waits for this much of the sound (its window ends here)
    post_trigger_sec: float = 0.5
    align_sec: float = 0.1  # window ends fall on this grid: a level and a hop analysis of one moment are one
    hold_off_sec: float = 2.0  # the same class again within this gap (seconds) is the same occurrence
    queue_size: int = 1  # windows waiting for analysis; when full the oldest waiting one is dropped
    level_frame_sec: float = 0.05  # frame of the level meter
    block_sec: float = 0.032  # capture block (sound card / stdin reads)
    emit_other: bool = False  # also emit events of category "other" (never sent to the backend)
    record_dir: str | None = None  # keep each analysed window and its sources here
    record_max_mb: float = 200.0  # oldest recordings are deleted to stay under this size
    # The fast alert stage (astsep.live): one AST forward on the last alert_sec seconds (padding
    # trimmed, no separation) alert_post_trigger_sec after an onset, then every alert_hop_sec while
    # loud (above trigger_dbfs, with either trigger). An alertable class (danger / help / warning)
    # among its top 5 at or above alert_threshold (the guide's probability: softmax for the AST, sigmoid for a
    # multi-label tagger) is sent at once, marked
    # provisional; the separation stage's result for the same sound updates that event.
    alert_stage: bool = True
    # 1 s: the first excerpt after an onset is then half the new sound (a 2 s one: a quarter), and
    # ~266 AST tokens instead of ~374 (benchmarks/README.md: alert p95 1.86 s instead of 2.17 s, load 6)
    alert_sec: float = 1.0
    alert_hop_sec: float = 1.0
    alert_post_trigger_sec: float = 0.5
    alert_threshold: float = 0.5
    alert_queue_size: int = 1  # alert excerpts waiting; when full the oldest waiting one is dropped
    # with the alert stage on, the separation thread runs this much nicer (Linux thread priority) so
    # that an alert forward gets the CPU first; 0 leaves it alone
    separation_nice: int = 10
    # when a newer window is waiting (the separation stage is behind), the window in progress runs
    # no further pass (the sounds it has not separated stay in its residual, which is still
    # classified): fewer passes instead of a dropped window. False: every window runs all its passes.
    cut_passes_when_behind: bool = True
    # each separated source is reported (recorded, sent) as soon as its pass ends, not after the
    # window's last pass and its residual's classification: a window's first sound arrives one pass
    # after the window is taken (benchmarks/bench_live.py). False: a window's events come together
    report_each_pass: bool = True
    # a provisional alert is retracted (an event with "retracted": true, the alert's event_id) when
    # the first separated window that holds its whole excerpt, every pass run, does not confirm it
    retract_unconfirmed: bool = True
    # an update goes to the backend again when its direction (its separated source's) is this many
    # degrees from the alert's (the unseparated excerpt's), as well as when its label or category differ
    resend_angle_deg: float = 30.0
    # a run of activity of a separated source shorter than this, beside a longer one of that source,
    # is a fragment of it, not a sound of its own
    min_run_sec: float = 0.05

    def __post_init__(self) -> None:
        sec = "live"
        check_float(sec, "window_sec", self.window_sec, lo=0.5, hi=MAX_WINDOW_SEC)
        check_str(sec, "trigger", self.trigger, choices=("level", "hop"))
        check_float(sec, "trigger_dbfs", self.trigger_dbfs, lo=-120.0, hi=0.0)
        check_float(sec, "release_db", self.release_db, lo=0.0, hi=60.0)
        check_float(sec, "release_sec", self.release_sec, lo=0.0, hi=10.0)
        check_float(sec, "hop_sec", self.hop_sec, lo=0.1, hi=60.0)
        check_float(sec, "post_trigger_sec", self.post_trigger_sec, lo=0.0, hi=self.window_sec)
        check_float(sec, "align_sec", self.align_sec, lo=0.01, hi=self.hop_sec)
        check_float(sec, "hold_off_sec", self.hold_off_sec, lo=0.0, hi=600.0)
        check_int(sec, "queue_size", self.queue_size, lo=1, hi=64)
        check_float(sec, "level_frame_sec", self.level_frame_sec, lo=0.005, hi=1.0)
        check_float(sec, "block_sec", self.block_sec, lo=0.001, hi=1.0)
        check_bool(sec, "emit_other", self.emit_other)
        check_str(sec, "record_dir", self.record_dir, optional=True)
        check_float(sec, "record_max_mb", self.record_max_mb, lo=0.0, lo_open=True)
        check_bool(sec, "alert_stage", self.alert_stage)
        check_float(sec, "alert_sec", self.alert_sec, lo=0.25, hi=MAX_WINDOW_SEC)
        check_float(sec, "alert_hop_sec", self.alert_hop_sec, lo=0.1, hi=60.0)
        check_float(sec, "alert_post_trigger_sec", self.alert_post_trigger_sec, lo=0.0, hi=self.alert_sec)
        check_float(sec, "alert_threshold", self.alert_threshold, lo=0.0, hi=1.0)
        check_int(sec, "alert_queue_size", self.alert_queue_size, lo=1, hi=64)
        check_int(sec, "separation_nice", self.separation_nice, lo=0, hi=19)
        check_bool(sec, "cut_passes_when_behind", self.cut_passes_when_behind)
        check_bool(sec, "report_each_pass", self.report_each_pass)
        check_bool(sec, "retract_unconfirmed", self.retract_unconfirmed)
        check_float(sec, "resend_angle_deg", self.resend_angle_deg, lo=0.0, hi=180.0)
        check_float(sec, "min_run_sec", self.min_run_sec, lo=0.0, hi=MAX_WINDOW_SEC)


DOA_METHODS = ("SRP", "MUSIC", "NormMUSIC", "TOPS", "CSSM", "WAVES")  # pyroomacoustics.doa's names


@dataclass
class DOAConfig:
    """How live mode estimates a direction of arrival (:mod:`astsep.doa`; YAML section ``doa``)."""

    method: str = "SRP"  # SRP (SRP-PHAT) | MUSIC | NormMUSIC | TOPS | CSSM | WAVES (pyroomacoustics names)
    nfft: int = 512  # STFT size of the spatial spectrum (32 ms at 16 kHz)
    freq_low: float = 300.0  # Hz: below, a small array cannot tell directions apart
    freq_high: float = 3500.0  # Hz: above about c / (2 · spacing), directions alias
    grid: int = 360  # candidate azimuths (1° steps)

    def __post_init__(self) -> None:
        if self.method not in DOA_METHODS:
            raise ConfigError(f"doa.method must be one of {', '.join(DOA_METHODS)}, got {self.method!r}")
        if isinstance(self.nfft, bool) or not isinstance(self.nfft, int) or self.nfft < 64 or self.nfft & (self.nfft - 1):
            raise ConfigError(f"doa.nfft must be a power of two >= 64, got {self.nfft}")
        check_float("doa", "freq_low", self.freq_low)
        check_float("doa", "freq_high", self.freq_high)
        if not 0 < self.freq_low < self.freq_high <= SAMPLE_RATE / 2:
            raise ConfigError(f"doa.freq_low/freq_high must satisfy 0 < low < high <= {SAMPLE_RATE // 2} Hz")
        check_int("doa", "grid", self.grid, lo=8)


@dataclass
class DeliveryConfig:
    """How events are sent to the backend (:class:`astsep.delivery.BackendClient`; YAML section
    ``delivery``). The URL, user id and outbox path are per run (``--backend-url``, ...)."""

    timeout: float = 5.0  # seconds allowed per request in all, answer included (--backend-timeout)
    retries: int = 3  # extra requests after the first for retryable failures
    backoff: float = 0.5  # urllib3 backoff_factor: the n-th retry waits backoff * 2**(n-1) s
    max_backoff: float = 8.0  # upper bound on any single wait, a Retry-After included
    verify_tls: bool = True  # verify the server's TLS certificate
    # each outbox entry's own retry schedule (astsep.delivery.RetryPolicy): after its n-th failed round it
    # waits min(retry_max_sec, retry_base_sec * 2**(n-1)); one failing for park_after_sec is parked
    # (kept, listed by `python -m astsep.delivery status`, sent by `flush --all`), never dropped
    retry_base_sec: float = 2.0
    retry_max_sec: float = 300.0
    park_after_sec: float = 86400.0
    # the reference backend's body has two fields astsep has nothing for; the reference sends the literal
    # "string" in both, and so does astsep unless told what the app expects (an icon name, an image URL)
    sound_icon: str = "string"
    location_image_url: str = "string"

    def __post_init__(self) -> None:
        check_float("delivery", "timeout", self.timeout, lo=0.0, lo_open=True)
        for name in ("retry_base_sec", "retry_max_sec", "park_after_sec"):
            check_float("delivery", name, getattr(self, name), lo=0.0)
        for name in ("sound_icon", "location_image_url"):
            if not isinstance(getattr(self, name), str):
                raise ConfigError(f"delivery.{name} must be a string, got {getattr(self, name)!r}")
        check_int("delivery", "retries", self.retries, lo=0, hi=100)
        check_float("delivery", "backoff", self.backoff, lo=0.0)
        check_float("delivery", "max_backoff", self.max_backoff, lo=0.0)
        check_bool("delivery", "verify_tls", self.verify_tls)
