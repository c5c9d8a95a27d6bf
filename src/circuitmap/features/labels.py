"""Automatic labels from a feature's evidence, computed offline.

Readings compete, each scored by the share of the feature's top contexts that support it:

- input-like: the token at the activation peak; the label is the dominant peak token;
- input concept: the peak tokens that belong together in the model's own embedding space (average-linkage
  clusters of their input embeddings, cosine similarity at least ``SIMILAR``), when such a group covers
  more contexts than the dominant token alone: ``Spain, France, Portugal`` rather than ``Spain``;
- output-like: the token that follows the peak is one the feature's logit lens promotes; the label is
  ``says X`` for the promoted token seen most often there, or ``says`` a concept when several promoted
  tokens that belong together share the contexts.

A single token wins over a group it belongs to when it alone covers ``STRONG`` of the contexts. The
better-supported reading wins and its share is the confidence. When none reaches ``WEAK`` the label lists
the three most common peak tokens and keeps the (low) confidence. Tokens are compared stripped of surrounding
spaces and case-folded, so `` Paris`` and ``Paris`` count as one. A concept label lists its most common
members; ``name_concepts`` can put a name in front, written by the model itself (``countries: Spain,
France, Portugal``). Every label's evidence names the tokens that support it (``members``) and the side
they are read on (``side``), so its support can be recounted from its contexts.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import replace
from typing import TypeVar

import numpy as np
import torch
from scipy.cluster.hierarchy import fcluster, linkage

from circuitmap.features.store import FeatureStore, Label, now, write_labels
from circuitmap.models.generation import generate_ids

WEAK = 0.3
"""Below this share of the top contexts no reading is trusted: the label lists common peak tokens."""
STRONG = 0.5
"""A single token covering this share of the contexts is the label, even inside a larger group."""
SIMILAR = 0.5
"""The least average cosine similarity of the centred input embeddings of a concept's tokens. Random token
pairs of SmolLM2-135M reach 0.29 at the 99th percentile and 0.47 at the 99.9th; Spain/Portugal 0.70,
Monday/Friday 0.77, red/blue 0.75."""
SHOWN_MEMBERS = 3
"""Members a concept label lists."""
Key = TypeVar("Key", bound=Hashable)


def token_key(text: str) -> str:
    """How tokens are compared: without surrounding whitespace, case-folded."""
    return text.strip().casefold()


def shown(text: str) -> str:
    """A token as it appears inside a label: stripped, or quoted when it is only whitespace."""
    return text.strip() or repr(text)


class TokenSpace:
    """The model's input embeddings, centred and of unit length, looked up by token key (the mean direction
    of every token with that key)."""

    def __init__(self, strings: Sequence[str], embeddings: torch.Tensor):
        vectors = embeddings.detach().float().cpu()
        vectors = vectors - vectors.mean(0)
        self._vectors = vectors / vectors.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        self._ids: dict[str, list[int]] = defaultdict(list)
        for index, text in enumerate(strings[: len(vectors)]):
            self._ids[token_key(text)].append(index)

    @classmethod
    def of_model(cls, model) -> TokenSpace:
        return cls(model.vocabulary(), model.hf_model.get_input_embeddings().weight)

    def vectors(self, keys: Sequence[str]) -> np.ndarray:
        """Unit vectors ``[len(keys), d]`` (zero for a key no token has)."""
        rows = []
        for key in keys:
            ids = self._ids.get(key)
            if not ids:
                rows.append(torch.zeros(self._vectors.shape[1]))
                continue
            mean = self._vectors[ids].mean(0)
            rows.append(mean / mean.norm().clamp_min(1e-12))
        return torch.stack(rows).numpy().astype(np.float64)

    def clusters(self, counts: Counter) -> list[list[str]]:
        """Groups of the counted keys that belong together (average linkage on cosine distance, cut at
        ``1 − SIMILAR``), the group covering the most counts first; members by count."""
        keys = [key for key, _ in counts.most_common()]
        if len(keys) < 2:
            return [keys]
        distances = 1.0 - self.vectors(keys) @ self.vectors(keys).T
        condensed = np.clip(distances[np.triu_indices(len(keys), 1)], 0.0, 2.0)
        assignment = fcluster(linkage(condensed, method="average"), t=1.0 - SIMILAR, criterion="distance")
        groups: dict[int, list[str]] = defaultdict(list)
        for key, cluster in zip(keys, assignment, strict=True):
            groups[int(cluster)].append(key)
        return sorted(groups.values(), key=lambda group: -sum(counts[key] for key in group))


def automatic_labels(
    top,
    peak_ids: torch.Tensor,
    next_ids: torch.Tensor,
    lens_ids: torch.Tensor,
    strings: list[str],
    space: TokenSpace | None = None,
) -> dict[int, Label]:
    """Labels of the features of one layer that were active at least once, by feature index.

    ``top`` is the ranked top-context list, ``peak_ids``/``next_ids`` ``[size, F]`` the token at each top
    context's peak and the one after it (-1 where absent), ``lens_ids`` ``[F, k]`` the promoted tokens;
    ``space`` (the model's embeddings) enables concept labels.
    """
    labels: dict[int, Label] = {}
    valid = (top.contexts >= 0).T.tolist()
    peaks, nexts, lens = peak_ids.T.tolist(), next_ids.T.tolist(), lens_ids.tolist()
    for feature, flags in enumerate(valid):
        n = sum(flags)
        if n == 0:
            continue
        peak_tokens = [strings[t] for t, ok in zip(peaks[feature], flags, strict=True) if ok]
        labels[feature] = label_from_evidence(
            peak_tokens,
            [strings[t] if t >= 0 else None for t, ok in zip(nexts[feature], flags, strict=True) if ok],
            [strings[t] for t in lens[feature]],
            space,
        )
    return labels


def label_from_evidence(
    peak_tokens: list[str],
    next_tokens: list[str | None],
    promoted: list[str],
    space: TokenSpace | None = None,
) -> Label:
    """The automatic label of one feature from its top contexts' peak and next tokens and its lens."""
    n = len(peak_tokens)
    peak_counts = Counter(token_key(token) for token in peak_tokens)
    promoted_keys = {token_key(token) for token in promoted if token_key(token)}
    said_tokens = [t for t in next_tokens if t is not None and token_key(t) in promoted_keys]
    said = Counter(token_key(t) for t in said_tokens)
    input_members, input_share = _reading(peak_counts, n, space)
    output_members, output_share = _reading(said, n, space) if said else ([], 0.0)
    evidence = {
        "contexts": n,
        "peak_token": _form(peak_tokens, peak_counts.most_common(1)[0][0]),
        "peak_share": round(peak_counts.most_common(1)[0][1] / n, 4),
        "next_in_lens_share": round(sum(said.values()) / n, 4),
        "lens_top": promoted[:5],
    }
    if max(input_share, output_share) < WEAK:
        common = [_form(peak_tokens, key) for key, _ in peak_counts.most_common(SHOWN_MEMBERS)]
        text = " / ".join(shown(token) for token in common)
        share = peak_counts.most_common(1)[0][1] / n
        members = [key for key, _ in peak_counts.most_common(SHOWN_MEMBERS)]
        support = _support(members, "input", "mixed", common)
        return Label(text, "auto", round(share, 4), evidence={**evidence, **support})
    if output_share > input_share:
        forms = [_form(said_tokens, key) for key in output_members]
        kind = "output" if len(forms) == 1 else "output concept"
        text = f"says {_listed(forms)}"
        support = _support(output_members, "output", kind, forms)
        return Label(text, "auto", round(output_share, 4), evidence={**evidence, **support})
    forms = [_form(peak_tokens, key) for key in input_members]
    kind = "input" if len(forms) == 1 else "input concept"
    support = _support(input_members, "input", kind, forms)
    return Label(_listed(forms), "auto", round(input_share, 4), evidence={**evidence, **support})


def _reading(counts: Counter, n: int, space: TokenSpace | None) -> tuple[list[str], float]:
    """The best-supported members for one side (a single key, or a concept group) and their share."""
    dominant, dominant_count = counts.most_common(1)[0]
    if space is None or dominant_count / n >= STRONG:
        return [dominant], dominant_count / n
    group = space.clusters(counts)[0]
    group_count = sum(counts[key] for key in group)
    if len(group) < 2 or group_count <= dominant_count:
        return [dominant], dominant_count / n
    return group, group_count / n


def _support(members: list[str], side: str, kind: str, forms: list[str]) -> dict:
    return {
        "kind": kind,
        "members": members,
        "side": side,
        "forms": [shown(f) for f in forms[:SHOWN_MEMBERS]],
    }


def _listed(forms: list[str]) -> str:
    text = ", ".join(shown(token) for token in forms[:SHOWN_MEMBERS])
    return text + ", …" if len(forms) > SHOWN_MEMBERS else text


def _form(tokens: list[str], key: str) -> str:
    """The most common spelling among ``tokens`` of the tokens that compare as ``key``."""
    return Counter(token for token in tokens if token_key(token) == key).most_common(1)[0][0]


def label_support(label: Label, peak_tokens: list[str], next_tokens: list[str | None]) -> float:
    """The share of a feature's top contexts that support its automatic label: those whose peak token (or,
    for an output label, the token after it) is one the label names."""
    evidence = label.evidence or {}
    members = set(evidence.get("members", []))
    read = next_tokens if evidence.get("side") == "output" else peak_tokens
    if not read:
        return 0.0
    return sum(t is not None and token_key(t) in members for t in read) / len(read)


CONCEPT_PROMPT = (
    "Spain, Italy, Japan are all countries.\nApple, banana, pear are all fruits.\n{members} are all"
)
"""How the model is asked to name a concept: two worked examples, then the concept's members."""


def unnamed_concept(label: Label) -> bool:
    """Whether ``label`` is an automatic concept label nobody has tried to name yet."""
    evidence = label.evidence or {}
    return label.source == "auto" and evidence.get("kind", "").endswith("concept") and "name" not in evidence


def name_concepts(
    labels: dict[Key, Label], namer: Callable[[list[list[str]]], list[str | None]]
) -> dict[Key, Label]:
    """The unnamed concept labels among ``labels``, named (``countries: Spain, France, Portugal``) by
    ``namer``, which names lists of member tokens (one call for all). A concept the namer cannot name keeps
    its text, its evidence noting the attempt (``"name": null``)."""
    concepts = {key: label for key, label in labels.items() if unnamed_concept(label)}
    groups = sorted({tuple(sorted(label.evidence["forms"])) for label in concepts.values()})
    names = dict(zip(groups, namer([list(group) for group in groups]), strict=True)) if groups else {}
    named = {}
    for key, label in concepts.items():
        name = names[tuple(sorted(label.evidence["forms"]))]
        text = label.text
        if name:
            prefix = "says " if text.startswith("says ") else ""
            text = f"{prefix}{name}: {text[len(prefix) :]}"
        named[key] = Label(text, label.source, label.confidence, evidence={**label.evidence, "name": name})
    return named


def name_stored_concepts(
    store: FeatureStore,
    features: list[tuple[int, int]],
    namer: Callable[[list[list[str]]], list[str | None]],
) -> dict[tuple[int, int], Label]:
    """Name the unnamed concept labels of ``features`` in ``store`` and keep the named labels there (each
    concept is named once, when a graph first shows it; a database that cannot be written only warns);
    returns them."""
    named = name_concepts(store.labels_of(store.checked(features)), namer)
    if named:
        stamped = [
            (layer, feature, replace(label, created=now())) for (layer, feature), label in named.items()
        ]
        write_labels(store.path, stamped, store.d_features)
    return named


def concept_name(continuation: str) -> str | None:
    """The name in a continuation of ``CONCEPT_PROMPT``: up to the first period or line break, one to four
    words of letters; None otherwise."""
    name = re.split(r"[.\n,;:!?]", continuation, maxsplit=1)[0].strip()
    words = name.split()
    if not 1 <= len(words) <= 4 or not all(re.fullmatch(r"[^\W\d_]+(?:[-'][^\W\d_]+)*", w) for w in words):
        return None
    return name


def model_namer(
    model, max_new_tokens: int = 5, batch_size: int = 64
) -> Callable[[list[list[str]]], list[str | None]]:
    """A namer for ``name_concepts`` that asks ``model`` (greedy, ``CONCEPT_PROMPT``), prompts of equal length
    batched together; a prompt longer than the model's context gets no name."""

    def name(groups: list[list[str]]) -> list[str | None]:
        texts = [CONCEPT_PROMPT.format(members=", ".join(group)) for group in groups]
        prompts = [model.tokenizer(text, return_tensors="pt").input_ids[0] for text in texts]
        by_length: dict[int, list[int]] = defaultdict(list)
        for index, prompt in enumerate(prompts):
            if model.context_length is None or len(prompt) + max_new_tokens <= model.context_length:
                by_length[len(prompt)].append(index)
        names: list[str | None] = [None] * len(groups)
        for indices in by_length.values():
            for first in range(0, len(indices), batch_size):
                chosen = indices[first : first + batch_size]
                batch = torch.stack([prompts[i] for i in chosen]).to(model.device)
                new = generate_ids(model.hf_model, batch, max_new_tokens)
                for index, row in zip(chosen, new, strict=True):
                    names[index] = concept_name(model.decode_after(prompts[index], row))
        return names

    return name
