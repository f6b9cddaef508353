"""Text similarity shared by dedup (near-duplicates) and split (groups, leakage).

MinHash signatures and the LSH banding parameters come from datasketch; the bands are
bucketed with numpy; clustering is a small union-find; word n-grams for the leakage check are
plain Python sets (exact, no false positives).
"""

from __future__ import annotations


def shingles(text: str, size: int) -> set[bytes]:
    """Word `size`-grams of normalised text (a short text is one shingle)."""
    words = text.split()
    if len(words) <= size:
        return {" ".join(words).encode()}
    return {" ".join(words[i : i + size]).encode() for i in range(len(words) - size + 1)}


def near_duplicate_pairs(
    texts: list[str], size: int, num_perm: int, threshold: float, seed: int
) -> list[tuple[int, int]]:
    """Index pairs (i < j) whose estimated Jaccard similarity of shingles is >= threshold."""
    if len(texts) < 2:
        return []
    pairs = similar_pairs(signatures(texts, size, num_perm, seed), threshold)
    return [(int(i), int(j)) for i, j in pairs]


def signatures(texts: list[str], size: int, num_perm: int, seed: int):
    """The MinHash signature of each text's shingles, one uint32 row each (datasketch keeps
    32-bit values in uint64). crc32 is the base hash: deterministic, in C, twice as fast as
    datasketch's sha1 here; the seeded permutations on top of it make the signature."""
    import zlib

    import numpy as np
    from datasketch import MinHash

    out = np.empty((len(texts), num_perm), dtype=np.uint32)
    # one MinHash, cleared for each text: what MinHash.bulk computes, without a new object
    # (and a copy of its permutations) per text
    minhash = MinHash(num_perm=num_perm, seed=seed, hashfunc=zlib.crc32)
    for k, text in enumerate(texts):
        minhash.clear()
        minhash.update_batch(shingles(text, size))
        out[k] = minhash.hashvalues
    return out


