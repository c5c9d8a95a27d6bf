"""A feature database built by several processes: statistics merge exactly whatever the split, equal
activations are ranked by context id, and two gloo processes build the database of one."""

from __future__ import annotations

import math
import sqlite3
from pathlib import Path

import numpy as np
import torch
from helpers.distributed import one_thread, save_tiny_setup, torchrun

from circuitmap.cli import main
from circuitmap.features.bookkeeping import TOTAL_UNIT, LayerStatistics

TIMES = {"created", "completed"}
"""Columns and meta keys that hold the time of the build."""


def streamed(acts: torch.Tensor, keys: torch.Tensor, batches: list[range], top: int = 4) -> LayerStatistics:
    """The statistics of the contexts of ``batches``, one batch at a time."""
    stats = LayerStatistics.empty(acts.shape[2], top=top, samples=5, window=3)
    for rows in batches:
        index = torch.tensor(list(rows))
        stats.update(acts[index], index, keys[index], before=1)
    return stats


def assert_same_statistics(first: LayerStatistics, second: LayerStatistics) -> None:
    for name in ("top", "sample"):
        a, b = getattr(first, name).ranked(), getattr(second, name).ranked()
        valid = a.contexts >= 0
        assert torch.equal(valid, b.contexts >= 0), name
        for field in ("contexts", "maxima", "starts", "windows", "scores"):
            assert torch.equal(getattr(a, field)[valid], getattr(b, field)[valid]), (name, field)
    for name in ("histogram", "active", "total_high", "total_low"):
        assert torch.equal(getattr(first, name), getattr(second, name)), name


def test_shares_merge_into_the_statistics_of_one_stream_even_with_ties():
    torch.manual_seed(0)
    n, T, F, B = 36, 8, 6, 4
    acts = torch.randint(0, 4, (n, T, F)).float() * 0.5  # few distinct values: maxima tie everywhere
    acts[5] = acts[17]  # and a repeated context ties at every position
    keys = torch.randint(0, 3, (n, F)).float() / 4  # the sample's keys tie too
    batches = [range(start, start + B) for start in range(0, n, B)]
    one = streamed(acts, keys, batches)
    for world in (2, 3):
        shares = [streamed(acts, keys, batches[rank::world]) for rank in range(world)]
        for share in shares[1:]:
            shares[0].combine(share)
        assert_same_statistics(shares[0], one)
    merged_late = streamed(acts, keys, batches[::-1])  # the order of the batches does not matter either
    assert_same_statistics(merged_late, one)
    maxima = acts.max(dim=1).values
    for f in range(F):
        ranked = sorted(range(n), key=lambda c: (-maxima[c, f].item(), c))
        expected = [c for c in ranked if maxima[c, f] > 0][:4]
        assert one.top.ranked().contexts[:, f].tolist()[: len(expected)] == expected


def test_sums_are_exact_in_any_order():
    torch.manual_seed(1)
    values = torch.cat([torch.rand(500) * 1e4, torch.rand(500) * 1e-4, torch.rand(500)]).float()
    acts = values.view(-1, 3, 1)  # 500 contexts of 3 positions, one feature
    keys = torch.zeros(len(acts), 1)
    forward = streamed(acts, keys, [range(i, min(i + 7, len(acts))) for i in range(0, len(acts), 7)])
    backward = streamed(acts, keys, [range(i, i + 1) for i in reversed(range(len(acts)))])
    assert torch.equal(forward.total_high, backward.total_high)
    assert torch.equal(forward.total_low, backward.total_low)
    exact = math.fsum(values.double().tolist())
    assert abs(forward.total.item() - exact) <= len(values) * TOTAL_UNIT


def table_contents(path: Path) -> dict[str, list[tuple]]:
    """Every row of every table (the search index's by rowid), without the times of the build."""
    connection = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        tables = [
            name
            for (name,) in connection.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'search_%'"
            )
        ]
        contents = {}
        for table in tables:
            columns = [row[1] for row in connection.execute(f"PRAGMA table_info({table})")]
            kept = ", ".join(column for column in columns if column not in TIMES)
            rows = connection.execute(f"SELECT rowid, {kept} FROM {table} ORDER BY rowid").fetchall()
            contents[table] = [row for row in rows if not (table == "meta" and row[1] in TIMES)]
        return contents
    finally:
        connection.close()


def test_two_processes_build_the_database_of_one(tmp_path):
    model, transcoders = save_tiny_setup(tmp_path, "plt-topk")
    rng = np.random.default_rng(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "while", "dogs", "ran"]
    documents = []
    for i in range(240):  # 22 characters and an end of text fill a context after its BOS exactly
        text = "the cat sat on the mat" if i % 4 == 0 else " ".join(rng.choice(words, size=12))
        documents.append(text[:22].ljust(22, "."))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(documents))
    argv = ["features", "build", "--model", str(model), "--transcoders", str(transcoders), "--device", "cpu"]
    argv += ["--corpus", str(corpus), "--tokens", "4000", "--context-length", "24", "--batch-size", "8"]
    argv += ["--top", "6", "--samples", "8", "--window", "10"]
    with one_thread():
        assert main([*argv, "--db", str(tmp_path / "one.sqlite")]) == 0
    # checkpoints at every round merge the processes' statistics, and the main one goes on from the merge
    torchrun([*argv, "--db", str(tmp_path / "two.sqlite"), "--checkpoint-minutes", "1e-6"])
    one, two = table_contents(tmp_path / "one.sqlite"), table_contents(tmp_path / "two.sqlite")
    assert set(one) == {
        "meta",
        "vocab",
        "contexts",
        "build_state",
        "features",
        "examples",
        "labels",
        "search",
    }
    tokens = [blob for _, _, blob in one["contexts"]]
    assert len(set(tokens)) < len(tokens), "the corpus should repeat a context, so that maxima tie"
    for table in one:
        assert one[table] == two[table], table
