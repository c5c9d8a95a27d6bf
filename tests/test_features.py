"""Feature database: streaming bookkeeping against brute force, the build against the model, resuming after a
stop or a kill, refusals, labels, search and the ``features`` commands."""

from __future__ import annotations

import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.models import REPO, char_tokenizer, tiny_hf_model, tiny_model
from helpers.transcoders import random_transcoders

from circuitmap import CircuitmapError
from circuitmap.cli import main
from circuitmap.errors import Interrupted
from circuitmap.features import BuildConfig, FeatureStore, build_features, logit_lens
from circuitmap.features import build as build_module
from circuitmap.features.bookkeeping import HISTOGRAM_BINS, LayerStatistics, histogram_edges
from circuitmap.features.build import build_features_from_activations
from circuitmap.features.labels import (
    TokenSpace,
    concept_name,
    label_from_evidence,
    label_support,
    model_namer,
    name_concepts,
    name_stored_concepts,
)
from circuitmap.features.schema import SCHEMA_VERSION
from circuitmap.features.store import write_labels
from circuitmap.training.activations import pack_contexts
from circuitmap.training.corpus import iter_documents

CONFIG = BuildConfig(
    tokens=3000, context_length=24, batch_size=8, top=6, samples=8, quantiles=4, window=10, before=6
)
SENTENCE = "the cat sat on a mat while dogs ran past quickly and birds sang loud songs over green hills"


def write_corpus(path: Path, documents: int = 300) -> Path:
    rng = np.random.default_rng(0)
    texts = [
        " ".join(rng.choice(SENTENCE.split(), size=int(rng.integers(8, 30)))) + f" {i}."
        for i in range(documents)
    ]
    path.write_text("\n\n".join(texts))
    return path


@pytest.fixture(scope="module")
def parts():
    model = tiny_model("llama")
    transcoders = random_transcoders("plt-topk", 3, 32).to(dtype=torch.float32)
    return model, transcoders


@pytest.fixture(scope="module")
def built(parts, tmp_path_factory):
    folder = tmp_path_factory.mktemp("features")
    corpus = write_corpus(folder / "corpus.txt")
    model, transcoders = parts
    path = folder / "features.sqlite"
    report = build_features(model, transcoders, corpus, path, CONFIG, progress=False)
    return path, corpus, report


def corpus_activations(model, transcoders, corpus: Path, config: BuildConfig):
    """Brute force: every counted activation of the build's contexts, [layers, contexts, T, F], and tokens."""
    contexts = list(pack_contexts(iter_documents(corpus), model.tokenizer, config.context_length))
    contexts = torch.stack(contexts[: math.ceil(config.tokens / (config.context_length - 1))])
    cache = model.activations(contexts, points=["mlp_in"])
    acts = torch.stack([transcoders.encode(layer, cache["mlp_in", layer]) for layer in range(model.n_layers)])
    acts[:, :, 0] = 0
    return acts.float(), contexts


# Bookkeeping ----------------------------------------------------------------------------------------------


