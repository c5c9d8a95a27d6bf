"""Toy models of superposition: the report ``docs/superposition.md`` and its figures.

Four results of Elhage et al. (2022), "Toy Models of Superposition", reproduced with ``circuitmap.toy``
(ReLU output models ``x' = ReLU(WᵀW x + b)``, one instance per setting, all instances trained together):

(a) **Sparsity packs features.** n = 20 features in m = 5 dimensions, importance ``0.7 ** i``, at seven
    feature densities from 1 to 0.001: per density ``WᵀW``, the norms ``‖W_i‖`` coloured by superposition
    ``Σ_{j≠i} (Ŵ_i · W_j)²``, and a table of represented features (``‖W_i‖ ≥ 0.5``), features in
    superposition (represented, superposition ≥ 0.1) and the loss on 100,000 fresh inputs.
(b) **Phase diagram.** n = 2 features, m = 1 dimension; feature 1 has importance 1, the extra feature 2
    an importance from 0.1 to 10; both features share a density from 1 to 0.01 (9 × 9 settings). Each
    setting trains four times from different initial weights and keeps the run of lowest expected loss
    (computed by quadrature over which features are present, not sampled, since at density 0.01 the
    interference that decides between solutions happens once in 10,000 inputs). The kept run is
    classified by the extra feature: *not represented* (``‖W_2‖ < 0.5``), *dedicated dimension*
    (``‖W_2‖ ≥ 0.5``, ``‖W_1‖ < 0.5``), *superposition* (both at least 0.5, opposite signs: an antipodal
    pair) or *other* (both at least 0.5 with the same sign, or neither).
(c) **Geometry.** n = 400 features in m = 30 dimensions, all of importance 1, at 17 densities with
    ``1/(1 − S)`` (one over the density) from 1 to 100, twelve of them between 1.6 and 8 where the
    dimensions per feature fall from 1 to 1/3: the dimensions per feature ``m / ‖W‖_F²`` and each
    represented feature's dimensionality ``D_i = ‖W_i‖² / Σ_j (Ŵ_i · W_j)²``; a feature counts as near a
    fraction (1, 3/4, 2/3, 1/2, 2/5, 3/8, 1/3) when that is the closest one and it lies within 0.01.
(d) **Sparse dictionary recovery.** A sparse autoencoder (``circuitmap.toy.train_sparse_dictionary``: ReLU
    encoder, unit-norm decoder columns, squared error plus an L1 penalty on the latents, dictionary twice
    the number of true features, three L1 weights) trained on hidden activations ``h = W x`` of two toys in
    superposition: the (a) model at density 0.01, and 80 equally important features in 20 dimensions at
    density 0.02. For each represented true feature, the best cosine between ``W_i`` and a decoder column;
    a feature counts as recovered above the 99th percentile of the best cosine that a random unit
    direction reaches against as many random unit directions in the same number of dimensions
    (``chance_cosines``), so that fewer than 1 in 100 features would pass by chance. A random dictionary
    of the same size is scored the same way.

``make superposition-report`` (or ``python examples/superposition_report.py``) regenerates the report and
the figures under ``docs/superposition/``. Everything is seeded; with the same thread count (``--threads``,
1 by default; the report names it and the machine) reruns are byte-identical. It prints its running time
(four to five minutes on one thread of a 2-core x86_64 machine); the report leaves it out, so
that reruns stay identical.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
import torch

matplotlib.use("Agg")
from matplotlib import pyplot as plt  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402

from circuitmap.toy import (  # noqa: E402
    DictionaryConfig,
    ToyConfig,
    ToyModel,
    best_cosines,
    chance_cosines,
    dimensionality,
    feature_norms,
    importance,
    sample_features,
    superposition,
    train_sparse_dictionary,
    train_toy_models,
    weighted_loss,
)

PACKING = ToyConfig(n_features=20, n_hidden=5, importance_decay=0.7, steps=5_000, batch_size=1_024, seed=0)
PACKING_DENSITIES = (1.0, 0.3, 0.1, 0.03, 0.01, 0.003, 0.001)
SHARED = 0.1
"""A represented feature is in superposition when its superposition is at least this."""
EVALUATION_INPUTS = 100_000

PHASE = ToyConfig(n_features=2, n_hidden=1, steps=2_000, batch_size=512, seed=1)
PHASE_IMPORTANCES = tuple(float(v) for v in np.logspace(-1, 1, 9))
PHASE_DENSITIES = tuple(float(v) for v in np.logspace(0, -2, 9))
PHASE_REPLICATES = 4
QUADRATURE_POINTS = 200
PHASES = ("not represented", "dedicated dimension", "superposition", "other")
PHASE_COLOURS = ("#d5d8dc", "#2471a3", "#c0392b", "#17202a")

GEOMETRY = ToyConfig(
    n_features=400, n_hidden=30, importance_decay=1.0, steps=2_000, batch_size=512, lr=3e-3, seed=2
)
GEOMETRY_INVERSE_DENSITIES = (1.0, *(float(v) for v in np.geomspace(1.6, 8, 12)), 12.0, 20.0, 40.0, 100.0)
"""1 / density: fine steps where the dimensions per feature fall from 1 towards 1/3, coarse ones after."""
FRACTIONS = ((1, 1), (3, 4), (2, 3), (1, 2), (2, 5), (3, 8), (1, 3))
NEAR = 0.01
"""A dimensionality is near a fraction when that fraction is the closest and at most this far."""
PLATEAU = 0.02
"""A density sits on the 1/2 or 2/5 plateau when its dimensions per feature is at most this far from it."""

PACKED_DENSITY = 0.01
"""The (a) instance whose activations (d) decomposes."""
LARGER_TOY = ToyConfig(
    n_features=80, n_hidden=20, importance_decay=1.0, steps=3_000, batch_size=1_024, lr=3e-3, seed=4
)
LARGER_DENSITY = 0.02
RECOVERY_SAMPLES = 200_000
RECOVERY_DICTIONARY = DictionaryConfig(steps=3_000, batch_size=1_024, lr=3e-3)
RECOVERY_L1 = (0.1, 0.3, 1.0)
CHANCE_SAMPLES = 20_000
CHANCE_QUANTILE = 0.99


def fraction_text(fraction: tuple[int, int]) -> str:
    return "1" if fraction == (1, 1) else f"{fraction[0]}/{fraction[1]}"


def save(figure, path: Path) -> None:
    """A PNG without the software version or a date, so that reruns write the same bytes."""
    figure.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(figure)


@dataclass
class Section:
    """One figure's text for the report, and the key numbers for the summary."""

    lines: list[str]
    summary: list[str]


