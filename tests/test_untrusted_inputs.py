"""Inputs that must not escape or exhaust (issue 21, items 5, 6, 7 and 10): output subfolder names
that always stay inside ``-o``, live WAV headers refused in bounded memory, YAML files whose every
problem is one line naming the file, file names that are not UTF-8, an input inside its own
output folder. Torch-free where the code under test is."""

from __future__ import annotations

import io
import os
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from astsep.capture import MAX_HEADER_BYTES, SKIP_BLOCK, StreamSource, read_wav_header
from astsep.errors import AudioError, ConfigError, OutputError
from astsep.inputs import check_inputs_outside_outputs, find_inputs, output_names, safe_name
from astsep.yamlfile import load_yaml

# --------------------------------------------------------------------------------------------------
# item 5: output subfolder names always inside -o
# --------------------------------------------------------------------------------------------------

ODD_NAMES = ["...wav", "..wav", ".wav", "...", "..", ".", "a/b.wav", "a\\b.wav", "x\x01y\x7f.wav", " .hid.wav",
             "tab\tname.wav", "new\nline.wav", "\u202egnp.wav", os.fsdecode(b"caf\xe9.wav"),
             os.fsdecode(b"\xff\xfe.wav"), "é" * 200 + ".wav", "a.wav", "A.wav", "a.flac"]


def test_every_output_subfolder_name_is_one_plain_name_inside_the_output_folder(tmp_path: Path) -> None:
    out = tmp_path / "results" / "batch2"
    names = output_names([Path(n) for n in ODD_NAMES])
    assert len(names) == len(ODD_NAMES) and len({n.casefold() for n in names}) == len(names), names
    for name in names:
        assert name not in ("", ".", "..") and not name.startswith(".") and "/" not in name and "\x00" not in name
        assert len(name.encode("utf-8")) <= 120 and name == name.strip()
        assert all(ch.isprintable() for ch in name), repr(name)
        name.encode("utf-8")  # no lone surrogate: printable, JSON-safe
        folder = (out / name).resolve()
        assert folder.parent == out.resolve(), (name, folder)
        folder.mkdir(parents=True)  # a real folder can be made under that name
    assert sorted(p.name for p in out.iterdir()) == sorted(names)
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == ["batch2"]  # nothing beside -o


@pytest.mark.parametrize("raw, expected", [("..", "input"), ("...", "input"), (".", "input"), ("a/..", "a_"),
                                            ("../../etc", "_.._etc"), ("", "input")])
def test_safe_name_never_gives_a_dot_name_or_a_path(raw: str, expected: str) -> None:
    assert safe_name(raw) == expected


def test_the_dot_dot_wav_case_of_the_issue_stays_inside_the_output_folder(tmp_path: Path) -> None:
    """Two inputs ``...wav`` and ``..wav`` with ``-o results/batch2``: before, they got the subfolders
    ``..`` and ``.``, so the second replaced an earlier run's files in ``results/``."""
    (tmp_path / "in").mkdir()
    for n in ("...wav", "..wav"):
        sf.write(tmp_path / "in" / n, np.zeros(160, np.float32), 16000, format="WAV")
    inputs = find_inputs([str(tmp_path / "in")])
    out_root = tmp_path / "results" / "batch2"
    dirs = [(out_root / n).resolve() for n in output_names(inputs)]
    assert all(d.parent == out_root.resolve() for d in dirs) and len(set(dirs)) == 2, dirs


# --------------------------------------------------------------------------------------------------
# item 10: names that are not UTF-8; an input inside the folder the run replaces
# --------------------------------------------------------------------------------------------------


def test_a_file_name_that_is_not_utf8_is_found_and_decoded(tmp_path: Path) -> None:
    from astsep.audio import load_audio

    sf.write(tmp_path / "tmp.wav", 0.1 * np.ones(1600, np.float32), 16000)
    os.rename(tmp_path / "tmp.wav", os.path.join(os.fsencode(tmp_path), b"caf\xe9.wav"))
    (found,) = find_inputs([str(tmp_path)])
    assert os.fsencode(found).endswith(b"caf\xe9.wav")
    x, info = load_audio(found)
    assert x.numel() == 1600 and info.sample_rate == 16000
    assert output_names([found]) == ["caf_"]


