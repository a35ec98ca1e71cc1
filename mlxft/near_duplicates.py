"""Exact and near-duplicate samples, and train/validation leakage, for `mlxft data check`.

Duplicates compare what the model is shown (the prompt: user and tool turns; system prompts are
ignored, being shared by design) and what it learns to say (the answer: assistant turns and tool
calls), each lower-cased, as sets of shingles: its words and its word pairs. Exact: prompt and
answer identical (after lower-casing and collapsing whitespace). Near: both the prompt and the
answer have a Jaccard similarity of at least NEAR_THRESHOLD (0.8: one word changed in a
20-word answer still counts, a rephrased question does not). Paraphrased questions with one shared
answer, as in the quickstart data, are therefore not duplicates.

Candidates come from MinHash with LSH banding (NUM_PERM hash functions in BANDS bands of ROWS):
pairs whose shingle sets, prompt and answer together, agree in a whole band. Since J(union) >=
min(J(prompt), J(answer)), a pair at the threshold is found with probability
1 - (1 - 0.8**ROWS)**BANDS = 0.947 (0.994 at 0.85 similarity, 0.9999 at 0.9); every candidate is
then confirmed on the exact Jaccard of its shingle sets, so no pair is reported on an estimate.
The signatures are computed with numpy over all samples at once: datasketch, which hashes each
shingle in a Python call, took 10.5 s per 20,000 samples here, most of the 60 s budget for 100,000.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

NEAR_THRESHOLD = 0.8
BANDS, ROWS = 16, 8
NUM_PERM = BANDS * ROWS
MAX_BUCKET = 2000     # a band bucket larger than this (templated data) is skipped: its pairs would
                      # swamp the check; such samples are usually reported as exact duplicates anyway

_SPACE = re.compile(r"\s+")
_WORD = re.compile(r"\w+")


@dataclass
class Item:
    """One sample as the duplicate finder sees it."""
    where: str
    prompt: str
    answer: str


def normalize(text: str) -> str:
    """Lower-cased, whitespace collapsed: the form duplicates are compared in."""
    return _SPACE.sub(" ", text.lower()).strip()


def _shingles(text: str) -> set[str]:
    """Words and word pairs; a text without words is its own single shingle."""
    words = _WORD.findall(text)
    if not words:
        return {text}
    return set(words) | {f"{a} {b}" for a, b in zip(words, words[1:])}


def _jaccard(a: set, b: set) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def _similarity(x: Item, y: Item) -> float:
    """min(J(prompt), J(answer)): near duplicates need both."""
    return min(_jaccard(_shingles(x.prompt), _shingles(y.prompt)), _jaccard(_shingles(x.answer), _shingles(y.answer)))


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: spreads small integers over 64 bits."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _shingle_values(items: list[Item]) -> list[tuple[np.ndarray, np.ndarray]]:
    """[(mixed 64-bit shingle values, owning item)] for the words and for the word pairs of every
    prompt and answer (tagged apart), each array ordered by item. Words are numbered through a
    dict so hashing stays in numpy."""
    vocab: dict[str, int] = {}
    ids: list[int] = []
    lens: list[int] = []
    for it in items:
        for text in (it.prompt, it.answer):
            words = _WORD.findall(text) or [text]
            ids.extend(vocab.setdefault(w, len(vocab)) for w in words)
            lens.append(len(words))
    wid = np.asarray(ids, dtype=np.uint64)
    text_of = np.repeat(np.arange(len(lens)), lens)
    side = (text_of % 2).astype(np.uint64) << np.uint64(62)  # 0: prompt, 1: answer
    owner = text_of // 2
    same_text = text_of[1:] == text_of[:-1]
    uni = wid | side
    bi = ((wid[:-1] << np.uint64(31)) | wid[1:] | np.uint64(1 << 61) | side[:-1])[same_text]
    return [(_mix(uni), owner), (_mix(bi), owner[:-1][same_text])]


def _signatures(items: list[Item], seed: int = 1) -> np.ndarray:
    """(len(items), NUM_PERM) MinHash signatures: per item, the minimum over its shingles of
    NUM_PERM multiply-shift hashes (odd multiplier, top 32 bits) of the mixed shingle values."""
    rng = np.random.default_rng(seed)
    mult = rng.integers(0, 1 << 62, size=NUM_PERM, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    add = rng.integers(0, 1 << 62, size=NUM_PERM, dtype=np.uint64)
    sig = np.full((len(items), NUM_PERM), np.iinfo(np.uint32).max, dtype=np.uint32)
    for values, owner in _shingle_values(items):
        if not len(values):
            continue
        starts = np.flatnonzero(np.r_[True, owner[1:] != owner[:-1]])
        rows = owner[starts]
        h = np.empty_like(values)
        with np.errstate(over="ignore"):
            for j in range(NUM_PERM):  # in place: no temporaries of millions of values per hash
                np.multiply(values, mult[j], out=h)
                h += add[j]
                h >>= np.uint64(32)
                sig[rows, j] = np.minimum(sig[rows, j], np.minimum.reduceat(h, starts).astype(np.uint32))
    return sig


def _candidate_pairs(sig: np.ndarray) -> set[tuple[int, int]]:
    """Pairs of rows that agree on every value of at least one band."""
    pairs: set[tuple[int, int]] = set()
    n = len(sig)
    for b in range(BANDS):
        band = np.ascontiguousarray(sig[:, b * ROWS:(b + 1) * ROWS]).view(np.dtype((np.void, 4 * ROWS))).ravel()
        order = np.argsort(band, kind="stable")
        sorted_band = band[order]
        starts = np.r_[0, np.flatnonzero(sorted_band[1:] != sorted_band[:-1]) + 1]
        sizes = np.diff(np.r_[starts, n])
        for start, size in zip(starts[sizes > 1].tolist(), sizes[sizes > 1].tolist()):
            if size > MAX_BUCKET:
                continue
            members = sorted(order[start:start + size].tolist())
            pairs.update((members[i], members[k]) for i in range(size) for k in range(i + 1, size))
    return pairs


def find_duplicates(train: list[Item], valid: list[Item]) -> dict:
    """Exact and near duplicates inside train and inside valid, and train samples that duplicate a
    validation sample (leakage)."""
    result = {"exact": [], "near": [], "leak_exact": [], "leak_near": []}
    groups: dict[tuple[str, str], list[int]] = defaultdict(list)
    everything = train + valid
    for i, it in enumerate(everything):
        groups[(it.prompt, it.answer)].append(i)
    n_train = len(train)
    reps = []  # one sample per distinct (prompt, answer)
    for members in groups.values():
        inside_train = [i for i in members if i < n_train]
        inside_valid = [i for i in members if i >= n_train]
        for part in (inside_train, inside_valid):
            if len(part) > 1:
                result["exact"].append([everything[i].where for i in part])
        if inside_train and inside_valid:
            result["leak_exact"].append({"train": [everything[i].where for i in inside_train],
                                         "valid": [everything[i].where for i in inside_valid]})
        reps.append(members)
    if len(reps) < 2:
        return result
    sig = _signatures([everything[m[0]] for m in reps])
    for ka, kb in sorted(_candidate_pairs(sig)):
        a, b = everything[reps[ka][0]], everything[reps[kb][0]]
        sim = _similarity(a, b)
        if sim < NEAR_THRESHOLD:
            continue
        a_train, b_train = [i for i in reps[ka] if i < n_train], [i for i in reps[kb] if i < n_train]
        a_valid, b_valid = [i for i in reps[ka] if i >= n_train], [i for i in reps[kb] if i >= n_train]
        for xs, ys in ((a_train, b_train), (a_valid, b_valid)):
            if xs and ys:
                result["near"].append({"a": everything[xs[0]].where, "b": everything[ys[0]].where,
                                       "similarity": round(sim, 3)})
        for xs, ys in ((a_train, b_valid), (b_train, a_valid)):
            if xs and ys:
                result["leak_near"].append({"train": everything[xs[0]].where, "valid": everything[ys[0]].where,
                                            "similarity": round(sim, 3)})
    return result
