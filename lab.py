#!/usr/bin/env python3
"""One entry point for a fresh machine (Python and pip only): set up, run the demo, test, open the lab.

    python3 lab.py demo      # create .venv if needed, install, run the main job: the whole tiny pipeline
    python3 lab.py demo --from-assets   # the same table from the shipped checkpoints (under a minute)
    python3 lab.py test      # create .venv if needed, install, run the test suite (extra args go to pytest)
    python3 lab.py lab       # open the notebooks in JupyterLab
    python3 lab.py install [--gpu]

Design choices
- Standard library only, so it runs before anything is installed; `make demo|test|lab` are aliases.
- The CPU path installs a CPU build of torch: a wheel in pip's find-links if there is one, else (Linux)
  the PyTorch CPU index, since PyPI's Linux wheels are multi-GB CUDA builds. TWLAB_TORCH_INDEX overrides
  the index; `--gpu` installs PyPI's default torch and the `gpu` extra (vllm).
- Under a CPU quota smaller than the cores the machine shows (a container), OMP_NUM_THREADS is set to
  the quota for everything lab.py starts: torch would otherwise start a thread per visible core.
- Installs are remembered in .venv/.twlab-installed (a hash of pyproject.toml and the options), so a
  second run starts at once and an edit to the dependencies reinstalls.
"""

from __future__ import annotations

import glob
import hashlib
import os
import platform
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = Path(os.environ.get("TWLAB_VENV", ROOT / ".venv"))
TORCH_VERSION = "2.13.0"  # environment.yml pins the same (tests/test_packaging.py)
MIN_PYTHON = (3, 11)  # pyproject.toml's requires-python (tests/test_packaging.py)
EXTRAS = "notebooks,dev,math,tracking"  # pyproject extras installed for the demo, the tests and the notebooks
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def venv_python() -> Path:
    return VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def run(cmd: list[str], **kwargs) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, **kwargs)


def local_cpu_wheel() -> bool:
    """Is a CPU torch wheel of our version in pip's find-links (as on this project's machines)?"""
    for folder in os.environ.get("PIP_FIND_LINKS", "").split():
        if glob.glob(os.path.join(folder.removeprefix("file://"), f"torch-{TORCH_VERSION}+cpu-*.whl")):
            return True
    return False


def torch_install_args(gpu: bool) -> list[str]:
    if gpu:
        return ["torch"]
    args = [f"torch=={TORCH_VERSION}"]
    index = os.environ.get("TWLAB_TORCH_INDEX")
    if index is None and platform.system() == "Linux" and not local_cpu_wheel():
        index = CPU_INDEX
    if index:
        args += ["--index-url", index, "--extra-index-url", "https://pypi.org/simple"]
    return args


def install(gpu: bool = False) -> None:
    if sys.version_info < MIN_PYTHON:
        raise SystemExit(f"lab.py: Python {'.'.join(map(str, MIN_PYTHON))} or newer is needed (pyproject.toml "
                         f"requires-python); this is {platform.python_version()}: run lab.py with a newer python3")
    extras = EXTRAS + (",gpu" if gpu else "")
    stamp = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + extras.encode()).hexdigest()
    marker = VENV / ".twlab-installed"
    if marker.exists() and marker.read_text() == stamp and venv_python().exists():
        return
    if not venv_python().exists():
        print(f"creating the virtual environment {VENV.name}/", flush=True)
        venv.create(VENV, with_pip=True)
    pip = [venv_python(), "-m", "pip", "install", "--disable-pip-version-check"]
    probe = subprocess.run([venv_python(), "-c", "import torch"], capture_output=True)
    if probe.returncode != 0 or gpu:
        run(pip + torch_install_args(gpu))
    run(pip + ["-e", f".[{extras}]"], cwd=ROOT)
    marker.write_text(stamp)


def usable_cpus(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """CPUs this process may really use: its affinity, capped by a cgroup CPU quota (containers).

    torch and OpenMP size their thread pools from the cores they see, not from a quota; on a large host
    with a 2-CPU quota that means dozens of threads fighting over 2 CPUs' worth of time.
    """
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        if (cgroup / "cpu.max").exists():                        # cgroup v2: "quota period" or "max period"
            quota, period = (cgroup / "cpu.max").read_text().split()[:2]
        else:                                                    # cgroup v1: quota -1 means none
            quota = (cgroup / "cpu" / "cpu.cfs_quota_us").read_text().strip()
            period = (cgroup / "cpu" / "cpu.cfs_period_us").read_text().strip()
        if quota not in ("max", "-1"):
            n = min(n, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return n


def child_env() -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cpus = usable_cpus()
    if "OMP_NUM_THREADS" not in env and cpus < (os.cpu_count() or cpus):
        env["OMP_NUM_THREADS"] = str(cpus)  # inherited by notebook kernels and worker processes too
    return env


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(__doc__)
        return 0
    command, rest = argv[0], argv[1:]
    if command == "install":
        install(gpu="--gpu" in rest)
        return 0
    install()
    py = str(venv_python())
    env = child_env()
    if command == "demo":
        return subprocess.call([py, "-m", "twlib", "pipeline", *rest], cwd=ROOT, env=env)
    if command == "test":
        # what the tests ran on, in two lines that a CI log keeps
        print(f"CPUs: {usable_cpus()} usable of {os.cpu_count()}; OMP_NUM_THREADS="
              f"{env.get('OMP_NUM_THREADS', 'unset')}", flush=True)
        subprocess.call([py, "-c", "import platform, torch; print('python', platform.python_version(), 'torch', "
                         "torch.__version__, 'threads', torch.get_num_threads())"], cwd=ROOT, env=env)
        return subprocess.call([py, "-m", "pytest", *rest], cwd=ROOT, env=env)
    if command == "lab":
        return subprocess.call([py, "-m", "jupyterlab", "notebooks", *rest], cwd=ROOT, env=env)
    print(f"unknown command {command!r}: expected demo, test, lab or install", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
