"""Resolve the `gpu` extra with pip (needs the package index) and write requirements/gpu-resolved.txt.

    python3 scripts/resolve_gpu_extra.py            # a throwaway venv with a current pip; ~1 minute

The file records, for Linux x86_64 and this Python: the pinned vllm's own requirements on the packages
twlib also uses, and the versions pip chose for twlib's dependencies + the `gpu` extra together
(`pip install --dry-run --report`, so nothing is installed). tests/test_packaging.py checks, offline, that
every requirement in pyproject.toml (dependencies and the gpu extra) and every recorded vllm requirement
holds for the resolved versions: when one of them changes, rerun this script.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "requirements" / "gpu-resolved.txt"
SHARED = ("torch", "transformers", "tokenizers", "safetensors", "numpy")  # what twlib and vllm both pin


def main() -> int:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + project["optional-dependencies"]["gpu"]
    with tempfile.TemporaryDirectory() as tmp:
        venv = Path(tmp) / "venv"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin" / "python"), "-m", "pip"]
        subprocess.run(pip + ["install", "-q", "-U", "pip"], check=True)
        report = Path(tmp) / "report.json"
        subprocess.run(pip + ["install", "--dry-run", "--ignore-installed", "-q", "--report", str(report)]
                       + wanted, check=True)
        installs = json.loads(report.read_text())["install"]
    versions = {i["metadata"]["name"].lower(): i["metadata"]["version"].split("+")[0] for i in installs}
    vllm = next(i["metadata"] for i in installs if i["metadata"]["name"].lower() == "vllm")
    vllm_needs = sorted(r for r in vllm.get("requires_dist", [])
                        if r.split(";")[0].strip().lower().startswith(SHARED) and "extra ==" not in r)
    lines = [f"# written by scripts/resolve_gpu_extra.py ({platform.system()} {platform.machine()}, Python "
             f"{platform.python_version()}): pip's choice for pyproject's dependencies + the gpu extra",
             f"# vllm {vllm['version']} requires:"] + [f"#   {r}" for r in vllm_needs]
    from packaging.requirements import Requirement

    names = sorted({Requirement(r).name.lower() for r in wanted + vllm_needs})
    lines += [f"{n}=={versions[n]}" for n in names if n in versions]
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text("\n".join(lines) + "\n")
    print(OUT.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