def test_an_input_inside_the_output_folder_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    own = out / "01_residual.wav"
    own.write_bytes(b"RIFF")
    with pytest.raises(OutputError, match="inside the output folder") as exc:
        check_inputs_outside_outputs([own], [out])
    assert "\n" not in str(exc.value)
    link = tmp_path / "link"
    link.symlink_to(out)
    with pytest.raises(OutputError):  # also through a symlink to the folder
        check_inputs_outside_outputs([link / "01_residual.wav"], [out])
    check_inputs_outside_outputs([tmp_path / "elsewhere.wav"], [out])  # beside it is fine
    check_inputs_outside_outputs([tmp_path / "outside.wav"], [tmp_path / "out2"])


# --------------------------------------------------------------------------------------------------
# item 6: live WAV headers
# --------------------------------------------------------------------------------------------------


def wav_header(rate: int = 16000, channels: int = 1, bits: int = 16, tag: int = 1, fmt_size: int = 16,
               before: bytes = b"", data: bytes = b"\x00\x00" * 160) -> bytes:
    block = channels * bits // 8
    fmt = struct.pack("<HHIIHH", tag, channels % 65536, rate % 2**32, (rate * block) % 2**32, block % 65536, bits)
    fmt = (fmt + b"\x00" * 64)[:fmt_size]
    body = b"WAVE" + before + b"fmt " + struct.pack("<I", fmt_size) + fmt + (b"\x00" if fmt_size & 1 else b"")
    body += b"data" + struct.pack("<I", 0xFFFFFFFF) + data
    return b"RIFF" + struct.pack("<I", 0xFFFFFFFF) + body


class WatchedStream(io.RawIOBase):
    """A pipe-like stream (no seek): ``parts`` in turn, each bytes or a count of zero bytes made as
    they are read; records the largest read asked of it."""

    def __init__(self, *parts: bytes | int) -> None:
        self.parts = list(parts)
        self.largest = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:  # type: ignore[override]
        n = len(buf)
        self.largest = max(self.largest, n)
        while self.parts:
            part = self.parts[0]
            if isinstance(part, int):
                k = min(n, part)
                buf[:k] = bytes(k)
                self.parts[0] = part - k
            else:
                k = min(n, len(part))
                buf[:k] = part[:k]
                self.parts[0] = part[k:]
            if not self.parts[0]:
                self.parts.pop(0)
            if k:
                return k
        return 0


def junk(size: int, present: int | None = None) -> bytes:
    return b"JUNK" + struct.pack("<I", size) + b"\x00" * (size if present is None else present)


CRAFTED = {
    "rate_4294967295": (wav_header(rate=4294967295), "4294967295 Hz is not usable"),
    "rate_0": (wav_header(rate=0), "0 Hz is not usable"),
    "rate_999": (wav_header(rate=999), "999 Hz is not usable"),
    "rate_400000": (wav_header(rate=400000), "400000 Hz is not usable"),
    "channels_0": (wav_header(channels=0), "0 channel(s) is not usable"),
    "channels_65": (wav_header(channels=65), "65 channel(s) is not usable"),
    "channels_65535": (wav_header(channels=65535), "65535 channel(s) is not usable"),
    "short_fmt_chunk": (wav_header(fmt_size=8), "fmt chunk is 8 bytes"),
    "huge_fmt_chunk": (wav_header(fmt_size=16)[:12] + b"fmt " + struct.pack("<I", 300_000_000), "fmt chunk is 300000000 bytes"),
    "extensible_without_subformat": (wav_header(tag=0xFFFE, fmt_size=18), "no sub-format"),
    "cut_at_30_bytes": (wav_header()[:30], "ended inside its fmt chunk"),
    "cut_at_8_bytes": (wav_header()[:8], "not a WAV stream"),
    "cut_before_data": (wav_header()[:36], "ended before its data chunk"),
    "no_fmt": (b"RIFF\xff\xff\xff\xffWAVEdata\xff\xff\xff\xff", "no fmt chunk"),
    "junk_300_mb": (b"RIFF\xff\xff\xff\xffWAVE" + junk(300_000_000, 0), "over 16 MiB"),
    "junk_cut_short": (b"RIFF\xff\xff\xff\xffWAVE" + junk(100_000, 10), "ended inside its 'JUNK' chunk"),
    "float_16_bits": (wav_header(tag=3, bits=16), "format 3 with 16 bits"),
}


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_a_crafted_live_wav_header_is_refused_in_one_line_and_bounded_memory(case: str) -> None:
    head, needle = CRAFTED[case]
    stream = WatchedStream(head)
    tracemalloc.start()
    try:
        with pytest.raises(AudioError) as exc:
            StreamSource(stream)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    message = str(exc.value)
    assert needle in message and "\n" not in message, message
    assert peak < 1 << 20, f"{peak / 2**20:.1f} MiB to refuse a header"
    assert stream.largest <= max(SKIP_BLOCK, 64), stream.largest


