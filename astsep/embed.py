"""``python -m astsep.embed --csv CSV --out table.pt``: precompute query embeddings once.

Text queries (default, needs ``--clap-ckpt``): every distinct caption of the CSV is embedded with
LAION-CLAP's text encoder. Audio prototypes (``--encoder ast``): every clip of the CSV is embedded
with the AST guide and the embeddings of clips sharing a caption are averaged, so captions can be
looked up although the AST has no text branch.

The table is ``{"texts", "embeddings" (N, D), "encoder"}`` (``astsep.query.EmbeddingTable``).
"""

from __future__ import annotations

import argparse
import csv
import logging
import sys
from collections import defaultdict
from pathlib import Path

from .deps import require_when_main

require_when_main(__name__)  # python -m: a dependency that cannot be loaded is one line, exit 3

import torch

from .config import DEFAULT_MODEL
from .errors import AstsepError, ConfigError
from .query import EmbeddingTable, QueryEncoder, normalise_text

log = logging.getLogger(__name__)


def read_captions(csv_path: str | Path) -> list[str]:
    """Distinct captions of a CSV with a ``caption`` column, in first-seen order."""
    p = Path(csv_path).expanduser()
    if not p.is_file():
        raise ConfigError(f"CSV not found: {p}")
    with open(p, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if "caption" not in (reader.fieldnames or []):
            raise ConfigError(f"{p} has no 'caption' column")
        caps = [normalise_text(r["caption"]) for r in reader if (r.get("caption") or "").strip()]
    return list(dict.fromkeys(caps))


def text_table(encoder: QueryEncoder, csv_path: str | Path, batch_size: int = 64) -> EmbeddingTable:
    """Embed the CSV's captions with ``encoder.encode_text``."""
    captions = read_captions(csv_path)
    if not captions:
        raise ConfigError(f"{csv_path} holds no captions")
    return EmbeddingTable.from_texts(encoder, captions, batch_size)


def audio_prototype_table(encoder: QueryEncoder, csv_path: str | Path, audio_dir: str | None = None,
                          seconds: float = 10.0, progress: bool = False) -> EmbeddingTable:
    """Mean ``encoder.encode_audio`` embedding of the clips of each caption (first ``seconds``)."""
    from tqdm.auto import tqdm

    from .data.audiocaps import ClipReader, read_clip_csv

    clips = read_clip_csv(csv_path, audio_dir, min_seconds=0.1)
    if not clips:
        raise ConfigError(f"{csv_path}: no usable clips")
    reader = ClipReader()
    groups: dict[str, list[torch.Tensor]] = defaultdict(list)
    for clip in tqdm(clips, desc="embedding clips", disable=not progress):
        x = reader.read(clip, 0.0, min(seconds, clip.seconds))
        groups[clip.caption].append(encoder.encode_audio(x.unsqueeze(0))[0])
    texts = list(groups)
    emb = torch.stack([torch.stack(groups[t]).mean(0) for t in texts])
    return EmbeddingTable(texts, emb, f"{encoder.name}:audio-prototype")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m astsep.embed", description=__doc__.split("\n\n")[0])
    p.add_argument("--csv", required=True, help="CSV with a 'caption' column (AudioCaps or path,caption)")
    p.add_argument("--out", required=True, help="output table (.pt)")
    p.add_argument("--encoder", choices=["clap", "ast"], default="clap", help="text (clap) or audio prototypes (ast)")
    p.add_argument("--clap-ckpt", default=None, help="laion-clap checkpoint, e.g. 630k-audioset-best.pt")
    p.add_argument("--clap-amodel", default="HTSAT-tiny", help="CLAP audio model of the checkpoint")
    p.add_argument("--clap-download", action="store_true", help="let laion-clap fetch roberta-base from the Hub")
    p.add_argument("--ast-model", default=DEFAULT_MODEL, help="AST for --encoder ast: Hub id, folder, or 'tiny'")
    p.add_argument("--audio-dir", default=None, help="folder of the clips (--encoder ast)")
    p.add_argument("--device", default="cpu")
    p.add_argument("-v", "--verbose", action="count", default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING - 10 * args.verbose, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.encoder == "clap":
            if not args.clap_ckpt:
                raise ConfigError("--encoder clap needs --clap-ckpt PATH (a local laion-clap checkpoint)")
            from .query import ClapQueryEncoder

            enc = ClapQueryEncoder(args.clap_ckpt, amodel=args.clap_amodel, device=args.device, download=args.clap_download)
            table = text_table(enc, args.csv)
        else:
            from .config import GuideConfig
            from .guide_loader import build_guide
            from .query import ASTQueryEncoder

            enc = ASTQueryEncoder(build_guide(args.ast_model, GuideConfig(device=args.device, trim_padding=True)))
            table = audio_prototype_table(enc, args.csv, args.audio_dir, progress=True)
        table.save(args.out)
    except AstsepError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    log.info("wrote %d embeddings (%d-d, %s) to %s", len(table), table.dim, table.encoder, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
