"""Exceptions a user can act on. The CLI prints their message as one line and exits non-zero.

Library code describes the thing that is wrong and names no command-line option; a front end that
knows which option chose a model says so with :func:`naming_option`.
"""

import contextlib


class AstsepError(Exception):
    """Base class: every error the CLI reports as one clear line."""

    exit_code = 2


class AudioError(AstsepError):
    """An input file is missing, unreadable, empty or holds non-finite samples."""


class ModelError(AstsepError):
    """A model cannot be found or loaded (e.g. offline without a local folder)."""

    exit_code = 3


class ModelLoadError(ModelError):
    """The named model cannot be had: no such folder, not cached offline, weights refused or torn."""


class ConfigError(AstsepError):
    """A configuration file or option is invalid."""


class ModelMismatchError(ConfigError):
    """A model does not fit another one it runs with (a refiner trained on another AST's embeddings)."""


class OutputError(AstsepError):
    """The output folder cannot be written, or another run holds it."""

    exit_code = 4


class BackendError(AstsepError):
    """The event backend is misconfigured (bad URL, …)."""


class MissingExtraError(AstsepError):
    """A feature needs an optional dependency (``pip install 'astsep[EXTRA]'``) that is not installed."""

    def __init__(self, feature: str, extra: str, missing: str | None = None, hint: str = ""):
        what = f" ({missing} is not installed)" if missing else ""
        super().__init__(f"{feature} needs the optional dependencies of astsep[{extra}]{what}: "
                         f"pip install 'astsep[{extra}]'{hint}")


@contextlib.contextmanager
def naming_option(option: str):
    """For front ends: a :class:`ModelLoadError` or :class:`ModelMismatchError` raised inside leaves
    with ``option`` (the command-line option that chose the model) before its message."""
    try:
        yield
    except (ModelLoadError, ModelMismatchError) as exc:
        raise type(exc)(f"{option}: {exc}") from exc
