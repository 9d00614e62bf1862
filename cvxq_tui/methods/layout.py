"""Moves weights between a layer's natural shape and the group layout of the packed format:
rows permuted and padded to a multiple of 32, cut into clusters of group_rows rows; a group
is one column of one cluster."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np

SLICE = 32


@dataclass(frozen=True)
class GroupLayout:
    rows: int
    cols: int
    group_rows: int

    @property
    def rows_pad(self) -> int:
        return -(-self.rows // SLICE) * SLICE

    @property
    def n_clusters(self) -> int:
        return -(-self.rows_pad // self.group_rows)

    def cluster_rows(self, c: int) -> int:
        return min(self.group_rows, self.rows_pad - c * self.group_rows)

    def cluster_counts(self) -> np.ndarray:
        """Weights per group, in depth-map order [n_clusters * cols]."""
        per = np.array([self.cluster_rows(c) for c in range(self.n_clusters)], dtype=np.int64)
        return np.repeat(per, self.cols)

    def runs(self) -> Iterator[tuple[int, int, int]]:
        """(first cluster, cluster count, rows per cluster) runs of equal-sized clusters."""
        full = self.rows_pad // self.group_rows
        if full:
            yield 0, full, self.group_rows
        if full < self.n_clusters:
            yield full, 1, self.cluster_rows(full)

    def to_storage(self, w: np.ndarray, perm: Optional[np.ndarray]) -> np.ndarray:
        """[rows, cols] -> permuted and zero-padded [rows_pad, cols]."""
        out = np.zeros((self.rows_pad, self.cols), dtype=w.dtype)
        out[: self.rows] = w[perm] if perm is not None else w
        return out

    def groups(self, wp: np.ndarray, first: int, count: int, size: int) -> np.ndarray:
        """Groups of clusters first..first+count of a storage matrix, as a contiguous
        [count * cols, size] matrix (group index = cluster * cols + column)."""
        block = wp[first * self.group_rows: first * self.group_rows + count * size]
        return np.ascontiguousarray(block.reshape(count, size, self.cols).transpose(0, 2, 1)
                                    .reshape(count * self.cols, size))

    def ungroup(self, g: np.ndarray, count: int, size: int) -> np.ndarray:
        """Inverse of groups(): [count * cols, size] -> [count * size, cols]."""
        return g.reshape(count, self.cols, size).transpose(0, 2, 1).reshape(count * size, self.cols)