def similar_pairs(
    signatures, threshold: float, rows=None, verify_batch: int = 16_384, engine: str = "local"
):
    """Sorted unique index pairs (i < j, an (n, 2) array) of signature rows whose estimated
    Jaccard similarity is >= threshold; `rows` picks the rows to compare (pairs index into it).

    The banding is datasketch's choice of (bands, rows) for the threshold, weighted to recall
    (the default banding misses ~1 in 10 pairs at Jaccard 0.82). The buckets are found with
    numpy, one band at a time (a signature file may be memory-mapped), instead of MinHashLSH's
    per-record Python calls: 100k records in ~2 s instead of ~15 s. engine="ray": the buckets
    are Ray Data groups (`ray_band_pairs`), the same pairs."""
    import numpy as np
    from datasketch import MinHashLSH

    num_perm = signatures.shape[1]
    bands = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=(0.1, 0.9))
    b, r = bands.b, bands.r
    n = signatures.shape[0] if rows is None else len(rows)
    if n < 2:
        return np.zeros((0, 2), dtype=np.int64)

    def band_keys(band: int):
        keys = signatures[:, band * r : (band + 1) * r]
        return np.ascontiguousarray(keys if rows is None else keys[rows])

    # pair (i, j) as i * n + j: sorts as the pairs do
    if engine == "ray":
        candidates = ray_band_pairs(map(band_keys, range(b)), n)
    else:
        candidates = [bucket_pairs(band_keys(band), np.arange(n), n) for band in range(b)]
    # the same pair from several bands is kept once
    codes = np.sort(np.concatenate(candidates))
    codes = codes[np.r_[True, codes[1:] != codes[:-1]]] if len(codes) else codes
    pairs = np.stack([codes // n, codes % n], axis=1)
    # candidates can be below the threshold: keep only pairs the signatures confirm, a batch
    # of pairs at a time (two signature rows per pair)
    keep = np.zeros(len(pairs), dtype=bool)
    for start in range(0, len(pairs), verify_batch):
        batch = pairs[start : start + verify_batch]
        left, right = (
            (batch[:, 0], batch[:, 1]) if rows is None else (rows[batch[:, 0]], rows[batch[:, 1]])
        )
        keep[start : start + len(batch)] = (signatures[left] == signatures[right]).mean(
            axis=1
        ) >= threshold
    return pairs[keep]


def bucket_pairs(keys, positions, n: int):
    """Rows with equal `keys` rows share a bucket; each is paired with its bucket's first row
    (a star instead of all pairs, linear in the bucket size; union-find joins the cluster
    through that first row). `positions` (ascending) number the rows; pairs come as codes
    first * n + other."""
    import numpy as np

    if not len(keys):
        return np.zeros(0, dtype=np.int64)
    _, bucket = np.unique(
        keys.view(np.dtype((np.void, keys.dtype.itemsize * keys.shape[1]))).ravel(),
        return_inverse=True,
    )
    order = np.argsort(bucket, kind="stable")
    run_start = np.r_[0, np.flatnonzero(np.diff(bucket[order])) + 1]
    anchor = order[np.repeat(run_start, np.diff(np.r_[run_start, len(order)]))]
    linked = anchor != order
    return positions[anchor[linked]].astype(np.int64) * n + positions[order[linked]]


PARTS = 16  # Ray groups per band: buckets hashed apart so each group is a slice of the rows


def ray_band_pairs(bands, n: int) -> list:
    """bucket_pairs of each band's keys as a Ray Data groupby: rows go to the group of their
    (band, first key value mod PARTS), so equal keys meet in one group, on any node."""
    from functools import partial

    import numpy as np

    from stages.common.engine import group_map

    def blocks():
        for band, keys in enumerate(bands):
            columns = {f"k{j}": keys[:, j] for j in range(keys.shape[1])}
            yield {
                "band": np.full(len(keys), band, dtype=np.int32),
                "part": keys[:, 0] % PARTS,
                "row": np.arange(len(keys), dtype=np.int64),
                **columns,
            }

    found = group_map(blocks(), ["band", "part"], partial(_group_pairs, n=n))
    return [batch["code"] for batch in found] or [np.zeros(0, dtype=np.int64)]


def _group_pairs(group: dict, n: int) -> dict:
    import numpy as np

    order = np.argsort(group["row"], kind="stable")
    width = sum(1 for name in group if name.startswith("k"))
    keys = np.ascontiguousarray(np.stack([group[f"k{j}"][order] for j in range(width)], axis=1))
    return {"code": bucket_pairs(keys.astype(np.uint32), group["row"][order], n)}


def text_digests(texts: list[str]):
    """A 128-bit hash of each text: equal texts, equal digests (a collision is ~2^-64 likely
    among a billion texts), 16 bytes a row instead of the text."""
    import hashlib

    import numpy as np

    return np.array(
        [hashlib.blake2b(t.encode("utf-8"), digest_size=16).digest() for t in texts],
        dtype=np.dtype((np.void, 16)),
    ).reshape(len(texts))


class UnionFind:
    """Clusters from pairs; the smallest index of a cluster is its root (the row kept)."""

    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, i: int, j: int) -> None:
        a, b = self.find(i), self.find(j)
        if a != b:
            self.parent[max(a, b)] = min(a, b)

    def union_pairs(self, pairs, batch: int = 65_536) -> None:
        """Union each (i, j) row of a numpy array of pairs, a batch at a time (millions of
        pairs as Python lists would take more memory than the rest of a stage)."""
        for start in range(0, len(pairs), batch):
            for i, j in pairs[start : start + batch].tolist():
                self.union(i, j)

    def clusters(self) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for i in range(len(self.parent)):
            out.setdefault(self.find(i), []).append(i)
        return out


def ngrams(text: str, n: int) -> set[str]:
    words = text.split()
    return {" ".join(words[i : i + n]) for i in range(len(words) - n + 1)}
