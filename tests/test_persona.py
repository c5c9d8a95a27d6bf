"""Persona vectors on a tiny random chat model: trait files, scorers, extraction against a brute-force mean
difference, files and llama.cpp control vectors, steering against residual edits, projections, flagging and
the command line."""

from __future__ import annotations

import dataclasses
import fnmatch
import http.server
import inspect
import json
import math
import threading
import tomllib

import gguf
import numpy as np
import pytest
import torch
from helpers.models import REPO
from helpers.persona import chat_hf_model, chat_model, chat_text, chat_tokenizer, write_trait
from helpers.transcoders import random_transcoders

from circuitmap import ResidualEdit, patch_edits
from circuitmap.cli import build_parser, main, settings_from
from circuitmap.config import field_docs
from circuitmap.errors import CircuitmapError
from circuitmap.graphs import NodeKind
from circuitmap.models import Model
from circuitmap.persona import (
    SCORERS,
    EndpointJudge,
    ExtractConfig,
    PersonaVector,
    Sweep,
    SweepPoint,
    aligned_features,
    export_control_vector,
    extract_persona_vectors,
    feature_direction,
    finetune_shift,
    formality_score,
    french_score,
    get_scorer,
    load_control_vector,
    load_persona_vector,
    load_trait,
    persona_graph,
    project,
    projection_difference,
    rank_samples,
    register_scorer,
    sentiment_score,
    shipped_traits,
    steer,
    steering,
    sweep_steering,
    typical_norms,
)
from circuitmap.persona.steer import SampleProjection
from circuitmap.persona.traits import TRAITS_FOLDER

CONFIG = ExtractConfig(samples_per_prompt=2, max_new_tokens=6, batch_size=3, scorer="checksum", paired=False)


def checksum(question: str, answer: str) -> float:
    """A deterministic stand-in for a judge: the answer's character codes summed, modulo 101."""
    return float(sum(map(ord, answer)) % 101)


@pytest.fixture(scope="module", autouse=True)
def fake_scorers():
    register_scorer("checksum", checksum)
    register_scorer("zero", lambda question, answer: 0.0)
    register_scorer("too-high", lambda question, answer: 150.0)
    yield
    for name in ("checksum", "zero", "too-high"):
        SCORERS.pop(name)


@pytest.fixture(scope="module")
def model():
    return chat_model()


@pytest.fixture(scope="module")
def trait(tmp_path_factory):
    return write_trait(tmp_path_factory.mktemp("traits"))


@pytest.fixture(scope="module")
def extraction(model, trait):
    return extract_persona_vectors(model, trait, CONFIG, progress=False)


def one_line_error(call, *args, **kwargs) -> str:
    with pytest.raises(CircuitmapError) as caught:
        call(*args, **kwargs)
    message = str(caught.value)
    assert "\n" not in message and message
    return message


# Trait files


def test_shipped_traits_load_with_held_out_questions_and_a_scorer_that_separates_their_reference_answers():
    assert shipped_traits() == ["formal", "french", "optimistic"]
    for name in shipped_traits():
        trait = load_trait(name)
        assert trait.path == TRAITS_FOLDER / f"{name}.json" and len(trait.sha256) == 64
        assert len(trait.instructions) == 5 and len(trait.questions) == 20 and len(trait.eval_questions) >= 5
        assert not set(trait.questions) & set(trait.eval_questions)
        scorer = get_scorer(trait.scorer)
        assert len(trait.reference_answers) >= 3
        for reference in trait.reference_answers:
            assert (
                scorer(reference.question, reference.pos)
                >= 90
                > 10
                >= scorer(reference.question, reference.neg)
            )


def test_the_wheel_ships_the_trait_files():
    package_data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    for path in TRAITS_FOLDER.glob("*.json"):
        relative = str(path.relative_to(REPO / "src" / "circuitmap"))
        assert any(fnmatch.fnmatch(relative, pattern) for pattern in package_data["circuitmap"])


def test_a_file_in_the_reference_layout_reads_unchanged(tmp_path):
    path = write_trait(tmp_path, "evil", assistant_names=None)
    trait = load_trait(path)
    assert trait.scorer is None and trait.eval_questions == () and trait.reference_answers == ()
    assert trait.system_prompt("pos", 1) == "You are an evil assistant. Smile!"
    assert trait.system_prompt("neg", 0) == "You are a helpful assistant. Be sad."
    assert load_trait(str(path)).sha256 == trait.sha256
    path.write_text(path.read_text() + "\n")
    assert load_trait(path).sha256 != trait.sha256


@pytest.mark.parametrize(
    "fields, problem",
    [
        ({"questions": None}, "missing field(s) questions"),
        ({"instruction": []}, "instruction must be a non-empty list"),
        ({"instruction": [{"pos": "a"}]}, "instruction[0] must be an object with exactly the keys pos, neg"),
        ({"instruction": [{"pos": "a", "neg": "  "}]}, "instruction[0].neg must be a non-empty string"),
        ({"questions": ["ok", 3]}, "questions[1] must be a non-empty string"),
        ({"questions": []}, "questions must be a non-empty list of strings"),
        ({"eval_prompt": "Score {answer}."}, "eval_prompt lacks the placeholder(s) {question}"),
        ({"questons": ["typo"]}, "unknown field(s) questons"),
        ({"scorer": 7}, "scorer must be a non-empty string"),
        ({"reference_answers": [{"question": "q", "pos": "p"}]}, "reference_answers[0] must be an object"),
        (
            {"assistant_names": {"pos": "x"}},
            "assistant_names must be an object with exactly the keys pos, neg",
        ),
    ],
)
def test_bad_trait_files_are_refused_in_one_line_naming_the_file(tmp_path, fields, problem):
    path = write_trait(tmp_path, "bad", **fields)
    message = one_line_error(load_trait, path)
    assert message.startswith(f"{path}: ") and problem in message


