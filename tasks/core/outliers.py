"""Outlier scores in an embedding space: the ugly-duckling math shared by the ugly_duckling stage and screening.

A row's score is the Euclidean distance of its group vector (rows of one lesion averaged) to the centroid of the
OTHER groups (leave-one-out), on L2-normalised embeddings; `rank_desc` turns scores into ranks (1 = most odd).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd


def l2_normalise(emb: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero)."""
    emb = np.asarray(emb, dtype=np.float64)
    norm = np.linalg.norm(emb, axis=1, keepdims=True)
    return emb / np.where(norm > 0, norm, 1.0)


def loo_centroid_scores(emb: np.ndarray, groups: Sequence[Any] | None = None) -> np.ndarray:
    """Distance of each row's group vector to the mean of the OTHER groups' vectors (one value per row).

    `groups` (e.g. lesion_id) merges rows that show the same lesion; None = every row its own lesion.
    Fewer than two groups -> NaN (nothing to compare with).
    """
    emb = np.asarray(emb, dtype=np.float64)
    if emb.ndim != 2:
        raise ValueError(f"embeddings must be 2-D (n, d), got shape {emb.shape}")
    keys = np.arange(len(emb)) if groups is None else pd.factorize(pd.Series(list(groups), dtype=object))[0]
    n_groups = int(keys.max()) + 1 if len(keys) else 0
    if n_groups < 2:
        return np.full(len(emb), np.nan)
    vecs = np.zeros((n_groups, emb.shape[1]))
    np.add.at(vecs, keys, emb)
    vecs /= np.bincount(keys, minlength=n_groups)[:, None]
    total = vecs.sum(axis=0)
    others = (total[None, :] - vecs) / (n_groups - 1)  # leave-one-out centroid per group
    dist = np.linalg.norm(vecs - others, axis=1)
    return dist[keys]


def rank_desc(scores: np.ndarray) -> np.ndarray:
    """1 = largest score; ties broken by order of appearance (stable), NaN ranks last."""
    s = np.nan_to_num(np.asarray(scores, dtype=np.float64), nan=-np.inf)
    order = np.argsort(-s, kind="stable")
    ranks = np.empty(len(s), dtype=np.int64)
    ranks[order] = np.arange(1, len(s) + 1)
    return ranks


def ud_scores(emb: np.ndarray, normalise: str = "l2") -> tuple[np.ndarray, np.ndarray]:
    """(score, rank) of each row among all rows (every row its own group).

    normalise: "l2" for network embeddings (direction = appearance); "zscore" for hand-made features of
    mixed units (each feature standardised over the rows, so none dominates by its scale)."""
    if len(emb) == 0:
        return np.zeros(0), np.zeros(0, np.int64)
    emb = np.asarray(emb, np.float64)
    if normalise == "zscore":
        x = (emb - emb.mean(0)) / np.maximum(emb.std(0), 1e-3)
    elif normalise == "l2":
        x = l2_normalise(emb)
    else:
        raise ValueError(f"normalise must be 'l2' or 'zscore', not {normalise!r}")
    s = loo_centroid_scores(x)
    return s, rank_desc(s)
