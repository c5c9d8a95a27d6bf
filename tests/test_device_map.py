"""A model spread over devices by a device map, and transcoders placed per layer, trace and intervene exactly
as on one device.

Without GPUs the split is simulated on the CPU in two ways.

- accelerate's own offloading: a device map that sends some modules to ``"cpu"`` and the others to
  ``torch.device("cpu")`` (another device value to accelerate) makes accelerate run everything on the latter
  and offload the former, as it offloads modules to the CPU beside GPUs: their parameters wait on the meta
  device, their weights in CPU memory, and its hooks load them for each call.
- Virtual devices: ``VirtualDevices`` makes CPU tensors act as if they sat on distinct devices ``cpu:1``,
  ``cpu:2``, … (each reports its device, and an operation mixing two devices fails as it would across GPUs),
  and ``spread_virtually`` places a model's modules on them and aligns their inputs as accelerate's dispatch
  does. A tensor that circuitmap forgets to move between a layer, its transcoder and the rows fails there.

The tests at the end run the real split where GPUs are present.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from accelerate.hooks import ModelHook, add_hook_to_module
from accelerate.utils import find_device, send_to_device
from helpers.models import STORIES, char_tokenizer, needs_shared, tiny_hf_model, tiny_model
from helpers.transcoders import random_transcoders
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from circuitmap import CircuitmapError, load_model
from circuitmap.attribution import attribute
from circuitmap.cli import main
from circuitmap.errors import ModelLoadError
from circuitmap.graphs import NodeKind
from circuitmap.interventions import FeatureEdit, ResidualEdit, generate_with, intervene

PROMPT = "The cat sat on"
MAIN = torch.device("cpu")
OFFLOADED = "cpu"
SPLIT = {
    "model.embed_tokens": MAIN,
    "model.rotary_emb": MAIN,
    "model.layers.0": MAIN,
    "model.layers.1": OFFLOADED,
    "model.layers.2": MAIN,
    "model.norm": OFFLOADED,
    "lm_head": OFFLOADED,
}
VIRTUAL_SPLIT = {
    "model.embed_tokens": 1,
    "model.rotary_emb": 1,
    "model.layers.0": 1,
    "model.layers.1": 2,
    "model.layers.2": 3,
    "model.norm": 2,
    "lm_head": 4,
}
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")


def virtual(index: int) -> torch.device:
    return torch.device("cpu", index)


class VirtualDevices(TorchFunctionMode):
    """While active, CPU tensors act as if they sat on devices ``cpu:1``, ``cpu:2``, …: a tensor moved or
    created there carries that device and reports it, an operation's results carry its inputs' device, and
    an operation whose floating-point inputs sit on two devices (the real CPU counting as one) fails. Integer
    and boolean tensors (indices) and scalars go with any device; ``autograd.grad`` and ``copy_`` cross
    devices."""

    def __init__(self):
        super().__init__()
        self.devices = WeakIdKeyDictionary()

    def put(self, tensor: torch.Tensor, index: int | None) -> torch.Tensor:
        if index is not None:
            self.devices[tensor] = index
        return tensor

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__self__", None) is torch.Tensor.device:
            index = self.devices.get(args[0])
            return func(*args) if index is None else virtual(index)
        if func is torch.Tensor.to:
            return self._to(*args, **kwargs)
        if func is torch.Tensor.cpu:
            return self._moved(args[0], func(*args, **kwargs), None)
        if func is torch.autograd.grad:
            inputs = kwargs.get("inputs", args[1] if len(args) > 1 else None)
            inputs = [inputs] if isinstance(inputs, torch.Tensor) else inputs
            grads = func(*args, **kwargs)
            return tuple(
                g if g is None else self.put(g, self.devices.get(x))
                for g, x in zip(grads, inputs, strict=True)
            )
        if func is torch.Tensor.copy_:
            return func(*args, **kwargs)
        created = None
        if kwargs.get("device") is not None:
            created = torch.device(kwargs["device"]).index
            kwargs = {**kwargs, "device": "cpu"}
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        found = {
            self.devices.get(t, 0) for t in tensors if t in self.devices or (t.ndim and t.is_floating_point())
        }
        if len(found) > 1:
            raise RuntimeError(f"{getattr(func, '__name__', func)} mixes tensors of devices {sorted(found)}")
        result = func(*args, **kwargs)
        index = created if created is not None else max(found, default=0) or None
        for output in tree_flatten(result)[0]:
            if isinstance(output, torch.Tensor) and not any(output is t for t in tensors):
                self.put(output, index)
        return result

    def _to(self, tensor: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if args and isinstance(args[0], torch.Tensor):
            other = args[0]
            return self._moved(tensor, tensor.to(other.dtype), self.devices.get(other))
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        moved = tensor if dtype is None else tensor.to(dtype)
        if device is None:
            return self._moved(tensor, moved, self.devices.get(tensor))
        return self._moved(tensor, moved, device.index if device.type == "cpu" else None)

    def _moved(self, tensor: torch.Tensor, moved: torch.Tensor, index: int | None) -> torch.Tensor:
        """``moved`` (``tensor``, cast) on device ``index``: a copy when the device changes."""
        if index != self.devices.get(tensor) and moved is tensor:
            moved = tensor.clone()
        return self.put(moved, index)


class _Align(ModelHook):
    """accelerate's alignment of a dispatched module: its inputs are moved to ``execution_device`` after any
    forward pre-hook; the top-level module's outputs go back to where its inputs came from."""

    def __init__(self, execution_device: torch.device, io_same_device: bool = False):
        self.execution_device = execution_device
        self.io_same_device = io_same_device

    def pre_forward(self, module, *args, **kwargs):
        if self.io_same_device:
            self.input_device = find_device([args, kwargs])
        return send_to_device(args, self.execution_device), send_to_device(kwargs, self.execution_device)

    def post_forward(self, module, output):
        return send_to_device(output, self.input_device) if self.io_same_device else output