def test_chunks_before_the_data_are_skipped_by_streaming_and_the_samples_read() -> None:
    """A 10 MiB JUNK chunk (and a LIST) before fmt: skipped 64 KiB at a time, then the samples."""
    samples = (np.arange(320, dtype="<i2") * 50).tobytes()
    size = 10 * 2**20
    after = b"LIST" + struct.pack("<I", 5) + b"abcde\x00"
    head = wav_header(rate=48000, channels=2, before=b"JUNK" + struct.pack("<I", size) + b"@@@@" + after, data=samples)
    cut = head.index(b"@@@@")
    stream = WatchedStream(head[:cut], size, head[cut + 4:])
    tracemalloc.start()
    try:
        source = StreamSource(stream)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (source.sample_rate, source.channels, source.format) == (48000, 2, "s16le")
    assert peak < 1 << 20 and stream.largest <= SKIP_BLOCK
    x = np.concatenate(list(source))
    assert x.shape == (160, 2) and np.allclose(x.reshape(-1) * 32768, np.arange(320) * 50)


def test_the_header_bound_is_large_enough_for_real_metadata() -> None:
    head = wav_header(before=junk(2**20))
    assert read_wav_header(io.BytesIO(head)) == ("s16le", 16000, 1)
    assert MAX_HEADER_BYTES >= 2**20


def test_the_live_cli_refuses_a_crafted_stdin_header_in_one_line(tmp_path: Path, tiny_model_dir: Path) -> None:
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(root / "infer.py"), "--live", "-", "-m", str(tiny_model_dir), "-q"],
                          input=wav_header(rate=4294967295), capture_output=True, timeout=240,
                          env=dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(root)))
    err = proc.stderr.decode()
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("astsep: error: ") and "4294967295 Hz is not usable" in lines[0]


# --------------------------------------------------------------------------------------------------
# item 7: YAML files: one line naming the file and what is wrong
# --------------------------------------------------------------------------------------------------

BAD_YAML = {
    "latin1": ("rate: 16000\nname: caf\xe9\n".encode("latin-1"), "is not UTF-8 text (byte 0xe9 at line 2, column 10)"),
    "syntax": (b"separator:\n  max_passes: [1, 2\n  x: y\n", "is not valid YAML: "),
    "tab_indent": (b"separator:\n\tmax_passes: 2\n", "is not valid YAML: "),
    "a_list": (b"- 1\n- 2\n", "must hold a mapping (key: value lines) at the top level, not a list"),
    "a_scalar": (b"hello\n", "must hold a mapping (key: value lines) at the top level, not a str"),
    "nul_byte": (b"a: 1\n\x00", "holds a NUL byte"),
    "too_deep": (b"[" * 50_000, "nested too deeply"),
    "too_big": (b"a: 1\n" + b"#" * (1 << 20), "is larger than 1024 KiB"),
}


