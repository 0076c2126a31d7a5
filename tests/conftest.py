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