# (a) ------------------------------------------------------------------------------------------------------


def packing(figures: Path, log: Callable[[str], None]) -> tuple[Section, ToyModel]:
    model = train_toy_models(PACKING, PACKING_DENSITIES, progress=False)
    log("(a) trained")
    W = model.W.detach()
    norms, shared = feature_norms(W), superposition(W)
    generator = torch.Generator().manual_seed(PACKING.seed + 100)
    x = sample_features(torch.tensor(PACKING_DENSITIES), PACKING.n_features, EVALUATION_INPUTS, generator)
    with torch.no_grad():
        losses = weighted_loss(model, x, importance(PACKING))

    columns = len(PACKING_DENSITIES)
    figure, axes = plt.subplots(2, columns, figsize=(2.1 * columns, 6.2), height_ratios=(1, 1.15))
    colours = plt.get_cmap("plasma")
    for k, density in enumerate(PACKING_DENSITIES):
        gram = (W[k].T @ W[k]).numpy()
        axes[0, k].imshow(gram, cmap="RdBu_r", vmin=-1, vmax=1)
        axes[0, k].set_title(f"density {density:g}", fontsize=9)
        axes[0, k].set_xticks([])
        axes[0, k].set_yticks([])
        bars = axes[1, k]
        bars.barh(
            range(PACKING.n_features),
            norms[k].numpy(),
            color=colours(np.clip(shared[k].numpy(), 0, 1)),
            edgecolor="#555555",
            linewidth=0.3,
        )
        bars.invert_yaxis()
        bars.set_xlim(0, 1.3)
        bars.axvline(0.5, color="#888888", linewidth=0.6, linestyle=":")
        bars.set_yticks([0, 5, 10, 15, 19] if k == 0 else [])
        bars.tick_params(labelsize=7)
        bars.set_xlabel("‖W_i‖", fontsize=8)
    axes[0, 0].set_ylabel("WᵀW (blue −1, red +1)", fontsize=8)
    axes[1, 0].set_ylabel("feature i (most important at the top)", fontsize=8)
    scale = plt.cm.ScalarMappable(cmap=colours, norm=plt.Normalize(0, 1))
    figure.colorbar(scale, ax=axes[1, :], fraction=0.02, pad=0.01, label="superposition Σ_{j≠i} (Ŵ_i·W_j)²")
    figure.suptitle(
        f"(a) n = {PACKING.n_features} features in m = {PACKING.n_hidden} dimensions, importance "
        f"{PACKING.importance_decay}^i: as features get sparser, more of them are packed",
        fontsize=10,
    )
    save(figure, figures / "a-packing.png")

    rows, summary_counts = [], []
    for k, density in enumerate(PACKING_DENSITIES):
        kept = norms[k] >= 0.5
        in_superposition = kept & (shared[k] >= SHARED)
        rows.append(
            f"| {density:g} | {int(kept.sum())} | {int(in_superposition.sum())} | "
            f"{_indices(kept)} | {float(losses[k]):.4g} | {float(losses[k]) / density:.4g} |"
        )
        summary_counts.append((density, int(kept.sum()), int(in_superposition.sum())))
    dense, sparsest = summary_counts[0], summary_counts[-1]
    most = max(summary_counts, key=lambda c: c[1])
    dense_kept = norms[0] >= 0.5
    dense_text = (
        f"the {PACKING.n_hidden} most important, each with a dimension of its own"
        if int(dense_kept.sum()) == PACKING.n_hidden
        and bool(dense_kept[: PACKING.n_hidden].all())
        and dense[2] == 0
        else f"features {_indices(dense_kept)}"
    )
    beyond = [c for c in summary_counts if c[1] > PACKING.n_hidden]
    lines = [
        "## (a) Sparsity packs more features than dimensions",
        "",
        f"n = {PACKING.n_features} features, m = {PACKING.n_hidden} dimensions, feature i of importance "
        f"{PACKING.importance_decay}^i, {PACKING.steps:,} AdamW steps of {PACKING.batch_size:,} inputs "
        f"(lr {PACKING.lr:g}), one instance per density, seed {PACKING.seed}. A feature is represented when "
        f"‖W_i‖ ≥ 0.5 and in superposition when it is represented and Σ_(j≠i) (Ŵ_i · W_j)² ≥ {SHARED}. "
        f"The loss is the importance-weighted squared error on {EVALUATION_INPUTS:,} fresh inputs (summed "
        "over features, averaged over inputs); divided by the density it compares across densities.",
        "",
        "![(a) WᵀW and feature norms per density](superposition/a-packing.png)",
        "",
        "| density | represented | in superposition | represented features | loss | loss / density |",
        "|---:|---:|---:|---|---:|---:|",
        *rows,
        "",
        f"Dense (density {dense[0]:g}), {dense[1]} of {PACKING.n_features} features are represented, "
        f"{dense[2]} of them in superposition: {dense_text}. "
        + (
            f"From density {beyond[0][0]:g} on, more features than dimensions are represented. "
            if beyond
            else "No density represents more features than dimensions. "
        )
        + f"At density {sparsest[0]:g}, {sparsest[1]} of {PACKING.n_features} are represented in "
        f"{PACKING.n_hidden} dimensions, {sparsest[2]} of them in superposition; the most is {most[1]} "
        f"(density {most[0]:g}).",
        "",
    ]
    summary = [
        f"(a) n = {PACKING.n_features}, m = {PACKING.n_hidden}: represented features "
        + ", ".join(f"{c[1]} at density {c[0]:g}" for c in summary_counts)
        + "."
    ]
    return Section(lines, summary), model


