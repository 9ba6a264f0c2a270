"""tmd installed like a library: a wheel, installed non-editable into a fresh virtual environment, run from a
directory outside the repository (its configs and world assets must come from the package data)."""

import os
import subprocess
import sys
import venv
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run(args, cwd, env, timeout=600):
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(map(str, args))} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def test_a_wheel_installs_and_runs_from_any_directory(tmp_path):
    wheels = tmp_path / "wheels"
    # no build isolation, no dependencies: the wheel is built and installed from what this environment has
    run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(REPO)],
        tmp_path,
        os.environ,
    )
    (wheel,) = wheels.glob("tmd-*.whl")
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(env_dir)
    python, tmd = env_dir / "bin" / "python", env_dir / "bin" / "tmd"
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q", str(wheel)],
        tmp_path,
        clean,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = run([str(python), "-c", "import tmd; print(tmd.__file__)"], elsewhere, clean)
    assert where.strip().startswith(str(env_dir)), f"the venv imports tmd from {where.strip()}, not from the wheel"
    assert "usage: tmd" in run([str(tmd), "--help"], elsewhere, clean)
    bench = run([str(tmd), "bench", "--quick", "--repeats", "1", "--json", "bench.json"], elsewhere, clean)
    assert "teacher" in bench and (elsewhere / "bench.json").is_file()
    overrides = ["train.steps=1", "train.batch_size=2", "train.progress=false", "train.out_dir=run", "--threads", "1"]
    run([str(tmd), "train", "--config", "world_dmd2.yaml", *overrides], elsewhere, clean)
    assert (elsewhere / "run" / "student.safetensors").is_file()
