"""Output folders, all or nothing: ``write_outputs`` and the lock and checks around it.

A run killed at any moment (SIGKILL, power loss) leaves the previous complete folder or the new
complete one, never a mix: the new folder is staged complete as a hidden sibling of ``out/`` (same
filesystem), ``events.json`` last, then put in place by swapping the two folders. Per-file
``os.replace`` into ``out/`` is not enough for that: a run killed between two replaces leaves the
old ``events.json`` beside a new ``00_<label>.wav`` of the same name, so the files it lists no longer
add up to its input (``tests/test_atomic_outputs.py::test_per_file_replace_alone_mixes_two_runs_when_killed_between_files``).

The swap is ``renameat2(RENAME_EXCHANGE)`` (Linux, glibc ≥ 2.28: one atomic step). Elsewhere it is
two renames, ``out → .<out>.astsep-old`` and ``stage → out``; a run killed between them leaves
``out/`` missing and the backup complete, and the next run into that folder puts it back.

One ``filelock`` lock beside the folder (``.<out>.astsep.lock``, never moved by a swap) serialises
the runs that write one folder. Where the folder cannot be swapped (``-o .``: the user's shell is
in it; a mount point), files are renamed into it one by one, ``events.json`` last: each file is
atomic there, the set is not.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import shutil
import stat
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Protocol

from filelock import FileLock, Timeout

from .audio import new_dir_mode, write_bytes_atomic, write_wav_atomic
from .durable import fsync_path
from .errors import OutputError
from .export import FORMATS, Export, ExportOptions, export_tracks, rename_in_events

if TYPE_CHECKING:
    from .config import AstsepConfig

log = logging.getLogger(__name__)

MANIFEST = "events.json"
LOCK_TAG = ".astsep.lock"  # the lock beside the folder: .<name>.astsep.lock
STAGE_TAG = ".astsep-new-"  # staging sibling: .<name>.astsep-new-XXXX
BACKUP_TAG = ".astsep-old"  # the old folder between two renames: .<name>.astsep-old
IN_PLACE_STAGE = ".astsep-stage-"  # staging folder inside out/ when it is written in place
_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


class SeparationResult(Protocol):
    """What :func:`write_outputs` writes (:class:`astsep.pipeline.SeparationResult` is one); named
    here, not imported, so that this module stays below the pipeline that calls it."""

    tracks: list[Any]  # each with ``filename``, ``kind`` and ``render(num_samples)``
    stats: dict[str, Any]

    @property
    def residual(self) -> Any: ...

    @property
    def num_samples(self) -> int: ...

    def manifest(self) -> dict[str, Any]: ...


def _checkpoint(name: str) -> None:
    """A named point of the write sequence; a no-op. Fault tests replace it to kill the process here."""


def _sibling(out_dir: Path, tag: str) -> Path:
    return out_dir.parent / f".{out_dir.name}{tag}"


def _real_path(out_dir: str | os.PathLike) -> Path:
    """``out_dir`` absolute, and resolved when it exists: a symlinked folder is written through (the
    real folder is swapped, the user's link stays)."""
    path = Path(os.path.abspath(out_dir))
    return path.resolve() if path.is_symlink() or path.exists() else path


@contextlib.contextmanager
def output_lock(out_dir: Path) -> Iterator[None]:
    """Hold the lock on ``out_dir`` for one run (a second run at the same time gets
    :class:`OutputError`), after cleaning up what a killed run left (:func:`recover_output`).

    The lock file is removed again, still held, when the run ends; ``filelock`` (≥ 3.20.4) re-checks
    that a lock it takes is still linked, so a run that opened the old file meanwhile retries on a new one.
    """
    path = _sibling(out_dir, LOCK_TAG)
    lock = FileLock(str(path), timeout=0)
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        lock.acquire()
    except Timeout:
        raise OutputError(f"another astsep run is writing to {out_dir}; wait for it or choose another --output") from None
    except OSError as exc:
        raise OutputError(f"cannot create output folder {out_dir}: {exc.strerror or exc}") from exc
    try:
        recover_output(out_dir)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        lock.release()


def check_output_folder(out_dir: str | os.PathLike) -> Path:
    """Refuse, before any decoding or model work, an output folder :func:`write_outputs` would
    refuse after it: a path that exists and is not a folder, a folder that is not astsep's
    (non-empty without an astsep ``events.json``), a folder or a parent (where the lock file goes)
    that cannot be written. Raises :class:`OutputError` (exit code 4); returns the real path.
    Changes nothing on disk."""
    out_dir = _real_path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"--output {out_dir} exists and is not a folder")
    anc = out_dir.parent
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise OutputError(f"cannot create output folder {out_dir}: {anc} is not a folder")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise OutputError(f"cannot create output folder {out_dir}: {anc} is not writable (astsep keeps a lock "
                          "file beside the output folder and swaps the folder as a whole)")
    if out_dir.is_dir():
        if not os.access(out_dir, os.W_OK | os.X_OK):
            raise OutputError(f"cannot write outputs to {out_dir}: the folder is not writable")
        _foreign_entries(out_dir)
    return out_dir


