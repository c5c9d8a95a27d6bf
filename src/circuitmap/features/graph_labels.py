"""Feature labels in graph documents: unlabelled feature nodes take their feature's current label.

A node keeps its own ``clerp`` when it has one (a label typed in the explorer, or given at export); only
empty ones are filled, and those get a ``label_source`` (``auto``, ``manual`` or ``llm``) saying where the
text came from.
"""

from __future__ import annotations

from circuitmap.errors import IncompatibleTranscodersError
from circuitmap.features.logit_lens import FEATURE_TYPE
from circuitmap.features.store import FeatureStore
from circuitmap.graphs.ids import parse_feature_id


def unlabelled_features(document: dict) -> list[tuple[dict, tuple[int, int]]]:
    """The feature nodes of a viewer document whose ``clerp`` is empty, each with its (layer, feature)."""
    return [
        (node, parse_feature_id(node["node_id"])[:2])
        for node in document.get("nodes", [])
        if isinstance(node, dict) and node.get("feature_type") == FEATURE_TYPE and not node.get("clerp")
    ]


def add_feature_labels(document: dict, store: FeatureStore) -> dict:
    """Give each unlabelled feature node of ``document`` its feature's current label from ``store`` (one
    query for all of them), with ``label_source``; returns the document. A document made with another
    transcoder set than the database's is refused: its features are other features."""
    metadata = document.get("metadata")
    info = metadata.get("info") if isinstance(metadata, dict) else None
    recorded = info.get("transcoders_fingerprint") if isinstance(info, dict) else None
    built_for = store.meta.get("fingerprint")
    if isinstance(recorded, str) and built_for and recorded != built_for:
        raise IncompatibleTranscodersError(
            f"the graph was made with another transcoder set (fingerprint {recorded[:12]}) than the feature "
            f"database {store.path} (fingerprint {built_for[:12]}): its labels would name other features"
        )
    nodes = unlabelled_features(document)
    wanted = {key for _, key in nodes if 0 <= key[0] < store.n_layers and 0 <= key[1] < store.d_features}
    if not wanted:
        return document
    labels = store.labels_of(sorted(wanted))
    for node, key in nodes:
        label = labels.get(key)
        if label is not None:
            node["clerp"] = label.text
            node["label_source"] = label.source
    return document
