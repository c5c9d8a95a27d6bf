"""Optional feature labels written by a language model behind an OpenAI-compatible chat endpoint.

Nothing here runs unless ``label_features`` is called: it then sends, for each feature, a compact prompt
built from the feature's dashboard (its top contexts with the peak token marked, the tokens its output
promotes and the input tokens that excite it) to ``POST {base_url}/chat/completions`` and stores the
sanitised one-line reply as an ``llm`` label whose author is the model's name. Labels are written in
batches as they come, so an interrupted run keeps the finished ones; manual labels still take precedence
over LLM labels, which take precedence over automatic ones.

Only the standard library is used for HTTP. Requests that fail with 429 or a 5xx status, time out or lose
the connection are retried with exponential backoff (honouring ``Retry-After``); other failures stop the
run with a one-line ``CircuitmapError`` that never contains the API key.
"""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from tqdm.auto import tqdm

from circuitmap import __version__
from circuitmap.errors import CircuitmapError
from circuitmap.features.store import Example, FeatureDashboard, FeatureStore, Label, now, write_labels
from circuitmap.validation import check_number

MAX_LABEL_CHARS = 80
PROMPT_CONTEXTS = 8
PROMPT_TOKENS = 10
BEFORE_PEAK = 12
AFTER_PEAK = 4
EXCERPT_CHARS = 200
MAX_RETRY_AFTER = 60.0

SYSTEM_PROMPT = (
    "You name features of a language model's transcoder. Each feature is a direction that becomes "
    "active on some tokens. From the evidence, give the feature a short, specific label of at most 8 "
    "words saying what it responds to or what it makes the model say next. Reply with the label only: "
    "one line, no quotes, no explanation."
)


@dataclass
class LabelReport:
    """What a labelling run did: labels stored, features skipped and why, failures, requests made."""

    labelled: int = 0
    already_labelled: int = 0
    no_evidence: int = 0
    failed: list[tuple[int, int, str]] = field(default_factory=list)
    requests: int = 0
    seconds: float = 0.0