def _indices(mask: torch.Tensor) -> str:
    """The features a mask keeps, as ranges: ``0–4, 7``."""
    kept = [int(i) for i in torch.nonzero(mask).flatten()]
    if not kept:
        return "none"
    parts, start = [], kept[0]
    for previous, current in zip(kept, [*kept[1:], None], strict=True):
        if current != previous + 1:
            parts.append(str(start) if start == previous else f"{start}–{previous}")
            start = current
    return ", ".join(parts)


# (b) ------------------------------------------------------------------------------------------------------


def expected_two_feature_loss(
    model: ToyModel, densities: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """The exact expected loss per instance of a two-feature model, ``[instances]``: the four cases of which
    features are present, each weighted by its probability, the present values integrated on a midpoint
    grid."""
    grid = (torch.arange(QUADRATURE_POINTS) + 0.5) / QUADRATURE_POINTS
    zeros = torch.zeros_like(grid)
    cases = {
        (False, False): torch.zeros(1, 2),
        (True, False): torch.stack([grid, zeros], dim=1),
        (False, True): torch.stack([zeros, grid], dim=1),
        (True, True): torch.cartesian_prod(grid, grid),
    }
    total = torch.zeros(len(densities))
    for (first, second), values in cases.items():
        probability = torch.ones_like(densities)
        for present in (first, second):
            probability = probability * (densities if present else 1 - densities)
        x = values[:, None, :].expand(-1, len(densities), -1)
        with torch.no_grad():
            total += probability * weighted_loss(model, x, weights)
    return total


def classify(W: torch.Tensor) -> int:
    """The phase (an index into PHASES) of one two-feature model ``W`` ``[1, 2]``."""
    first, second = (float(v) for v in W[0])
    if abs(second) < 0.5:
        return 0 if abs(first) >= 0.5 else 3
    if abs(first) < 0.5:
        return 1
    return 2 if first * second < 0 else 3


def phase_diagram(figures: Path, log: Callable[[str], None]) -> Section:
    settings = [
        (density, extra)
        for _ in range(PHASE_REPLICATES)
        for density in PHASE_DENSITIES
        for extra in PHASE_IMPORTANCES
    ]
    densities = [density for density, _ in settings]
    weights = torch.tensor([[1.0, extra] for _, extra in settings])
    model = train_toy_models(PHASE, densities, importances=weights, progress=False)
    log("(b) trained")
    losses = expected_two_feature_loss(model, torch.tensor(densities), weights)
    n_densities, n_importances = len(PHASE_DENSITIES), len(PHASE_IMPORTANCES)
    shape = (PHASE_REPLICATES, n_densities, n_importances)
    losses = losses.view(shape)
    W = model.W.detach().view(*shape, 1, 2)
    labels = np.array(
        [
            [[classify(W[r, d, i]) for i in range(n_importances)] for d in range(n_densities)]
            for r in range(shape[0])
        ]
    )
    best = losses.argmin(dim=0).numpy()
    chosen = np.take_along_axis(labels, best[None], axis=0)[0]  # [density, importance]
    agreeing = (labels == chosen[None]).sum(axis=0)

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.6))
    extent_x = np.log10([PHASE_DENSITIES[0], PHASE_DENSITIES[-1]])
    half_x = (extent_x[1] - extent_x[0]) / (n_densities - 1) / 2
    extent_y = np.log10([PHASE_IMPORTANCES[0], PHASE_IMPORTANCES[-1]])
    half_y = (extent_y[1] - extent_y[0]) / (n_importances - 1) / 2
    extent = (extent_x[0] - half_x, extent_x[1] + half_x, extent_y[0] - half_y, extent_y[1] + half_y)
    left.imshow(
        chosen.T,
        origin="lower",
        extent=extent,
        aspect="auto",
        cmap=ListedColormap(PHASE_COLOURS),
        vmin=-0.5,
        vmax=len(PHASES) - 0.5,
        interpolation="nearest",
    )
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in PHASE_COLOURS]
    left.legend(handles, PHASES, fontsize=7, loc="upper left", framealpha=0.9)
    left.set_title(f"phase of the lowest-loss run (of {PHASE_REPLICATES})", fontsize=9)
    shown = right.imshow(
        agreeing.T,
        origin="lower",
        extent=extent,
        aspect="auto",
        cmap="Greens",
        vmin=0,
        vmax=PHASE_REPLICATES,
        interpolation="nearest",
    )
    figure.colorbar(shown, ax=right, ticks=range(PHASE_REPLICATES + 1), label="runs in that phase")
    right.set_title(f"how many of the {PHASE_REPLICATES} runs reached that phase", fontsize=9)
    for axes in (left, right):
        axes.set_xticks(np.log10(PHASE_DENSITIES), [f"{d:.2g}" for d in PHASE_DENSITIES], fontsize=7)
        axes.set_yticks(np.log10(PHASE_IMPORTANCES), [f"{v:.2g}" for v in PHASE_IMPORTANCES], fontsize=7)
        axes.set_xlabel("density of both features (sparser →)")
        axes.set_ylabel("importance of the extra feature (feature 1: 1)")
    figure.suptitle("(b) n = 2 features, m = 1 dimension: what happens to the extra feature", fontsize=10)
    figure.tight_layout()
    save(figure, figures / "b-phase.png")

    letters = {0: "·", 1: "D", 2: "S", 3: "?"}
    grid_rows = []
    for i in reversed(range(n_importances)):
        cells = [f"{letters[int(chosen[d, i])]} {int(agreeing[d, i])}" for d in range(n_densities)]
        grid_rows.append(f"| {PHASE_IMPORTANCES[i]:.2g} | " + " | ".join(cells) + " |")
    counts = {name: int((chosen == k).sum()) for k, name in enumerate(PHASES)}
    run_counts = {name: int((labels == k).sum()) for k, name in enumerate(PHASES)}
    cells = n_densities * n_importances
    unanimous = int((agreeing == PHASE_REPLICATES).sum())
    dense_column = [letters[int(v)] for v in chosen[0]]
    boundary = next((PHASE_IMPORTANCES[i] for i in range(n_importances) if chosen[0, i] == 1), None)
    sparse_column = chosen[-1]
    isolated = [
        f"{PHASES[int(chosen[d, i])]} at importance {PHASE_IMPORTANCES[i]:.2g}, "
        f"density {PHASE_DENSITIES[d]:.2g}"
        for d in range(n_densities)
        for i in range(n_importances)
        if all(
            chosen[d + dd, i + di] != chosen[d, i]
            for dd, di in ((-1, 0), (1, 0), (0, -1), (0, 1))
            if 0 <= d + dd < n_densities and 0 <= i + di < n_importances
        )
    ]
    lines = [
        "## (b) Phase diagram: one extra feature in one dimension",
        "",
        "n = 2 features, m = 1 dimension. Feature 1 has importance 1; the extra feature 2 has the importance "
        "on the vertical axis; both features have the density on the horizontal axis (the setup as we read "
        "the paper's phase-change section: one shared sparsity, the extra feature's relative importance "
        f"varied). {PHASE_REPLICATES} runs per setting from different initial weights ({PHASE.steps:,} "
        f"steps of {PHASE.batch_size:,} inputs, seed {PHASE.seed}), the one of lowest exact expected loss "
        "kept and classified (see the script's docstring for the rules).",
        "",
        "![(b) phase diagram](superposition/b-phase.png)",
        "",
        "| phase of the kept run | settings (of "
        + str(cells)
        + ") | runs in that phase (of "
        + str(cells * PHASE_REPLICATES)
        + ") |",
        "|---|---:|---:|",
        *[f"| {name} | {counts[name]} | {run_counts[name]} |" for name in PHASES],
        "",
        "The grid (rows: importance of the extra feature, top 10; columns: density; `·` not represented, "
        "`D` dedicated dimension, `S` superposition, `?` other; the number is how many of the "
        f"{PHASE_REPLICATES} runs reached the kept run's phase):",
        "",
        "| importance \\ density | " + " | ".join(f"{d:.2g}" for d in PHASE_DENSITIES) + " |",
        "|---:|" + "---|" * n_densities,
        *grid_rows,
        "",
        f"Dense (density {PHASE_DENSITIES[0]:g}), the phases from importance {PHASE_IMPORTANCES[0]:.2g} "
        f"up are `{''.join(dense_column)}`: the extra feature first takes the dimension at importance "
        f"{_maybe(boundary)}. At density {PHASE_DENSITIES[-1]:g}, "
        f"{int((sparse_column == 2).sum())} of {n_importances} importances end in superposition. "
        f"{unanimous} of {cells} settings have all {PHASE_REPLICATES} runs in the same phase; in the others "
        "the runs reach different local minima and the choice rests on the expected loss. "
        + (
            f"Settings whose phase differs from all their neighbours' ({len(isolated)}): "
            + "; ".join(isolated)
            + "."
            if isolated
            else "No setting differs from all its neighbours."
        ),
        "",
    ]
    summary = [
        f"(b) n = 2, m = 1, {cells} settings: "
        + ", ".join(f"{counts[name]} {name}" for name in PHASES)
        + f"; {unanimous} settings with all {PHASE_REPLICATES} runs agreeing."
    ]
    return Section(lines, summary)