def test_streaming_statistics_equal_brute_force():
    torch.manual_seed(0)
    batches, B, T, F = 6, 5, 12, 7
    acts = torch.relu(torch.randn(batches * B, T, F) - 0.8)
    acts[3, :, 2] = 0  # a context where feature 2 never fires
    acts[:, :, 6] = 0  # a feature that never fires
    keys = torch.rand(batches * B, F)
    stats = LayerStatistics.empty(F, top=4, samples=6, window=5)
    for b in range(batches):
        rows = slice(b * B, (b + 1) * B)
        stats.update(acts[rows], torch.arange(b * B, (b + 1) * B), keys[rows], before=2)
    maxima, peaks = acts.max(dim=1)
    top, sample = stats.top.ranked(), stats.sample.ranked()
    for f in range(F):
        active = torch.nonzero(maxima[:, f] > 0).flatten()
        expected = active[maxima[active, f].argsort(descending=True)][:4].tolist()
        listed = [c for c in top.contexts[:, f].tolist() if c >= 0]
        assert listed == expected
        for slot, context in enumerate(listed):
            start = int(top.starts[slot, f])
            assert start == max(0, min(int(peaks[context, f]) - 2, T - 5))
            assert torch.equal(top.windows[slot, f], acts[context, start : start + 5, f])
            assert top.maxima[slot, f] == maxima[context, f]
        chosen = active[keys[active, f].argsort(descending=True)][:6]
        assert sorted(c for c in sample.contexts[:, f].tolist() if c >= 0) == sorted(chosen.tolist())
        values = acts[:, :, f][acts[:, :, f] > 0]
        assert stats.active[f] == values.numel()
        assert stats.total[f].item() == pytest.approx(values.double().sum().item(), rel=1e-12)
        edges = torch.tensor(histogram_edges(), dtype=torch.float64)
        bins = (torch.bucketize(values.double(), edges, right=True) - 1).clamp(0, HISTOGRAM_BINS - 1)
        assert torch.equal(stats.histogram[f], torch.bincount(bins, minlength=HISTOGRAM_BINS))


def test_state_round_trips_through_tensors():
    stats = LayerStatistics.empty(3, top=2, samples=2, window=4)
    stats.update(torch.rand(2, 6, 3), torch.tensor([0, 1]), torch.rand(2, 3), before=1)
    again = LayerStatistics.from_tensors(stats.tensors())
    for name, tensor in stats.tensors().items():
        assert torch.equal(tensor, again.tensors()[name]), name


# Build against the model ----------------------------------------------------------------------------------


def test_dashboards_match_the_model(parts, built):
    model, transcoders = parts
    path, corpus, report = built
    acts, contexts = corpus_activations(model, transcoders, corpus, CONFIG)
    tokens = contexts.shape[0] * (CONFIG.context_length - 1)
    assert report.tokens == tokens and not report.corpus_exhausted
    with FeatureStore(path, transcoders=transcoders) as store:
        checked = 0
        for layer in range(3):
            for feature in range(0, transcoders.d_features, 5):
                dashboard = store.get(layer, feature)
                values = acts[layer, :, :, feature]
                assert dashboard.active_tokens == int((values > 0).sum())
                assert dashboard.density == pytest.approx(dashboard.active_tokens / tokens)
                if dashboard.active_tokens == 0:
                    assert dashboard.top_examples == [] and dashboard.label is None
                    continue
                assert dashboard.max_activation == pytest.approx(values.max().item(), rel=1e-6)
                assert dashboard.mean_activation == pytest.approx(values[values > 0].mean().item(), rel=1e-5)
                assert sum(dashboard.histogram) == dashboard.active_tokens
                for example in dashboard.top_examples:
                    recomputed = acts[
                        layer, example.context, example.start : example.start + CONFIG.window, feature
                    ]
                    np.testing.assert_allclose(example.activations, recomputed.numpy(), rtol=1e-6, atol=1e-7)
                    ids = contexts[example.context, example.start : example.start + CONFIG.window]
                    assert example.tokens == model.token_strings(ids)
                    assert example.activations[example.peak] == pytest.approx(example.max_activation)
                maxima = sorted(values.max(dim=1).values.tolist(), reverse=True)
                shown = [example.max_activation for example in dashboard.top_examples]
                np.testing.assert_allclose(shown, [m for m in maxima if m > 0][: CONFIG.top], rtol=1e-6)
                sampled = [e for group in dashboard.quantile_groups for e in group.examples]
                assert len(sampled) == min(CONFIG.samples, int((values.max(dim=1).values > 0).sum()))
                assert [e.max_activation for e in sampled] == sorted(e.max_activation for e in sampled)
                (lens,) = logit_lens(model, transcoders, [(layer, feature)], k=CONFIG.lens_tokens)
                assert [t for t, _ in dashboard.output_top] == [t for t, _ in lens.top]
                np.testing.assert_allclose(
                    [v for _, v in dashboard.output_top], [v for _, v in lens.top], rtol=1e-5
                )
                assert [t for t, _ in dashboard.output_bottom] == [t for t, _ in lens.bottom]
                checked += 1
        assert checked > 10


