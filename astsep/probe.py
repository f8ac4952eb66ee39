"""``python -m astsep.probe``: how well astsep's internal features serve a classification task.

Features (one vector per example, ``--features``, several allowed):

- ``pooled``: the AST guide's pooled embedding (mean of the final CLS and distillation tokens
  after the last layer norm; what ``ASTGuide.embed`` returns and the refiner is queried with);
- ``layer:N``: the AST's hidden states after layer ``N`` (0 = patch embeddings plus positions),
  averaged over the patches that cover audio (zero padding up to 10.24 s is left out);
- ``refiner``: the refiner's U-Net bottleneck (``--refiner CKPT``), averaged over its frequency
  and time cells, run on the example as the mixture, with its own baseline masks and *no* query
  (``has_query = 0``), so the vector depends on the audio alone.

Datasets (``--data``): a folder with one subfolder per class; a flat folder whose file names give
the label (``--pattern`` with a ``(?P<label>…)`` group, optionally ``(?P<group>…)``, e.g. the
speaker); or a CSV ``path,label[,split][,group]`` (paths relative to the CSV's folder).
``--segment S`` cuts every file into non-overlapping ``S``-second examples.

Split: ``--test-groups A,B`` (group-disjoint, e.g. speakers), else the CSV's ``split`` column
(``train`` / ``test``), else a stratified ``--test-size`` (default 0.2) split, seeded. The report
states which, and when segments of one file can be on both sides.

Probes (scikit-learn, standardised features, seeded): ``linear`` (multinomial logistic regression)
and ``mlp`` (three linear layers: two ReLU hidden layers of ``--hidden`` units and the output).
The report gives test accuracy, the majority-class share of the test set (chance), and, with
``--shuffled-control``, the same probes on randomly permuted labels (a permutation test: the test
labels no longer depend on the audio, so a sound probe and split score chance; more means a leak).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import re
import sys
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .deps import require_when_main

require_when_main(__name__)  # python -m: a dependency that cannot be loaded is one line, exit 3

import numpy as np
import torch

from .audio import load_audio, write_bytes_atomic
from .config import DEFAULT_MODEL, SAMPLE_RATE, GuideConfig
from .errors import AstsepError, ConfigError, naming_option

log = logging.getLogger(__name__)

AUDIO_SUFFIXES = {".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif", ".au"}
PROBES = ("linear", "mlp")


@dataclass
class ProbeConfig:
    """Split and probe settings."""

    test_size: float = 0.2  # share of examples in the test set (stratified split)
    seed: int = 0  # split, probe initialisation and the shuffled-label control
    hidden: int = 256  # width of both hidden layers of the 3-layer MLP probe
    linear_c: float = 1.0  # inverse L2 strength of the logistic regression
    mlp_alpha: float = 1e-3  # L2 strength of the MLP
    max_iter: int = 1000  # optimiser iterations of either probe
    control_repeats: int = 5  # label permutations averaged in the shuffled-label control


@dataclass
class Example:
    """One labelled example: ``audio (N,)`` at 16 kHz; ``source`` is the file it was cut from."""

    audio: torch.Tensor
    label: str
    source: str
    group: str = ""
    split: str = ""


@dataclass
class Entry:
    path: Path
    label: str
    group: str = ""
    split: str = ""


# --- datasets ---------------------------------------------------------------------------------
def _audio_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES)


def list_dataset(data: str | Path, pattern: str | None = None) -> list[Entry]:
    """Entries of a class-per-folder tree, a flat folder named by ``pattern``, or a CSV."""
    root = Path(data).expanduser()
    if not root.exists():
        raise ConfigError(f"dataset not found: {root}")
    if root.is_file():
        return _list_csv(root)
    if pattern:
        try:
            rx = re.compile(pattern)
        except re.error as exc:
            raise ConfigError(f"--pattern {pattern!r} is not a regular expression ({exc})") from None
        if "label" not in rx.groupindex:
            raise ConfigError(f"--pattern {pattern!r} needs a named group (?P<label>...)")
        entries, skipped = [], 0
        for p in _audio_files(root):
            m = rx.search(p.name)
            if m is None:
                skipped += 1
                continue
            entries.append(Entry(p, m.group("label"), m.groupdict().get("group") or ""))
        if skipped:
            log.info("--pattern matched %d of %d audio files in %s; the others are left out",
                     len(entries), len(entries) + skipped, root)
    else:
        classes = sorted(d for d in root.iterdir() if d.is_dir())
        if not classes:
            raise ConfigError(f"{root} has no class subfolders; for a flat folder pass --pattern with a "
                              "(?P<label>...) group, or give a CSV path,label")
        entries = [Entry(p, d.name) for d in classes for p in _audio_files(d)]
    if not entries:
        raise ConfigError(f"no labelled audio files in {root}")
    return entries


def _list_csv(path: Path) -> list[Entry]:
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            fields = set(reader.fieldnames or [])
            rows = list(reader)
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if not {"path", "label"} <= fields:
        raise ConfigError(f"{path} needs columns 'path,label[,split][,group]'; "
                          f"it has {', '.join(sorted(fields)) or 'none'}")
    entries = []
    for i, row in enumerate(rows, start=2):
        raw, label = (row.get("path") or "").strip(), (row.get("label") or "").strip()
        if not raw or not label:
            raise ConfigError(f"{path}, line {i}: empty path or label")
        p = Path(raw).expanduser()
        split = (row.get("split") or "").strip().lower()
        if split not in ("", "train", "test"):
            raise ConfigError(f"{path}, line {i}: split must be 'train' or 'test', not {split!r}")
        entries.append(Entry(p if p.is_absolute() else path.parent / p, label, (row.get("group") or "").strip(), split))
    if not entries:
        raise ConfigError(f"{path} lists no examples")
    return entries


def load_examples(entries: list[Entry], segment: float | None = None, max_seconds: float = 10.24) -> list[Example]:
    """Decode every entry to 16 kHz mono: the first ``max_seconds``, or cut into ``segment``-second
    pieces (a last piece shorter than half a segment is dropped)."""
    out = []
    for e in entries:
        x, _ = load_audio(e.path)
        if segment:
            n = int(segment * SAMPLE_RATE)
            if n < 400:
                raise ConfigError(f"--segment {segment} is too short (at least 0.025 s, one AST frame)")
            starts = range(0, max(x.numel() - n // 2, 1), n)
            pieces = [x[s:s + n] for s in starts]
            pieces = [p if p.numel() == n else torch.nn.functional.pad(p, (0, n - p.numel())) for p in pieces]
        else:
            pieces = [x[: int(max_seconds * SAMPLE_RATE)]]
        out += [Example(p, e.label, str(e.path), e.group, e.split) for p in pieces]
    return out


# --- split ------------------------------------------------------------------------------------
@dataclass
class Split:
    train: np.ndarray  # indices into the examples
    test: np.ndarray
    description: str


def make_split(examples: list[Example], cfg: ProbeConfig, test_groups: list[str] | None = None) -> Split:
    """Group-disjoint (``test_groups``), the examples' ``split`` field, or stratified by label."""
    labels = [e.label for e in examples]
    idx = np.arange(len(examples))
    segmented = len({e.source for e in examples}) < len(examples)
    if test_groups:
        groups = {e.group for e in examples}
        missing = [g for g in test_groups if g not in groups]
        if missing:
            raise ConfigError(f"--test-groups {','.join(missing)} not found; the groups are "
                              f"{', '.join(sorted(g or '(none)' for g in groups))}")
        is_test = np.array([e.group in test_groups for e in examples])
        train_groups = sorted({e.group for e in examples} - set(test_groups))
        desc = f"group-disjoint: test groups {', '.join(test_groups)}, train groups {', '.join(train_groups)}"
        split = Split(idx[~is_test], idx[is_test], desc)
    elif all(e.split for e in examples):
        is_test = np.array([e.split == "test" for e in examples])
        split = Split(idx[~is_test], idx[is_test], "as given by the CSV's split column")
    else:
        if any(e.split for e in examples):
            raise ConfigError("the CSV's split column is filled for some rows only; fill it for all or none")
        counts = Counter(labels)
        few = sorted(k for k, v in counts.items() if v < 2)
        if few:
            raise ConfigError(f"class {few[0]!r} has {counts[few[0]]} example(s): a stratified split needs at least "
                              "2 per class; cut the files with --segment S, or give a split column or --test-groups")
        from sklearn.model_selection import train_test_split

        try:
            tr, te = train_test_split(idx, test_size=cfg.test_size, random_state=cfg.seed, stratify=labels)
        except ValueError as exc:
            raise ConfigError(f"cannot make a stratified {cfg.test_size:g} split: {exc}") from None
        desc = f"stratified {1 - cfg.test_size:.0%}/{cfg.test_size:.0%} by label, seed {cfg.seed}"
        if segmented:
            desc += "; segments of one file can be in both train and test"
        split = Split(np.sort(tr), np.sort(te), desc)
    if len(split.train) == 0 or len(split.test) == 0:
        raise ConfigError(f"the split ({split.description}) leaves the train or the test set empty")
    unseen = sorted({labels[i] for i in split.test} - {labels[i] for i in split.train})
    if unseen:
        raise ConfigError(f"test label {unseen[0]!r} never occurs in the training set ({split.description})")
    return split


