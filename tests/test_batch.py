"""Batch mode (``batch.py`` over :mod:`astsep.batch`): two gloo processes on the CPU write what
``infer.py`` writes for the same inputs, skip what is already done when run again, and report a bad
file without losing the others."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import soundfile as sf

from astsep.batch import BatchItem, is_done, plan
from astsep.inputs import output_names

from conftest import ESC, ROOT, SEED_RECORDING

# one thread per process in both runs: float32 sums depend on how a reduction is split across threads
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _inputs(tmp: Path) -> list[Path]:
    """Four inputs: two share a stem (folder names dog_flac, dog_flac_2), one cannot be decoded."""
    (tmp / "a").mkdir()
    (tmp / "b").mkdir()
    dog = next(ESC.glob("dog__*.flac"))
    shutil.copy(dog, tmp / "a" / "dog.flac")
    shutil.copy(next(ESC.glob("rooster__*.flac")), tmp / "b" / "dog.flac")
    bad = tmp / "b" / "broken.wav"
    bad.write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot audio at all")
    return [tmp / "a" / "dog.flac", tmp / "b" / "dog.flac", bad, SEED_RECORDING]


def _run(script: str, args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, script, *args], capture_output=True, text=True, cwd=ROOT, env=ENV,
                          timeout=900)


def _content(folder: Path) -> dict:
    """What a user gets: events.json without its timings, and every listed file's samples."""
    data = json.loads((folder / "events.json").read_text())
    del data["stats"]["seconds"]
    samples = {n: sf.read(folder / n, dtype="float32")[0].tolist() for n in data["files"]}
    return {"manifest": data, "samples": samples}


def test_two_gloo_processes_write_what_infer_writes_and_a_restart_skips_what_is_done(tmp_path, tiny_model_dir, shared):
    inputs = [str(p) for p in _inputs(tmp_path)]
    common = ["-m", str(tiny_model_dir), "-q"]
    ref = _run("infer.py", ["-i", *inputs, "-o", str(tmp_path / "infer"), *common])
    assert ref.returncode == 1 and "broken.wav" in ref.stderr  # the bad file fails, the others are written
    out = tmp_path / "batch"
    proc = _run("batch.py", ["-i", *inputs, "-o", str(out), *common, "--accelerator", "cpu", "--devices", "2",
                             "--strategy", "ddp"])
    assert proc.returncode == 1, proc.stderr[-2000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("astsep: error:")]
    assert len(errors) == 1 and "broken.wav" in errors[0], proc.stderr[-2000:]
    report = json.loads((out / "batch_report.json").read_text())
    assert report["processes"] == 2 and sorted(report["done"]) == sorted(inputs[:2] + inputs[3:])
    assert [f["input"] for f in report["failed"]] == [inputs[2]] and report["skipped"] == []

    folders = sorted(p.name for p in (tmp_path / "infer").iterdir() if p.is_dir())
    assert folders == ["dog_flac", "dog_flac_2", "seed_recording_16k"]
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == folders
    for name in folders:
        assert _content(out / name) == _content(tmp_path / "infer" / name), name

    # a restart: one folder lost; only that input is separated again, the rest is left alone
    kept = {name: (out / name / "events.json").stat().st_mtime_ns for name in ("dog_flac", "seed_recording_16k")}
    shutil.rmtree(out / "dog_flac_2")
    again = _run("batch.py", ["-i", *inputs, "-o", str(out), *common, "--accelerator", "cpu", "--devices", "2",
                              "--strategy", "ddp"])
    report = json.loads((out / "batch_report.json").read_text())
    assert report["done"] == [inputs[1]] and sorted(report["skipped"]) == sorted([inputs[0], inputs[3]])
    assert again.returncode == 1 and [f["input"] for f in report["failed"]] == [inputs[2]]  # still broken
    assert {name: (out / name / "events.json").stat().st_mtime_ns for name in kept} == kept
    assert _content(out / "dog_flac_2") == _content(tmp_path / "infer" / "dog_flac_2")


def test_plan_names_folders_from_the_whole_list_and_skips_only_complete_outputs_of_the_same_input(tmp_path):
    inputs = [Path("x/a.wav"), Path("y/a.wav"), Path("y/A.flac"), Path("z/b.wav")]
    assert output_names(inputs) == ["a_wav", "a_wav_2", "A_flac", "b"]
    out = tmp_path / "out"
    todo, done = plan(inputs, out)
    assert [it.out_dir for it in todo] == [str(out / n) for n in ("a_wav", "a_wav_2", "A_flac", "b")] and done == []
    (out / "b").mkdir(parents=True)
    (out / "b" / "events.json").write_text(json.dumps({"stats": {"input": "z/b.wav"}}))
    (out / "a_wav").mkdir()
    (out / "a_wav" / "events.json").write_text(json.dumps({"stats": {"input": "elsewhere/a.wav"}}))  # not this input
    (out / "A_flac").mkdir()
    (out / "A_flac" / "events.json").write_text("{torn")
    todo, done = plan(inputs, out)
    assert [it.path for it in done] == ["z/b.wav"] and [it.index for it in todo] == [0, 1, 2]
    assert not is_done(BatchItem(0, "x/a.wav", str(out / "a_wav")))
    todo, done = plan(inputs, out, redo=True)
    assert len(todo) == 4 and done == []
