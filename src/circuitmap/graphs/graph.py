"""``Graph``: the nodes and sparse edges of one attribution graph, with its prompt and provenance.

Nodes are stored column-wise in NumPy arrays, in a fixed order: features (sorted by layer, position,
feature index), then error nodes (by layer, position), then token nodes (by position), then target nodes
(logits or other read-out directions). Edges are a CSR matrix over targets: row ``t`` holds the direct
effects ``A[t, s]`` of every source ``s`` on target ``t``'s input (a feature's pre-activation, a target's
de-meaned logit). Rows of error and token nodes are empty: they have no inputs.

For every target row, ``value[t] == constant[t] + sum_s A[t, s]``: ``constant`` gathers what no node
accounts for (biases, and the first position's MLP outputs, which are excluded from graphs by convention).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path

import numpy as np

EDGE_BLOCK = 1 << 21
"""Edges read at a time by code that streams a graph's edges (about 16 MiB per per-edge float64 array)."""
MAX_LAYER_RUNS = 4096
"""Beyond this many changes of layer along the rows, rows are not listed by layer: blocks are cut by size."""


class NodeKind(IntEnum):
    """What a node stands for."""

    FEATURE = 0
    ERROR = 1
    TOKEN = 2
    TARGET = 3


@dataclass
class Graph:
    """An attribution graph. Per-node arrays all have length ``n_nodes``; edges are CSR over target rows.

    - ``kind``: NodeKind per node.
    - ``layer``: transcoder layer of features and errors; -1 for tokens; ``n_layers`` for targets.
    - ``position``: token position (targets: the position they read, the last one).
    - ``index``: feature index for features, token id for tokens and single-token logit targets, else -1.
    - ``activation``: feature activation (0 for other nodes).
    - ``value``: the quantity a row explains: feature pre-activation, target value (de-meaned logit);
      NaN for error and token nodes.
    - ``constant``: the part of ``value`` that comes from no node (biases, excluded positions).
    - ``target_weight``: weight of each target in influence (its probability for salient logits, renormalised
      to sum to 1 over targets); 0 for other nodes.
    - ``labels``: optional node labels by node index.
    """

    prompt: str
    tokens: list[int]
    token_strings: list[str]
    n_layers: int
    kind: np.ndarray
    layer: np.ndarray
    position: np.ndarray
    index: np.ndarray
    activation: np.ndarray
    value: np.ndarray
    constant: np.ndarray
    target_weight: np.ndarray
    target_names: list[str]
    target_probs: np.ndarray
    indptr: np.ndarray
    indices: np.ndarray
    weights: np.ndarray
    model_name: str = ""
    transcoders_name: str = ""
    labels: dict[int, str] = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    @property
    def n_nodes(self) -> int:
        return len(self.kind)

    @property
    def n_edges(self) -> int:
        return len(self.indices)

    def nodes_of(self, kind: NodeKind) -> np.ndarray:
        """Indices of the nodes of one kind (contiguous, in graph order)."""
        return np.flatnonzero(self.kind == kind)

    def _repr_html_(self) -> str:
        """In a notebook: the explorer's read-only view, pruned and grouped (``circuitmap.show``)."""
        from circuitmap.notebook import show

        return show(self)._repr_html_()

    @property
    def n_features(self) -> int:
        return int(np.count_nonzero(self.kind == NodeKind.FEATURE))

    def row(self, target: int) -> tuple[np.ndarray, np.ndarray]:
        """Sources and weights of the edges into node ``target``."""
        start, stop = self.indptr[target], self.indptr[target + 1]
        return self.indices[start:stop], self.weights[start:stop]

    def target_indices(self) -> np.ndarray:
        """Row index (target) of every edge, aligned with ``indices`` and ``weights``."""
        return np.repeat(np.arange(self.n_nodes, dtype=np.int64), np.diff(self.indptr))

    def row_blocks(self, rows: np.ndarray | None = None) -> list[np.ndarray]:
        """The nodes that have incoming edges (those of ``rows``, sorted, if given), cut into blocks so that
        the edges can be read a block at a time: at every change of layer (unless the rows are not listed by
        layer) and wherever a block's edges would pass ``EDGE_BLOCK`` (one row may exceed it alone)."""
        counts = np.diff(self.indptr)
        rows = np.flatnonzero(counts) if rows is None else rows[counts[rows] > 0]
        if len(rows) == 0:
            return []
        counts = counts[rows]
        layer_runs = np.flatnonzero(np.diff(self.layer[rows])) + 1
        if len(layer_runs) > MAX_LAYER_RUNS:
            layer_runs = np.zeros(0, dtype=np.intp)
        blocks = []
        for run, run_counts in zip(np.split(rows, layer_runs), np.split(counts, layer_runs), strict=True):
            window = (np.cumsum(run_counts) - run_counts) // EDGE_BLOCK
            blocks += np.split(run, np.flatnonzero(np.diff(window)) + 1)
        return blocks

    def block_edges(self, block: np.ndarray) -> tuple[np.ndarray, slice | np.ndarray]:
        """The row of each edge of the rows ``block`` (sorted), and where those edges lie in ``indices`` and
        ``weights``: a slice when the rows are consecutive."""
        starts, ends = self.indptr[block], self.indptr[block + 1]
        rows = np.repeat(block, ends - starts)
        if block[-1] - block[0] + 1 == len(block):
            return rows, slice(int(starts[0]), int(ends[-1]))
        return rows, self.edges_of(block)

    def edges_of(self, rows: np.ndarray) -> np.ndarray:
        """Positions in ``indices`` and ``weights`` of the edges of the nodes ``rows``, row by row."""
        rows = np.asarray(rows, dtype=np.int64)
        starts, lengths = self.indptr[rows], self.indptr[rows + 1] - self.indptr[rows]
        offsets = np.cumsum(lengths) - lengths
        return np.repeat(starts - offsets, lengths) + np.arange(int(lengths.sum()), dtype=np.int64)

    def rows_of(self, edges: np.ndarray) -> np.ndarray:
        """Row index (target) of the edges at positions ``edges``, without forming every edge's."""
        return np.searchsorted(self.indptr, edges, side="right") - 1

    def dense_adjacency(self) -> np.ndarray:
        """The full ``n_nodes × n_nodes`` matrix: for tests and small graphs only."""
        dense = np.zeros((self.n_nodes, self.n_nodes), dtype=np.float64)
        np.add.at(dense, (self.target_indices(), self.indices), self.weights)
        return dense

    def save(self, path: str | Path) -> Path:
        """Write the graph to one ``.safetensors`` file (arrays as tensors, the rest as JSON metadata)."""
        from circuitmap.graphs.files import save_graph

        return save_graph(self, path)

    @classmethod
    def load(cls, path: str | Path) -> Graph:
        """Read a graph written by ``save``."""
        from circuitmap.graphs.files import load_graph

        return load_graph(path)

    def node_id(self, node: int) -> str:
        """The node's id in exported JSON (see ``circuitmap.graphs.export``)."""
        from circuitmap.graphs.ids import node_id

        return node_id(self, node)