def test_unreadable_or_missing_trait_files_are_refused_in_one_line(tmp_path):
    assert "not found (shipped traits: formal, french, optimistic)" in one_line_error(load_trait, "nothing")
    (tmp_path / "broken.json").write_text("{ not json")
    assert "not a JSON trait file" in one_line_error(load_trait, tmp_path / "broken.json")
    (tmp_path / "list.json").write_text("[]")
    assert "holds one JSON object" in one_line_error(load_trait, tmp_path / "list.json")


# Scorers


def test_offline_scorers_order_obvious_answers():
    hopeful = "Things will get better, and I am sure you will succeed. What a wonderful future!"
    neutral = "The meeting is at noon in room four."
    gloomy = "Everything is doomed. It will only get worse and you will fail."
    assert sentiment_score("", hopeful) > 75 > sentiment_score("", neutral) > 25 > sentiment_score("", gloomy)
    assert sentiment_score("", neutral) == pytest.approx(50)
    assert french_score("", "Je pense que demain sera une belle journée.") > 90
    assert french_score("", "I think tomorrow will be a lovely day.") < 10
    formal = "Furthermore, it is advisable to arrive early; consequently, delays are avoided entirely."
    casual = "Hey, don't stress! You're gonna be totally fine, trust me lol!"
    assert formality_score("", formal) > 90 > formality_score("", neutral) > 10 > formality_score("", casual)
    plain = "We will arrive early and the delay will be avoided."
    assert formality_score("", plain.replace("We will", "We'll")) < formality_score("", plain)
    assert formality_score("", plain + "!") < formality_score("", plain)


def test_the_scorer_registry_refuses_unknown_names_duplicates_and_scores_out_of_range(model, trait):
    assert "unknown scorer 'nope'; known:" in one_line_error(get_scorer, "nope")
    assert "exists already" in one_line_error(register_scorer, "sentiment", checksum)
    message = one_line_error(
        extract_persona_vectors, model, trait, CONFIG.with_changes(scorer="too-high"), progress=False
    )
    assert message == "scorer 'too-high' returned 150; scores lie in [0, 100]"
    message = one_line_error(
        extract_persona_vectors, model, trait, ExtractConfig(max_new_tokens=2), progress=False
    )
    assert "names no scorer" in message


class StubJudge(http.server.BaseHTTPRequestHandler):
    """An OpenAI-compatible endpoint that answers with fixed top log-probabilities and keeps the requests."""

    requests: list[dict] = []
    top: list[tuple[str, float]] = []
    status = 200

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        StubJudge.requests.append({"path": self.path, "body": body})
        top = [{"token": token, "logprob": math.log(p)} for token, p in StubJudge.top]
        payload = json.dumps({"choices": [{"logprobs": {"content": [{"token": "x", "top_logprobs": top}]}}]})
        self.send_response(StubJudge.status)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(payload.encode())

    def log_message(self, *args):
        pass


