"""How well automatic labels are supported by the contexts they summarise, with and without concepts.

For a seeded sample of live features of a feature database, the label is recomputed from the dashboard's
evidence (peak tokens of the top contexts, the token after each peak, the logit lens) twice: token labels
only, and with concept labels from the model's embeddings. A label is supported by a context when the
context's peak token (for ``says`` labels: the token after it) is one the label names. Printed: the share
of features whose label is supported by at least half of its top contexts, the mean support, the kinds of
labels, and the concept labels of the sample with the names stored in the database.

    python benchmarks/labels.py --features PATH.sqlite [--model smollm2-135m] [--sample 100]
"""

from __future__ import annotations

import argparse
import random
from collections import Counter

from circuitmap import load_model
from circuitmap.features import FeatureStore
from circuitmap.features.labels import TokenSpace, label_from_evidence, label_support


def evidence(dashboard) -> tuple[list[str], list[str | None], list[str]]:
    peaks, nexts = [], []
    for example in dashboard.top_examples:
        peaks.append(example.tokens[example.peak])
        after = example.peak + 1
        nexts.append(example.tokens[after] if after < len(example.tokens) else None)
    return peaks, nexts, [token for token, _ in dashboard.output_top]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", required=True, help="feature database (.sqlite)")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--sample", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    model = load_model(args.model)
    space = TokenSpace.of_model(model)
    with FeatureStore(args.features) as store:
        every = [(layer, feature) for layer in range(store.n_layers) for feature in range(store.d_features)]
        random.Random(args.seed).shuffle(every)
        rows = []
        for layer, feature in every:
            dashboard = store.get(layer, feature)
            if not dashboard.top_examples:
                continue
            peaks, nexts, lens = evidence(dashboard)
            before = label_from_evidence(peaks, nexts, lens)
            after = label_from_evidence(peaks, nexts, lens, space)
            rows.append(
                (
                    (layer, feature),
                    before,
                    label_support(before, peaks, nexts),
                    after,
                    label_support(after, peaks, nexts),
                    dashboard.label,
                )
            )
            if len(rows) == args.sample:
                break
    n = len(rows)
    print(f"{n} live features sampled (seed {args.seed}) from {args.features}")
    print("labels          supported by >= 50% of top contexts   mean support   kinds")
    for name, label_index, support_index in (("tokens only", 1, 2), ("with concepts", 3, 4)):
        supported = sum(row[support_index] >= 0.5 for row in rows) / n
        mean = sum(row[support_index] for row in rows) / n
        kinds = Counter(row[label_index].evidence["kind"] for row in rows)
        print(f"{name:<15} {supported:>6.0%}{'':<32}{mean:>6.2f}         {dict(kinds)}")
    print("\nconcept labels in the sample (stored label, support before -> after):")
    for (layer, feature), _before, support_before, after, support_after, stored in rows:
        if after.evidence["kind"].endswith("concept"):
            text = stored.text if stored is not None else after.text
            print(f"  {layer}_{feature}: {text!r}  {support_before:.2f} -> {support_after:.2f}")


if __name__ == "__main__":
    main()
