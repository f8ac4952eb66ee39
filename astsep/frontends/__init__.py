"""The front ends: leaves of the package, imported by nothing in :mod:`astsep`.

- :mod:`astsep.frontends.infer`: ``python infer.py`` (batch separation and delivery), the argparse
  parser of every option; ``--live`` hands over to :mod:`astsep.frontends.live`;
- :mod:`astsep.frontends.live`: ``python infer.py --live``: capture, events as JSON lines;
- :mod:`astsep.frontends.app`: ``python -m astsep.frontends.app``, the web demo (Gradio).

Each turns what its user gave into an :class:`astsep.runtime.RunOptions` and builds everything
through :mod:`astsep.runtime`; the only import between them is ``infer`` → ``live``.
"""