def recover_output(out_dir: Path) -> None:
    """Undo what a killed run left (call under the lock): put back ``out_dir`` from the backup of
    an interrupted two-rename swap, then remove staging folders and the backup."""
    backup = _sibling(out_dir, BACKUP_TAG)
    if backup.is_dir() and not out_dir.exists():
        log.warning("restoring %s from %s (an earlier run was interrupted while swapping)", out_dir, backup)
        os.rename(backup, out_dir)
    leftovers = [backup] + list(out_dir.parent.glob(f".{glob.escape(out_dir.name)}{STAGE_TAG}*"))
    if out_dir.is_dir():
        leftovers += list(out_dir.glob(f"{IN_PLACE_STAGE}*"))
    for p in leftovers:
        shutil.rmtree(p, ignore_errors=True)


def write_outputs(result: SeparationResult, out_dir: str | os.PathLike, debug: bool = False,
                  config: AstsepConfig | None = None, export: Export | None = None) -> Path:
    """Write every track (float32 WAV at 16 kHz, or as ``export`` made them: see :mod:`astsep.export`)
    (and, with ``debug``, the figures) and ``events.json`` into ``out_dir``, all or nothing (see the
    module docstring). Files in ``out_dir`` that the previous run's ``events.json`` does not list (the
    user's) are carried into the new folder as hard links; a non-empty folder without an astsep
    ``events.json`` is refused with :class:`OutputError`. Returns the path of ``events.json``.
    """
    if export is None:
        export = export_tracks(result, ExportOptions())
    out_dir = _real_path(out_dir)
    with output_lock(out_dir):
        keep = _foreign_entries(out_dir) if out_dir.is_dir() else []
        t0 = time.perf_counter()
        if _holds_cwd(out_dir):  # `-o .`: a swap would leave the user's shell in a deleted folder
            log.info("%s is (or holds) the working directory: writing in place", out_dir)
            return _write_in_place(result, out_dir, debug, config, t0, export)
        # mkdtemp makes 0700; the swapped-in folder keeps the old one's mode, a new one the umask's
        mode = stat.S_IMODE(out_dir.stat().st_mode) if out_dir.is_dir() else new_dir_mode()
        try:
            stage = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}{STAGE_TAG}", dir=str(out_dir.parent)))
        except OSError as exc:
            raise OutputError(f"cannot write outputs beside {out_dir}: {exc.strerror or exc}") from exc
        try:
            os.chmod(stage, mode)
            _checkpoint("staging")
            manifest = _write_folder(result, stage, debug, config, t0, export)
            for name in keep:
                _link_tree(out_dir / name, stage / name)
            write_bytes_atomic(stage / MANIFEST, manifest)
            fsync_path(stage)
            _checkpoint("staged")
            out_dir.mkdir(exist_ok=True)
            try:
                _swap(stage, out_dir)
            except OSError as exc:  # a mount point, a busy folder, …: nothing moved, or put back now
                recover_output(out_dir)
                log.info("cannot swap %s (%s): writing in place", out_dir, exc.strerror or exc)
                return _write_in_place(result, out_dir, debug, config, t0, export)
            _checkpoint("swapped")
        except OSError as exc:
            raise OutputError(f"cannot write outputs to {out_dir}: {exc.strerror or exc}") from exc
        finally:
            shutil.rmtree(stage, ignore_errors=True)  # after the swap: the old folder
            shutil.rmtree(_sibling(out_dir, BACKUP_TAG), ignore_errors=True)
        _checkpoint("done")
    return out_dir / MANIFEST


def _holds_cwd(out_dir: Path) -> bool:
    """True when the working directory is ``out_dir`` or inside it (``-o .``, ``-o ..``): the shell
    that started the run is there too, and must not be left in a folder the swap deleted."""
    try:
        cwd = Path(os.getcwd()).resolve()
    except OSError:  # the working directory is already gone
        return False
    return cwd == out_dir or out_dir in cwd.parents


def _write_folder(result: SeparationResult, folder: Path, debug: bool, config: AstsepConfig | None,
                  t0: float, export: Export) -> bytes:
    """Write the tracks (and figures) into ``folder``; return ``events.json``'s bytes (not written)."""
    new_files = []
    container, subtype, _ = FORMATS[export.options.format]
    for track in export.tracks():
        write_wav_atomic(folder / track.filename, track.samples, track.sample_rate, container, subtype)
        new_files.append(track.filename)
        del track
        _checkpoint(f"wrote:{new_files[-1]}")
    if debug:
        from .viz import debug_figures

        new_files += debug_figures(result, folder, config)
    result.stats["seconds"]["write"] = round(time.perf_counter() - t0, 4)
    manifest = result.manifest()
    manifest["files"] = new_files
    if not export.options.is_default:
        manifest["events"] = rename_in_events(manifest["events"], export)
        manifest["output"] = export.manifest_entry()
    return json.dumps(manifest, indent=2, allow_nan=False).encode()