def test_input_tokens_are_the_embeddings_that_excite_the_encoder_most(parts, built):
    model, transcoders = parts
    path, _, _ = built
    layer, feature = 1, 3
    norm = model.hf_model.model.layers[layer].post_attention_layernorm
    with torch.no_grad():
        embeddings = model.hf_model.get_input_embeddings().weight
        pre = norm(embeddings) @ transcoders.encoder_vectors(layer, torch.tensor([feature])).T
        pre = pre.squeeze(1) + transcoders.layers[layer].b_enc[feature]
    values, ids = pre.topk(CONFIG.lens_tokens)
    with FeatureStore(path) as store:
        inputs = store.get(layer, feature).input_top
    assert [t for t, _ in inputs] == model.token_strings(ids)
    np.testing.assert_allclose([v for _, v in inputs], values.numpy(), rtol=1e-5)


def test_a_finished_database_is_left_alone(parts, built):
    model, transcoders = parts
    path, corpus, _ = built
    before = path.stat().st_mtime_ns
    report = build_features(model, transcoders, corpus, path, CONFIG, progress=False)
    assert report.already_complete and path.stat().st_mtime_ns == before


# Resuming, refusals -------------------------------------------------------------------------------------


def dump(path: Path) -> dict:
    """Every feature's dashboard except label times, for comparing two builds."""
    with FeatureStore(path) as store:
        result = {}
        for layer in range(store.n_layers):
            for feature in range(store.d_features):
                data = store.get(layer, feature).as_json()
                for label in data["labels"]:
                    label.pop("created")
                data["label"] and data["label"].pop("created")
                result[layer, feature] = data
        return result


