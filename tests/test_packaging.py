"""Set-up files agree: environment.yml installs the same packages as pyproject.toml; lab.py is sane."""

import importlib.util
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def normalise(req: str) -> str:
    return req.replace(" ", "").lower()


def pip_lines() -> list[str]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    return next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)


def test_environment_yml_matches_pyproject():
    """environment.yml = pyproject's dependencies + every extra lab.py installs; torch is the CPU build
    lab.py installs, reachable by `conda env create` (an index line in the pip list, not a comment)."""
    from packaging.requirements import Requirement

    lab = load_lab()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = lab.EXTRAS.split(",")
    assert set(extras) <= set(project["optional-dependencies"]), extras
    wanted = project["dependencies"] + [r for e in extras for r in project["optional-dependencies"][e]]
    pip = pip_lines()
    options = [p for p in pip if p.startswith("--")]
    listed = [p for p in pip if not p.startswith("-")]
    assert "-e ." in pip
    # conda hands the list to `pip install -r`: the CPU index is an extra index (PyPI stays for the rest),
    # and pip then prefers torch==X+cpu over PyPI's CUDA X (a local version sorts after the plain one)
    assert options == [f"--extra-index-url {lab.CPU_INDEX}"]
    torch_pin = next(Requirement(r) for r in listed if Requirement(r).name == "torch")
    torch_range = next(Requirement(r) for r in wanted if Requirement(r).name == "torch")
    assert str(torch_pin.specifier) == f"=={lab.TORCH_VERSION}"
    assert torch_range.specifier.contains(lab.TORCH_VERSION)
    others = lambda reqs: sorted(normalise(r) for r in reqs if Requirement(r).name != "torch")
    assert others(listed) == others(wanted)
    # one Python floor everywhere: pyproject, environment.yml, lab.py (3.11: tomllib, this very test)
    floor = project["requires-python"].removeprefix(">=")
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert f"python>={floor}" in env["dependencies"]
    assert tuple(int(x) for x in floor.split(".")) == lab.MIN_PYTHON == (3, 11)


IMPORT_NAMES = {"pyyaml": "yaml", "math-verify": "math_verify", "jupyterlab": None, "ipykernel": None,
                "ipywidgets": "ipywidgets", "pytest": "pytest", "vllm": "vllm"}


def test_every_declared_package_is_used_and_every_used_one_declared():
    """No dead dependencies (accelerate, nbmake were), and the packages twlib imports are declared."""
    import re

    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    sources = "\n".join(p.read_text(errors="replace") for folder in ("twlib", "tests", "scripts", "benchmarks",
                                                                     "notebooks")
                         for p in sorted((ROOT / folder).rglob("*")) if p.suffix in (".py", ".ipynb"))
    declared = project["dependencies"] + [r for reqs in project["optional-dependencies"].values() for r in reqs]
    for req in declared:
        name = Requirement(req).name.lower()
        module = IMPORT_NAMES.get(name, name.replace("-", "_"))
        if module is None:  # tools, not imported (jupyterlab, ipykernel)
            continue
        assert re.search(rf"\b(import|from) {module}\b", sources), f"{req} is declared but never imported"
    names = {Requirement(r).name.lower() for r in declared}
    for module, package in (("pyarrow", "pyarrow"), ("math_verify", "math-verify"), ("yaml", "pyyaml")):
        assert package in names, f"twlib imports {module}: declare {package}"
    assert "accelerate" not in names and "nbmake" not in names


