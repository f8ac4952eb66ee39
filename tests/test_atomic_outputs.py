"""Outputs are all or nothing: a run killed (SIGKILL) at any moment leaves the previous complete
output folder or the new complete one, never a mix and never a truncated file; two runs into the
same folder never corrupt each other; the user's own files survive.

The kill tests run a small writer in a subprocess (no model: a hand-made SeparationResult) that
kills itself at a named point of the write sequence (``outputs._checkpoint``), and a writer that
is killed from outside at random moments while it rewrites the folder again and again.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from astsep import outputs
from astsep.errors import OutputError
from astsep.outputs import MANIFEST, OLD_INNER_LOCK, output_lock, write_outputs
from astsep.pipeline import SeparationResult, Track

from conftest import ROOT, SEED_RECORDING
from infer_run import infer

WRITER = textwrap.dedent("""
    import os, signal, sys
    import torch
    from pathlib import Path
    from astsep import outputs
    from astsep.outputs import write_outputs
    from astsep.pipeline import SeparationResult, Track

    out, kill_at, exchange, gens = sys.argv[1], sys.argv[2], sys.argv[3] == "1", int(sys.argv[4])
    if not exchange:
        outputs._exchange = lambda a, b: False
    if kill_at != "-":
        def checkpoint(name):
            if name == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
        outputs._checkpoint = checkpoint

    def result(gen):
        # generation g: g+1 sources of length 8000*(g+1) samples plus the residual
        n = 8000 * (gen + 1)
        g = torch.Generator().manual_seed(gen)
        x = torch.randn(n, generator=g) * 0.1
        tracks = [Track(k, f"gen{gen}_src{k}", k, "source", [(0, x * 0.1)]) for k in range(gen + 1)]
        tracks.append(Track(gen + 1, "residual", -1, "residual"))
        return SeparationResult(f"gen{gen}", x, tracks, [{"event_id": f"g{gen}"}], {"seconds": {}, "gen": gen})

    print("ready", flush=True)
    for gen in range(1, gens + 1) if gens > 1 else [int(os.environ.get("GEN", "1"))]:
        write_outputs(result(gen), Path(out))
