"""Replace personal data and secrets with typed placeholders: <EMAIL>, <IP_ADDRESS>, <PHONE>, <SECRET>.

Token formats (cloud and API keys) come from detect-secrets' own detector patterns, run over the
whole text; its keyword and entropy detectors, which are slow, see only the lines that assign to
a secret-like name. A model trained on the output must never be able to emit what was removed.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from collections import Counter
from functools import cache

from detect_secrets.plugins.aws import AWSKeyDetector
from detect_secrets.plugins.azure_storage_key import AzureStorageKeyDetector
from detect_secrets.plugins.basic_auth import BasicAuthDetector
from detect_secrets.plugins.discord import DiscordBotTokenDetector
from detect_secrets.plugins.github_token import GitHubTokenDetector
from detect_secrets.plugins.gitlab_token import GitLabTokenDetector
from detect_secrets.plugins.high_entropy_strings import Base64HighEntropyString, HexHighEntropyString
from detect_secrets.plugins.jwt import JwtTokenDetector
from detect_secrets.plugins.keyword import KeywordDetector
from detect_secrets.plugins.npm import NpmDetector
from detect_secrets.plugins.openai import OpenAIDetector
from detect_secrets.plugins.pypi_token import PypiTokenDetector
from detect_secrets.plugins.sendgrid import SendGridDetector
from detect_secrets.plugins.slack import SlackDetector
from detect_secrets.plugins.square_oauth import SquareOAuthDetector
from detect_secrets.plugins.stripe import StripeDetector
from detect_secrets.settings import default_settings

from tisslm.core.config import AnonymizeParams

# Importing detect_secrets calls logging.captureWarnings(True), which routes every warning of the
# process into a logger nobody reads: a checkpoint skipped as corrupt would pass in silence.
logging.captureWarnings(False)

EMAIL, IP_ADDRESS, PHONE, SECRET = "<EMAIL>", "<IP_ADDRESS>", "<PHONE>", "<SECRET>"
REDACTION_TYPES = ("EMAIL", "IP_ADDRESS", "PHONE", "SECRET")  # the placeholders, without brackets

# Detectors whose patterns name a token format precisely enough to run on every line of code.
TOKEN_DETECTORS = (
    AWSKeyDetector, AzureStorageKeyDetector, BasicAuthDetector, DiscordBotTokenDetector, GitHubTokenDetector,
    GitLabTokenDetector, JwtTokenDetector, NpmDetector, OpenAIDetector, PypiTokenDetector, SendGridDetector,
    SlackDetector, SquareOAuthDetector, StripeDetector,
)  # fmt: skip

PRIVATE_KEY = re.compile(
    r"-----BEGIN[A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----"
    r"(?:.*?-----END[A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----|(?:\s*[A-Za-z0-9+/=]{16,})*)",  # no END: the base64 run
    re.DOTALL,
)
EMAIL_RE = re.compile(r"(?<![\w.+%-])[A-Za-z0-9][A-Za-z0-9._%+-]*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,24}\b")
IPV4_RE = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?![\w.])")
IPV6_RE = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")
PHONE_RE = re.compile(r"(?<![\w+.-])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)|\d{3})[ .-]\d{3}[ .-]\d{4}(?![\w-])")
# Lines worth the slow detectors: an assignment (or mapping entry) to a secret-like name.
SECRET_NAME_RE = re.compile(
    r"(?i)(?:passw|pwd|secret|token|api[_-]?key|access[_-]?key|auth|credential|private[_-]?key)\w*['\"]?\s*[:=]"
)
# What must never survive cleaning: the Great Expectations suite and the tests check for these.
LEAK_PATTERNS = {
    "email": EMAIL_RE.pattern,
    "aws_access_key": r"(?:A3T[A-Z0-9]|ABIA|ACCA|AKIA|ASIA)[0-9A-Z]{16}",
    "github_token": r"(?:ghp|gho|ghu|ghs|ghr)_[A-Za-z0-9_]{36}",
    "private_key": r"-----BEGIN[A-Z0-9 ]*PRIVATE KEY",
}


@cache
def _token_patterns() -> tuple[re.Pattern, ...]:
    with default_settings():
        return tuple(p for detector in TOKEN_DETECTORS for p in detector().denylist)


@cache
def _line_detectors() -> tuple:
    with default_settings():
        return KeywordDetector(), Base64HighEntropyString(), HexHighEntropyString()


def _secret_span(match: re.Match) -> tuple[int, int]:
    """The secret inside a detector match: its capture group when that holds it, else the match
    less the delimiters some patterns include (GitHub's group is just the 'ghp' prefix)."""
    if match.lastindex and len(match.group(1) or "") >= 8:
        return match.span(1)
    start, end = match.span()
    text = match.group()
    return start + len(text) - len(text.lstrip(" \t=:\"'")), end - len(text) + len(text.rstrip(" \t\"'\n"))


def _redact_tokens(text: str, counts: Counter) -> str:
    spans = []
    for pattern in _token_patterns():
        spans.extend(_secret_span(m) for m in pattern.finditer(text))
    return _replace_spans(text, spans, SECRET, counts)


def _replace_spans(text: str, spans: list[tuple[int, int]], placeholder: str, counts: Counter) -> str:
    if not spans:
        return text
    merged: list[list[int]] = []
    for start, end in sorted(spans):
        if end <= start:
            continue
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    pieces, last = [], 0
    for start, end in merged:
        pieces += [text[last:start], placeholder]
        last = end
    counts[placeholder.strip("<>")] += len(merged)
    return "".join(pieces) + text[last:]


def _redact_assigned_secrets(text: str, counts: Counter) -> str:
    if not SECRET_NAME_RE.search(text):
        return text
    lines = text.split("\n")
    detectors = _line_detectors()
    for number, line in enumerate(lines):
        if not SECRET_NAME_RE.search(line):
            continue
        values = set()
        with default_settings():
            for detector in detectors:
                values |= {
                    s.secret_value for s in detector.analyze_line(filename="x.py", line=line, line_number=number)
                }
        spans = [m.span() for value in values if value for m in re.finditer(re.escape(value), line)]
        lines[number] = _replace_spans(line, spans, SECRET, counts)
    return "\n".join(lines)


def _public_ip(candidate: str) -> bool:
    if ":" in candidate and sum(1 for group in candidate.split(":") if group) < 3:
        return False  # `x[1::2]` is a slice, not the address 1::2
    if "." in candidate and all(len(part) == 1 for part in candidate.split(".")[:3]):
        return False  # 2.7.2.2, 8.2.4.44: version and section numbers (at the cost of 8.8.8.8)
    try:
        return ipaddress.ip_address(candidate).is_global
    except ValueError:
        return False


def _sub_counted(pattern: re.Pattern, placeholder: str, text: str, counts: Counter, keep=None) -> str:
    def replace(match: re.Match) -> str:
        if keep is not None and not keep(match.group()):
            return match.group()
        counts[placeholder.strip("<>")] += 1
        return placeholder

    return pattern.sub(replace, text)


def anonymize(text: str, params: AnonymizeParams) -> tuple[str, Counter]:
    """`text` with personal data and secrets replaced, and the count of each placeholder used."""
    counts: Counter = Counter()
    if params.secrets:
        text = _sub_counted(PRIVATE_KEY, SECRET, text, counts)
        text = _redact_tokens(text, counts)
        text = _redact_assigned_secrets(text, counts)
    if params.emails and "@" in text:
        text = _sub_counted(EMAIL_RE, EMAIL, text, counts)
    if params.ip_addresses:
        text = _sub_counted(IPV4_RE, IP_ADDRESS, text, counts, keep=_public_ip)
        if "::" in text or text.count(":") >= 7:
            text = _sub_counted(IPV6_RE, IP_ADDRESS, text, counts, keep=_public_ip)
    if params.phone_numbers:
        text = _sub_counted(PHONE_RE, PHONE, text, counts)
    return text, counts