def spread_virtually(devices: VirtualDevices, model, device_map: dict[str, int]) -> None:
    """Put each module of ``device_map`` with its weights on its virtual device, as ``dispatch_model``
    would."""
    for name, index in device_map.items():
        module = model.hf_model.get_submodule(name)
        for tensor in [*module.parameters(), *module.buffers()]:
            devices.put(tensor, index)
        add_hook_to_module(module, _Align(virtual(index)))
    main_device = virtual(device_map["model.embed_tokens"])
    add_hook_to_module(model.hf_model, _Align(main_device, io_same_device=True))


@pytest.fixture
def keep_cpu_indices(monkeypatch):
    """``nn.Module.to`` reads its device through ``_parse_to``, which drops a CPU device's index: keep it."""
    parse = torch._C._nn._parse_to

    def parse_keeping_index(*args, **kwargs):
        device, *rest = parse(*args, **kwargs)
        given = kwargs.get("device", args[0] if args and isinstance(args[0], (str, torch.device)) else None)
        if device is not None and given is not None and torch.device(given).type == "cpu":
            device = torch.device(given)
        return (device, *rest)

    monkeypatch.setattr(torch._C._nn, "_parse_to", parse_keeping_index)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_hf_model("llama").save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def plain(tiny_folder):
    return load_model(tiny_folder, device="cpu", dtype="float64")


@pytest.fixture(scope="module")
def spread(tiny_folder):
    return load_model(tiny_folder, dtype="float64", device_map=SPLIT)


def assert_same_graph(expected, graph, atol: float = 0.0) -> None:
    for name in ("kind", "layer", "position", "index", "indptr", "indices"):
        np.testing.assert_array_equal(getattr(graph, name), getattr(expected, name), err_msg=name)
    for name in ("weights", "value", "constant", "activation", "target_probs"):
        np.testing.assert_allclose(getattr(graph, name), getattr(expected, name), rtol=0, atol=atol)


def assert_same_result(expected, result, atol: float = 0.0) -> None:
    for name in ("logits_after", "readout_after", "logits_before"):
        torch.testing.assert_close(getattr(result, name), getattr(expected, name), rtol=0, atol=atol)
    for before, after in zip(expected.activations_after, result.activations_after, strict=True):
        torch.testing.assert_close(after, before, rtol=0, atol=atol)


def edits_of(graph) -> list:
    """A scale, a set and an ablation of the first feature of each layer, and a residual edit."""
    features = graph.nodes_of(NodeKind.FEATURE)
    ids = [graph.node_id(int(features[graph.layer[features] == layer][0])) for layer in range(3)]
    vector = torch.linspace(-0.5, 0.5, 32, dtype=torch.float64)
    return [
        FeatureEdit.scale(ids[0], 2.0),
        FeatureEdit.set(ids[1], 0.5),
        FeatureEdit.ablate(ids[2]),
        ResidualEdit(1, vector, (2,)),
    ]


def run_everything(model, transcoders):
    """The graph, capped graph, interventions (both modes) and edited continuation of the test prompt."""
    graph = attribute(model, transcoders, PROMPT, progress=False)
    capped = attribute(model, transcoders, PROMPT, progress=False, max_feature_nodes=12)
    edits = edits_of(graph)
    open_loop = intervene(model, transcoders, PROMPT, edits)
    constrained = intervene(model, transcoders, PROMPT, edits[:3], mode="constrained")
    first = graph.nodes_of(NodeKind.FEATURE)[0]
    everywhere = [FeatureEdit.set((int(graph.layer[first]), None, int(graph.index[first])), 1.5), edits[3]]
    text = generate_with(model, transcoders, PROMPT, everywhere, max_new_tokens=6)
    return graph, capped, open_loop, constrained, text