def test_a_stopped_build_resumes_to_the_same_database(parts, built, tmp_path, monkeypatch):
    model, transcoders = parts
    path, corpus, _ = built
    resumed = tmp_path / "resumed.sqlite"
    import threading

    stop = threading.Event()
    calls = {"n": 0}
    original = build_module._process

    def process_then_stop(*args, **kwargs):
        original(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 4:
            stop.set()

    monkeypatch.setattr(build_module, "_process", process_then_stop)
    with pytest.raises(Interrupted, match="run the same command to resume"):
        build_features(model, transcoders, corpus, resumed, CONFIG, progress=False, stop=stop)
    with pytest.raises(CircuitmapError, match="not finished"):
        FeatureStore(resumed)
    monkeypatch.setattr(build_module, "_process", original)
    report = build_features(model, transcoders, corpus, resumed, CONFIG, progress=False)
    assert report.contexts == math.ceil(CONFIG.tokens / (CONFIG.context_length - 1))
    assert dump(resumed) == dump(path)


def test_a_build_from_precomputed_inputs_equals_the_build_that_runs_the_model(parts, built, tmp_path):
    model, transcoders = parts
    path, corpus, _ = built
    _, contexts = corpus_activations(model, transcoders, corpus, CONFIG)
    cache = model.activations(contexts, points=["mlp_in"])
    inputs = torch.stack([cache["mlp_in", layer][:, 1:] for layer in range(model.n_layers)], dim=2)
    shards = [(contexts[:5], inputs[:5]), (contexts[5:], inputs[5:])]  # shards need not match batches
    again = tmp_path / "from-inputs.sqlite"
    report = build_features_from_activations(
        model, transcoders, shards, again, CONFIG, "the corpus", progress=False
    )
    assert report.contexts == len(contexts)
    assert dump(again) == dump(path)
    with pytest.raises(CircuitmapError, match="activations are of 7-token contexts"):
        build_features_from_activations(
            model, transcoders, [(contexts[:, :7], inputs[:, :6])], again, CONFIG, "x", progress=False
        )


KILLED_BUILD = """
import sys, torch
sys.path.insert(0, {tests!r})
from helpers.models import tiny_model
from helpers.transcoders import random_transcoders
from circuitmap.features import BuildConfig, build_features
config = BuildConfig(**{config!r})
build_features(tiny_model("llama"), random_transcoders("plt-topk", 3, 32).to(dtype=torch.float32), {corpus!r},
               {path!r}, config, progress=False, checkpoint_seconds=0)
"""


def test_a_killed_build_resumes_without_a_corrupt_database(parts, built, tmp_path):
    model, transcoders = parts
    path, corpus, _ = built
    killed = tmp_path / "killed.sqlite"
    big = BuildConfig(**{**CONFIG.__dict__, "tokens": 40_000})
    big_corpus = write_corpus(tmp_path / "big.txt", documents=4000)
    script = KILLED_BUILD.format(
        tests=str(REPO / "tests"), config=big.__dict__, corpus=str(big_corpus), path=str(killed)
    )
    process = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if killed.exists() and _tokens_done(killed) > 2000:
                break
            time.sleep(0.05)
        else:
            pytest.fail("the build did not save progress in time")
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    connection = sqlite3.connect(killed)
    assert connection.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert connection.execute("SELECT value FROM meta WHERE key = 'status'").fetchone() == ("building",)
    connection.close()
    report = build_features(model, transcoders, big_corpus, killed, big, progress=False)
    assert report.contexts == math.ceil(big.tokens / (big.context_length - 1))
    fresh = tmp_path / "fresh.sqlite"
    build_features(model, transcoders, big_corpus, fresh, big, progress=False)
    assert dump(killed) == dump(fresh)


def _tokens_done(path: Path) -> int:
    try:
        connection = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)
        try:
            row = connection.execute("SELECT value FROM meta WHERE key = 'tokens_done'").fetchone()
        finally:
            connection.close()
    except sqlite3.Error:
        return 0
    return int(row[0]) if row else 0


def test_a_small_corpus_keeps_what_it_has(parts, tmp_path, capsys):
    model, transcoders = parts
    corpus = write_corpus(tmp_path / "small.txt", documents=20)
    path = tmp_path / "small.sqlite"
    report = build_features(model, transcoders, corpus, path, CONFIG, progress=False)
    assert report.corpus_exhausted and 0 < report.tokens < CONFIG.tokens
    assert report.short_features > 0
    assert "the corpus has only" in capsys.readouterr().err
    with FeatureStore(path) as store:
        assert store.meta["status"] == "complete"
        assert any(store.get(0, f).top_examples for f in range(transcoders.d_features))


def test_other_sets_newer_schemas_and_other_files_are_refused(parts, built, tmp_path):
    model, transcoders = parts
    path, corpus, _ = built
    other = random_transcoders("plt-topk", 3, 32, seed=5).to(dtype=torch.float32)
    with pytest.raises(CircuitmapError, match="another transcoder set"):
        FeatureStore(path, transcoders=other)
    with pytest.raises(CircuitmapError, match="another transcoder set"):
        build_features(model, other, corpus, path, CONFIG, progress=False)
    newer = tmp_path / "newer.sqlite"
    newer.write_bytes(path.read_bytes())
    with sqlite3.connect(newer) as connection:
        connection.execute(
            "UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),)
        )
    with pytest.raises(CircuitmapError, match="newer than"):
        FeatureStore(newer)
    text = tmp_path / "notes.sqlite"
    text.write_text("not a database")
    with pytest.raises(CircuitmapError, match="not a circuitmap feature database"):
        FeatureStore(text)
    with pytest.raises(CircuitmapError, match="no such feature database"):
        FeatureStore(tmp_path / "absent.sqlite")


