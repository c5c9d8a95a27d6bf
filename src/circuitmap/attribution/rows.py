"""Rows of the adjacency matrix: batched backward passes through the replacement model.

A row is a read-out vector injected at one place: a feature's encoder row at its layer's MLP input and
position, or a target's vector at a read-out point at the last position. Its direct effects are the
gradients it sends to the places where sources write (every MLP output below it, and the embedding), dotted
with what the sources write there (``Sources``).

With attention patterns and norm scales frozen, the map from those places to a row is linear, and causal: a
row at position p depends on positions ≤ p only. So rows are computed on *row graphs*: the replacement model
rebuilt over a prefix of the prompt as a batch of copies, one copy per row, keeping only the linear path
(the MLPs, queries, keys and unembedding are bypassed: their values play no part in a gradient). Then:

1. sort the rows by prefix (the shortest multiple of ``prefix_step`` that holds a row's position), then by
   layer, and cut each prefix's rows into passes where that costs least: a pass goes down from its highest
   row's layer, so rows of many layers in one pass pay for the deepest (``RowComputer.passes``);
2. inject each row's vector into its own copy at its place (``_Seed``) and run one ordinary backward pass
   from the batch's highest injection down to the embedding;
3. as the gradient passes each layer's output (which is the gradient at its MLP output), multiply it with
   what that layer's sources write there, a few batched products per layer (``Sources.tiers``), and let it
   go; the gradient reaching the embedding gives the token columns.

A graph is built once per prefix length and number of copies and reused by every batch that needs it; it
holds one copy of the embedding per row and views of the frozen constants (the patterns are read in place,
never copied per prefix). Its forward pass skips the norms' own computation (the frozen scale replaces it)
and hands freed memory back to the system after every layer: otherwise the C allocator keeps the batch's
temporaries of every layer, about a gigabyte for 512 rows of SmolLM2. On a model spread over several devices
each product is taken where its gradient arrives and gathered on the first layer's device.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from circuitmap.attribution.progress import Reporter
from circuitmap.attribution.replacement import ReplacementRun
from circuitmap.attribution.sources import Sources
from circuitmap.hardware import release_free_memory
from circuitmap.models import Model
from circuitmap.models.adapters import get_module
from circuitmap.models.hooks import bypass, resident_tensor
from circuitmap.transcoders import Transcoders

PASS_BUDGET_BYTES = 8 * 2**20
GPU_PASS_BUDGET_BYTES = 256 * 2**20
MAX_ROWS_PER_PASS = 512
N_PREFIXES = 16
MIN_PREFIX_STEP = 32
SMALL_PASS_DIVISOR = 4
"""Besides full passes, a prefix's rows may go in passes on a graph with this many times fewer copies."""
PASS_OVERHEAD_ROW_TOKENS = 64
"""Fixed cost of one layer of one pass, in units of one row's cost per token of the prefix (measured)."""


@dataclass
class RowSpec:
    """Rows to compute: read-out ``vectors`` [n, d] injected at ``point`` and ``position``; ``"mlp_in"`` rows
    are features of ``layer``, other rows read ``resid_final`` or ``final_norm``."""

    point: list[str]
    layer: torch.Tensor
    position: torch.Tensor
    vectors: torch.Tensor

    def __len__(self) -> int:
        return len(self.point)

    def subset(self, rows: torch.Tensor) -> RowSpec:
        """The rows at indices ``rows``, in that order."""
        return RowSpec(
            [self.point[i] for i in rows.tolist()],
            self.layer[rows],
            self.position[rows],
            self.vectors[rows.to(self.vectors.device)],
        )


def concat_specs(specs: Sequence[RowSpec]) -> RowSpec:
    """One RowSpec holding the rows of several, in order (the vectors on the first one's device: feature rows
    come from the transcoders, target rows from the unembedding, which a device map may put elsewhere)."""
    device = specs[0].vectors.device
    return RowSpec(
        [point for spec in specs for point in spec.point],
        torch.cat([spec.layer for spec in specs]),
        torch.cat([spec.position for spec in specs]),
        torch.cat([spec.vectors.to(device) for spec in specs]),
    )