def assert_same_everything(expected, found, atol: float = 0.0) -> None:
    assert_same_graph(expected[0], found[0], atol)
    assert_same_graph(expected[1], found[1], atol)
    assert_same_result(expected[2], found[2], atol)
    assert_same_result(expected[3], found[3], atol)
    assert found[4] == expected[4]


def test_a_dispatched_model_offloads_and_computes_the_same(plain, spread):
    assert spread.dispatched and not plain.dispatched
    weights = dict(spread.hf_model.named_parameters())
    assert weights["lm_head.weight"].device.type == "meta", "accelerate offloaded the unembedding"
    assert weights["model.layers.1.mlp.up_proj.weight"].device.type == "meta"
    assert spread.device == MAIN and spread.layer_devices() == [MAIN] * 3
    assert torch.equal(spread.unembedding, plain.unembedding)
    ids = plain.encode(PROMPT)
    assert torch.equal(spread.logits(ids), plain.logits(ids))
    assert spread.generate(PROMPT, 8) == plain.generate(PROMPT, 8)
    cut = spread.first_layers(2)
    assert torch.equal(cut.logits(ids), plain.first_layers(2).logits(ids))
    assert not torch.equal(cut.logits(ids), plain.logits(ids)), "the cut model runs only its layers"
    with pytest.raises(CircuitmapError, match="cannot be moved or cast"):
        spread.to("cpu")


@pytest.mark.parametrize("kind", ["plt-topk-skip", "clt-jumprelu-skip"])
def test_graphs_and_interventions_match_the_undispatched_model(plain, spread, kind):
    expected = run_everything(plain, random_transcoders(kind, 3, 32))
    assert_same_everything(expected, run_everything(spread, random_transcoders(kind, 3, 32)))


@pytest.mark.parametrize("kind", ["plt-topk-skip", "clt-jumprelu-skip"])
@pytest.mark.parametrize("placement", [None, [virtual(5), MAIN, virtual(6)]], ids=["follow", "placed"])
def test_a_model_over_virtual_devices(plain, kind, placement, keep_cpu_indices):
    expected = run_everything(plain, random_transcoders(kind, 3, 32))
    model = tiny_model("llama", dtype=torch.float64)
    with VirtualDevices() as devices:
        spread_virtually(devices, model, VIRTUAL_SPLIT)
        assert model.device == virtual(1) and model.layer_devices() == [virtual(1), virtual(2), virtual(3)]
        _, cache = model.run_with_cache(PROMPT, ["resid_pre", "mlp_in", "resid_final"])
        assert cache["resid_pre", 2].device == virtual(3), "hooks see tensors where their layer runs"
        assert cache["mlp_in", 1].device == virtual(2) and cache["resid_final", None].device == virtual(2)
        transcoders = random_transcoders(kind, 3, 32)
        if placement is not None:
            transcoders.place(placement)
        found = run_everything(model, transcoders)
        assert [transcoders.layer_device(layer) for layer in range(3)] == (placement or model.layer_devices())
        assert transcoders.placement == (None if placement is None else tuple(placement))
    assert_same_everything(expected, found)


def test_placing_transcoders_round_trips(spread):
    transcoders = random_transcoders("clt-jumprelu-skip", 3, 32)
    assert transcoders.placement is None
    assert transcoders.place("cpu").placement == (MAIN,) * 3
    assert transcoders.place(None).placement is None
    assert transcoders.place(["cpu", MAIN, "cpu"]).placement == (MAIN,) * 3
    assert transcoders.place({1: "cpu"}).placement == (MAIN,) * 3
    assert transcoders.first_layers(2).placement == (MAIN,) * 2
    assert transcoders.layer_device(2) == MAIN
    transcoders.to(dtype=torch.float32)
    attribute(spread, transcoders, PROMPT, progress=False)
    assert transcoders.dtype == torch.float64, "a placed set is still cast to the model's dtype"
    assert transcoders.placement == (MAIN,) * 3
    with pytest.raises(CircuitmapError, match=r"place needs one device per layer \(3\), got 2"):
        transcoders.place(["cpu", "cpu"])
    with pytest.raises(CircuitmapError, match="layer 5 is out of range"):
        transcoders.place({5: "cpu"})
    with pytest.raises(CircuitmapError, match="unknown device 'gpu7'"):
        transcoders.place("gpu7")