def test_resuming_with_other_settings_is_refused_once_something_was_read(parts, tmp_path, monkeypatch):
    import threading

    model, transcoders = parts
    corpus = write_corpus(tmp_path / "corpus.txt")
    changed = BuildConfig(**{**CONFIG.__dict__, "top": 7})
    untouched = tmp_path / "untouched.sqlite"
    stop = threading.Event()
    stop.set()
    with pytest.raises(Interrupted):
        build_features(model, transcoders, corpus, untouched, CONFIG, progress=False, stop=stop)
    assert build_features(model, transcoders, corpus, untouched, changed, progress=False).contexts > 0
    assert json.loads(FeatureStore(untouched).meta["settings"])["top"] == 7, "one that read nothing restarts"
    path = tmp_path / "partial.sqlite"
    original = build_module._process

    def process_then_stop(*args, **kwargs):
        original(*args, **kwargs)
        stop.set()

    stop.clear()
    monkeypatch.setattr(build_module, "_process", process_then_stop)
    with pytest.raises(Interrupted):
        build_features(model, transcoders, corpus, path, CONFIG, progress=False, stop=stop)
    monkeypatch.setattr(build_module, "_process", original)
    with pytest.raises(CircuitmapError, match="top 6 → 7.*--rebuild"):
        build_features(model, transcoders, corpus, path, changed, progress=False)
    rebuilt = build_features(model, transcoders, corpus, path, changed, progress=False, rebuild=True)
    assert rebuilt.contexts > 0 and json.loads(FeatureStore(path).meta["settings"])["top"] == 7


def test_an_empty_or_missing_corpus_is_refused_before_anything_is_written(parts, tmp_path):
    model, transcoders = parts
    (tmp_path / "empty.txt").write_text("")
    long_contexts = BuildConfig(**{**CONFIG.__dict__, "context_length": 65})
    with pytest.raises(CircuitmapError, match="a context .* has 65 tokens but the model's context is 64"):
        build_features(model, transcoders, tmp_path / "empty.txt", tmp_path / "db.sqlite", long_contexts)
    for corpus, message in [
        (tmp_path / "empty.txt", "too little text for one context"),
        (tmp_path / "typo.txt", "typo.txt"),
    ]:
        with pytest.raises(CircuitmapError, match=message):
            build_features(model, transcoders, corpus, tmp_path / "db.sqlite", CONFIG, progress=False)
        assert not (tmp_path / "db.sqlite").exists()


def test_bad_settings_are_refused(parts, tmp_path):
    model, transcoders = parts
    for bad, message in [
        ({"window": 30}, "cannot be longer"),
        ({"tokens": 0}, "tokens must be at least 1"),
        ({"before": 10}, "before must lie"),
    ]:
        with pytest.raises(CircuitmapError, match=message):
            build_features(
                model, transcoders, "x", tmp_path / "x.sqlite", BuildConfig(**{**CONFIG.__dict__, **bad})
            )
    assert not (tmp_path / "x.sqlite").exists()


# Labels and search ----------------------------------------------------------------------------------------


def test_automatic_labels_read_the_evidence():
    input_like = label_from_evidence([" Paris"] * 8 + [" London", "paris"], [" is"] * 10, [" France", " the"])
    assert (input_like.text, input_like.confidence, input_like.evidence["kind"]) == ("Paris", 0.9, "input")
    output_like = label_from_evidence(
        [" of", " in", " the", " to"], [" Paris", " paris", " Paris", None], [" Paris", " Lyon"]
    )
    assert (output_like.text, output_like.confidence, output_like.evidence["kind"]) == (
        "says Paris",
        0.75,
        "output",
    )
    mixed = label_from_evidence(["a", "b", "c", "d", "e"], [None] * 5, ["z"])
    assert mixed.evidence["kind"] == "mixed" and mixed.confidence == 0.2 and mixed.text.count(" / ") == 2
    assert label_from_evidence(["\n"] * 3, [None] * 3, ["x"]).text == "'\\n'"


