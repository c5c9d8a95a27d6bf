"""Automatic labels from a feature's evidence, computed offline.

Two readings compete, each scored by the share of the feature's top contexts that support it:

- input-like: the token at the activation peak; the label is the dominant peak token;
- output-like: the token that follows the peak is one the feature's logit lens promotes; the label is
  ``says X`` for the promoted token seen most often there.

The better-supported reading wins and its share is the confidence. When neither reaches ``WEAK`` the label
lists the three most common peak tokens and keeps the (low) confidence. Tokens are compared stripped of
surrounding spaces and case-folded, so `` Paris`` and ``Paris`` count as one.
"""

from __future__ import annotations

from collections import Counter

import torch

from circuitmap.features.store import Label

WEAK = 0.3


def token_key(text: str) -> str:
    """How tokens are compared: without surrounding whitespace, case-folded."""
    return text.strip().casefold()


def shown(text: str) -> str:
    """A token as it appears inside a label: stripped, or quoted when it is only whitespace."""
    return text.strip() or repr(text)


def automatic_labels(
    top,
    peak_ids: torch.Tensor,
    next_ids: torch.Tensor,
    lens_ids: torch.Tensor,
    strings: list[str],
) -> dict[int, Label]:
    """Labels of the features of one layer that were active at least once, by feature index.

    ``top`` is the ranked top-context list, ``peak_ids``/``next_ids`` ``[size, F]`` the token at each top
    context's peak and the one after it (-1 where absent), ``lens_ids`` ``[F, k]`` the promoted tokens.
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
        )
    return labels


def label_from_evidence(peak_tokens: list[str], next_tokens: list[str | None], promoted: list[str]) -> Label:
    """The automatic label of one feature from its top contexts' peak and next tokens and its lens."""
    n = len(peak_tokens)
    peak_counts = Counter(token_key(token) for token in peak_tokens)
    dominant, dominant_count = peak_counts.most_common(1)[0]
    promoted_keys = {token_key(token) for token in promoted if token_key(token)}
    said = Counter(token_key(t) for t in next_tokens if t is not None and token_key(t) in promoted_keys)
    said_count = sum(said.values())
    input_share, output_share = dominant_count / n, said_count / n
    evidence = {
        "contexts": n,
        "peak_token": _form(peak_tokens, dominant),
        "peak_share": round(input_share, 4),
        "next_in_lens_share": round(output_share, 4),
        "lens_top": promoted[:5],
    }
    if max(input_share, output_share) < WEAK:
        common = [_form(peak_tokens, key) for key, _ in peak_counts.most_common(3)]
        text = " / ".join(shown(token) for token in common)
        return Label(text, "auto", round(input_share, 4), evidence={**evidence, "kind": "mixed"})
    if output_share > input_share:
        key = said.most_common(1)[0][0]
        token = _form([t for t in next_tokens if t is not None], key)
        return Label(
            f"says {shown(token)}", "auto", round(output_share, 4), evidence={**evidence, "kind": "output"}
        )
    token = _form(peak_tokens, dominant)
    return Label(shown(token), "auto", round(input_share, 4), evidence={**evidence, "kind": "input"})


def _form(tokens: list[str], key: str) -> str:
    """The most common spelling among ``tokens`` of the tokens that compare as ``key``."""
    return Counter(token for token in tokens if token_key(token) == key).most_common(1)[0][0]