def _write_in_place(result: SeparationResult, out_dir: Path, debug: bool, config: AstsepConfig | None,
                    t0: float, export: Export) -> Path:
    """Stage inside ``out_dir``, rename file by file, ``events.json`` last, then remove the previous
    run's outputs this run did not write (each file is atomic; the set is not)."""
    try:
        out_dir.mkdir(exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=IN_PLACE_STAGE, dir=str(out_dir)))
    except OSError as exc:
        raise OutputError(f"cannot write outputs to {out_dir}: {exc.strerror or exc}") from exc
    try:
        manifest = _write_folder(result, stage, debug, config, t0, export)
        new_files = json.loads(manifest)["files"]
        old = _old_files(out_dir)
        for name in new_files:
            os.replace(stage / name, out_dir / name)
            _checkpoint(f"replaced:{name}")
        write_bytes_atomic(out_dir / MANIFEST, manifest)
        for name in old - set(new_files):
            with contextlib.suppress(OSError):
                (out_dir / name).unlink()
    except OSError as exc:
        raise OutputError(f"cannot write outputs to {out_dir}: {exc.strerror or exc}") from exc
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return out_dir / MANIFEST


def _foreign_entries(out_dir: Path) -> list[str]:
    """Names in ``out_dir`` that astsep did not write (to carry over); refuses a folder that is not
    empty and holds no astsep ``events.json``."""
    ours = _old_files(out_dir)
    has_manifest = _read_manifest(out_dir) is not None
    if (out_dir / MANIFEST).exists() and not has_manifest:
        raise OutputError(f"output folder {out_dir} holds an events.json that astsep did not write; "
                          "choose a new or empty --output")
    foreign = sorted(p.name for p in out_dir.iterdir()
                     if p.name not in ours and p.name != MANIFEST and not _is_temp(p.name))
    if foreign and not has_manifest:
        shown = ", ".join(foreign[:3]) + (", …" if len(foreign) > 3 else "")
        raise OutputError(f"output folder {out_dir} is not empty and holds no astsep events.json ({shown}); "
                          "astsep replaces its output folder as a whole: choose a new or empty --output")
    return foreign


def _is_temp(name: str) -> bool:
    """Temporary names of :func:`write_wav_atomic`/:func:`write_bytes_atomic` and in-place staging."""
    return name.startswith(IN_PLACE_STAGE) or (name.startswith(".") and name.endswith((".wav.tmp", ".flac.tmp", ".json.tmp")))


def _link_tree(src: Path, dst: Path) -> None:
    """Carry ``src`` to ``dst``: hard links for files (copies where linking fails), same tree."""
    def link_or_copy(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    if src.is_symlink():
        os.symlink(os.readlink(src), dst)
    elif src.is_dir():
        shutil.copytree(src, dst, symlinks=True, copy_function=link_or_copy)
    elif src.is_file():
        link_or_copy(str(src), str(dst))
    else:
        log.warning("not carrying special file %s into the new output folder", src)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically exchange two paths (Linux ``renameat2(RENAME_EXCHANGE)``, glibc ≥ 2.28; Python has
    no binding). False where the kernel, libc or filesystem cannot; raises ``OSError`` for real failures."""
    import ctypes
    import errno

    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _swap(stage: Path, out_dir: Path) -> None:
    """Put ``stage`` at ``out_dir``; the old folder ends at ``stage`` (exchange) or at the backup
    sibling (two renames; :func:`recover_output` puts it back when a run dies in between)."""
    if not _exchange(stage, out_dir):
        os.rename(out_dir, _sibling(out_dir, BACKUP_TAG))
        _checkpoint("between_renames")
        os.rename(stage, out_dir)
    fsync_path(out_dir.parent)


def _read_manifest(out_dir: Path) -> dict | None:
    """``out_dir``'s ``events.json`` when astsep wrote it (a dict with ``files`` and ``events``), else None."""
    try:
        data = json.loads((out_dir / MANIFEST).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("files"), list) or "events" not in data:
        return None
    return data


def _old_files(out_dir: Path) -> set[str]:
    """The file names the previous run's ``events.json`` lists (plain names only, never a path)."""
    data = _read_manifest(out_dir)
    if data is None:
        return set()
    return {n for n in data["files"] if isinstance(n, str) and n == Path(n).name and not n.startswith(".")}