def _maybe(value: float | None) -> str:
    return "none of the grid" if value is None else f"{value:.2g}"


# (c) ------------------------------------------------------------------------------------------------------


def geometry(figures: Path, log: Callable[[str], None]) -> Section:
    densities = [1 / v for v in GEOMETRY_INVERSE_DENSITIES]
    model = train_toy_models(GEOMETRY, densities, progress=False)
    log("(c) trained")
    W = model.W.detach()
    norms, dims = feature_norms(W), dimensionality(W)
    per_feature = GEOMETRY.n_hidden / (W**2).sum(dim=(-1, -2))
    targets = torch.tensor([a / b for a, b in FRACTIONS])

    rows, scatter, pooled = [], [], []
    counted = torch.zeros(len(FRACTIONS), dtype=torch.long)
    total = 0
    for k, inverse in enumerate(GEOMETRY_INVERSE_DENSITIES):
        kept = norms[k] >= 0.5
        values = dims[k][kept]
        distance = (values[:, None] - targets).abs()
        nearest, closest = distance.min(dim=1)
        near = nearest <= NEAR
        counts = [int(((closest == j) & near).sum()) for j in range(len(FRACTIONS))]
        counted += torch.tensor(counts)
        total += len(values)
        scatter.append((inverse, values.numpy()))
        pooled.append(values.numpy())
        shares = " | ".join(f"{c / max(len(values), 1):.0%}" if c else "" for c in counts)
        rows.append(
            f"| {inverse:.3g} | {1 / inverse:.3g} | {int(kept.sum())} | {float(per_feature[k]):.3f} | "
            f"{shares} | {1 - sum(counts) / max(len(values), 1):.0%} |"
        )
    values_all = np.concatenate(pooled)

    figure, axes = plt.subplots(3, 1, figsize=(8, 10), height_ratios=(1, 1.3, 1))
    top, middle, bottom = axes
    top.plot(GEOMETRY_INVERSE_DENSITIES, per_feature.numpy(), marker="o", color="#17202a")
    for fraction in FRACTIONS:
        value = fraction[0] / fraction[1]
        for axes_ in (top, middle):
            axes_.axhline(value, color="#aaaaaa", linewidth=0.6, linestyle=":")
            axes_.text(
                1.02, value, fraction_text(fraction), transform=axes_.get_yaxis_transform(), fontsize=7
            )
    for inverse, values in scatter:
        jitter = inverse * np.exp(np.linspace(-0.04, 0.04, len(values))) if len(values) else []
        middle.scatter(jitter, values, s=3, alpha=0.5, color="#2c7fb8")
    for axes_ in (top, middle):
        axes_.set_xscale("log")
        axes_.set_xlabel("1 / (1 − S) = 1 / density")
    top.set_ylabel("dimensions per feature m / ‖W‖_F²")
    middle.set_ylabel("D_i of each represented feature")
    middle.set_ylim(0, 1.1)
    bottom.hist(values_all, bins=np.linspace(0, 1.05, 106), color="#2471a3")
    for fraction in FRACTIONS:
        bottom.axvline(fraction[0] / fraction[1], color="#c0392b", linewidth=0.6, linestyle=":")
    bottom.set_yscale("log")
    bottom.set_xlabel("D_i (all densities pooled; dotted: 1, 3/4, 2/3, 1/2, 2/5, 3/8, 1/3)")
    bottom.set_ylabel("represented features")
    figure.suptitle(
        f"(c) n = {GEOMETRY.n_features} features in m = {GEOMETRY.n_hidden} dimensions, equal importance",
        fontsize=10,
    )
    figure.tight_layout()
    save(figure, figures / "c-geometry.png")

    plateaus = {}
    for fraction in ((1, 2), (2, 5)):
        value = fraction[0] / fraction[1]
        on = [
            (inverse, float(per_feature[k]))
            for k, inverse in enumerate(GEOMETRY_INVERSE_DENSITIES)
            if abs(float(per_feature[k]) - value) <= PLATEAU
        ]
        plateaus[fraction] = on
    plateau_text = []
    for fraction, on in plateaus.items():
        if on:
            plateau_text.append(
                f"{fraction_text(fraction)}: {len(on)} {'density' if len(on) == 1 else 'densities'} ("
                + ", ".join(f"{v:.3f} at 1/(1−S) = {inverse:.3g}" for inverse, v in on)
                + ")"
            )
        else:
            plateau_text.append(f"{fraction_text(fraction)}: no density")
    # the listed fractions span [1/3, 1): features in that range (sharing dimensions, not yet below 1/3)
    shared_range = (values_all >= 1 / 3 - NEAR) & (values_all < 1 - NEAR)
    in_range = int(shared_range.sum())
    near_shared = int(counted[1:].sum())
    near_share = near_shared / max(in_range, 1)
    loose = np.abs(values_all[shared_range][:, None] - targets[1:].numpy()).min(axis=1) <= 2 * NEAR
    unseen = [fraction_text(f) for f, c in zip(FRACTIONS, counted, strict=True) if c == 0]
    first_plateau = plateaus[(1, 2)][0][0] if plateaus[(1, 2)] else None
    before = [
        values
        for inverse, values in scatter
        if len(values) and first_plateau is not None and 1 < inverse < first_plateau
    ]
    dense_text = (
        f"At density 1 no feature reaches ‖W_i‖ ≥ 0.5 although m / ‖W‖_F² = {float(per_feature[0]):.3f}: "
        f"with equal importances the {GEOMETRY.n_hidden} dimensions are spread over many features (the "
        f"longest ‖W_i‖ is {float(norms[0].max()):.2f}), so no D_i is counted there. "
        if int((norms[0] >= 0.5).sum()) == 0
        else ""
    )
    unseen_text = (
        f"No represented feature is within {NEAR} of {', '.join(unseen)} at any density"
        + (
            f"; before the 1/2 plateau (1 < 1/(1−S) < {first_plateau:.3g}) the D_i range from "
            f"{float(np.concatenate(before).min()):.3f} to {float(np.concatenate(before).max()):.3f}. "
            if before
            else ". "
        )
        if unseen
        else "Every listed fraction is reached by some feature. "
    )
    lines = [
        "## (c) Dimensionality: sticky fractions",
        "",
        f"n = {GEOMETRY.n_features} features, m = {GEOMETRY.n_hidden} dimensions (the paper's sizes), all of "
        f"importance 1, {len(GEOMETRY_INVERSE_DENSITIES)} densities with 1/(1−S) from 1 to 100 (twelve "
        "log-spaced between 1.6 and 8), "
        f"{GEOMETRY.steps:,} AdamW steps of {GEOMETRY.batch_size:,} inputs (lr {GEOMETRY.lr:g}), seed "
        f"{GEOMETRY.seed}. Dimensions per feature is m / ‖W‖_F² (1 when m features each have a dimension, "
        f"m / n = {GEOMETRY.n_hidden / GEOMETRY.n_features:.3f} when all n do with norm 1). D_i is given for "
        f"represented features (‖W_i‖ ≥ 0.5); a D_i is near a fraction when that is the closest of the "
        f"seven and at most {NEAR} away.",
        "",
        "![(c) dimensions per feature and D_i](superposition/c-geometry.png)",
        "",
        "| 1/(1−S) | density | represented | m / ‖W‖_F² | "
        + " | ".join(f"near {fraction_text(f)}" for f in FRACTIONS)
        + " | near none |",
        "|---:|---:|---:|---:|" + "---:|" * (len(FRACTIONS) + 1),
        *rows,
        "",
        f"Over all densities, {total} represented features: near "
        + ", ".join(f"{fraction_text(f)} {int(c)}" for f, c in zip(FRACTIONS, counted, strict=True))
        + f"; near none {total - int(counted.sum())}. The fractions below 1 lie between 1/3 and 3/4: of the "
        f"{in_range} represented features with D_i in [1/3 − {NEAR}, 1 − {NEAR}) (sharing dimensions, not "
        f"yet below 1/3), {near_shared} ({near_share:.0%}) sit near 3/4, 2/3, 1/2, 2/5, 3/8 or 1/3. The "
        f"other {total - in_range - int(counted[0])} have D_i below 1/3 − {NEAR} (down to "
        f"{float(values_all.min()):.3f}), where none of the listed fractions applies. With a tolerance of "
        f"{2 * NEAR:g} instead, {int(loose.sum())} of the {in_range} ({loose.mean() if in_range else 0:.0%}) "
        "are near one.",
        "",
        dense_text + unseen_text.rstrip(),
        "",
        f"Plateaus (densities whose dimensions per feature is within {PLATEAU} of the fraction): "
        + "; ".join(plateau_text)
        + ".",
        "",
    ]
    summary = [
        f"(c) n = {GEOMETRY.n_features}, m = {GEOMETRY.n_hidden}: plateaus "
        + "; ".join(plateau_text)
        + f"; {near_shared} of the {in_range} features with D_i in [1/3 − {NEAR}, 1 − {NEAR}) "
        f"({near_share:.0%}) are within {NEAR} of 3/4, 2/3, 1/2, 2/5, 3/8 or 1/3."
    ]
    return Section(lines, summary)


