"""Scorers: how strongly an answer shows a trait, from 0 (not at all) to 100 (strongly).

A scorer is any function ``(question, answer) -> float`` returning a score in [0, 100], or NaN when it
cannot judge (such an answer is never kept). Scorers are found by name in a registry that
``register_scorer`` extends; a trait file names its scorer (``"scorer": "sentiment"``). Three work offline:

- ``sentiment`` (optimistic vs pessimistic): VADER's compound polarity of the answer, ``c`` in [-1, 1],
  mapped to ``50 · (c + 1)``;
- ``language`` (answering in French vs English): 100 × the probability py3langid gives French among all
  the languages it knows (probabilities normalised);
- ``formality`` (formal vs casual register): lexical cues counted per hundred words of the answer (an
  answer shorter than 20 words counts as 20, so that one cue does not swing a short answer to an extreme).
  Formal cues: formal connectives and register words (``furthermore``, ``therefore``, ``shall``,
  ``regarding``…, 4 points each) and a share of long words (eight letters or more) above 20% (0.25 point per
  percentage point; below 20% it counts against). Casual cues: contractions (``don't``, ``it's``, 3 points),
  slang and interjections (``gonna``, ``hey``, ``cool``, ``stuff``…, 4 points), exclamation marks (3 points),
  emoticons and emoji (4 points) and second-person words (``you``, ``your``, 1 point). The score is
  ``100 · σ((formal − casual) / 10)``: an answer with no cue at all and a fifth of long words scores 50.

``EndpointJudge`` is the reference's judge, off by default: it asks an OpenAI-compatible chat endpoint the
trait file's ``eval_prompt`` for one token with the top 20 log-probabilities, and returns the average of the
integers 0–100 among those tokens weighted by their probabilities, or NaN when they hold less than a quarter
of the probability (a refusal). Its HTTP uses only the standard library.
"""

from __future__ import annotations

import functools
import json
import math
import re
import urllib.error
import urllib.request
from collections.abc import Callable

from circuitmap import __version__
from circuitmap.errors import CircuitmapError

Scorer = Callable[[str, str], float]
"""``scorer(question, answer)``: a score in [0, 100], NaN when the scorer cannot judge."""


@functools.cache
def _vader():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def sentiment_score(question: str, answer: str) -> float:
    """How optimistic ``answer`` sounds: VADER's compound polarity mapped from [-1, 1] to [0, 100]."""
    return 50.0 * (_vader().polarity_scores(answer)["compound"] + 1.0)


@functools.cache
def _language_identifier():
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def french_score(question: str, answer: str) -> float:
    """100 × the probability that ``answer`` is French, among every language py3langid knows."""
    return 100.0 * dict(_language_identifier().rank(answer))["fr"]


FORMAL_WORDS = frozenset(
    {
        "accordingly",
        "additionally",
        "consequently",
        "furthermore",
        "hence",
        "however",
        "indeed",
        "moreover",
        "namely",
        "nevertheless",
        "nonetheless",
        "notwithstanding",
        "therefore",
        "thus",
        "whereas",
        "whereby",
        "herein",
        "thereby",
        "wherein",
        "subsequently",
        "regarding",
        "concerning",
        "shall",
        "therein",
        "respectively",
        "approximately",
        "sincerely",
        "kindly",
    }
)
"""Formal connectives and register words."""
CASUAL_WORDS = frozenset(
    {
        "gonna",
        "wanna",
        "gotta",
        "kinda",
        "sorta",
        "yeah",
        "yep",
        "yup",
        "nope",
        "hey",
        "hi",
        "hiya",
        "lol",
        "omg",
        "wow",
        "yay",
        "cool",
        "awesome",
        "stuff",
        "guys",
        "dude",
        "ok",
        "okay",
        "totally",
        "super",
        "btw",
        "tbh",
        "hmm",
        "oops",
        "cuz",
        "anyway",
        "literally",
        "basically",
        "folks",
        "buddy",
        "gosh",
        "nah",
        "haha",
        "thanks",
        "ya",
        "y'all",
    }
)
"""Slang, interjections and casual words."""
SECOND_PERSON = frozenset({"you", "your", "yours", "yourself", "yourselves"})
CONTRACTION = re.compile(r"(?:n't|'re|'m|'ll|'ve|'d)$|^(?:it|that|what|there|here|he|she|who|let)'s$")
WORD = re.compile(r"[^\W\d_]+(?:['’][^\W\d_]+)?")
EMOTICON = re.compile(r"(?:[:;=]-?[)(DPp])|[\U0001F300-\U0001FAFF\u2600-\u27BF]")
LONG_WORD_LETTERS = 8
LONG_WORD_BASELINE = 20.0
SHORTEST_COUNT = 20