COUNTRIES = [" Spain", " France", " Portugal", " Germany"]


def concept_space() -> TokenSpace:
    """Four country tokens sharing one strong direction, among 300 tokens of random directions."""
    generator = torch.Generator().manual_seed(0)
    strings = [*COUNTRIES, " the", " ran", " blue", " 7"] + [f"filler{i}" for i in range(292)]
    vectors = torch.randn(300, 64, generator=generator)
    vectors[:4] = vectors[:4] * 0.3 + torch.randn(64, generator=generator)
    return TokenSpace(strings, vectors)


def test_peak_tokens_that_belong_together_make_a_concept_label():
    space = concept_space()
    peaks = [" Spain"] * 4 + [" France"] * 3 + [" Portugal"] * 2 + [" Germany"] + [" the", " ran"]
    label = label_from_evidence(peaks, [None] * 12, [" x"], space)
    assert label.evidence["kind"] == "input concept"
    assert label.text == "Spain, France, Portugal, …" and label.confidence == round(10 / 12, 4)
    assert label_support(label, peaks, [None] * 12) == 10 / 12
    plain = label_from_evidence(peaks, [None] * 12, [" x"])
    assert (plain.text, plain.confidence) == ("Spain", round(4 / 12, 4)), "without embeddings: the token"
    dominant = label_from_evidence([" Spain"] * 7 + [" France"] * 3, [None] * 10, [" x"], space)
    assert (dominant.text, dominant.evidence["kind"]) == ("Spain", "input"), (
        "a token covering half stays the label"
    )
    unrelated = label_from_evidence(
        [" the"] * 2 + [" ran"] * 2 + [" blue"] * 2 + [" 7"], [None] * 7, ["x"], space
    )
    assert unrelated.evidence["kind"] == "mixed", "tokens far apart never form a concept"
    says = label_from_evidence(
        [" of", " to", " in", " at", " by", " on"],
        [" Spain", " France", " Portugal", " Spain", None, " the"],
        COUNTRIES,
        space,
    )
    assert (says.text, says.evidence["kind"], says.confidence) == (
        "says Spain, France, Portugal",
        "output concept",
        round(4 / 6, 4),
    )


def test_concepts_are_named_once_per_group_and_a_failed_name_keeps_the_list():
    space = concept_space()
    peaks = [" Spain", " France", " Portugal", " Spain", " ran"]
    labels = {
        0: label_from_evidence(peaks, [None] * 5, ["x"], space),
        1: label_from_evidence(list(reversed(peaks)), [None] * 5, ["x"], space),
        2: label_from_evidence([" ran"] * 5, [None] * 5, ["x"], space),
    }
    asked = []

    def namer(groups):
        asked.append(groups)
        return ["countries" for _ in groups]

    named = name_concepts(labels, namer)
    assert len(asked) == 1 and len(asked[0]) == 1, "one request, one group"
    assert named[0].text == "countries: Spain, France, Portugal" and named[0].evidence["name"] == "countries"
    assert 2 not in named, "only concepts are named"
    unnamed = name_concepts(labels, lambda groups: [None] * len(groups))[0]
    assert unnamed.text == labels[0].text and unnamed.evidence["name"] is None
    assert name_concepts(named, namer) == {} and len(asked) == 1, "a concept is named once"


def test_graphs_name_their_concepts_once_and_keep_the_names(built, tmp_path):
    path = tmp_path / "named.sqlite"
    path.write_bytes(built[0].read_bytes())
    space = concept_space()
    concept = label_from_evidence([" Spain", " France", " Portugal", " Germany"], [None] * 4, ["x"], space)
    write_labels(path, [(1, 3, concept)], 32)
    asked = []

    def namer(groups):
        asked.extend(groups)
        return ["countries"] * len(groups)

    with FeatureStore(path) as store:
        named = name_stored_concepts(store, [(1, 3), (0, 0)], namer)
        assert list(named) == [(1, 3)] and store.label(1, 3).text.startswith("countries: Spain, France")
        assert name_stored_concepts(store, [(1, 3)], namer) == {} and len(asked) == 1
        assert store.search("countries")[0].feature == 3


