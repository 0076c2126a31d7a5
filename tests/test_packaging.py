"""Set-up files agree: environment.yml installs the same packages as pyproject.toml; lab.py is sane."""

import importlib.util
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def normalise(req: str) -> str:
    return req.replace(" ", "").lower()


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + project["optional-dependencies"]["notebooks"] + \
        project["optional-dependencies"]["dev"]
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    listed = [p for p in pip if not p.startswith("-e")]
    assert sorted(map(normalise, listed)) == sorted(map(normalise, wanted))
    assert "-e ." in pip
    assert any(str(d).startswith("python>=" + project["requires-python"].removeprefix(">="))
               for d in env["dependencies"])


def load_lab():
    spec = importlib.util.spec_from_file_location("lab", ROOT / "lab.py")
    lab = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lab)
    return lab


def test_lab_caps_threads_at_a_cpu_quota(monkeypatch, tmp_path):
    lab = load_lab()
    (tmp_path / "cpu.max").write_text("200000 100000\n")            # cgroup v2: 2 CPUs' worth of time
    assert lab.usable_cpus(tmp_path) == min(2, len(lab.os.sched_getaffinity(0)))
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert lab.usable_cpus(tmp_path) == len(lab.os.sched_getaffinity(0))
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")   # cgroup v1: 1 CPU
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert lab.usable_cpus(tmp_path) == 1
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(lab, "usable_cpus", lambda: 2)
    monkeypatch.setattr(lab.os, "cpu_count", lambda: 64)
    assert lab.child_env()["OMP_NUM_THREADS"] == "2"                 # a quota below the visible cores
    monkeypatch.setattr(lab.os, "cpu_count", lambda: 2)
    assert "OMP_NUM_THREADS" not in lab.child_env()                   # no quota: torch's own choice
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    monkeypatch.setattr(lab.os, "cpu_count", lambda: 64)
    assert lab.child_env()["OMP_NUM_THREADS"] == "7"                 # the user's setting wins


def test_lab_picks_a_cpu_torch(monkeypatch, tmp_path):
    lab = load_lab()
    monkeypatch.delenv("TWLAB_TORCH_INDEX", raising=False)
    monkeypatch.setattr(lab.platform, "system", lambda: "Linux")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    assert lab.CPU_INDEX in lab.torch_install_args(gpu=False)  # no local wheel: the CPU index
    (tmp_path / f"torch-{lab.TORCH_VERSION}+cpu-cp311-cp311-manylinux_2_28_x86_64.whl").write_bytes(b"")
    assert lab.torch_install_args(gpu=False) == [f"torch=={lab.TORCH_VERSION}"]
    monkeypatch.setattr(lab.platform, "system", lambda: "Darwin")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    assert lab.torch_install_args(gpu=False) == [f"torch=={lab.TORCH_VERSION}"]  # macOS wheels are CPU
    assert lab.torch_install_args(gpu=True) == ["torch"]


def test_readme_names_the_commands():
    readme = (ROOT / "README.md").read_text()
    for command in ("python3 lab.py demo", "python3 lab.py test", "python3 lab.py lab"):
        assert command in readme
    assert "python3 lab.py test" in (ROOT / ".ci" / "run").read_text()