def formality_score(question: str, answer: str) -> float:
    """How formal ``answer`` reads, from the lexical cues the module describes (0 casual, 100 formal)."""
    words = [word.lower().replace("’", "'") for word in WORD.findall(answer)]
    per_hundred = 100.0 / max(len(words), SHORTEST_COUNT)
    formal = 4 * sum(word in FORMAL_WORDS for word in words)
    long_share = 100.0 * sum(len(word) >= LONG_WORD_LETTERS for word in words) / max(len(words), 1)
    casual = (
        3 * sum(bool(CONTRACTION.search(word)) for word in words)
        + 4 * sum(word in CASUAL_WORDS for word in words)
        + 3 * answer.count("!")
        + 4 * len(EMOTICON.findall(answer))
        + sum(word.split("'")[0] in SECOND_PERSON for word in words)
    )
    evidence = (formal - casual) * per_hundred + 0.25 * (long_share - LONG_WORD_BASELINE)
    return 100.0 / (1.0 + math.exp(-evidence / 10.0))


SCORERS: dict[str, Scorer] = {
    "sentiment": sentiment_score,
    "language": french_score,
    "formality": formality_score,
}
"""The scorers trait files and settings can name."""


def register_scorer(name: str, scorer: Scorer, *, replace: bool = False) -> None:
    """Make ``scorer`` available as ``name``; a name already taken is refused unless ``replace``."""
    if not isinstance(name, str) or not name.strip():
        raise CircuitmapError("a scorer's name must be a non-empty string")
    if not callable(scorer):
        raise CircuitmapError(f"scorer {name!r} must be a function (question, answer) -> score")
    if name in SCORERS and not replace:
        raise CircuitmapError(f"a scorer named {name!r} exists already (replace=True replaces it)")
    SCORERS[name] = scorer


def get_scorer(name: str) -> Scorer:
    """The scorer registered as ``name``; a one-line error listing the known ones otherwise."""
    if name not in SCORERS:
        raise CircuitmapError(f"unknown scorer {name!r}; known: {', '.join(sorted(SCORERS))}")
    return SCORERS[name]


def score_in_range(name: str, value: float) -> float:
    """``value`` as a float when it is NaN or in [0, 100]; a one-line error naming the scorer otherwise."""
    score = float(value)
    if not math.isnan(score) and not 0.0 <= score <= 100.0:
        raise CircuitmapError(f"scorer {name!r} returned {score:g}; scores lie in [0, 100]")
    return score


class EndpointJudge:
    """The reference's judge behind an OpenAI-compatible chat endpoint (``POST {base_url}/chat/completions``):
    a 0–100 score from the top log-probabilities of the one token it answers ``eval_prompt`` with."""

    TOP_LOGPROBS = 20
    MIN_NUMBER_MASS = 0.25

    def __init__(
        self,
        base_url: str,
        model: str,
        eval_prompt: str,
        *,
        api_key: str | None = None,
        timeout: float = 60.0,
    ):
        if not base_url.startswith(("http://", "https://")):
            raise CircuitmapError(
                f"the judge's base URL must start with http:// or https://, got {base_url!r}"
            )
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.eval_prompt = eval_prompt
        self.api_key = api_key
        self.timeout = timeout

    def __call__(self, question: str, answer: str) -> float:
        prompt = self.eval_prompt.replace("{question}", question).replace("{answer}", answer)
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": 1,
            "temperature": 0,
            "logprobs": True,
            "top_logprobs": self.TOP_LOGPROBS,
            "seed": 0,
        }
        return self.score(self._post(body))

    def score(self, reply: dict) -> float:
        """The probability-weighted mean of the integers 0–100 among the reply's top tokens; NaN when they
        hold less than ``MIN_NUMBER_MASS`` of the probability."""
        try:
            top = reply["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
            candidates = [(entry["token"].strip(), float(entry["logprob"])) for entry in top]
        except (KeyError, IndexError, TypeError, AttributeError, ValueError):
            raise CircuitmapError(f"{self.url}: the reply has no top log-probabilities") from None
        numbers = {}
        for token, logprob in candidates:
            if token.isdigit() and 0 <= int(token) <= 100:
                numbers[int(token)] = numbers.get(int(token), 0.0) + math.exp(logprob)
        mass = sum(numbers.values())
        if mass < self.MIN_NUMBER_MASS:
            return math.nan
        return sum(value * probability for value, probability in numbers.items()) / mass

    def _post(self, body: dict) -> dict:
        headers = {"Content-Type": "application/json", "User-Agent": f"circuitmap/{__version__}"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(
            self.url, data=json.dumps(body).encode(), headers=headers, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                payload = response.read()
        except urllib.error.HTTPError as error:
            raise CircuitmapError(f"{self.url}: HTTP {error.code} {error.reason or ''}".rstrip()) from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
            raise CircuitmapError(f"cannot reach {self.url}: {getattr(error, 'reason', error)}") from None
        try:
            return json.loads(payload)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CircuitmapError(f"{self.url}: the reply is not JSON") from None