# --- features ---------------------------------------------------------------------------------
def parse_features(specs: list[str]) -> list[str]:
    out = []
    for s in specs:
        s = s.strip()
        if s in ("pooled", "refiner") or re.fullmatch(r"layer:\d+", s):
            out.append(s)
        else:
            raise ConfigError(f"unknown --features {s!r} (pooled, layer:N, refiner)")
    return out


@torch.no_grad()
def ast_features(guide, x: torch.Tensor, kind: str) -> torch.Tensor:
    """``(B, H)`` features of equal-length 16 kHz windows ``x (B, N)``: ``pooled`` or ``layer:N``."""
    if kind == "pooled":
        return guide.embed(x.float())
    from .features import ast_input

    layer = int(kind.split(":")[1])
    if not hasattr(guide.model, "config"):
        raise ConfigError(f"--features {kind} needs an AST guide; a tagger gives 'pooled' (its embedding)")
    n_layers = int(guide.model.config.num_hidden_layers)
    if layer > n_layers:
        raise ConfigError(f"--features {kind}: this AST has layers 0..{n_layers}")
    cfg = guide.cfg
    feats, _ = ast_input(x.float().to(guide.device), guide.max_frames, cfg.fbank_mean, cfg.fbank_std)
    out = guide.model.audio_spectrogram_transformer(feats.to(guide.dtype), output_hidden_states=True)
    h = out.hidden_states[layer][:, 2:]  # drop CLS and distillation tokens; patches frequency-major
    B, _, H = h.shape
    tp = guide.layout.valid_time_patches(x.shape[-1], guide.max_frames, guide.time_patches)
    return h.reshape(B, guide.freq_patches, guide.time_patches, H)[:, :, :tp].float().mean(dim=(1, 2)).cpu()