@dataclass(frozen=True)
class ChatEndpoint:
    """An OpenAI-compatible chat-completions endpoint and how patiently to call it."""

    base_url: str
    model: str
    api_key: str | None = None
    timeout: float = 60.0
    retries: int = 4
    backoff: float = 1.0
    temperature: float = 0.0

    @property
    def url(self) -> str:
        """The chat-completions URL."""
        return self.base_url.rstrip("/") + "/chat/completions"

    @property
    def host(self) -> str:
        """The endpoint's host (and port), without any credentials in the URL."""
        parts = urlsplit(self.base_url)
        return parts.hostname + (f":{parts.port}" if parts.port else "") if parts.hostname else ""

    def check(self) -> None:
        """A clear error for a URL or model that cannot work."""
        parts = urlsplit(self.base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise CircuitmapError(
                f"the LLM base URL must be http(s)://host[:port][/path], got {self.base_url!r}"
            )
        if not self.model.strip():
            raise CircuitmapError("name the LLM model to ask for labels")
        check_number("the timeout", self.timeout, low=0, low_open=True)
        check_number("the number of retries", self.retries, low=0, whole=True)
        check_number("the backoff", self.backoff, low=0)
        check_number("the temperature", self.temperature, low=0, high=2)

    def complete(self, messages: list[dict], report: LabelReport | None = None) -> str:
        """The text of the model's reply to ``messages`` (retrying transient failures)."""
        body = json.dumps(
            {"model": self.model, "messages": messages, "temperature": self.temperature}
        ).encode()
        for attempt in range(self.retries + 1):
            if report is not None:
                report.requests += 1
            try:
                with urllib.request.urlopen(self._request(body), timeout=self.timeout) as response:
                    payload = response.read()
            except urllib.error.HTTPError as error:
                excerpt = self._redact(_excerpt(error.read()))
                if _transient(error.code) and attempt < self.retries:
                    time.sleep(self._delay(attempt, error.headers.get("Retry-After")))
                    continue
                raise CircuitmapError(
                    f"{self.url}: HTTP {error.code} {error.reason or ''}".rstrip()
                    + (f": {excerpt}" if excerpt else "")
                ) from None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
                if attempt < self.retries:
                    time.sleep(self._delay(attempt, None))
                    continue
                reason = getattr(error, "reason", error)
                raise CircuitmapError(f"cannot reach {self.url}: {reason}") from None
            return reply_text(payload, self.url)
        raise AssertionError("unreachable")

    def _request(self, body: bytes) -> urllib.request.Request:
        """The POST request with JSON headers and, when a key is given, bearer authorisation."""
        headers = {
            "Content-Type": "application/json",
            "Accept": "application/json",
            "User-Agent": f"circuitmap/{__version__}",
        }
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return urllib.request.Request(self.url, data=body, headers=headers, method="POST")

    def _redact(self, text: str) -> str:
        """``text`` with the API key, should a server echo it, replaced by ``***``."""
        return text.replace(self.api_key, "***") if self.api_key else text

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        """Seconds to wait before the next attempt: ``Retry-After`` when given, else exponential backoff."""
        if retry_after is not None:
            try:
                return min(max(float(retry_after), 0.0), MAX_RETRY_AFTER)
            except ValueError:
                pass
        return self.backoff * 2**attempt


def label_features(
    store_path: str | Path,
    features: list[tuple[int, int]] | None,
    *,
    base_url: str,
    model: str,
    api_key: str | None = None,
    timeout: float = 60.0,
    progress: bool = True,
    skip_labelled: bool = True,
    batch_size: int = 16,
    retries: int = 4,
    backoff: float = 1.0,
    temperature: float = 0.0,
) -> LabelReport:
    """Ask the model behind ``base_url`` for a label of each feature (every feature of the set when
    ``features`` is None) and store the replies as ``llm`` labels, ``batch_size`` at a time.

    With ``skip_labelled``, features that already have a manual or LLM label are left alone; features
    that were never active have no evidence and are skipped. A reply that sanitises to nothing is counted
    in ``failed`` and the run goes on; an unusable endpoint stops it, keeping the labels stored so far.
    """
    endpoint = ChatEndpoint(base_url, model, api_key, timeout, retries, backoff, temperature)
    endpoint.check()
    if batch_size < 1:
        raise CircuitmapError(f"batch_size must be at least 1, got {batch_size}")
    started = time.perf_counter()
    report = LabelReport()
    with FeatureStore(store_path) as store:
        wanted = list(dict.fromkeys(store.checked(features)))
        if skip_labelled:
            current = store.labels_of(wanted)
            kept = [key for key in wanted if key not in current or current[key].source == "auto"]
            report.already_labelled = len(wanted) - len(kept)
            wanted = kept
        pending: list[tuple[int, int, Label]] = []
        try:
            for layer, feature in tqdm(wanted, desc="LLM labels", unit="feature", disable=not progress):
                label = _label_one(store, endpoint, layer, feature, report)
                if label is not None:
                    pending.append((layer, feature, label))
                if len(pending) >= batch_size:
                    _flush(store, pending, report)
        finally:
            _flush(store, pending, report)
    report.seconds = time.perf_counter() - started
    return report


def _label_one(
    store: FeatureStore, endpoint: ChatEndpoint, layer: int, feature: int, report: LabelReport
) -> Label | None:
    """Ask for one feature's label; None (and a note in the report) when there is nothing to store."""
    dashboard = store.get(layer, feature)
    if not dashboard.top_examples:
        report.no_evidence += 1
        return None
    prompt = build_prompt(dashboard)
    reply = endpoint.complete(
        [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt}], report
    )
    text = clean_label(reply)
    if not text:
        report.failed.append((layer, feature, f"unusable reply {_excerpt(reply.encode())!r}"))
        return None
    evidence = {"endpoint": endpoint.host, "temperature": endpoint.temperature, **prompt_summary(dashboard)}
    return Label(text=text, source="llm", author=endpoint.model, created=now(), evidence=evidence)


def _flush(store: FeatureStore, pending: list[tuple[int, int, Label]], report: LabelReport) -> None:
    """Store the pending labels in one transaction and clear the list."""
    if pending:
        write_labels(store.path, pending, store.d_features)
        report.labelled += len(pending)
        pending.clear()


def build_prompt(dashboard: FeatureDashboard) -> str:
    """The user message: the feature's top contexts (peak token in ``[[ ]]``), promoted and input tokens."""
    share = f"{dashboard.density:.3%}"
    lines = [
        f"Feature {dashboard.feature} of layer {dashboard.layer}, active on {share} of tokens.",
        "Contexts where it is most active (its strongest token marked [[like this]], the activation after):",
    ]
    for n, (example, marked) in enumerate(shown_contexts(dashboard), 1):
        lines.append(f"{n}. {marked}  ({example.max_activation:.3g})")
    if dashboard.output_top:
        lines.append("Tokens its output makes more likely next: " + token_list(dashboard.output_top))
    if dashboard.input_top:
        lines.append("Input tokens that excite it most: " + token_list(dashboard.input_top))
    lines.append("Label (at most 8 words):")
    return "\n".join(lines)


def shown_contexts(dashboard: FeatureDashboard) -> list[tuple[Example, str]]:
    """Up to ``PROMPT_CONTEXTS`` top contexts with their marked text, repeats of the same text left out."""
    shown: dict[str, Example] = {}
    for example in dashboard.top_examples:
        shown.setdefault(marked_context(example), example)
        if len(shown) == PROMPT_CONTEXTS:
            break
    return [(example, marked) for marked, example in shown.items()]