@pytest.mark.parametrize(
    ("continuation", "name"),
    [
        (" countries.\nS", "countries"),
        (" days of the week", "days of the week"),
        (" 123 things", None),
        ("\n", None),
    ],
)
def test_concept_names_are_short_and_made_of_words(continuation, name):
    assert concept_name(continuation) == name


def test_the_model_names_concepts_in_one_batched_pass_per_prompt_length():
    model = tiny_model("llama")
    names = model_namer(model, max_new_tokens=3)([["a", "b"], ["c", "d"], ["abc", "de", "f"]])
    assert len(names) == 3 and all(name is None or isinstance(name, str) for name in names)


def test_manual_labels_take_precedence_and_keep_their_history(built, tmp_path):
    path = tmp_path / "labels.sqlite"
    path.write_bytes(built[0].read_bytes())
    with FeatureStore(path) as store:
        layer, feature = next(
            (lay, f) for lay in range(3) for f in range(48) if store.label(lay, f) is not None
        )
        automatic = store.label(layer, feature)
        assert automatic.source == "auto" and 0 < automatic.confidence <= 1
        store.set_label(layer, feature, "  a   cat\nfeature ", author="ada")
        current = store.label(layer, feature)
        assert (current.text, current.source, current.author) == ("a cat feature", "manual", "ada")
        assert current.created.endswith("+00:00")
        assert [hit.feature for hit in store.search("cat feat") if hit.layer == layer] == [feature]
        store.set_label(layer, feature, "")
        assert store.label(layer, feature) == automatic
        assert [label.source for label in store.get(layer, feature).labels] == ["auto", "manual", "manual"]
        with pytest.raises(CircuitmapError, match="at most 500"):
            store.set_label(layer, feature, "x" * 501)
        with pytest.raises(CircuitmapError, match="no feature 48 in layer 0"):
            store.set_label(0, 48, "x")


def test_search_by_label_token_and_number(built):
    with FeatureStore(built[0]) as store:
        assert [(h.layer, h.feature) for h in store.search("2/7")] == [(2, 7)]
        assert [(h.layer, h.feature) for h in store.search("L1:40")] == [(1, 40)]
        label = next(store.label(0, f) for f in range(48) if store.label(0, f) is not None)
        word = next(w for w in label.text.replace("/", " ").split() if w.isalnum())
        assert any(hit.label == label.text for hit in store.search(word, limit=200))
        assert store.search("") == []
        assert len(store.search("t", limit=3)) <= 3


def test_lookups_are_read_only(built):
    with FeatureStore(built[0]) as store, pytest.raises(sqlite3.OperationalError, match="readonly"):
        store._connection.execute("DELETE FROM features")


# Command line ---------------------------------------------------------------------------------------------


