#!/usr/bin/env python
"""Separate recordings, classify every source and deliver the events: ``python infer.py -h``."""

import sys

from astsep.frontends.infer import main

if __name__ == "__main__":
    sys.exit(main())