def test_math_grader_is_an_extra_the_configs_name():
    """task: math needs math-verify: the `math` extra, named by every config that grades with it."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert [r for r in project["optional-dependencies"]["math"] if r.startswith("math-verify")]
    assert not any(r.startswith("math-verify") for r in project["dependencies"] + project["optional-dependencies"]["dev"])
    math_configs = [p for p in (ROOT / "configs").glob("*.yaml")
                    if any(line.split("#")[0].split() == ["task:", "math"] for line in p.read_text().splitlines())]
    assert math_configs
    for path in math_configs:
        assert '.[math]' in path.read_text(), f"{path.name} grades with math-verify but does not name the math extra"
    assert '.[math]' in (ROOT / "twlib" / "rewards.py").read_text()


def test_cli_version_and_fast_help():
    """`python -m twlib --version` / `--help` answer without importing torch (measured: 2.0 s -> 0.08 s)."""
    import subprocess
    import sys

    import twlib

    code = ("import sys, runpy; sys.argv = ['twlib', '{arg}']\n"
            "try:\n    runpy.run_module('twlib', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')")
    for arg in ("--version", "--help"):
        out = subprocess.run([sys.executable, "-c", code.format(arg=arg)], capture_output=True, text=True,
                             cwd=ROOT, timeout=120)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip().endswith("NO-TORCH"), out.stdout
    version = subprocess.run([sys.executable, "-m", "twlib", "--version"], capture_output=True, text=True, cwd=ROOT,
                             timeout=120)
    assert version.stdout.strip() == f"twlib {twlib.__version__}"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["version"] == twlib.__version__
    helped = subprocess.run([sys.executable, "-m", "twlib", "--help"], capture_output=True, text=True, cwd=ROOT,
                            timeout=120).stdout
    for command in ("sft", "pgrpo", "plan", "prepare-model", "serve", "prompts"):
        assert command in helped


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


def test_ci_fetches_the_real_tokenizer_before_the_tests():
    ci = (ROOT / ".ci" / "run").read_text()
    fetch = ci.index("python3 scripts/fetch_qwen3_tokenizer.py")
    assert fetch < ci.index("python3 lab.py test")
    assert 'export CI="${CI:-true}"' in ci[:fetch]  # a missing fixture is then a failure (tests/conftest.py)
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"realtok:' in pyproject


def test_missing_real_tokenizer_skips_locally_and_fails_under_ci(tmp_path):
    """The qwen3_tokenizer fixture with $TWLAB_QWEN3_TOKENIZER pointing at an empty folder, in a child pytest."""
    import os
    import subprocess
    import sys

    test = tmp_path / "test_probe.py"
    test.write_text("def test_probe(qwen3_tokenizer_dir):\n    pass\n")
    (tmp_path / "conftest.py").write_text((ROOT / "tests" / "conftest.py").read_text().replace(
        'Path(__file__).resolve().parent.parent / "scripts"', f'Path({str(ROOT)!r}) / "scripts"'))
    results = {}
    for ci in ("", "true"):
        env = dict(os.environ, TWLAB_QWEN3_TOKENIZER=str(tmp_path / "empty"), CI=ci)
        out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test)],
                             capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
        results[ci] = (out.returncode, out.stdout)
    assert results[""][0] == 0 and "1 skipped" in results[""][1], results[""]
    assert results["true"][0] == 1 and "CI=true: Qwen3 tokenizer not available" in results["true"][1], results["true"]
    assert "fetch_qwen3_tokenizer.py" in results["true"][1]


def test_readme_names_the_commands():
    readme = (ROOT / "README.md").read_text()
    for command in ("python3 lab.py demo", "python3 lab.py test", "python3 lab.py lab"):
        assert command in readme
    assert "python3 lab.py test" in (ROOT / ".ci" / "run").read_text()


def test_gpu_extra_resolves_with_the_dependencies():
    """requirements/gpu-resolved.txt (pip's resolution of dependencies + the gpu extra, written by
    scripts/resolve_gpu_extra.py) satisfies every requirement in pyproject.toml and every requirement the
    pinned vllm declares on shared packages; vllm is pinned to one version, the one resolved."""
    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    gpu = [Requirement(r) for r in project["optional-dependencies"]["gpu"]]
    vllm = next(r for r in gpu if r.name == "vllm")
    assert str(vllm.specifier).startswith("=="), f"pin vllm to one version, not {vllm.specifier}"
    text = (ROOT / "requirements" / "gpu-resolved.txt").read_text().splitlines()
    resolved = {Requirement(line).name: str(Requirement(line).specifier).removeprefix("==")
                for line in text if line and not line.startswith("#")}
    vllm_needs = [Requirement(line.strip("# ")) for line in text if line.startswith("#   ")]
    assert vllm_needs, "no vllm requirement recorded: rerun scripts/resolve_gpu_extra.py"
    assert resolved["vllm"] == str(vllm.specifier).removeprefix("=="), "rerun scripts/resolve_gpu_extra.py"
    for req in [Requirement(r) for r in project["dependencies"]] + gpu + vllm_needs:
        assert req.name in resolved, f"{req.name} is not in requirements/gpu-resolved.txt: rerun the script"
        assert req.specifier.contains(resolved[req.name], prereleases=True), \
            f"{req} does not hold for the resolved {req.name}=={resolved[req.name]}"
