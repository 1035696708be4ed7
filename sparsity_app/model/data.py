"""Real human-labelled text shipped inside the `gensim` wheel (read in place, never copied).

- Lee corpus: 50 news documents and a 50x50 matrix of human similarity scores (0..1).
- Pang & Lee polarity: 200 movie-review sentences, 100 positive and 100 negative.
- WordSim353 and SimLex-999: word pairs with a mean human similarity score (0..10).

And unlabelled text that no metric evaluates on (`training_documents`): what recovery trains on and
what activation-aware pruning calibrates on, so neither sees an evaluation text.
"""
from __future__ import annotations

import functools
import importlib.util
import pathlib

import numpy as np

from sparsity_app.core.errors import UserError


@functools.cache
def data_dir() -> pathlib.Path:
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the labelled data needs the 'gensim' package: pip install -r requirements.txt")
    return pathlib.Path(spec.submodule_search_locations[0]) / "test" / "test_data"


@functools.cache
def lee_documents() -> tuple[str, ...]:
    """The 50 Lee news documents, in the order of the similarity matrix."""
    text = (data_dir() / "lee.cor").read_text(encoding="cp1252")
    docs = tuple(line.strip() for line in text.splitlines() if line.strip())
    assert len(docs) == 50, f"lee.cor: expected 50 documents, found {len(docs)}"
    return docs


TRAINING_CORPORA = ("lee_background.cor", "head500.noblanks.cor")  # metrics never read these


@functools.cache
def training_documents() -> tuple[str, ...]:
    """The unlabelled training documents, one per non-empty line of each TRAINING_CORPORA file, in order
    (300 Lee background news articles, then 500 Wikipedia paragraphs)."""
    docs: list[str] = []
    for name in TRAINING_CORPORA:
        text = (data_dir() / name).read_text(encoding="utf-8", errors="replace")
        docs += [line.strip() for line in text.splitlines() if line.strip()]
    return tuple(docs)


@functools.cache
def lee_similarity() -> np.ndarray:
    """Human similarity scores, float64 [50, 50], symmetric, ones on the diagonal.

    The file stores the upper triangle only (zeros below the diagonal).
    """
    upper = np.loadtxt(data_dir() / "similarities0-1.txt", delimiter="\t", dtype=np.float64)
    return np.triu(upper) + np.triu(upper, 1).T


@functools.cache
def polarity_sentences() -> tuple[tuple[str, int], ...]:
    """200 (sentence, label) pairs; label 1 = positive, 0 = negative."""
    rows = []
    for line in (data_dir() / "pang_lee_polarity.cor").read_text(encoding="cp1252").splitlines():
        label, _, text = line.partition(" ")
        if text:
            rows.append((text.strip(), int(label == "__label__pos")))
    return tuple(rows)


def _word_pairs(name: str, expected: int) -> tuple[tuple[str, str, float], ...]:
    """(word 1, word 2, human score) rows of a tab-separated UTF-8 file; '#' lines are headers."""
    rows = []
    for line in (data_dir() / name).read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            a, b, score = line.split("\t")
            rows.append((a.strip(), b.strip(), float(score)))
    assert len(rows) == expected, f"{name}: expected {expected} word pairs, found {len(rows)}"
    return tuple(rows)


@functools.cache
def wordsim353() -> tuple[tuple[str, str, float], ...]:
    """WordSim353: 353 (word, word, score) pairs; relatedness as much as similarity (tiger-cat 7.35)."""
    return _word_pairs("wordsim353.tsv", 353)


@functools.cache
def simlex999() -> tuple[tuple[str, str, float], ...]:
    """SimLex-999: 999 (word, word, score) pairs; similarity only, antonyms score low (hard-easy 0.95)."""
    return _word_pairs("simlex999.txt", 999)