""")


def run_writer(tmp_path: Path, out: Path, kill_at: str = "-", exchange: bool = True, gen: int = 1,
               gens: int = 1) -> subprocess.CompletedProcess:
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    env = dict(os.environ, GEN=str(gen), PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, str(script), str(out), kill_at, "1" if exchange else "0", str(gens)],
                          capture_output=True, text=True, env=env, timeout=120)


def folder_generation(out: Path) -> int:
    """The generation a complete output folder holds; fails on any mix or truncated file."""
    manifest = json.loads((out / MANIFEST).read_text())
    gen = manifest["stats"]["gen"]
    assert manifest["files"] == [f"{k:02d}_gen{gen}_src{k}.wav" for k in range(gen + 1)] + [f"{gen + 1:02d}_residual.wav"]
    wavs = sorted(p.name for p in out.iterdir() if p.suffix == ".wav")
    assert wavs == sorted(manifest["files"]), "files of another run in the folder"
    total = 0
    for name in manifest["files"]:
        data, sr = sf.read(out / name, dtype="float64")
        assert sr == 16000 and data.shape == (8000 * (gen + 1),), name
        total = total + data
    g = torch.Generator().manual_seed(gen)
    x = (torch.randn(8000 * (gen + 1), generator=g) * 0.1).double().numpy()
    np.testing.assert_allclose(total, x, atol=1e-5)
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp") or p.name.startswith(".astsep-stage")]
    return gen


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


POINTS = {True: ["staging", "wrote:00_gen2_src0.wav", "staged", "swapped"],  # renameat2(RENAME_EXCHANGE)
          False: ["staged", "between_renames", "done"]}  # two renames


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two_renames"])
def test_a_run_killed_at_any_point_leaves_the_old_or_the_new_complete_folder(tmp_path, exchange):
    out = tmp_path / "out"
    assert run_writer(tmp_path, out, gen=1).returncode == 0
    assert folder_generation(out) == 1
    for point in POINTS[exchange]:
        proc = run_writer(tmp_path, out, kill_at=point, exchange=exchange, gen=2)
        assert proc.returncode == -signal.SIGKILL, (point, proc.stderr)
        if point == "between_renames":
            assert not out.exists()  # the old folder waits in the backup sibling …
        else:
            assert folder_generation(out) == (2 if point in ("swapped", "done") else 1), point
        with output_lock(out):  # … and the next run restores it and removes every leftover
            pass
        assert folder_generation(out) == (2 if point in ("swapped", "done") else 1), point
        assert leftovers(out) == []
        if point in ("swapped", "done"):  # back to generation 1 for the next point
            assert run_writer(tmp_path, out, gen=1).returncode == 0


def test_a_writer_killed_at_random_moments_never_leaves_a_mix(tmp_path):
    out = tmp_path / "out"
    rnd = random.Random(7)
    seen = set()
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for _ in range(5):
        proc = subprocess.Popen([sys.executable, str(script), str(out), "-", "1", "40"], stdout=subprocess.PIPE,
                                env=env)
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(rnd.uniform(0.05, 1.0))
        proc.kill()
        proc.wait()
        if out.exists() and (out / MANIFEST).exists():
            seen.add(folder_generation(out))
        with output_lock(out):
            pass
        if (out / MANIFEST).exists():
            folder_generation(out)
        assert leftovers(out) == []
    assert len(seen) >= 2  # the kills landed in different generations


def test_the_cli_killed_before_the_swap_keeps_the_previous_outputs(tmp_path, tiny_model_dir, shared):
    out = tmp_path / "out"
    short = tmp_path / "short.wav"
    x, _ = sf.read(SEED_RECORDING, dtype="float32")
    sf.write(short, x[:16000], 16000, subtype="FLOAT")
    assert infer("-i", str(short), "-o", str(out), "-m", str(tiny_model_dir), "-q").returncode == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    code = ("import os, signal, sys; from astsep import outputs\n"
            "outputs._checkpoint = lambda n: n == 'staged' and os.kill(os.getpid(), signal.SIGKILL)\n"
            "from astsep.frontends.infer import main; sys.exit(main(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", code, "-i", str(SEED_RECORDING), "-o", str(out), "-m",
                           str(tiny_model_dir), "-q"], cwd=str(ROOT), capture_output=True,
                          env=dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT)), timeout=240)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert leftovers(out)  # the staging folder of the killed run …
    with output_lock(out):  # … which the next run removes
        pass
    assert leftovers(out) == [] and {p.name: p.read_bytes() for p in out.iterdir()} == before


def _result(n: int = 1600, label: str = "Dog") -> SeparationResult:
    x = torch.linspace(-0.5, 0.5, n)
    tracks = [Track(0, label, 74, "source", [(0, x * 0.5)]), Track(1, "residual", -1, "residual")]
    return SeparationResult("t", x, tracks, [], {"seconds": {}})


def test_a_second_run_while_the_folder_is_locked_is_refused_and_changes_nothing(tmp_path):
    out = tmp_path / "out"
    write_outputs(_result(label="Dog"), out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with output_lock(out):
        with pytest.raises(OutputError, match="another astsep run"):
            write_outputs(_result(label="Cat"), out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_the_lock_lives_beside_the_folder_and_an_old_inner_lock_file_is_not_carried_over(tmp_path):
    """The lock guards the folder's name, so a swap never moves it; it is gone once the run ends."""
    out = tmp_path / "out"
    write_outputs(_result(), out)
    (out / OLD_INNER_LOCK).write_text("")  # what earlier versions left inside out/
    with output_lock(out):
        assert leftovers(out) == [f".out{outputs.LOCK_TAG}"]
    write_outputs(_result(label="Cat"), out)
    assert sorted(p.name for p in out.iterdir()) == ["00_Cat.wav", "01_residual.wav", MANIFEST]
    assert leftovers(out) == []


