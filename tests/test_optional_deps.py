"""Optional dependencies: separation works without laion-clap, torchvision and wandb (the ``clap`` and
``wandb`` extras), and a feature that needs one of them says which extra to install, in one line."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT, SEED_RECORDING

EXTRAS = ("laion_clap", "torchvision", "wandb")
# Runs the rest of argv (a script, `-m module` or `-c code`) as if EXTRAS were not installed: a None
# entry in sys.modules makes every `import name` raise ModuleNotFoundError (and find_spec say None), and
# their distributions' metadata is gone (torchmetrics asks importlib.metadata whether torchvision is there).
WITHOUT = f"""
import importlib.metadata as md, runpy, sys
for name in {EXTRAS!r}:
    sys.modules[name] = None
_distribution = md.distribution
def distribution(name):
    if name.lower().replace("-", "_") in {EXTRAS!r}:
        raise md.PackageNotFoundError(name)
    return _distribution(name)
md.distribution = distribution
md.version = lambda name: distribution(name).version
args = sys.argv[1:]
if args[0] == "-c":
    sys.argv = ["-c"] + args[2:]
    exec(compile(args[1], "<test>", "exec"), {{"__name__": "__main__"}})
elif args[0] == "-m":
    sys.argv = args[1:]
    runpy.run_module(args[1], run_name="__main__", alter_sys=True)
else:
    sys.argv = args
    runpy.run_path(args[0], run_name="__main__")
"""


def without_extras(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WITHOUT, *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(ROOT),
                                                "MPLBACKEND": "Agg"})


def test_the_package_imports_without_the_extras():
    code = ("import astsep, astsep.pipeline, astsep.frontends.infer, astsep.refiner, astsep.query, astsep.lit, astsep.embed\n"
            "import sys\n"
            f"print([m for m in {EXTRAS!r} if sys.modules.get(m) is not None])")
    proc = without_extras("-c", code)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stderr[-1500:]


def test_infer_separates_without_the_extras(tmp_path, tiny_model_dir, shared):
    out = tmp_path / "out"
    proc = without_extras(str(ROOT / "infer.py"), "-i", str(SEED_RECORDING), "-o", str(out), "-m", str(tiny_model_dir),
                          "-q")
    assert proc.returncode == 0, proc.stderr[-1500:]
    assert (out / "events.json").is_file()


def test_clap_queries_without_laion_clap_name_the_clap_extra(tmp_path):
    ckpt = tmp_path / "630k-audioset-best.pt"
    ckpt.write_bytes(b"not needed: the missing package is reported first")
    csv = tmp_path / "captions.csv"
    csv.write_text("caption\na dog barking\n")
    proc = without_extras("-m", "astsep.embed", "--csv", str(csv), "--out", str(tmp_path / "t.pt"),
                          "--clap-ckpt", str(ckpt))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-1500:]
    assert "laion_clap is not installed" in lines[0] and "pip install 'astsep[clap]'" in lines[0]


def test_training_with_the_wandb_logger_without_wandb_names_the_extra_and_the_way_around(tmp_path, shared):
    proc = without_extras(str(ROOT / "train.py"), "fit", "--config", "configs/refiner_tiny.yaml",
                          "--trainer.max_steps=1", f"--trainer.default_root_dir={tmp_path}")
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stderr[-1500:]
    assert "Traceback" not in proc.stderr and "pip install 'astsep[wandb]'" in lines[-1], proc.stderr[-1500:]
    assert "--trainer.logger=CSVLogger" in lines[-1]  # the way around it (checked by hand: trains without wandb)
    assert not list(tmp_path.rglob("*.ckpt"))
