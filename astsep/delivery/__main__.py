"""``python -m astsep.delivery``: look at and send what waits in an outbox.

* ``flush --outbox PATH --backend-url URL [--all]``: send every pending entry once now (entries
  that never failed first); ``--all`` also retries the entries parked after failing too long.
  Exit codes: 0 nothing left pending and nothing rejected; 1 entries remain pending or were
  rejected (or another process was sending).
* ``status --outbox PATH [--json]``: how many entries are pending, parked, delivered, rejected,
  and one line per pending / parked entry (key, failures, last status, reason, next retry).
  Exit codes: 0 nothing parked; 1 some entries are parked (they need ``flush --all``).

Both: 2 for a usage / configuration error, as one ``astsep: error:`` line.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from datetime import datetime, timezone
from pathlib import Path

from ..errors import BackendError
from .client import DEFAULT_TOKEN_ENV, BackendClient
from .outbox import Outbox
from .payload import validate_url
from .send import DEFAULT_POLICY, RetryPolicy, flush


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m astsep.delivery",
                                description="Deliver queued sound events to the event backend.")
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("flush", help="send every pending entry of an outbox")
    f.add_argument("--outbox", required=True, help="outbox database (SQLite)")
    f.add_argument("--backend-url", required=True, help="endpoint, e.g. http://host:8000/sound-events/")
    f.add_argument("--all", action="store_true",
                   help="also retry the entries parked after failing for longer than --park-after")
    f.add_argument("--timeout", type=float, default=5.0, help="seconds allowed per request in all (default 5)")
    f.add_argument("--retries", type=int, default=3, help="retries per entry (default 3)")
    f.add_argument("--retry-base", type=float, default=DEFAULT_POLICY.base_delay,
                   help=f"seconds an entry waits after its first failed round, doubling after each "
                        f"(default {DEFAULT_POLICY.base_delay:g})")
    f.add_argument("--retry-max", type=float, default=DEFAULT_POLICY.max_delay,
                   help=f"longest wait between two rounds of one entry, seconds (default {DEFAULT_POLICY.max_delay:g})")
    f.add_argument("--park-after", type=float, default=DEFAULT_POLICY.park_after,
                   help=f"park an entry failing for this many seconds (default {DEFAULT_POLICY.park_after:g})")
    f.add_argument("--token-env", default=DEFAULT_TOKEN_ENV,
                   help=f"env var holding a bearer token (default {DEFAULT_TOKEN_ENV})")
    f.add_argument("--lock-timeout", type=float, default=10.0, help="seconds to wait for another sender (default 10)")
    f.add_argument("--json", action="store_true", help="print the report as JSON instead of a summary line")
    f.add_argument("-v", "--verbose", action="store_true", help="log each request to stderr")
    s = sub.add_parser("status", help="what an outbox holds: counts, and each pending or parked entry")
    s.add_argument("--outbox", required=True, help="outbox database (SQLite)")
    s.add_argument("--json", action="store_true", help="print the status as JSON")
    s.add_argument("-v", "--verbose", action="store_true", help="log to stderr")
    return p


def _open(path: str) -> Outbox:
    p = Path(path)
    if not p.is_file():
        raise BackendError(f"outbox not found: {p}")
    return Outbox(p)


def _when(epoch: float | None) -> str:
    if epoch is None:
        return "now"
    return datetime.fromtimestamp(epoch, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _status(outbox: Outbox, as_json: bool) -> int:
    counts = outbox.counts()
    entries = outbox.pending()
    if as_json:
        for e in entries:
            e.pop("payload", None)
        print(json.dumps({"outbox": str(outbox.path), "counts": counts, "pending": entries}))
    else:
        print(f"{outbox.path}: {counts['pending']} pending ({counts['parked']} parked), "
              f"{counts['delivered']} delivered, {counts['rejected']} rejected")
        for e in entries:
            state = f"parked since {e['parked_at']}" if e["parked_at"] else f"next try {_when(e['next_at'])}"
            last = f"HTTP {e['status']}" if e["status"] is not None else "no answer" if e["failures"] else "not tried"
            reason = f": {e['reason']}" if e["reason"] else ""
            print(f"  {e['key']}  {state}; {e['failures']} failed round(s), {e['attempts']} request(s), "
                  f"queued {e['added_at']}; {last}{reason}")
    return 1 if counts["parked"] else 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if not args.verbose:  # urllib3 warns on every retry; astsep says once when it gives up on an entry
        logging.getLogger("urllib3").setLevel(logging.ERROR)
    try:
        if args.command == "status":
            return _status(_open(args.outbox), args.json)
        url = validate_url(args.backend_url)
        if not (args.timeout > 0 and math.isfinite(args.timeout)):
            raise BackendError(f"--timeout must be a positive number of seconds, got {args.timeout}")
        policy = RetryPolicy(args.retry_base, args.retry_max, args.park_after)
        outbox = _open(args.outbox)
        with BackendClient(url, timeout=args.timeout, retries=args.retries, token_env=args.token_env) as client:
            report = flush(outbox, client, lock_timeout=args.lock_timeout, policy=policy, include_parked=args.all)
    except BackendError as exc:
        print(f"astsep: error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(json.dumps(report.to_dict()) if args.json else report.summary())
    return 0 if (report.outbox_pending == 0 and report.rejected == 0 and not report.busy) else 1


if __name__ == "__main__":
    sys.exit(main())
