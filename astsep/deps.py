"""Whether the packages astsep runs on can be imported, and one line that says how to fix it when not.

Standard library only: this module must work when torch itself is what fails. An upstream release can
break a fresh install overnight (torchaudio 2.11.1's ``libtorchaudio.so`` does not load beside torch
2.11.0: ``undefined symbol``), and the user should then read which package failed, its version and the
command that installs the tested set, not ``internal error: OSError``.
"""

from __future__ import annotations

import importlib
import sys
from importlib import metadata

from .errors import AstsepError

#: What separation and training import; the optional extras report themselves (``MissingExtraError``).
CORE_PACKAGES = ("torch", "torchaudio", "transformers", "soundfile")
#: The install that CI tests: the lock file of the exact versions, beside pyproject.toml.
FIX = 'pip install -e ".[dev]" -c constraints.txt'


class DependencyError(AstsepError):
    """A package astsep needs is installed but cannot be imported or loaded (or is missing)."""

    exit_code = 3

    def __init__(self, package: str, exc: BaseException):
        self.package = package
        version = installed_version(package)
        beside = ""
        if package != "torch" and installed_version("torch"):
            beside = f" beside torch {installed_version('torch')}"
        what = f"{package} {version}" if version else f"{package} (not installed)"
        detail = " ".join(str(exc).split())  # the loader's message spans lines; keep one
        cause = exc.__cause__  # torchaudio wraps the dynamic loader's error (e.g. "undefined symbol: ...")
        if cause is not None and str(cause) and str(cause) not in detail:
            detail += " <- " + " ".join(str(cause).split())
        if len(detail) > 300:
            detail = detail[:297] + "..."
        super().__init__(f"{what} cannot be loaded{beside} ({type(exc).__name__}: {detail}); "
                         f"install the tested versions from the repository: {FIX}")


def installed_version(package: str) -> str | None:
    """The installed distribution's version, read from its metadata without importing it."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def check(packages: tuple[str, ...] = CORE_PACKAGES) -> None:
    """Import every package of ``packages``; raise :class:`DependencyError` for the first that fails."""
    for name in packages:
        try:
            importlib.import_module(name)
        except Exception as exc:  # ImportError, OSError from a shared library, RuntimeError from its init
            raise DependencyError(name, exc) from exc


def diagnose(exc: BaseException, packages: tuple[str, ...] = CORE_PACKAGES) -> DependencyError | None:
    """If ``exc`` (caught by an entry point) comes from a dependency that cannot be loaded, that error.

    Lets an entry point import lazily (``infer.py -h`` stays fast) and still name the broken package.
    """
    if isinstance(exc, DependencyError):
        return exc
    if not isinstance(exc, (ImportError, OSError, RuntimeError, AttributeError)):
        return None
    try:
        check(packages)
    except DependencyError as err:
        return err
    return None


def require(packages: tuple[str, ...] = CORE_PACKAGES) -> None:
    """For an entry point about to import these packages: on failure, one line and exit code 3."""
    try:
        check(packages)
    except DependencyError as err:
        print(f"astsep: error: {err}", file=sys.stderr)
        raise SystemExit(err.exit_code) from None


def require_when_main(module_name: str, packages: tuple[str, ...] = CORE_PACKAGES) -> None:
    """``require()`` only when ``module_name`` is ``"__main__"`` (``python -m astsep.X``).

    Called at the top of a module that imports torch at module level, before those imports, so the
    module stays importable as a library (the check is skipped) and fails in one line as a command.
    """
    if module_name == "__main__":
        require(packages)