# (d) ------------------------------------------------------------------------------------------------------


@dataclass
class Recovery:
    """One sparse dictionary fitted to one toy's activations, scored against the toy's true features."""

    toy: str
    l1: float
    cosines: np.ndarray
    random_cosines: np.ndarray
    threshold: float
    latents: int
    alive: int
    unexplained: float
    active: float


def recover(name: str, W: torch.Tensor, density: float, seed: int) -> list[Recovery]:
    """Sparse dictionaries at each L1 weight for one toy ``W`` ``[m, n]``, scored on its represented
    features."""
    n_hidden, n_features = W.shape
    true_directions = W[:, feature_norms(W) >= 0.5]
    generator = torch.Generator().manual_seed(seed)
    x = sample_features(torch.tensor([density]), n_features, RECOVERY_SAMPLES, generator)[:, 0]
    h = x @ W.T
    latents = 2 * n_features
    chance = chance_cosines(n_hidden, latents, samples=CHANCE_SAMPLES, seed=seed)
    threshold = float(chance.quantile(CHANCE_QUANTILE))
    random_directions = torch.randn(n_hidden, latents, generator=generator)
    random_cosines = best_cosines(true_directions, random_directions).numpy()
    results = []
    for l1 in RECOVERY_L1:
        config = RECOVERY_DICTIONARY.with_changes(n_latents=latents, l1=l1, seed=seed)
        dictionary = train_sparse_dictionary(h, config, progress=False)
        with torch.no_grad():
            reconstruction, codes = dictionary(h)
        results.append(
            Recovery(
                toy=name,
                l1=l1,
                cosines=best_cosines(true_directions, dictionary.directions).numpy(),
                random_cosines=random_cosines,
                threshold=threshold,
                latents=latents,
                alive=int((codes.max(dim=0).values > 0).sum()),
                unexplained=float(((reconstruction - h) ** 2).sum() / ((h - h.mean(dim=0)) ** 2).sum()),
                active=float((codes > 0).sum(dim=1).float().mean()),
            )
        )
    return results


