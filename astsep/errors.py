"""Exceptions a user can act on. The CLI prints their message as one line and exits non-zero."""


class AstsepError(Exception):
    """Base class: every error the CLI reports as one clear line."""

    exit_code = 2


class AudioError(AstsepError):
    """An input file is missing, unreadable, empty or holds non-finite samples."""


class ModelError(AstsepError):
    """A model cannot be found or loaded (e.g. offline without a local folder)."""

    exit_code = 3


class ConfigError(AstsepError):
    """A configuration file or option is invalid."""


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
