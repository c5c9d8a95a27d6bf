"""Vector files: one tensor, or the named one, out of a safetensors file; clear errors otherwise."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from circuitmap.errors import CircuitmapError
from circuitmap.vectors import load_vector


def test_the_only_tensor_or_the_named_one(tmp_path):
    one, two = torch.randn(8), torch.randn(8)
    save_file({"v": one}, tmp_path / "one.safetensors")
    save_file({"a": one, "b": two}, tmp_path / "two.safetensors")
    assert torch.equal(load_vector(tmp_path / "one.safetensors"), one)
    assert torch.equal(load_vector(tmp_path / "two.safetensors", "b"), two)


@pytest.mark.parametrize(
    ("name", "key", "message"),
    [
        ("missing.safetensors", None, "vector file not found"),
        ("two.safetensors", None, "holds 2 tensors; name one as FILE:KEY"),
        ("two.safetensors", "c", "has no tensor 'c'"),
        ("corrupt.safetensors", None, "not a readable safetensors file"),
    ],
)
def test_clear_errors(tmp_path, name, key, message):
    save_file({"a": torch.zeros(2), "b": torch.ones(2)}, tmp_path / "two.safetensors")
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{bad json")
    with pytest.raises(CircuitmapError, match=message):
        load_vector(tmp_path / name, key)