@pytest.mark.parametrize("case", sorted(BAD_YAML))
@pytest.mark.parametrize("what", ["config", "mic_geometry", "stem_map"])
def test_a_bad_yaml_file_is_one_line_naming_the_file(tmp_path: Path, case: str, what: str) -> None:
    data, needle = BAD_YAML[case]
    path = tmp_path / f"{case}.yaml"
    path.write_bytes(data)
    if what == "config":
        from astsep.config import load_config as load
    elif what == "mic_geometry":
        from astsep.doa import load_geometry as load
    else:
        from astsep.stems import load_stem_map as load
    with pytest.raises(ConfigError) as exc:
        load(str(path))
    message = str(exc.value)
    assert needle in message and str(path) in message and "\n" not in message, message


def test_a_yaml_syntax_error_says_where(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_bytes(b"a: 1\nb: [1, 2\nc: 3\n")
    with pytest.raises(ConfigError, match=r"at line 3, column 2$"):
        load_yaml(path, what="config file")


def test_a_stem_map_that_is_a_list_or_has_a_list_for_stems_is_a_config_error(tmp_path: Path) -> None:
    from astsep.stems import load_stem_map

    for text in ("- vocals\n- drums\n", "stems: [1, 2]\n", "stems:\n  vocals: 3\n", "- {a: 1}\n", "1: [2]\n"):
        path = tmp_path / "m.yaml"
        path.write_text(text)
        with pytest.raises(ConfigError) as exc:
            load_stem_map(path)
        assert "\n" not in str(exc.value)


def test_a_good_yaml_file_still_loads(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_bytes("\ufeffname: café\n".encode("utf-8"))
    assert load_yaml(path, what="config file") == {"name": "café"}
    (tmp_path / "e.yaml").write_text("")
    assert load_yaml(tmp_path / "e.yaml", what="config file") == {}


# --------------------------------------------------------------------------------------------------
# item 10: crafted checkpoints and pickle weights are one line, and never run
# --------------------------------------------------------------------------------------------------


class _Evil:
    """A pickle that would write a file when unpickled by a loader that trusts it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"echo PWNED > {self.marker}",))


def _run(args: list[str]) -> tuple[int, list[str], str]:
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, cwd=str(root),
                          env=dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(root)))
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip() and "Writing model shards" not in ln]
    return proc.returncode, lines, proc.stderr


@pytest.mark.parametrize("kind", ["code_running_pickle", "random_bytes"])
def test_evaluate_refuses_a_crafted_refiner_checkpoint_in_one_line(tmp_path: Path, kind: str) -> None:
    import torch

    ckpt, marker = tmp_path / "evil.ckpt", tmp_path / "pwned"
    if kind == "code_running_pickle":
        torch.save({"state_dict": _Evil(marker)}, ckpt)
    else:
        ckpt.write_bytes(np.random.default_rng(0).bytes(4096))
    rc, lines, err = _run(["-m", "astsep.evaluate", "--heldout", "-n", "2", "--out",  # valid mixtures: the
                           str(tmp_path / "o"), "--refiner", str(ckpt)])  # checkpoint is what fails
    assert rc == 3 and len(lines) == 1 and "Traceback" not in err, err
    assert f"cannot read refiner checkpoint {ckpt}" in lines[0] and "unpickling refused" in lines[0], lines
    assert not marker.exists()


def test_a_crafted_pickle_model_with_allow_pickle_is_one_line(tmp_path: Path, tiny_model_dir: Path) -> None:
    import shutil

    import torch

    model, marker = tmp_path / "model", tmp_path / "pwned"
    shutil.copytree(tiny_model_dir, model)
    for f in model.glob("*.safetensors"):
        f.unlink()
    torch.save({"weights": _Evil(marker)}, model / "pytorch_model.bin")
    wav = tmp_path / "in.wav"
    sf.write(wav, 0.1 * np.ones(16000, np.float32), 16000)
    rc, lines, err = _run(["infer.py", "-i", str(wav), "-o", str(tmp_path / "out"), "-m", str(model),
                           "--allow-pickle", "-q"])
    assert rc == 3 and len(lines) == 1 and "Traceback" not in err and "internal error" not in err, err
    assert lines[0].startswith("astsep: error: --model: cannot load AST model") and "weights file was refused" in lines[0]
    assert "posix.system" in lines[0] and not marker.exists()