@torch.no_grad()
def refiner_features(module, x: torch.Tensor) -> torch.Tensor:
    """``(B, C)`` bottleneck of the refiner on ``x (B, N)`` as the mixture, with no query."""
    from .features import stft

    x = x.float().to(module.device)
    masks, _, _ = module.run_baseline(x)
    spec = stft(x, module.cfg.stft)
    grabbed = {}
    hook = module.refiner.bottleneck.register_forward_hook(lambda _m, _i, out: grabbed.__setitem__("b", out))
    try:
        B, D = x.shape[0], module.refiner.cfg.query_dim
        none = x.new_zeros(B)
        module.refiner(spec.abs(), masks, x.new_zeros(B, D), has_query=none)
    finally:
        hook.remove()
    return grabbed["b"].float().mean(dim=(2, 3)).cpu()


def extract(examples: list[Example], kind: str, guide=None, refiner=None, batch_size: int = 16,
            progress: bool = False) -> np.ndarray:
    """``(len(examples), D)`` features; examples of equal length are batched together."""
    from tqdm.auto import tqdm

    by_len: dict[int, list[int]] = {}
    for i, e in enumerate(examples):
        by_len.setdefault(e.audio.numel(), []).append(i)
    rows: dict[int, torch.Tensor] = {}
    batches = [ids[j:j + batch_size] for ids in by_len.values() for j in range(0, len(ids), batch_size)]
    for ids in tqdm(batches, desc=f"features {kind}", disable=not progress):
        x = torch.stack([examples[i].audio for i in ids])
        f = refiner_features(refiner, x) if kind == "refiner" else ast_features(guide, x, kind)
        rows.update(zip(ids, f))
    return torch.stack([rows[i] for i in range(len(examples))]).numpy().astype(np.float64)