def rows_per_pass(model: Model, n_tokens: int) -> int:
    """Rows per backward pass: as many as keep one gradient of the pass within about 8 MiB on a CPU (256 MiB
    on a GPU), at most 512. On a CPU larger passes buy no speed (the products are already large) but put every
    buffer of the pass above the size that the C allocator returns to the system, so that it is mapped and
    zeroed again each time; a GPU's caching allocator has no such cost and wants larger products."""
    budget = GPU_PASS_BUDGET_BYTES if model.device.type == "cuda" else PASS_BUDGET_BYTES
    per_row = n_tokens * model.d_model * model.dtype.itemsize
    return int(min(MAX_ROWS_PER_PASS, max(1, budget // per_row)))


def prefix_step(n_tokens: int) -> int:
    """Granularity of the prefixes that row graphs are built on: at most 16 graphs, none shorter than 32."""
    return max(MIN_PREFIX_STEP, -(-n_tokens // N_PREFIXES))


class _Seed(torch.autograd.Function):
    """Identity on a tensor, plus a scalar handle: a backward pass started at the handle adds the rows'
    vectors that are waiting under this point's key (``seeds[key]``, [B, n, d]) to the gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, seeds: dict, key: tuple[str, int]):
        ctx.seeds, ctx.key = seeds, key
        ctx.set_materialize_grads(False)
        return x.view_as(x), x.new_zeros(())

    @staticmethod
    def backward(ctx, grad: torch.Tensor | None, _handle: torch.Tensor | None):
        seed = ctx.seeds.get(ctx.key)
        if seed is not None:
            grad = seed if grad is None else grad + seed
        return grad, None, None


class RowGraph:
    """The linear part of the replacement model over the first ``length`` positions, ``batch`` copies."""

    def __init__(
        self,
        model: Model,
        transcoders: Transcoders,
        run: ReplacementRun,
        ids: torch.Tensor,
        length: int,
        batch: int,
    ):
        self.length, self.batch = length, batch
        self.seeds: dict[tuple[str, int], torch.Tensor] = {}
        self.handles: dict[tuple[str, int], torch.Tensor] = {}
        self.sources: Sources | None = None
        self.values: torch.Tensor | None = None
        mlp_inputs: dict[int, torch.Tensor] = {}
        embed: list[torch.Tensor] = []

        def embedding_leaf(hidden: torch.Tensor) -> torch.Tensor:
            leaf = hidden.detach().clone().requires_grad_(True)
            embed.append(leaf)
            return leaf

        def seed_point(key: tuple[str, int], keep: bool = False):
            def seed(hidden: torch.Tensor) -> torch.Tensor:
                output, self.handles[key] = _Seed.apply(hidden, self.seeds, key)
                if keep:
                    mlp_inputs[key[1]] = output
                return output

            return seed

        def cut_mlp(layer: int):
            def cut(output: torch.Tensor) -> torch.Tensor:
                result = output.detach()
                if transcoders.has_skip:
                    result = result + transcoders.skip(layer, mlp_inputs.pop(layer)).to(result.device)
                return result

            return cut

        def watch_layer(layer: int):
            def watch(hidden: torch.Tensor) -> None:
                hidden.register_hook(lambda gradient: self._take(layer, gradient))
                release_free_memory()

            return watch

        hooks = [("resid_pre", 0, embedding_leaf)]
        for layer in range(model.n_layers):
            hooks += [
                ("mlp_in", layer, seed_point(("mlp_in", layer), keep=transcoders.has_skip)),
                ("mlp_out", layer, cut_mlp(layer)),
                ("resid_post", layer, watch_layer(layer)),
            ]
        hooks += [
            ("resid_final", None, seed_point(("resid_final", -1))),
            ("final_norm", None, seed_point(("final_norm", -1))),
        ]
        with (
            run.frozen.prefix(length),
            model.hooks(*hooks),
            bypass(_bypassed(model)),
            _without_parameter_gradients(model),
            torch.enable_grad(),
        ):
            model.forward(ids[:, :length].expand(batch, length))
        self.embed = embed[0]

    def compute(self, sources: Sources, spec: RowSpec) -> torch.Tensor:
        """Values [len(spec), n_columns] of at most ``batch`` rows, all within this graph's prefix."""
        n_rows = len(spec)
        keys = [
            (point, layer if point == "mlp_in" else -1)
            for point, layer in zip(spec.point, spec.layer.tolist(), strict=True)
        ]
        for key in dict.fromkeys(keys):
            handle = self.handles[key]
            members = torch.tensor([row for row, other in enumerate(keys) if other == key])
            seed = torch.zeros(
                self.batch, self.length, self.embed.shape[-1], dtype=handle.dtype, device=handle.device
            )
            seed[members.to(seed.device), spec.position[members].to(seed.device)] = spec.vectors[
                members.to(spec.vectors.device)
            ].to(seed)
            self.seeds[key] = seed
        home = sources.embed.device
        self.sources = sources
        self.values = torch.zeros(self.batch, sources.n_columns, dtype=sources.embed.dtype, device=home)
        handles = [self.handles[key] for key in self.seeds]
        try:
            (embed_gradient,) = torch.autograd.grad(
                handles,
                [self.embed],
                [torch.ones_like(handle) for handle in handles],
                retain_graph=True,
                allow_unused=True,
            )
            values = self.values
        finally:
            self.seeds.clear()
            self.sources, self.values = None, None
        if embed_gradient is not None:
            n_written = sources.n_features + sources.n_errors
            values[:, n_written : n_written + self.length] = torch.einsum(
                "bpd,pd->bp", embed_gradient.to(home), sources.embed[: self.length]
            )
        return values[:n_rows]

    def _take(self, layer: int, gradient: torch.Tensor) -> None:
        """Products of the gradient at layer ``layer``'s output with what the sources write to its MLP
        output, added to the rows' values."""
        values = self.values
        for tier in self.sources.tiers[layer]:
            n_positions = int(torch.searchsorted(tier.positions, self.length))
            if n_positions == 0:
                continue
            positions = tier.positions[:n_positions].to(gradient.device)
            products = torch.bmm(
                gradient.transpose(0, 1)[positions], tier.vectors[:n_positions].transpose(1, 2)
            )
            columns = tier.columns[:n_positions].reshape(-1)
            written = (columns >= 0).nonzero(as_tuple=True)[0]
            flat = products.transpose(0, 1).reshape(self.batch, -1)
            values.index_add_(1, columns[written], flat[:, written.to(flat.device)].to(values.device))


def _bypassed(model: Model) -> list:
    """Modules whose values a row graph does not need: every MLP (its output is cut), the norms (the frozen
    scale is applied by their hooks), the unembedding, and where a layer has separate projections, the query
    and key ones (the pattern is replayed) and the value and output ones, which keep only their gradient."""
    points = model.points
    replaced = [(points.layer_module(i, points.adapter.mlp), _identity) for i in range(model.n_layers)]
    replaced += [(norm, _identity) for norm in points.norm_modules()]
    replaced.append((get_module(model.hf_model, points.adapter.unembed), _identity))
    for attention in points.attention_modules():
        projections = {
            name: getattr(attention, name, None) for name in ("q_proj", "k_proj", "v_proj", "o_proj")
        }
        if not all(isinstance(module, torch.nn.Linear) for module in projections.values()):
            continue
        for name in ("q_proj", "k_proj"):
            replaced.append((projections[name], _zeros(projections[name].out_features)))
        for name in ("v_proj", "o_proj"):
            replaced.append((projections[name], _gradient_only(projections[name])))
    return replaced


@contextmanager
def _without_parameter_gradients(model: Model) -> Iterator[None]:
    """Context: the model's parameters do not require gradients, so a graph built inside keeps no inputs for
    weight gradients it will never compute."""
    parameters = [p for p in model.hf_model.parameters() if p.requires_grad]
    for parameter in parameters:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter in parameters:
            parameter.requires_grad_(True)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


class _LinearGradient(torch.autograd.Function):
    """A linear map inside a row graph, whose values nothing reads (every later operation is linear with
    frozen coefficients): the forward pass returns zeros of the output's shape without the product, the
    backward pass carries the gradient back through the weight [out, in]."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor):
        ctx.save_for_backward(weight)
        return x.new_zeros(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, gradient: torch.Tensor):
        (weight,) = ctx.saved_tensors
        return gradient @ weight.to(gradient), None


def _gradient_only(module: torch.nn.Linear):
    def linear(x: torch.Tensor) -> torch.Tensor:
        return _LinearGradient.apply(x, resident_tensor(module, "weight").detach())

    return linear


def _zeros(width: int):
    def zeros(x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], width)

    return zeros


@dataclass
class RowPass:
    """One backward pass: the rows ``members`` of a spec, on the graph of ``length`` positions with
    ``copies`` copies."""

    members: torch.Tensor
    length: int
    copies: int


class RowComputer:
    """Computes rows of any spec against any sources of one replacement run, on row graphs built as needed
    and kept for reuse (one per prefix length and number of copies)."""

    def __init__(
        self,
        model: Model,
        transcoders: Transcoders,
        run: ReplacementRun,
        ids: torch.Tensor,
        rows_per_pass: int,
    ):
        self.model, self.transcoders, self.run, self.ids = model, transcoders, run, ids
        self.rows_per_pass = rows_per_pass
        self.small_pass = max(1, rows_per_pass // SMALL_PASS_DIVISOR)
        self.n_tokens = ids.shape[1]
        self.step = prefix_step(self.n_tokens)
        self.graphs: dict[tuple[int, int], RowGraph] = {}

    def prefix_of(self, position: int) -> int:
        """Length of the graph that serves rows at ``position``."""
        return min(self.n_tokens, (position // self.step + 1) * self.step)

    def graph(self, length: int, copies: int) -> RowGraph:
        if (length, copies) not in self.graphs:
            self.graphs[length, copies] = RowGraph(
                self.model, self.transcoders, self.run, self.ids, length, copies
            )
            release_free_memory()
        return self.graphs[length, copies]

    def passes(self, spec: RowSpec) -> list[RowPass]:
        """The backward passes that compute ``spec``'s rows: sorted by prefix, then layer; each prefix's rows
        cut at the changes of layer that make the cheapest passes (``_cheapest_segments``), each segment in
        passes of at most ``rows_per_pass`` rows."""
        prefixes = torch.tensor([self.prefix_of(p) for p in spec.position.tolist()], dtype=torch.long)
        order = torch.argsort(prefixes * (self.model.n_layers + 2) + spec.layer, stable=True)
        lengths, counts = torch.unique_consecutive(prefixes[order], return_counts=True)
        passes = []
        for length, members in zip(lengths.tolist(), order.split(counts.tolist()), strict=True):
            layers = spec.layer[members]
            for start, stop in self._cheapest_segments(layers, length):
                segment = members[start:stop]
                for copies, size in self._packing(len(segment), length)[1]:
                    passes.append(RowPass(segment[:size], length, copies))
                    segment = segment[size:]
        return passes

    def _cheapest_segments(self, layers: torch.Tensor, length: int) -> list[tuple[int, int]]:
        """Cut rows sorted by layer into runs of whole layers so that the summed cost of their passes is least
        (dynamic programming over the changes of layer): a pass costs its depth (its highest layer + 1) times
        its copies' and its fixed work."""
        values, counts = torch.unique_consecutive(layers, return_counts=True)
        ends = [0, *torch.cumsum(counts, 0).tolist()]
        depths = (values + 1).tolist()
        best, cut = [0.0] + [float("inf")] * len(depths), [0] * (len(depths) + 1)
        for stop in range(1, len(depths) + 1):
            for start in range(stop):
                cost = best[start] + depths[stop - 1] * self._packing(ends[stop] - ends[start], length)[0]
                if cost < best[stop]:
                    best[stop], cut[stop] = cost, start
        segments, stop = [], len(depths)
        while stop > 0:
            segments.append((ends[cut[stop]], ends[stop]))
            stop = cut[stop]
        return segments[::-1]

    def _packing(self, n_rows: int, length: int) -> tuple[float, list[tuple[int, int]]]:
        """Cost per layer and ``(copies, rows)`` of each pass for ``n_rows`` rows of one depth: full passes,
        and the rest in one full pass or in small ones, whichever costs less."""
        full, rest = divmod(n_rows, self.rows_per_pass)
        passes = [(self.rows_per_pass, self.rows_per_pass)] * full
        if rest:
            n_small = -(-rest // self.small_pass)
            small_cost = n_small * (self.small_pass * length + PASS_OVERHEAD_ROW_TOKENS)
            if small_cost < self.rows_per_pass * length + PASS_OVERHEAD_ROW_TOKENS:
                passes += [
                    (self.small_pass, min(self.small_pass, rest - i * self.small_pass))
                    for i in range(n_small)
                ]
            else:
                passes.append((self.rows_per_pass, rest))
        cost = sum(copies * length + PASS_OVERHEAD_ROW_TOKENS for copies, _ in passes)
        return cost, passes

    def compute(self, sources: Sources, spec: RowSpec, advance=None) -> torch.Tensor:
        """Values [len(spec), n_columns] of every row of ``spec``, in its order."""
        values = torch.empty(
            len(spec), sources.n_columns, dtype=sources.embed.dtype, device=sources.embed.device
        )
        for row_pass in self.passes(spec):
            members = row_pass.members
            graph = self.graph(row_pass.length, row_pass.copies)
            values[members.to(values.device)] = graph.compute(sources, spec.subset(members))
            if advance is not None:
                advance(len(members))
        return values

    def batches(
        self, sources: Sources, spec: RowSpec, reporter: Reporter, description: str, batch_size: int
    ) -> Iterator[tuple[slice, torch.Tensor]]:
        """Yield ``(rows, values)`` for consecutive batches of ``spec``'s rows of ``batch_size``."""
        with reporter.stage(len(spec), description) as advance:
            for start in range(0, len(spec), batch_size):
                rows = slice(start, min(start + batch_size, len(spec)))
                part = spec.subset(torch.arange(rows.start, rows.stop))
                yield rows, self.compute(sources, part, advance)