def marked_context(example: Example) -> str:
    """A context cut around its peak, with the peak token in ``[[ ]]`` and newlines shown as ``\\n``."""
    start = max(example.peak - BEFORE_PEAK, 0)
    end = min(example.peak + AFTER_PEAK + 1, len(example.tokens))
    pieces = [_visible(token) for token in example.tokens[start:end]]
    pieces[example.peak - start] = f"[[{pieces[example.peak - start]}]]"
    return ("…" if start > 0 else "") + "".join(pieces) + ("…" if end < len(example.tokens) else "")


def token_list(tokens: list[tuple[str, float]]) -> str:
    """Up to ``PROMPT_TOKENS`` tokens, each quoted so that spaces show."""
    return ", ".join(json.dumps(token, ensure_ascii=False) for token, _ in tokens[:PROMPT_TOKENS])


def prompt_summary(dashboard: FeatureDashboard) -> dict:
    """What the prompt showed, kept as the label's evidence."""
    shown = shown_contexts(dashboard)
    peaks = [example.tokens[example.peak] for example, _ in shown]
    return {
        "contexts": len(shown),
        "peak_tokens": peaks[:5],
        "promoted": [token for token, _ in dashboard.output_top[:5]],
        "inputs": [token for token, _ in dashboard.input_top[:5]],
    }


def clean_label(reply: str | None) -> str:
    """The label in a model's reply: its first meaningful line without prefixes, quotes or markup, at most
    ``MAX_LABEL_CHARS`` characters (cut at a word boundary)."""
    if not reply:
        return ""
    text = re.sub(r"<think>.*?(?:</think>|$)", " ", reply, flags=re.DOTALL | re.IGNORECASE)
    lines = [line for line in (_clean_line(raw) for raw in text.splitlines()) if line]
    # A lead-in such as "Here is a label:" is skipped when something follows it.
    while len(lines) > 1 and lines[0].endswith(":"):
        lines.pop(0)
    return _cap(lines[0].rstrip(":").strip()) if lines else ""


def _clean_line(line: str) -> str:
    """One line of a reply without list markers, a ``Label:`` prefix, quotes, emphasis or a final period."""
    line = line.replace("**", "").replace("__", "").strip().strip("`").strip()
    line = re.sub(r"^(?:[-*•]\s+|\d+[.)]\s+|#+\s*)", "", line)
    line = re.sub(r"^(?:feature\s+)?(?:label|name|answer)\s*[:–-]\s*", "", line, flags=re.IGNORECASE)
    line = _unquote(line.strip(" \t*_`").rstrip(".").strip())
    return " ".join(line.rstrip(".").split())


def _unquote(text: str) -> str:
    """``text`` without quotes that enclose all of it (straight or typographic, possibly nested)."""
    pairs = {'"': '"', "'": "'", "“": "”", "‘": "’"}
    while len(text) >= 2 and pairs.get(text[0]) == text[-1]:
        text = text[1:-1].strip()
    return text


def reply_text(payload: bytes, url: str) -> str:
    """The message text of a chat-completions response body (empty when the model sent none)."""
    try:
        data = json.loads(payload)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CircuitmapError(f"{url}: the reply is not JSON: {_excerpt(payload)!r}") from None
    try:
        content = data["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise CircuitmapError(
            f"{url}: the reply has no choices[0].message.content: {_excerpt(payload)!r}"
        ) from None
    if content is not None and not isinstance(content, str):
        raise CircuitmapError(f"{url}: the reply's message content is not text: {_excerpt(payload)!r}")
    return content or ""


def _cap(text: str) -> str:
    """``text`` cut to ``MAX_LABEL_CHARS`` characters, at a word boundary where there is one."""
    if len(text) <= MAX_LABEL_CHARS:
        return text
    cut = text[: MAX_LABEL_CHARS + 1].rsplit(" ", 1)[0]
    return (cut if cut and len(cut) <= MAX_LABEL_CHARS else text[:MAX_LABEL_CHARS]).rstrip(" ,;:-")


def _visible(token: str) -> str:
    """A token with line breaks and tabs written as escapes, so a context stays on one line."""
    return token.replace("\r", "\\r").replace("\n", "\\n").replace("\t", "\\t")


def _transient(status: int) -> bool:
    """Whether an HTTP status is worth retrying (rate limits and server errors)."""
    return status == 429 or 500 <= status < 600


def _excerpt(body: bytes) -> str:
    """The start of a response body on one line, for error messages."""
    text = " ".join(body.decode("utf-8", "replace").split())
    return text if len(text) <= EXCERPT_CHARS else text[:EXCERPT_CHARS] + "…"