# --- probes -----------------------------------------------------------------------------------
def make_probe(name: str, cfg: ProbeConfig):
    """A scikit-learn pipeline: standardise, then the probe."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if name == "linear":
        clf = LogisticRegression(C=cfg.linear_c, max_iter=cfg.max_iter, random_state=cfg.seed)
    elif name == "mlp":
        clf = MLPClassifier(hidden_layer_sizes=(cfg.hidden, cfg.hidden), alpha=cfg.mlp_alpha,
                            max_iter=cfg.max_iter, random_state=cfg.seed)
    else:
        raise ConfigError(f"unknown probe {name!r} ({', '.join(PROBES)})")
    return make_pipeline(StandardScaler(), clf)


def fit_probe(name: str, X: np.ndarray, y: np.ndarray, split: Split, cfg: ProbeConfig,
              shuffle: bool = False) -> dict:
    """Train on ``split.train``, score on ``split.test``.

    ``shuffle``: a permutation test. The labels of all examples are permuted before training and
    scoring, so the test labels are independent of the features and any probe scores chance in
    expectation; the accuracy is the mean over ``cfg.control_repeats`` seeded permutations. (Permuting
    only the training labels would not do: on well separable features the permuted labels still
    correlate a little with the true ones, and the probe then scores 0 or 1, not chance.)
    """
    from sklearn.exceptions import ConvergenceWarning

    rng = np.random.default_rng(cfg.seed)
    label_sets = [rng.permutation(y) for _ in range(cfg.control_repeats)] if shuffle else [y]
    test_acc, train_acc = [], []
    for labels in label_sets:
        probe = make_probe(name, cfg)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            probe.fit(X[split.train], labels[split.train])
        test_acc.append(float((probe.predict(X[split.test]) == labels[split.test]).mean()))
        train_acc.append(float((probe.predict(X[split.train]) == labels[split.train]).mean()))
    return {"probe": name, "labels": f"shuffled (mean of {len(label_sets)})" if shuffle else "true",
            "accuracy": float(np.mean(test_acc)), "train_accuracy": float(np.mean(train_acc))}


@dataclass
class ProbeReport:
    dataset: str
    n_examples: int
    classes: list[str]
    split: dict
    chance: float
    results: list[dict] = field(default_factory=list)
    settings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def markdown(self) -> str:
        s = self.split
        lines = [f"# Probe accuracy: {self.dataset}", "",
                 f"{self.n_examples} examples, {len(self.classes)} classes; split: {s['description']} "
                 f"({s['train']} train / {s['test']} test). Chance (majority class of the test set): "
                 f"{self.chance:.3f}.", "",
                 "| features | dim | probe | labels | train acc. | test acc. |",
                 "| --- | ---: | --- | --- | ---: | ---: |"]
        for r in self.results:
            lines.append(f"| {r['features']} | {r['dim']} | {r['probe']} | {r['labels']} | "
                         f"{r['train_accuracy']:.3f} | {r['accuracy']:.3f} |")
        return "\n".join(lines) + "\n"


def run_probes(examples: list[Example], features: dict[str, np.ndarray], split: Split, cfg: ProbeConfig,
               probes: tuple[str, ...] = PROBES, shuffled_control: bool = False, dataset: str = "",
               on_result=None) -> ProbeReport:
    """Fit every probe on every feature set; ``features``: ``{name: (n_examples, D)}``; ``on_result``:
    called with each result row as it is made (progress)."""
    y = np.array([e.label for e in examples])
    counts = Counter(y[split.test].tolist())
    report = ProbeReport(dataset=dataset, n_examples=len(examples), classes=sorted(set(y.tolist())),
                         split={"description": split.description, "train": int(len(split.train)),
                                "test": int(len(split.test))},
                         chance=max(counts.values()) / len(split.test), settings=dataclasses.asdict(cfg))
    for kind, X in features.items():
        for name in probes:
            for shuffle in ((False, True) if shuffled_control else (False,)):
                r = fit_probe(name, X, y, split, cfg, shuffle)
                report.results.append({"features": kind, "dim": int(X.shape[1]), **r})
                if on_result is not None:
                    on_result(report.results[-1])
    return report


# --- command line -----------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m astsep.probe", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True,
                   help="class-per-folder tree, flat folder (with --pattern) or CSV path,label[,split][,group]")
    p.add_argument("--pattern", default=None, metavar="REGEX",
                   help=r"flat folder: regex on file names with (?P<label>…) and optionally (?P<group>…), "
                        r"e.g. '^(?P<label>\d)_(?P<group>[a-z]+)_'")
    p.add_argument("--features", nargs="+", default=["pooled"], metavar="KIND",
                   help="pooled, layer:N, refiner (several allowed)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="AST: Hub id, local folder, or 'tiny' (random tiny AST)")
    p.add_argument("--refiner", default=None, metavar="CKPT", help="refiner checkpoint for --features refiner")
    p.add_argument("--segment", type=float, default=None, metavar="S", help="cut files into S-second examples")
    p.add_argument("--max-seconds", type=float, default=10.24, help="without --segment: use this much of each file")
    p.add_argument("--test-groups", default=None, metavar="A,B",
                   help="group-disjoint split: these groups are the test set")
    p.add_argument("--test-size", type=float, default=0.2, help="stratified split: share of the test set (default 0.2)")
    p.add_argument("--probes", nargs="+", default=list(PROBES), choices=PROBES)
    p.add_argument("--hidden", type=int, default=256, help="hidden units of the 3-layer MLP probe")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shuffled-control", action="store_true", help="also train every probe on permuted labels")
    p.add_argument("--out", default=None, metavar="DIR", help="write probe.md and probe.json here")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("-v", "--verbose", action="count", default=0)
    return p


def load_refiner_module(path: str | Path, device: str = "cpu"):
    """A trained ``RefinerModule`` (with its frozen guide and separator, for baseline masks) from a
    ``train.py`` checkpoint, read with ``weights_only``."""
    from .errors import ModelError
    from .lit import RefinerModule

    p = Path(path).expanduser()
    if not p.is_file():
        raise ModelError(f"refiner checkpoint not found: {p}")
    module = RefinerModule.load_from_checkpoint(str(p), map_location=device, weights_only=True)
    return module.to(device).eval()


def _progress_lines(enabled: bool):
    """One ``astsep.probe: ...`` line on stderr per stage when stderr is not a terminal (no progress bar)."""
    def say(text: str) -> None:
        if enabled:
            print(f"astsep.probe: {text}", file=sys.stderr, flush=True)
    return say


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING - 10 * args.verbose, format="%(levelname)s %(name)s: %(message)s")
    try:
        if not 0 < args.test_size < 1:
            raise ConfigError(f"--test-size must be between 0 and 1, not {args.test_size}")
        if args.hidden < 1:
            raise ConfigError(f"--hidden must be >= 1, not {args.hidden}")
        kinds = parse_features(args.features)
        if "refiner" in kinds and not args.refiner:
            raise ConfigError("--features refiner needs --refiner CKPT")
        cfg = ProbeConfig(test_size=args.test_size, seed=args.seed, hidden=args.hidden)
        examples = load_examples(list_dataset(args.data, args.pattern), args.segment, args.max_seconds)
        groups = [g.strip() for g in args.test_groups.split(",") if g.strip()] if args.test_groups else None
        split = make_split(examples, cfg, groups)
        guide = module = None
        if any(k != "refiner" for k in kinds):
            from .guide_loader import build_guide
            from .guide import quiet_model_loading

            with quiet_model_loading(), naming_option("--model"):
                guide = build_guide(args.model, GuideConfig(device=args.device))
        if "refiner" in kinds:
            module = load_refiner_module(args.refiner, args.device)
        progress = sys.stderr.isatty()
        say = _progress_lines(not progress)
        features = {}
        for k in kinds:  # (lines only once a stage is done: a request refused midway stays one error line)
            t0 = time.perf_counter()
            features[k] = extract(examples, k, guide, module, progress=progress)
            say(f"features {k} of {len(examples)} examples ({len(split.train)} train / {len(split.test)} test): "
                f"{features[k].shape[1]} dims in {time.perf_counter() - t0:.1f} s")
        dataset = str(args.data) + (f" (segments of {args.segment:g} s)" if args.segment else "")
        report = run_probes(examples, features, split, cfg, tuple(args.probes), args.shuffled_control, dataset,
                            on_result=lambda r: say(f"probe {r['probe']} on {r['features']} ({r['labels']} labels): "
                                                    f"test accuracy {r['accuracy']:.3f}"))
        report.settings.update(model=args.model if guide is not None else None, refiner=args.refiner,
                               segment=args.segment, pattern=args.pattern)
        md = report.markdown()
        if args.out:
            out = Path(args.out).expanduser()
            out.mkdir(parents=True, exist_ok=True)
            write_bytes_atomic(out / "probe.md", md.encode())
            write_bytes_atomic(out / "probe.json", json.dumps(report.to_dict(), indent=2).encode())
    except AstsepError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    sys.stdout.write(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
