"""The embedded default corpus: an excerpt (3.3 MB of text, 0.9 MB gzipped) of the Python 3.11
documentation sources, under the PSF licence in `LICENSE-pydocs.txt`. It lets training, the demo and the
norm comparison run on a fresh machine with no data of the user's own."""

import gzip
from pathlib import Path

DEFAULT_CORPUS = Path(__file__).with_name("pydocs-excerpt.txt.gz")
CORPUS_LICENSE = Path(__file__).with_name("LICENSE-pydocs.txt")


def read_default_corpus() -> str:
    """The whole excerpt as one string."""
    with gzip.open(DEFAULT_CORPUS, "rt", encoding="utf-8") as f:
        return f.read()
