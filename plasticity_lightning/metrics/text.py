"""Text degeneration of generated samples: distinct-n, repeated n-grams, single-token repetition.

Deterministic functions of token sequences (lists of ids or of words), for monitoring what a language model
produces as it is pruned, grown or retrained. Each sample is one generated continuation.

===============================  =================================================================================
function                         definition
===============================  =================================================================================
:func:`distinct_n`               unique n-grams / all n-grams, pooled over the samples (Li et al. 2016)
:func:`repeated_ngram_rate`      per sample, the share of its n-grams that already occurred earlier in it; mean
:func:`max_token_repetition`     per sample, the share of its tokens taken by its most frequent token; mean
===============================  =================================================================================

All return 0.0 for samples too short to hold an n-gram.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Sequence

from plasticity_lightning.core.errors import check_positive_int

Sample = Sequence[Hashable]


def _ngrams(sample: Sample, n: int) -> list[tuple[Hashable, ...]]:
    return [tuple(sample[i : i + n]) for i in range(len(sample) - n + 1)]


def distinct_n(samples: Sequence[Sample], n: int = 1) -> float:
    """Unique n-grams over all n-grams of all samples.

    Args:
        samples: generated samples, each a sequence of tokens (ids or strings).
        n: the n-gram length (default 1: distinct tokens; Li et al. 2016's distinct-n).

    Example::

        >>> distinct_n([[1, 2, 3], [1, 2, 4]], n=2)
        0.75
    """
    check_positive_int("distinct_n", "n", n)
    grams = [g for sample in samples for g in _ngrams(sample, n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repeated_ngram_rate(samples: Sequence[Sample], n: int = 3) -> float:
    """Mean over samples of the share of n-grams that repeat an earlier n-gram of the same sample.

    Args:
        samples: generated samples, each a sequence of tokens (ids or strings).
        n: the n-gram length (default 3).

    Example::

        >>> repeated_ngram_rate([[1, 2, 3, 1, 2, 3]], n=3)  # (1,2,3) again; (2,3,1), (3,1,2) are new
        0.25
    """
    check_positive_int("repeated_ngram_rate", "n", n)
    rates = []
    for sample in samples:
        grams = _ngrams(sample, n)
        if grams:
            rates.append(1 - len(set(grams)) / len(grams))
    return sum(rates) / len(rates) if rates else 0.0


def max_token_repetition(samples: Sequence[Sample]) -> float:
    """Mean over samples of the share of tokens taken by the sample's most frequent token.

    Args:
        samples: generated samples, each a sequence of tokens (ids or strings).

    Example::

        >>> max_token_repetition([[5, 5, 5, 1], [1, 2]])
        0.625
    """
    shares = [Counter(sample).most_common(1)[0][1] / len(sample) for sample in samples if len(sample)]
    return sum(shares) / len(shares) if shares else 0.0


def degeneration_summary(samples: Sequence[Sample]) -> dict[str, float]:
    """The four numbers :class:`~plasticity_lightning.callbacks.DegenerationMonitor` logs.

    Args:
        samples: generated samples, each a sequence of tokens (ids or strings).

    Example::

        >>> degeneration_summary([["a", "b", "a", "b"]])["distinct_2"]
        0.6666666666666666
    """
    return {
        "distinct_1": distinct_n(samples, 1),
        "distinct_2": distinct_n(samples, 2),
        "repeated_3gram_rate": repeated_ngram_rate(samples, 3),
        "max_token_repetition": max_token_repetition(samples),
    }