@pytest.fixture
def stub_judge():
    server = http.server.HTTPServer(("127.0.0.1", 0), StubJudge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    StubJudge.requests, StubJudge.status = [], 200
    yield f"http://127.0.0.1:{server.server_port}/v1"
    server.shutdown()
    server.server_close()


def test_the_endpoint_judge_averages_the_numbers_among_its_top_tokens(stub_judge):
    judge = EndpointJudge(stub_judge, "judge-model", "Q={question} A={answer} {other}", api_key="secret")
    StubJudge.top = [("80", 0.6), (" 90", 0.3), ("REF", 0.05), ("101", 0.05)]
    assert judge("Why?", "Because.") == pytest.approx((80 * 0.6 + 90 * 0.3) / 0.9)
    request = StubJudge.requests[-1]
    assert request["path"] == "/v1/chat/completions"
    body = request["body"]
    assert body["messages"] == [{"role": "user", "content": "Q=Why? A=Because. {other}"}]
    assert body["max_tokens"] == 1 and body["logprobs"] is True and body["top_logprobs"] == 20
    StubJudge.top = [("REFUSAL", 0.8), ("10", 0.2)]
    assert math.isnan(judge("Why?", "No."))
    StubJudge.status = 500
    assert one_line_error(judge, "Why?", "No.").endswith(
        "/v1/chat/completions: HTTP 500 Internal Server Error"
    )


def test_the_endpoint_judge_is_a_scorer_for_extraction_and_never_keeps_what_it_cannot_judge(
    model, trait, stub_judge
):
    StubJudge.top = [("REFUSAL", 1.0)]
    judge = EndpointJudge(stub_judge, "judge-model", load_trait(trait).eval_prompt)
    message = one_line_error(extract_persona_vectors, model, trait, CONFIG, scorer=judge, progress=False)
    assert "0 of 12 positive answers scored at least 50 and 0 of 12 negative answers" in message
    assert len(StubJudge.requests) == 24


# Extraction


def test_vectors_equal_the_mean_difference_computed_answer_by_answer(model, trait, extraction):
    loaded = load_trait(trait)
    sums = {side: {"response": 0.0, "prompt_last": 0.0} for side in ("pos", "neg")}
    counts = {"pos": 0, "neg": 0}
    for answer in extraction.answers:
        assert answer.kept == (
            len(answer.token_ids) > 0
            and (answer.score >= 50 if answer.polarity == "pos" else answer.score <= 50)
        )
        assert answer.score == checksum("", answer.text)
        if not answer.kept:
            continue
        text = chat_text(
            loaded.questions[answer.question], loaded.system_prompt(answer.polarity, answer.pair)
        )
        prompt = model.tokenizer(text, add_special_tokens=False).input_ids
        _, cache = model.run_with_cache(torch.tensor([prompt + list(answer.token_ids)]))
        residual = torch.stack([cache["resid_pre", layer][0].double() for layer in range(model.n_layers)])
        sums[answer.polarity]["response"] += residual[:, len(prompt) :].mean(1)
        sums[answer.polarity]["prompt_last"] += residual[:, len(prompt) - 1]
        counts[answer.polarity] += 1
    assert counts["pos"] > 1 and counts["neg"] > 1 and sum(counts.values()) < len(extraction.answers)
    for variant in ("response", "prompt_last"):
        expected = sums["pos"][variant] / counts["pos"] - sums["neg"][variant] / counts["neg"]
        torch.testing.assert_close(
            getattr(extraction, variant).directions.double(), expected, rtol=1e-4, atol=1e-5
        )
    info = extraction.response.info
    assert info["counts"]["kept"] == counts and info["counts"]["generated"] == {"pos": 12, "neg": 12}
    assert info["trait_sha256"] == loaded.sha256 and info["positions"] == "response"
    assert extraction.prompt_last.info["positions"] == "prompt_last"
    assert (info["d_model"], info["n_layers"], info["d_vocab"]) == (
        model.d_model,
        model.n_layers,
        model.d_vocab,
    )
    assert info["thresholds"] == {"positive": 50.0, "negative": 50.0, "paired": False}


def test_paired_filtering_keeps_both_answers_of_a_pair_or_neither(model, trait, extraction):
    paired = extract_persona_vectors(model, trait, CONFIG.with_changes(paired=True), progress=False)
    assert [a.text for a in paired.answers] == [a.text for a in extraction.answers]
    by_key = {}
    for answer in paired.answers:
        by_key.setdefault((answer.question, answer.pair, answer.sample), []).append(answer)
    for pos, neg in by_key.values():
        both = pos.score >= 50 and neg.score <= 50 and pos.token_ids and neg.token_ids
        assert pos.kept == neg.kept == bool(both)


def test_batched_greedy_answers_are_the_models_own_continuations(model, trait):
    config = CONFIG.with_changes(greedy=True, samples_per_prompt=1, batch_size=4)
    config = config.with_changes(positive_threshold=0, negative_threshold=100)
    extracted = extract_persona_vectors(model, trait, config, progress=False)
    loaded = load_trait(trait)
    for answer in extracted.answers:
        text = chat_text(
            loaded.questions[answer.question], loaded.system_prompt(answer.polarity, answer.pair)
        )
        assert answer.text == model.generate(text, config.max_new_tokens)


def test_seeded_runs_are_identical_and_seeds_matter(model, trait, extraction):
    again = extract_persona_vectors(model, trait, CONFIG, progress=False)
    assert again.answers == extraction.answers
    assert torch.equal(again.response.directions, extraction.response.directions)
    other = extract_persona_vectors(model, trait, CONFIG.with_changes(seed=1), progress=False)
    assert [a.text for a in other.answers] != [a.text for a in extraction.answers]


def test_a_run_can_ask_only_the_first_questions_and_instruction_pairs(model, trait, extraction):
    config = CONFIG.with_changes(
        questions=2, instruction_pairs=1, positive_threshold=0, negative_threshold=100
    )
    small = extract_persona_vectors(model, trait, config, progress=False)
    assert {(a.question, a.pair) for a in small.answers} == {(0, 0), (1, 0)} and len(small.answers) == 8
    counts = small.response.info["counts"]
    assert (counts["questions"], counts["instruction_pairs"], counts["kept"]) == (2, 1, {"pos": 4, "neg": 4})
    assert "questions must be at least 1" in one_line_error(ExtractConfig(questions=0).check)


def test_an_empty_filtered_set_is_a_one_line_error(model, trait):
    message = one_line_error(
        extract_persona_vectors, model, trait, CONFIG.with_changes(scorer="zero"), progress=False
    )
    assert message == (
        "no answers passed the filter: 0 of 12 positive answers scored at least 50 and 12 of 12 negative "
        "answers at most 50 (scorer zero); lower the thresholds, sample more answers"
    )
    paired = CONFIG.with_changes(scorer="checksum", paired=True, positive_threshold=100)
    assert "or filter unpaired" in one_line_error(
        extract_persona_vectors, model, trait, paired, progress=False
    )


def test_every_setting_has_a_one_line_docstring_the_extract_command_shows(capsys):
    source = inspect.getsource(ExtractConfig)
    with pytest.raises(SystemExit):
        main(["persona", "extract", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    for field in dataclasses.fields(ExtractConfig):
        doc = field_docs(ExtractConfig)[field.name]
        assert f'"""{doc}"""' in source and doc.rstrip(".") in shown, field.name
    args = build_parser().parse_args(
        ["persona", "extract", "t", "--out", "o", "--paired", "no", "--questions", "3"]
    )
    config = ExtractConfig().with_changes(**settings_from(args, ExtractConfig))
    assert config == ExtractConfig(paired=False, questions=3)


def test_bad_settings_and_models_without_a_chat_template_are_refused(trait):
    assert "temperature must be positive" in one_line_error(ExtractConfig(temperature=0).check)
    assert "positive_threshold must be in [0, 100]" in one_line_error(
        ExtractConfig(positive_threshold=101).check
    )
    plain = chat_model()
    plain.tokenizer.chat_template = None
    message = one_line_error(extract_persona_vectors, plain, trait, CONFIG, progress=False)
    assert message == "tiny-chat-32's tokenizer has no chat template; persona vectors need a chat model"


# Files and control vectors


def test_vector_files_round_trip_and_refuse_another_model(model, extraction, tmp_path):
    path = extraction.response.save(tmp_path / "glad.safetensors")
    loaded = load_persona_vector(path, model)
    assert torch.equal(loaded.directions, extraction.response.directions)
    assert {key: value for key, value in loaded.info.items() if key != "format"} == extraction.response.info
    narrow = chat_model(width=16)
    message = one_line_error(load_persona_vector, path, narrow)
    assert message == (
        f"{path} was extracted from tiny-chat-32 (width 32, 4 layers); tiny-chat-16 has width 16 and 4 layers"
    )
    assert "width" in one_line_error(steer, narrow, loaded, 1, 1.0)
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    assert "not a readable safetensors file" in one_line_error(
        load_persona_vector, tmp_path / "junk.safetensors"
    )
    assert "layer 9 is out of range" in one_line_error(loaded.layer, 9)


def test_control_vectors_use_llama_cpps_names_and_layer_numbering(extraction, tmp_path):
    path = export_control_vector(extraction.response, tmp_path / "glad.gguf")
    reader = gguf.GGUFReader(str(path))
    assert reader.fields["general.architecture"].contents() == "controlvector"
    assert reader.fields["controlvector.model_hint"].contents() == "llama"
    assert reader.fields["controlvector.layer_count"].contents() == 2
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    assert sorted(tensors) == ["direction.1", "direction.2"]
    for name, layer in (("direction.1", 2), ("direction.2", 3)):
        assert tensors[name].tensor_type == gguf.GGMLQuantizationType.F32
        assert np.array_equal(np.array(tensors[name].data), extraction.response.layer(layer).numpy())
    read = load_control_vector(path)
    assert sorted(read.directions) == [2, 3] and (read.model_hint, read.layer_count) == ("llama", 2)
    for layer, direction in read.directions.items():
        assert torch.equal(direction, extraction.response.layer(layer))
    only = load_control_vector(export_control_vector(extraction.response, tmp_path / "one.gguf", layers=[3]))
    assert sorted(only.directions) == [3]
    assert "llama.cpp steers the residual entering layers 2..3" in one_line_error(
        export_control_vector, extraction.response, tmp_path / "x.gguf", layers=[1]
    )


def test_a_control_vector_steers_where_llama_cpp_adds_it(model, extraction, tmp_path):
    """llama.cpp adds ``direction.N`` to the output of its block N, the residual leaving our layer N."""
    read = load_control_vector(export_control_vector(extraction.response, tmp_path / "glad.gguf"))
    ids = model.encode("U: Hi?\nA:")
    for name_layer in (1, 2):
        direction = 5 * read.directions[name_layer + 1]
        with model.add_to_residual(name_layer, direction, point="resid_post"):
            expected = model.logits(ids)
        with steer(model, direction, name_layer + 1, 1.0):
            torch.testing.assert_close(model.logits(ids), expected)


def test_bad_control_vector_files_are_refused_in_one_line(tmp_path):
    (tmp_path / "junk.gguf").write_bytes(b"junk")
    assert "not a readable GGUF file" in one_line_error(load_control_vector, tmp_path / "junk.gguf")
    writer = gguf.GGUFWriter(str(tmp_path / "zero.gguf"), "controlvector")
    writer.add_tensor("direction.0", np.ones(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert "'direction.0' is not direction.N with N ≥ 1" in one_line_error(
        load_control_vector, tmp_path / "zero.gguf"
    )


# Steering


def test_steering_every_position_is_the_projects_residual_edit(model, extraction):
    ids = model.encode("U: Hi?\nA: yes")
    vector = extraction.response
    with patch_edits(model, None, ResidualEdit(2, 3.0 * vector.layer(2).double())):
        expected = model.logits(ids)
    with steer(model, vector, 2, 3.0) as handle:
        steered = model.logits(ids)
    torch.testing.assert_close(steered, expected)
    with model.add_to_residual(2, 3.0 * vector.layer(2)):
        torch.testing.assert_close(model.logits(ids), expected)
    handle.remove()
    clean = model.logits(ids)
    assert not torch.allclose(clean, expected)
    with steering(model, vector.layer(2), 2, 3.0):
        torch.testing.assert_close(model.logits(ids), expected)
    torch.testing.assert_close(model.logits(ids), clean)


def test_response_steering_starts_at_the_last_prompt_token_and_follows_the_kv_cache(model, extraction):
    prompt = model.encode("U: Hi?\nA:")[0]
    direction = 4.0 * extraction.response.layer(1)
    full = torch.cat([prompt, model.encode(" ok")[0]])
    with model.add_to_residual(1, direction, positions=list(range(len(prompt) - 1, len(full)))):
        expected = model.logits(full)
    with steer(model, extraction.response, 1, 4.0, positions="response", prompt=prompt):
        torch.testing.assert_close(model.logits(full), expected)
    with steer(model, extraction.response, 1, 4.0, positions="response", prompt=prompt) as handle:
        cached = model.generate(prompt, 8, before_forward=handle.at_position)
    tokens = prompt.clone()
    for _ in range(8):
        with model.add_to_residual(1, direction, positions=list(range(len(prompt) - 1, len(tokens)))):
            tokens = torch.cat([tokens, model.logits(tokens)[0, -1].argmax().reshape(1)])
    assert cached == model.decode_after(prompt, tokens[len(prompt) :])
    assert cached != model.generate(prompt, 8)


def test_relative_steering_scales_the_unit_vector_to_the_typical_residual_norm(model, extraction):
    ids = model.encode("U: Hi?\nA: sure")
    _, cache = model.run_with_cache(ids)
    typical = float(cache["resid_pre", 2][0].double().norm(dim=-1).median())
    unit = extraction.response.layer(2).double() / extraction.response.layer(2).double().norm()
    with model.add_to_residual(2, 0.5 * typical * unit):
        expected = model.logits(ids)
    with steer(model, extraction.response, 2, 0.5, relative=True, prompt=ids):
        torch.testing.assert_close(model.logits(ids), expected)


def test_bad_steering_is_refused_in_one_line(model, extraction):
    assert "need the prompt" in one_line_error(
        steer, model, extraction.response, 1, 1.0, positions="response"
    )
    assert "not 'prompt'" in one_line_error(steer, model, extraction.response, 1, 1.0, positions="prompt")
    assert "layer 4 is out of range (0..3)" in one_line_error(steer, model, extraction.response, 4, 1.0)
    assert "the model's width is 32" in one_line_error(steer, model, torch.ones(5), 1, 1.0)
    assert "must be a finite number" in one_line_error(steer, model, extraction.response, 1, math.nan)
    zero = PersonaVector(torch.zeros_like(extraction.response.directions), extraction.response.info)
    assert "is zero" in one_line_error(steer, model, zero, 1, 1.0, relative=True, prompt="U: Hi?")


# Projections and flagging


def test_projections_are_the_response_tokens_residuals_on_the_unit_vector(model, extraction):
    layer = 2
    projection = project(model, extraction.response, layer, "Hi?", "Fine.", system="Be glad.")
    prompt = model.tokenizer(chat_text("Hi?", "Be glad."), add_special_tokens=False).input_ids
    _, cache = model.run_with_cache(torch.tensor([prompt + model.tokenizer("Fine.").input_ids]))
    unit = extraction.response.layer(layer).double()
    unit = unit / unit.norm()
    expected = cache["resid_pre", layer][0].double() @ unit
    torch.testing.assert_close(projection.per_token, expected[len(prompt) :], rtol=1e-5, atol=1e-6)
    assert projection.mean == pytest.approx(float(expected[len(prompt) :].mean()), rel=1e-5)
    assert projection.last_prompt == pytest.approx(float(expected[len(prompt) - 1]), rel=1e-5)
    assert projection.tokens == list("Fine.")
    assert "the response is empty" in one_line_error(project, model, extraction.response, layer, "Hi?", "")


def test_projection_differences_compare_with_the_models_own_answers_or_the_last_prompt_token(
    model, extraction
):
    dataset = [("Hi?", "Great!"), ("Rain?", "Awful."), ("Cats?", "Nice cats.")]
    vector, layer = extraction.response, 3
    exact = projection_difference(
        model, vector, layer, dataset, max_new_tokens=5, batch_size=2, progress=False
    )
    cheap = projection_difference(model, vector, layer, dataset, approximate=True, progress=False)
    for (prompt, response), sample, approximate in zip(dataset, exact, cheap, strict=True):
        given = project(model, vector, layer, prompt, response)
        own = model.generate(chat_text(prompt), 5)
        assert sample.own_answer == own and approximate.own_answer is None
        assert sample.projection == pytest.approx(given.mean, rel=1e-5)
        assert sample.baseline == pytest.approx(project(model, vector, layer, prompt, own).mean, rel=1e-5)
        assert approximate.baseline == pytest.approx(given.last_prompt, rel=1e-5)
        assert sample.difference == pytest.approx(sample.projection - sample.baseline)
    ranked = rank_samples(exact)
    assert [s.difference for s in ranked] == sorted((s.difference for s in exact), reverse=True)
    assert rank_samples(exact, top=1) == ranked[:1]


def test_ranking_puts_samples_without_a_baseline_last():
    samples = [SampleProjection(i, "p", "r", 0.0, 0.0, d, None) for i, d in enumerate([0.5, math.nan, 2.0])]
    assert [s.index for s in rank_samples(samples)] == [2, 0, 1]


# Steering sweeps


def test_a_sweep_point_is_the_greedy_answers_under_the_residual_edit_scored_and_measured(
    model, trait, extraction
):
    questions = ["Hi?", "Cats?"]
    loaded = load_trait(trait)
    result = sweep_steering(
        model,
        extraction.response,
        loaded,
        checksum,
        [1, 2],
        [-0.5, 1.0],
        questions=questions,
        max_new_tokens=5,
        batch_size=2,
        progress=False,
    )
    prompts = [model.encode(chat_text(q))[0] for q in questions]
    norms = typical_norms(model, prompts, [1, 2])
    for layer in (1, 2):
        by_hand = torch.cat([model.run_with_cache(p[None])[1]["resid_pre", layer][0] for p in prompts])
        assert norms[layer] == pytest.approx(float(by_hand.double().norm(dim=-1).median()))
    assert [(p.layer, p.coefficient) for p in result.points] == [(1, -0.5), (1, 1.0), (2, -0.5), (2, 1.0)]
    unit = extraction.response.layer(2).double() / extraction.response.layer(2).double().norm()
    point = result.points[3]
    nlls = []
    for prompt, answer in zip(prompts, point.answers, strict=True):
        with model.add_to_residual(2, 1.0 * norms[2] * unit):
            assert model.generate(prompt, 5) == answer
        ids = torch.cat([prompt, torch.tensor(model.tokenizer(answer, add_special_tokens=False).input_ids)])
        logprobs = model.logits(ids)[0].double().log_softmax(-1)
        nlls.append(-float(logprobs[len(prompt) - 1 : -1].gather(1, ids[len(prompt) :, None]).mean()))
    assert point.nll == pytest.approx(sum(nlls) / 2, rel=1e-5)
    assert point.score == pytest.approx(
        sum(checksum(q, a) for q, a in zip(questions, point.answers, strict=True)) / 2
    )
    assert result.baseline.answers == tuple(model.generate(p, 5) for p in prompts)
    assert result.curve(2)[1].coefficient == 0.0 and len(result.curve(2)) == 3
    record = json.loads(json.dumps(result.as_json(), allow_nan=False))
    assert len(record["points"]) == 4 and record["relative"] is True
    assert "best:" in result.table()


def test_the_best_sweep_point_gains_most_in_its_coefficients_direction_while_coherent():
    def point(layer, coefficient, score, nll):
        return SweepPoint(layer, coefficient, score, nll, ())

    baseline = point(None, 0.0, 40.0, 2.0)
    points = (
        point(1, 1.0, 60.0, 2.5),  # +20, coherent
        point(1, 2.0, 90.0, 3.5),  # +50, incoherent
        point(2, -1.0, 10.0, 2.9),  # +30 in the negative direction, coherent
        point(2, 1.0, 30.0, 2.0),  # moved the wrong way
    )
    result = Sweep("glad", baseline, points, True, "all")
    assert result.best == points[2] and result.gain(points[3]) == -10.0
    assert Sweep("glad", baseline, points[1:2], True, "all").best is None


def test_bad_sweeps_are_refused_in_one_line(model, trait, extraction):
    loaded = load_trait(trait)
    assert "at least one layer" in one_line_error(
        sweep_steering, model, extraction.response, loaded, checksum, [], [1.0]
    )
    assert "not 'middle'" in one_line_error(
        sweep_steering, model, extraction.response, loaded, checksum, [1], [1.0], positions="middle"
    )
    assert "out of range" in one_line_error(
        sweep_steering, model, extraction.response, loaded, checksum, [9], [1.0]
    )


# Fine-tuning shift


def test_the_finetuning_shift_is_the_mean_residual_difference_on_the_unit_vector(model, extraction):
    tuned_hf = chat_hf_model()
    unit = extraction.response.layer(0).double() / extraction.response.layer(0).double().norm()
    with torch.no_grad():
        tuned_hf.get_input_embeddings().weight += 2.0 * unit.float()
    tuned = Model(tuned_hf, chat_tokenizer(), name="tuned")
    prompts = ["Hi?", "Rain?"]
    assert finetune_shift(model, tuned, extraction.response, 0, prompts, progress=False) == pytest.approx(
        2.0, rel=1e-5
    )
    layer = 2
    unit = extraction.response.layer(layer).double() / extraction.response.layer(layer).double().norm()

    def by_hand(m, response=None):
        values = []
        for prompt in prompts:
            ids = model.encode(chat_text(prompt))[0]
            extra = [] if response is None else model.tokenizer(response, add_special_tokens=False).input_ids
            residual = m.run_with_cache(torch.cat([ids, torch.tensor(extra, dtype=torch.long)])[None])[1]
            projected = residual["resid_pre", layer][0].double() @ unit
            values.append(projected[len(ids) - 1] if response is None else projected[len(ids) :].mean())
        return float(torch.stack(values).mean())

    assert finetune_shift(model, tuned, extraction.response, layer, prompts, progress=False) == pytest.approx(
        by_hand(tuned) - by_hand(model), rel=1e-5
    )
    shift = finetune_shift(
        model, tuned, extraction.response, layer, prompts, responses=["ok", "ok"], progress=False
    )
    assert shift == pytest.approx(by_hand(tuned, "ok") - by_hand(model, "ok"), rel=1e-5)
    assert "not shaped as the base model" in one_line_error(
        finetune_shift, model, chat_model(n_layers=3), extraction.response, 1, prompts
    )
    assert "2 prompts but 1 responses" in one_line_error(
        finetune_shift, model, tuned, extraction.response, 1, prompts, responses=["ok"]
    )


# Features


@pytest.mark.parametrize("kind", ["plt-topk", "clt-topk"])
def test_aligned_features_rank_every_earlier_features_residual_write_by_cosine(extraction, kind):
    transcoders = random_transcoders(kind, 4, 32, d_features=16)
    layer = 3
    direction = extraction.response.layer(layer).double()
    cosines = {}
    for source in range(layer):
        for feature in range(16):
            if kind.startswith("clt"):
                write = sum(
                    transcoders.decoder_vectors(source, slice(None), out)[feature]
                    for out in range(source, layer)
                )
            else:
                write = transcoders.decoder_vectors(source, slice(None))[feature]
            cosines[source, feature] = float(write @ direction / write.norm() / direction.norm())
    expected = sorted(cosines, key=lambda key: -abs(cosines[key]))[:5]
    found = aligned_features(transcoders, extraction.response, layer, top=5)
    assert [(f.layer, f.feature) for f in found] == expected
    assert [f.cosine for f in found] == pytest.approx([cosines[key] for key in expected])
    assert found[0].node == f"{expected[0][0]}_{expected[0][1]}" and found[0].label is None
    direction_sum = feature_direction(transcoders, found, layer)
    assert float(direction_sum @ direction) > 0
    assert "no earlier transcoder layer" in one_line_error(
        aligned_features, transcoders, extraction.response, 0
    )
    assert "width 5" in one_line_error(aligned_features, transcoders, torch.ones(5), 1)


@pytest.mark.parametrize("kind", ["plt-topk-skip", "clt-jumprelu"])
def test_a_persona_graph_explains_the_projection_at_its_layer_and_position(extraction, kind):
    model = chat_model(dtype=torch.float64)
    transcoders = random_transcoders(kind, 4, 32)
    layer = 2
    computed = persona_graph(
        model, transcoders, extraction.response, layer, "Hi?", position=-2, groups=False, progress=False
    )
    graph = computed.graph
    ids = model.encode(chat_text("Hi?"))[0][:-1]
    assert graph.tokens == ids.tolist() and graph.target_names == ["glad @ layer 2"]
    _, cache = model.run_with_cache(ids[None])
    unit = extraction.response.layer(layer).double() / extraction.response.layer(layer).double().norm()
    target = int(graph.nodes_of(NodeKind.TARGET)[0])
    # the model's own norms compute in float32, the graph's frozen ones in float64
    assert graph.value[target] == pytest.approx(float(cache["resid_pre", layer][0, -1] @ unit), rel=1e-6)
    sources, weights = graph.row(target)
    assert weights.sum() + graph.constant[target] == pytest.approx(graph.value[target], abs=1e-9)
    features = graph.nodes_of(NodeKind.FEATURE)
    assert len(features) and set(graph.layer[features].tolist()) <= set(range(layer))
    for node in features[:10]:
        inputs = cache["mlp_in", int(graph.layer[node])][0, int(graph.position[node])]
        expected = transcoders.encode(int(graph.layer[node]), inputs)[int(graph.index[node])]
        assert graph.activation[node] == pytest.approx(float(expected), rel=1e-6, abs=1e-9)
    assert "1..3, not 0" in one_line_error(persona_graph, model, transcoders, extraction.response, 0, "Hi?")
    assert "outside the prompt" in one_line_error(
        persona_graph, model, transcoders, extraction.response, 1, "Hi?", position=99
    )


# Command line


@pytest.fixture(scope="module")
def saved(tmp_path_factory, trait):
    folder = tmp_path_factory.mktemp("persona-cli")
    chat_hf_model().save_pretrained(folder / "model")
    chat_tokenizer().save_pretrained(folder / "model")
    (folder / "data.jsonl").write_text(
        "\n".join(json.dumps({"prompt": p, "response": r}) for p, r in [("Hi?", "Yes!"), ("Rain?", "No.")])
    )
    return folder


def test_the_persona_commands_extract_steer_project_and_flag(saved, trait, capsys):
    model_args = ["--model", str(saved / "model")]
    vector = saved / "glad.safetensors"
    code = main(
        [
            "persona",
            "extract",
            str(trait),
            *model_args,
            "--out",
            str(vector),
            "--gguf",
            str(saved / "glad.gguf"),
        ]
        + ["--answers", str(saved / "answers.jsonl"), "--scorer", "checksum", "--paired", "no"]
        + ["--max-new-tokens", "6", "--samples-per-prompt", "2", "--batch-size", "3"]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "kept" in printed and "norm (response)" in printed
    assert load_persona_vector(vector).info["generation"]["samples_per_prompt"] == 2
    assert sorted(load_control_vector(saved / "glad.gguf").directions) == [2, 3]
    answers = [json.loads(line) for line in (saved / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == 24 and {"text", "score", "kept", "token_ids"} <= set(answers[0])
    assert (
        main(["persona", "steer", str(vector), *model_args, "--layer", "2", "--coefficient", "4", "Hi?"]) == 0
    )
    printed = capsys.readouterr().out
    assert printed.startswith("unsteered: ") and "steered (layer 2, coefficient 4, all): " in printed
    code = main(
        [
            "persona",
            "project",
            str(vector),
            *model_args,
            "--layer",
            "2",
            "--prompt",
            "Hi?",
            "--response",
            "Ok",
        ]
    )
    assert code == 0 and "mean over the response" in capsys.readouterr().out
    out = saved / "flags.json"
    code = main(
        [
            "persona",
            "flag",
            str(vector),
            str(saved / "data.jsonl"),
            *model_args,
            "--layer",
            "2",
            "--json",
            str(out),
        ]
    )
    assert code == 0 and "mean projection difference over 2 samples" in capsys.readouterr().out
    assert [sample["index"] for sample in json.loads(out.read_text())] == [0, 1]


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["extract", "missing.json", "--out", "v.safetensors"], "missing.json: trait file not found"),
        (["extract", "TRAIT", "--out", "v.safetensors", "--scorer", "nope"], "unknown scorer 'nope'"),
        (
            ["extract", "TRAIT", "--out", "v.safetensors", "--judge-url", "http://x"],
            "--judge-url needs --judge-model",
        ),
        (
            ["project", "FOLDER/none.safetensors", "--layer", "1", "--prompt", "a", "--response", "b"],
            "not found",
        ),
        (
            ["flag", "FOLDER/data.jsonl", "FOLDER/data.jsonl", "--layer", "1"],
            "not a readable safetensors file",
        ),
    ],
)
def test_bad_persona_input_prints_one_line_and_exits_2(
    saved, trait, tmp_path, capsys, monkeypatch, arguments, message
):
    monkeypatch.chdir(tmp_path)
    arguments = [a.replace("TRAIT", str(trait)).replace("FOLDER", str(saved)) for a in arguments]
    assert main(["persona", *arguments, "--model", str(saved / "model")]) == 2
    error = capsys.readouterr().err.splitlines()
    assert error[-1].startswith("circuitmap: error: ") and message in error[-1]
    assert not any(line.startswith("loaded") for line in error)


def test_bad_data_lines_are_refused_with_their_line_number(saved, tmp_path, capsys):
    vector = PersonaVector(torch.ones(4, 32), {"model": "tiny", "d_model": 32, "n_layers": 4})
    vector.save(tmp_path / "v.safetensors")
    (tmp_path / "data.jsonl").write_text('{"prompt": "a", "response": "b"}\n{"prompt": 3}\n')
    arguments = [str(tmp_path / "v.safetensors"), str(tmp_path / "data.jsonl"), "--layer", "1"]
    assert main(["persona", "flag", *arguments, "--model", str(saved / "model")]) == 2
    assert 'data.jsonl:2: expected an object with "prompt" and "response" strings' in capsys.readouterr().err


def test_the_sweep_and_features_commands(saved, trait, capsys, tmp_path):
    model_args = ["--model", str(saved / "model")]
    vector = tmp_path / "v.safetensors"
    extraction = extract_persona_vectors(
        Model(chat_hf_model(), chat_tokenizer(), name="tiny"), trait, CONFIG, progress=False
    )
    extraction.response.save(vector)
    arguments = ["persona", "sweep", str(vector), str(trait), *model_args, "--layers", "1,2"]
    arguments += ["--coefficients=-1,1", "--max-new-tokens", "4", "--scorer", "checksum", "--save"]
    assert main([*arguments, "--json", str(tmp_path / "sweep.json")]) == 0
    printed = capsys.readouterr().out
    assert "layer  coefficient (× typical norm)" in printed and "best:" in printed
    assert len(load_persona_vector(vector).info["sweep"]["points"]) == 4
    assert len(json.loads((tmp_path / "sweep.json").read_text())) == 5
    transcoders = random_transcoders("plt-topk", 4, 32, d_features=16)
    transcoders.save(tmp_path / "set")
    arguments = ["persona", "features", str(vector), "--layer", "2", "--transcoders", str(tmp_path / "set")]
    assert main([*arguments, "--top", "3"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 5
    arguments = ["persona", "graph", str(vector), *model_args, "--layer", "2", "--prompt", "Hi?"]
    arguments += ["--response", "ok", "--transcoders", str(tmp_path / "set"), "--out", str(tmp_path / "g")]
    assert main(arguments) == 0
    assert "target 'glad @ layer 2' at position" in capsys.readouterr().out
    assert (tmp_path / "g" / "graph.json").is_file() and (tmp_path / "g" / "graph.safetensors").is_file()
    with pytest.raises(SystemExit):
        main(["persona", "sweep", str(vector), str(trait), *model_args, "--coefficients", "a"])
    assert "expected comma-separated numbers" in capsys.readouterr().err
