"""``python -m astsep.delivery flush --outbox PATH --backend-url URL``: send what waits in an outbox.

Exit codes: 0 nothing left pending and nothing rejected; 1 entries remain pending or were rejected
(or another process was sending); 2 usage / configuration error, as one ``astsep: error:`` line.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

from ..errors import BackendError
from .client import DEFAULT_TOKEN_ENV, BackendClient
from .outbox import Outbox
from .payload import validate_url
from .send import flush


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m astsep.delivery",
                                description="Deliver queued sound events to the event backend.")
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("flush", help="send every pending entry of an outbox")
    f.add_argument("--outbox", required=True,
                   help="outbox database (SQLite; a JSON-lines journal of an earlier version is migrated)")
    f.add_argument("--backend-url", required=True, help="endpoint, e.g. http://host:8000/sound-events/")
    f.add_argument("--timeout", type=float, default=5.0, help="seconds allowed per request in all (default 5)")
    f.add_argument("--retries", type=int, default=3, help="retries per entry (default 3)")
    f.add_argument("--token-env", default=DEFAULT_TOKEN_ENV,
                   help=f"env var holding a bearer token (default {DEFAULT_TOKEN_ENV})")
    f.add_argument("--lock-timeout", type=float, default=10.0, help="seconds to wait for another sender (default 10)")
    f.add_argument("--json", action="store_true", help="print the report as JSON instead of a summary line")
    f.add_argument("-v", "--verbose", action="store_true", help="log each request to stderr")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if not args.verbose:  # urllib3 warns on every retry; astsep says once when it gives up on an entry
        logging.getLogger("urllib3").setLevel(logging.ERROR)
    try:
        url = validate_url(args.backend_url)
        path = Path(args.outbox)
        if not path.is_file():
            raise BackendError(f"outbox not found: {path}")
        if not (args.timeout > 0 and math.isfinite(args.timeout)):
            raise BackendError(f"--timeout must be a positive number of seconds, got {args.timeout}")
        with BackendClient(url, timeout=args.timeout, retries=args.retries, token_env=args.token_env) as client:
            report = flush(Outbox(path), client, lock_timeout=args.lock_timeout)
    except BackendError as exc:
        print(f"astsep: error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(json.dumps(report.to_dict()) if args.json else report.summary())
    return 0 if (report.outbox_pending == 0 and report.rejected == 0 and not report.busy) else 1


if __name__ == "__main__":
    sys.exit(main())