def dictionary_recovery(figures: Path, log: Callable[[str], None], packed: ToyModel) -> Section:
    larger = train_toy_models(LARGER_TOY, [LARGER_DENSITY], progress=False)
    larger_W = larger.W.detach()[0]
    log("(d) larger toy trained")
    packed_W = packed.W.detach()[PACKING_DENSITIES.index(PACKED_DENSITY)]
    toys = [
        (f"(a) n = {PACKING.n_features}, m = {PACKING.n_hidden}", packed_W, PACKED_DENSITY, 3),
        (f"n = {LARGER_TOY.n_features}, m = {LARGER_TOY.n_hidden}", larger_W, LARGER_DENSITY, 4),
    ]
    results: list[Recovery] = []
    for name, W, density, seed in toys:
        results += recover(name, W, density, seed)
        log(f"(d) dictionaries of {name} trained")
    larger_kept = feature_norms(larger_W) >= 0.5
    larger_dims = dimensionality(larger_W)[larger_kept]

    figure, axes = plt.subplots(1, len(toys), figsize=(11, 4))
    bins = np.linspace(0.3, 1.0, 71)
    for axes_, (name, _, density, _) in zip(axes, toys, strict=True):
        mine = [r for r in results if r.toy == name]
        axes_.hist(
            mine[0].random_cosines, bins=bins, histtype="step", color="#7f8c8d", label="random dictionary"
        )
        for r, colour in zip(mine, ("#f5b041", "#c0392b", "#6c3483"), strict=True):
            axes_.hist(
                r.cosines, bins=bins, histtype="step", color=colour, linewidth=1.3, label=f"L1 {r.l1:g}"
            )
        axes_.axvline(mine[0].threshold, color="#17202a", linestyle="--", linewidth=0.8)
        axes_.text(
            mine[0].threshold,
            0.97,
            " chance 99%",
            transform=axes_.get_xaxis_transform(),
            fontsize=7,
            va="top",
        )
        axes_.set_title(f"toy {name}, density {density:g}", fontsize=9)
        axes_.set_xlabel("best cosine of a true feature with a dictionary direction")
        axes_.set_ylabel("represented true features")
        axes_.legend(fontsize=7, loc="upper left")
    figure.suptitle("(d) sparse dictionaries on the toys' hidden activations", fontsize=10)
    figure.tight_layout()
    save(figure, figures / "d-recovery.png")

    rows, key = [], []
    for name, *_ in toys:
        mine = [r for r in results if r.toy == name]
        for r in mine:
            rows.append(
                f"| {r.toy} | {len(r.cosines)} | {r.latents} ({r.alive} used) | {r.l1:g} | "
                f"{r.unexplained:.3f} | {r.active:.2f} | {r.threshold:.3f} | {np.median(r.cosines):.3f} | "
                f"{r.cosines.min():.3f} | **{int((r.cosines > r.threshold).sum())}** | "
                f"{int((r.random_cosines > r.threshold).sum())} |"
            )
        first = mine[0]
        key.append(
            f"toy {name}: of {len(first.cosines)} represented features, "
            + ", ".join(f"{int((r.cosines > r.threshold).sum())}" for r in mine)
            + " recovered at L1 "
            + ", ".join(f"{r.l1:g}" for r in mine)
            + f" (threshold {first.threshold:.3f}); a random dictionary "
            + f"{int((first.random_cosines > first.threshold).sum())}"
        )
    lines = [
        "## (d) Sparse dictionary recovery",
        "",
        f"Two toys in superposition: the (a) model at density {PACKED_DENSITY:g}, and a larger one trained "
        f"for this figure: n = {LARGER_TOY.n_features} features of equal importance in m = "
        f"{LARGER_TOY.n_hidden} dimensions at density {LARGER_DENSITY:g} ({LARGER_TOY.steps:,} steps of "
        f"{LARGER_TOY.batch_size:,} inputs, lr {LARGER_TOY.lr:g}, seed {LARGER_TOY.seed}), which represents "
        f"{int(larger_kept.sum())} features with mean D_i {float(larger_dims.mean()):.3f}. Their hidden "
        f"activations h = W x on {RECOVERY_SAMPLES:,} inputs at the toy's density train a sparse "
        "autoencoder (`train_sparse_dictionary`: latents = ReLU(E (h − c) + e), h ≈ D latents + c with "
        "unit-norm columns D_j, loss ‖h − ĥ‖² + L1 × Σ latents) with twice as many latents as features, "
        f"{RECOVERY_DICTIONARY.steps:,} Adam steps of {RECOVERY_DICTIONARY.batch_size:,} activations (lr "
        f"{RECOVERY_DICTIONARY.lr:g}), at three L1 weights. The true directions are the represented "
        "features' W_i (‖W_i‖ ≥ 0.5); each gets its best cosine with any decoder column. The threshold is "
        f"the {CHANCE_QUANTILE:.0%} quantile of the best cosine of a random unit direction against as many "
        f"random unit directions in m dimensions ({CHANCE_SAMPLES:,} draws): a feature passes it by chance "
        "1 time in 100. *Unexplained* is the squared error over the variance of h; *active* the mean "
        "number of nonzero latents per input.",
        "",
        "![(d) recovery](superposition/d-recovery.png)",
        "",
        "| toy | true features | latents | L1 | unexplained | active | threshold | median cosine | lowest | "
        "recovered | random dictionary |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        "Recovered features: " + "; ".join(key) + ".",
        "",
    ]
    return Section(lines, ["(d) " + "; ".join(key) + "."])