def test_features_commands(tmp_path, capsys):
    tiny_hf_model("llama").save_pretrained(tmp_path / "model")
    char_tokenizer().save_pretrained(tmp_path / "model")
    random_transcoders("plt-topk", 3, 32).save(tmp_path / "transcoders")
    corpus = write_corpus(tmp_path / "corpus.txt")
    db = tmp_path / "f.sqlite"
    common = ["--model", str(tmp_path / "model"), "--transcoders", str(tmp_path / "transcoders")]
    build = ["features", "build", *common, "--corpus", str(corpus), "--db", str(db), "--tokens", "2000"]
    assert main([*build, "--context-length", "32", "--window", "16"]) == 0
    assert "built" in capsys.readouterr().out
    assert main([*build, "--context-length", "32", "--window", "16"]) == 0
    assert "already complete" in capsys.readouterr().out
    assert main(["features", "show", str(db), "1", "2"]) == 0
    shown = capsys.readouterr().out
    assert "layer 1 feature 2" in shown and "promotes:" in shown
    assert main(["features", "show", str(db), "1", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["feature"] == 2
    assert main(["features", "label", str(db), "1", "2", "cats", "--author", "bo"]) == 0
    assert "manual label 'cats' by bo" in capsys.readouterr().out
    assert main(["features", "search", str(db), "cats"]) == 0
    assert "1/2" in capsys.readouterr().out
    assert main(["features", "show", str(db), "9", "2"]) == 2
    assert "no feature 2 in layer 9" in capsys.readouterr().err
    assert main(["features", "export", str(db), str(tmp_path / "one.json"), "--feature", "1/2"]) == 0
    assert json.loads((tmp_path / "one.json").read_text())["index"] == "2"
    assert main(["features", "label-llm", str(db), "--base-url", "http://127.0.0.1:9", "--model", "m"]) == 2
    assert "--all" in capsys.readouterr().err
    out = tmp_path / "graph"
    attribute = ["attribute", *common, "--prompt", "the cat", "--out", str(out), "--features", str(db)]
    assert main(attribute) == 0
    nodes = json.loads((out / "graph.json").read_text())["nodes"]
    assert any(node.get("label_source") for node in nodes)


def test_cross_layer_jumprelu_sets_build_too(parts, tmp_path):
    model, _ = parts
    transcoders = random_transcoders("clt", 3, 32).to(dtype=torch.float32)
    corpus = write_corpus(tmp_path / "corpus.txt", documents=60)
    config = BuildConfig(**{**CONFIG.__dict__, "tokens": 600})
    path = tmp_path / "clt.sqlite"
    build_features(model, transcoders, corpus, path, config, progress=False)
    acts, _ = corpus_activations(model, transcoders, corpus, config)
    with FeatureStore(path, transcoders=transcoders) as store:
        for layer, feature in [(0, 1), (1, 8), (2, 30)]:
            dashboard = store.get(layer, feature)
            values = acts[layer, :, :, feature]
            assert dashboard.active_tokens == int((values > 0).sum()) > 0
            assert dashboard.max_activation == pytest.approx(values.max().item(), rel=1e-6)
            (lens,) = logit_lens(model, transcoders, [(layer, feature)], k=config.lens_tokens)
            assert [t for t, _ in dashboard.output_top] == [t for t, _ in lens.top]


def test_readers_see_consistent_labels_while_one_is_written(built, tmp_path):
    import threading

    path = tmp_path / "shared.sqlite"
    path.write_bytes(built[0].read_bytes())
    errors: list[BaseException] = []
    done = threading.Event()

    def read() -> None:
        with FeatureStore(path) as store:
            while not done.is_set():
                try:
                    store.get(0, 3)
                except BaseException as error:  # noqa: BLE001 - reported to the test below
                    errors.append(error)
                    return

    readers = [threading.Thread(target=read) for _ in range(3)]
    for reader in readers:
        reader.start()
    with FeatureStore(path) as writer:
        for i in range(20):
            writer.set_label(0, 3, f"edit {i}", author="w")
    done.set()
    for reader in readers:
        reader.join()
    assert errors == []
    with FeatureStore(path) as store:
        assert store.label(0, 3).text == "edit 19"
        assert len([label for label in store.get(0, 3).labels if label.source == "manual"]) == 20


def test_dashboard_json_equals_the_dataclass_fields(built):
    import dataclasses

    with FeatureStore(built[0]) as store:
        for layer, feature in [(0, 0), (1, 5), (2, 47)]:
            dashboard = store.get(layer, feature)
            assert dashboard.as_json() == json.loads(json.dumps(dataclasses.asdict(dashboard)))