def test_concurrent_writers_never_corrupt_the_folder(tmp_path):
    out = tmp_path / "out"
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    procs = [subprocess.Popen([sys.executable, str(script), str(out), "-", "1", "12"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    errs = [p.communicate(timeout=120)[1] for p in procs]
    for p, err in zip(procs, errs):  # each run wrote, or was refused with the lock error
        assert p.returncode == 0 or "another astsep run is writing" in err, err
    folder_generation(out)
    assert leftovers(out) == []


def test_user_files_in_the_output_folder_are_kept_and_old_outputs_replaced(tmp_path):
    out = tmp_path / "out"
    write_outputs(_result(label="Dog"), out)
    (out / "notes.txt").write_text("mine")
    (out / "sub").mkdir()
    (out / "sub" / "a.txt").write_text("also mine")
    os.symlink("notes.txt", out / "link")
    write_outputs(_result(label="Cat"), out)
    assert (out / "notes.txt").read_text() == "mine" and (out / "sub" / "a.txt").read_text() == "also mine"
    assert os.readlink(out / "link") == "notes.txt"
    assert not (out / "00_Dog.wav").exists() and (out / "00_Cat.wav").is_file()
    assert json.loads((out / MANIFEST).read_text())["files"] == ["00_Cat.wav", "01_residual.wav"]


def test_a_non_empty_folder_astsep_did_not_write_is_refused(tmp_path):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(OutputError, match="not empty"):
        write_outputs(_result(), out)
    assert sorted(p.name for p in out.iterdir()) == ["holiday.jpg"]
    assert leftovers(out) == []


def test_a_symlinked_output_folder_stays_a_symlink(tmp_path):
    real = tmp_path / "real"
    write_outputs(_result(label="Dog"), real)
    os.symlink(real, tmp_path / "out")
    write_outputs(_result(label="Cat"), tmp_path / "out")
    assert (tmp_path / "out").is_symlink() and (real / "00_Cat.wav").is_file()


def test_without_rename_exchange_two_renames_give_the_same_result(tmp_path, monkeypatch):
    monkeypatch.setattr(outputs, "_exchange", lambda a, b: False)
    out = tmp_path / "out"
    write_outputs(_result(label="Dog"), out)
    write_outputs(_result(label="Cat"), out)
    assert json.loads((out / MANIFEST).read_text())["files"] == ["00_Cat.wav", "01_residual.wav"]
    assert leftovers(out) == []


def test_a_failing_write_leaves_the_previous_folder(tmp_path, monkeypatch):
    out = tmp_path / "out"
    write_outputs(_result(label="Dog"), out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def disk_full(path, x, sample_rate=16000):
        raise OutputError(f"cannot write {path}: No space left on device")

    monkeypatch.setattr(outputs, "write_wav_atomic", disk_full)
    with pytest.raises(OutputError, match="No space"):
        write_outputs(_result(label="Cat"), out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert leftovers(out) == []


@pytest.mark.parametrize("where", ["out", "out/sub"], ids=["cwd_is_out", "cwd_inside_out"])
def test_output_into_the_working_directory_keeps_that_folder_in_place(tmp_path, monkeypatch, where):
    """`infer.py -o .`: the shell that started the run stays in a live folder, the same one."""
    out = tmp_path / "out"
    write_outputs(_result(label="Dog"), out)
    (out / "sub").mkdir()  # the user's own folder inside, carried over by a swap as a *new* folder
    cwd = tmp_path / where
    monkeypatch.chdir(cwd)
    fd = os.open(cwd, os.O_RDONLY)  # what a shell sitting in the folder holds
    try:
        ino = os.fstat(fd).st_ino
        write_outputs(_result(label="Cat"), Path("." if where == "out" else ".."))
        assert os.fstat(fd).st_nlink > 0, "the working directory was deleted"
        assert os.stat(cwd).st_ino == ino and os.stat(".").st_ino == ino
    finally:
        os.close(fd)
    assert json.loads((out / MANIFEST).read_text())["files"] == ["00_Cat.wav", "01_residual.wav"]
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".wav") == ["00_Cat.wav", "01_residual.wav"]
    assert (out / "sub").is_dir() and leftovers(out) == []


def test_infer_with_output_dot_leaves_the_shell_in_the_same_live_folder(tmp_path, tiny_model_dir, shared):
    out = tmp_path / "here"
    out.mkdir()
    fd = os.open(out, os.O_RDONLY)  # the user's shell, sitting in the folder
    try:
        ino = os.fstat(fd).st_ino
        for _ in range(2):  # a first run into the empty folder, and a second that replaces its outputs
            proc = subprocess.run([sys.executable, str(ROOT / "infer.py"), "-i", str(SEED_RECORDING), "-o", ".",
                                   "-m", str(tiny_model_dir), "-q"], capture_output=True, text=True, cwd=out,
                                  timeout=300, env=dict(os.environ, HF_HUB_OFFLINE="1"))
            assert proc.returncode == 0, proc.stderr[-1500:]
            assert os.fstat(fd).st_nlink > 0 and os.stat(out).st_ino == ino
    finally:
        os.close(fd)
    assert (out / MANIFEST).is_file() and leftovers(out) == []


class _Killed(Exception):
    """Stands for SIGKILL at a checkpoint: what is on disk at that moment stays as it is."""


def test_per_file_replace_alone_mixes_two_runs_when_killed_between_files(tmp_path, monkeypatch):
    """Why the folder is swapped as a whole: renaming the files into it one by one, ``events.json``
    last (all that is possible for ``-o .``), leaves the old ``events.json`` beside a new file of the
    same name when the run dies between two files. The swap has no such moment (the kill tests above)."""
    out = tmp_path / "out"
    write_outputs(_result(n=1600), out)
    monkeypatch.chdir(out)  # the working directory: written in place

    def killed_after_first_file(name: str) -> None:
        if name == "replaced:00_Dog.wav":
            raise _Killed

    monkeypatch.setattr(outputs, "_checkpoint", killed_after_first_file)
    with pytest.raises(_Killed):
        write_outputs(_result(n=3200), out)
    listed = json.loads((out / MANIFEST).read_text())["files"]
    assert {name: sf.info(str(out / name)).frames for name in listed} == {"00_Dog.wav": 3200, "01_residual.wav": 1600}