# report ---------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs", help="folder for superposition.md and its figures")
    parser.add_argument("--threads", type=int, default=1, help="PyTorch threads (results depend on it)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    started = time.perf_counter()
    out = Path(args.out)
    figures = out / "superposition"
    figures.mkdir(parents=True, exist_ok=True)

    def log(message: str) -> None:
        print(f"{message} after {time.perf_counter() - started:.0f} s", flush=True)

    packed_section, packed = packing(figures, log)
    phase_section = phase_diagram(figures, log)
    geometry_section = geometry(figures, log)
    recovery_section = dictionary_recovery(figures, log, packed)
    sections = [packed_section, phase_section, geometry_section, recovery_section]
    machine = (
        f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} PyTorch "
        f"thread{'s' if torch.get_num_threads() != 1 else ''}, PyTorch {torch.__version__.split('+')[0]}"
    )
    header = [
        "# Toy models of superposition",
        "",
        "Four results of Elhage et al. (2022), “Toy Models of Superposition”, reproduced with "
        "`circuitmap.toy`: ReLU output models x' = ReLU(WᵀW x + b) that squeeze n sparse features "
        "(each present with probability *density* = 1 − S, then uniform in [0, 1]) through m < n hidden "
        "dimensions, with an importance-weighted squared error.",
        "",
        "Generated by `make superposition-report` (`python examples/superposition_report.py`; its docstring "
        "describes every step); every number below comes from that run, and a rerun with the same thread "
        "count writes the same bytes. The script prints its running time.",
        "",
        f"Machine: {machine}.",
        "",
        "## Summary",
        "",
        *[f"- {line}" for section in sections for line in section.summary],
        "",
    ]
    body = [line for section in sections for line in section.lines]
    (out / "superposition.md").write_text("\n".join(header + body))
    print(f"wrote {out / 'superposition.md'} in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