@pytest.mark.parametrize(
    ("device_map", "device", "message"),
    [
        ({"": "tpu"}, None, "device map entry '': unknown device 'tpu'"),
        ({"": "cpu", "lm_head": 1.5}, None, "device map entry 'lm_head': a device is a name or a GPU index"),
        (
            {"lm_head": OFFLOADED, "model": MAIN, "model.layerz.0": MAIN},
            None,
            "the model has no module 'model.layerz.0'",
        ),
        (
            {"model.embed_tokens": MAIN, "lm_head": OFFLOADED},
            None,
            "on its device map: The device_map provided",
        ),
        ("fastest", None, "device map 'fastest' is neither one of auto, balanced"),
        ({}, None, "a device map is one of auto"),
        ("auto", "cpu", "give a device or a device_map, not both"),
    ],
)
@pytest.mark.filterwarnings("ignore:The following device_map keys do not match")
def test_a_device_map_that_cannot_be_honoured_is_one_line(tiny_folder, device_map, device, message):
    with pytest.raises(ModelLoadError, match=message) as error:
        load_model(tiny_folder, device=device, device_map=device_map)
    assert "\n" not in str(error.value) and len(str(error.value)) < 400


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_a_device_map_naming_a_missing_gpu(tiny_folder):
    with pytest.raises(ModelLoadError, match="device map entry 'lm_head': .*CUDA is not available"):
        load_model(tiny_folder, device_map={"": "cpu", "lm_head": 0})


def test_cli_device_map(tiny_folder, tmp_path, capsys):
    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps({"model": "cpu", "lm_head": "cpu"}))
    assert main(["next", "--model", str(tiny_folder), "Hello", "-k", "3", "--device-map", str(mapping)]) == 0
    spread_lines = capsys.readouterr().out
    assert main(["next", "--model", str(tiny_folder), "Hello", "-k", "3", "--device", "cpu"]) == 0
    assert capsys.readouterr().out == spread_lines
    mapping.write_text("[1, 2]")
    assert main(["next", "--model", str(tiny_folder), "Hello", "--device-map", str(mapping)]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert errors == [
        f"circuitmap: error: {mapping}: a device map file holds a JSON object of module names to devices"
    ]


@needs_shared(STORIES)
def test_a_model_read_into_memory_is_dispatched_too():
    plain = load_model(STORIES / "stories260K.bin", device="cpu")
    layers = {f"model.layers.{i}": MAIN if i < 3 else OFFLOADED for i in range(5)}
    spread = load_model(
        STORIES / "stories260K.bin",
        device_map={
            "model.embed_tokens": MAIN,
            "model.rotary_emb": MAIN,
            **layers,
            "model.norm": OFFLOADED,
            "lm_head": OFFLOADED,
        },
    )
    assert spread.dispatched
    ids = plain.encode("Once upon a time")
    assert torch.equal(spread.logits(ids), plain.logits(ids))
    assert torch.equal(
        load_model(STORIES / "stories260K.bin", device_map="auto").logits(ids), plain.logits(ids)
    )


@needs_cuda
def test_a_model_over_a_gpu_and_the_cpu(tiny_folder, plain):
    """Layer 1 and the unembedding offloaded to the CPU (run on the GPU), layer 1's transcoder on the CPU."""
    gpu_map = {name: 0 if device is MAIN else OFFLOADED for name, device in SPLIT.items()}
    spread = load_model(tiny_folder, dtype="float64", device_map=gpu_map)
    assert spread.device == torch.device("cuda", 0) and spread.layer_device(1) == torch.device("cuda", 0)
    assert load_model(tiny_folder, device_map="auto").device.type == "cuda"
    expected = run_everything(plain, random_transcoders("clt-jumprelu-skip", 3, 32))
    transcoders = random_transcoders("clt-jumprelu-skip", 3, 32).place({0: "cuda:0", 1: "cpu", 2: "cuda:0"})
    assert_same_everything(expected, run_everything(spread, transcoders), atol=1e-9)
    assert transcoders.layer_device(1) == MAIN


@needs_two_gpus
def test_a_model_over_two_gpus(tiny_folder, plain):
    """Layers alternate between two GPUs and each layer's transcoder sits on the other one."""
    gpu_map = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.norm": 1, "lm_head": 0}
    gpu_map.update({f"model.layers.{i}": i % 2 for i in range(3)})
    spread = load_model(tiny_folder, dtype="float64", device_map=gpu_map)
    assert spread.layer_devices() == [torch.device("cuda", i % 2) for i in range(3)]
    for kind in ("plt-topk-skip", "clt-jumprelu-skip"):
        expected = run_everything(plain, random_transcoders(kind, 3, 32))
        transcoders = random_transcoders(kind, 3, 32).place([f"cuda:{1 - i % 2}" for i in range(3)])
        assert_same_everything(expected, run_everything(spread, transcoders), atol=1e-9)
