"""Find personal data and secrets, and replace them with typed placeholders such as <EMAIL>.

`find_personal_data` returns exact spans of the original text, so that the content filter can
report and cut what a model emits; `anonymize` replaces those spans for the clean stage and the
knowledge base. A model trained on the output must never be able to emit what was removed.

Each kind has the detector that knows its format best:
- secrets: detect-secrets' token patterns (cloud and API keys) over the whole text, and a few
  formats it lacks (`EXTRA_TOKENS`); its keyword and entropy detectors, which are slow, see only
  the lines that assign to a secret-like name; and values given to a secret-like name, quoted or
  not (`AWS_SECRET_ACCESS_KEY=...`, `password: ...`, `-u user -p '...'`, `://user:...@`), when
  they look random (`_looks_random`), which a reference (`os.environ[...]`, `${DB_PASSWORD}`,
  `None`, `get_token()`) does not.
- phone numbers: Google's libphonenumber metadata (`phonenumbers`), which knows which digits
  make a real number in each country.
- card numbers and IBANs: the patterns of Presidio's recognizers, with python-stdnum's Luhn and
  IBAN (mod-97, and the country's length and format) checks.
- emails and IP addresses: regular expressions, with the context of a match deciding whether
  four dotted numbers are an address or a version.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import re
from collections import Counter
from dataclasses import dataclass
from functools import cache

import phonenumbers
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
from stdnum import iban, luhn

from tisslm.core.config import AnonymizeParams

# Importing detect_secrets calls logging.captureWarnings(True), which routes every warning of the
# process into a logger nobody reads: a checkpoint skipped as corrupt would pass in silence.
logging.captureWarnings(False)

# The kinds of personal data, which are also the placeholders without brackets; clean.py counts each.
REDACTION_TYPES = ("EMAIL", "IP_ADDRESS", "PHONE", "CARD_NUMBER", "IBAN", "SECRET")


@dataclass(frozen=True, slots=True)
class Redaction:
    """`text[start:end]` of the original text holds personal data of `kind` (one of REDACTION_TYPES)."""

    start: int
    end: int
    kind: str

    @property
    def placeholder(self) -> str:
        return f"<{self.kind}>"


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
# Four dotted numbers are a version or a section, not an address, when a word that says so comes
# just before them (`Python 2.7.2.2`, `section 8.2.4.4`, `__version__ = '1.0.0.1'`) ...
VERSION_BEFORE = re.compile(
    r"(?i)(?:(?:\b|_)version\w*|\b(?:releases?|python\d?|pypy|sections?|chapters?|revisions?|appendix|clauses?"
    r"|paragraphs?)|\b(?:v|ver|rel|rev|sec|sect|ch|chap|para)\.?|§+)[\s'\"=:(\[-]{0,6}$"
)
# ... or after them: a pre-release or build suffix (`1.2.3.4-beta`), the document it numbers (`4.3.2.1 of RFC 9110`).
VERSION_AFTER = re.compile(
    r"(?i)(?:[-~]?(?:alpha|beta|rc|dev|pre|post|final|snapshot)|\+[0-9a-z])"
    r"|\s+of\s+(?:rfcs?|pep|iso|ieee|posix|ecma|the)\b"
)
# ... or, in code, when they are the value of a name that ends in such a word: assigned to it
# (`PROTOCOL = "1.1.0.0"`, `min_version: '1.2.3.4'`), compared with it, passed as its keyword
# (`version="2.0.0.1"`) or to a call of it (`AssemblyVersion("1.2.3.4")`). Only the name's end
# counts, so `protocol_host = "8.8.8.8"` and `build_server = "8.8.8.8"` are still addresses.
VERSION_NAME = re.compile(
    r"(?i)(?:version|protocol|proto|release|revision|firmware)(?:_?(?:str|string|number|num|no|info|id))?_*"
    r"['\"]?\s*(?:[:=!<>]=?|\()\s*[(\[]?\s*[bru]?['\"]?$"
)
CONTEXT_CHARS = 40  # how far before a match, on its line, the words above are looked for

# US numbers may be written without a country code; numbers of other countries need their +code,
# or every run of digits in code would be read as some country's national number.
PHONE_REGION = "US"
# A valid number still has to look written for people: a `+` or digits in groups. A bare run of
# ten digits is as often an integer in code (2147483647 is a valid Dallas number).
PHONE_WRITTEN = re.compile(r"^\+|\d[\s().-]+\d")
DECIMAL_PART = re.compile(r"\.\d")  # `Decimal('+35236450.6')` holds a valid Luxembourg number
# Every valid number has five digits or more, a few separators apart, and none spans lines: the
# matcher (slow, pure Python) need only see the lines that hold such a run, 2% of the stdlib's text.
PHONE_CANDIDATE = re.compile(r"\d(?:[^\w\n]{0,4}\d){4}")
# Presidio's card and IBAN patterns (presidio-analyzer 2.2's CreditCardRecognizer and
# IbanRecognizer), checked with python-stdnum's Luhn and IBAN validators rather than through
# Presidio, whose import loads spaCy, transformers and torch (seconds) for two checksums.
CARD_RE = re.compile(
    r"\b(?!1\d{12}(?!\d))(?:4\d{3}|5[0-5]\d{2}|6\d{3}|1\d{3}|3\d{3})[- ]?\d{3,4}[- ]?\d{3,4}[- ]?\d{3,5}\b"
)
# An IBAN's country, check digits and 2 to 6 groups of four; then an optional fifth group and up
# to three characters more. Three ends, tried longest first: "DE89370400440532013000 2 days" is
# an IBAN without its " 2".
IBAN_RE = re.compile(
    r"(?<![A-Z0-9])([A-Z]{2}[0-9]{2}(?:[ -]?[A-Z0-9]{4}){2,6})((?:[ -]?[A-Z0-9]{4})?)((?:[ -]?[A-Z0-9]{1,3})?)(?![A-Z0-9])"
)
# Cheap supersets of what those patterns match, so that texts without one skip the slower regexes.
CARD_CANDIDATE = re.compile(r"\d(?:[ -]?\d){12}")
IBAN_CANDIDATE = re.compile(r"[A-Z]{2}\d{2}[ -]?[A-Z0-9]{4}")
# A card-shaped run glued by `.` or `-` to more digits or letters is part of a longer token: the
# fraction of a float (0.6356910791873801) or a group of a UUID (12345678-1234-5678-1234-567812345678),
# which pass the Luhn check one time in ten.
GLUED_BEFORE = re.compile(r"[0-9A-Za-z][.-]")
GLUED_AFTER = re.compile(r"[.-][0-9A-Za-z]")

# Lines worth the slow detectors: an assignment (or mapping entry) to a secret-like name.
SECRET_NAME_RE = re.compile(
    r"(?i)(?:passw|pwd|secret|token|api[_-]?key|access[_-]?key|auth|credential|private[_-]?key)\w*['\"]?\s*[:=]"
)
# Token formats detect-secrets' plugins do not know, each with a prefix that makes it unmistakable.
EXTRA_TOKENS = re.compile(
    r"(?<![\w-])(?:AIza[0-9A-Za-z_-]{35}"  # Google API key
    r"|sk-(?:proj|svcacct|admin)-[A-Za-z0-9_-]{20,}"  # OpenAI project and service keys
    r"|hv[sbr]\.[A-Za-z0-9_-]{20,}"  # HashiCorp Vault tokens
    r"|pypi-AgE[A-Za-z0-9_-]{40,})"  # PyPI upload tokens (detect-secrets wants 70+ characters)
)
EXTRA_TOKEN_PREFIXES = ("AIza", "sk-", "hvs.", "hvb.", "hvr.", "pypi-AgE")  # texts without one skip the regex
# A secret-like name, then what gives it a value: `=`, `:`, `=>`, `:=` (the name maybe quoted, as a
# key of JSON or of a dict), then the value, quoted or bare. A bare value ends at a space, a quote
# or what ends a value in a URL's query or a command line. Only the name's last word is matched, so
# `EMAIL_HOST_PASSWORD`, `adminPassword` and `$db_pass` are names too; one after `:` or `/` is part
# of an ARN or a path (`arn:aws:secretsmanager:...:secret:Name-*`), not a name.
# Lower case: matched against the text with ASCII letters lowered (`_ASCII_LOWER`: same length, same
# offsets), which lets the regex engine skip ahead on the names' first letters, 3 times faster than (?i).
SECRET_VALUE_NAME = (
    r"(?:passw(?:or)?d|passwd|pass|pwd|secret|secret[_-]?(?:access[_-]?)?key|token|auth[_-]?token|api[_-]?key"
    r"|access[_-]?key|private[_-]?key|credentials?|client[_-]?secret)"
)
ASSIGNED_VALUE = re.compile(
    r"(?<![:/])" + SECRET_VALUE_NAME + r"(?:[_-]?(?:id|value|str|b64))?['\"]?[ \t]*(?:=>|:=|[:=])[ \t]*"
    r"(?:[bru]?(?P<quote>['\"`])(?P<quoted>[^'\"`\s]+)(?P=quote)|(?P<bare>[^\s'\"`,;&)(<>\[\]{}=]+=*))"
)
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
# Command lines and .netrc: `-u user -p 'value'` (mysql, docker login, twine), `--password value`,
# `login name password value`; and a URL's `scheme://user:value@host`.
CLI_SECRET = re.compile(
    r"(?:\s-u\s*\S+\s+-p[ \t]*|--password[= ][ \t]*|\blogin\s+\S+\s+password\s+)"
    r"(?:(?P<quote>['\"])(?P<quoted>[^'\"\s]+)(?P=quote)|(?P<bare>[^\s'\"`;&|]+))"
)
URL_CREDENTIAL = re.compile(r"(?<=[A-Za-z0-9+.-])://[^:/\s@]*:(?P<bare>[^@\s/:,]{6,})@")
# What a value that is a reference, a placeholder or an empty promise looks like.
NOT_A_VALUE = re.compile(
    r"(?i)^(?:none|null|nil|true|false|undefined|required|optional|changeme|change_me|redacted|secret|password"
    r"|x+|\*+|\.+|-+|<[^>]*>|your[-_].*|.*_here|\$.*|%.*|\{.*|@.*|env:.*)$"
)
IDENTIFIER_CHAIN = re.compile(r"^[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+$|^[A-Za-z]+(?:[_-][A-Za-z]+)*$")
IDENTIFIER = re.compile(r"^[A-Za-z_]\w*$")
# A name rather than a value: a type (`PKCS7PrivateKeyTypes`, `Ed25519PrivateKey`) or snake_case words (`md5_hash`).
NAME_LIKE = re.compile(
    r"(?:Keys?|Types?|Tokens?|Secrets?|Password|Credentials?|Error|Exception|Class|Factory|Manager|Provider"
    r"|Handler|Config|Settings|Bytes|Encoder|Decoder)$|^_?[a-z0-9]+(?:_[a-z0-9]+)+$|^_?[A-Z0-9]+(?:_[A-Z0-9]+)+$"
)
REGEX_LIKE = re.compile(r"\\[wdsWDSbB]|[*?]$")  # a pattern, or a wildcard (an ARN's `...:secret:Name-*`)


def _looks_random(value: str) -> bool:
    """Whether a value given to a secret-like name is a credential rather than a word, a name or a
    reference: three kinds of character (lower, upper, digit, other) in 8 or more, or a long run
    of 20 or more with digits (a hex or base64 key) and enough entropy."""
    if len(value) < 8 or NOT_A_VALUE.match(value) or IDENTIFIER_CHAIN.match(value) or REGEX_LIKE.search(value):
        return False
    if IDENTIFIER.match(value) and (NAME_LIKE.search(value) or not any(c.isdigit() for c in value)):
        return False  # a name (`_TokenType`, `Ed25519PrivateKey`, `md5_hash`), not letters and digits drawn at random
    kinds = sum(
        (any(c.islower() for c in value), any(c.isupper() for c in value), any(c.isdigit() for c in value),
         any(not c.isalnum() for c in value))
    )  # fmt: skip
    counts = [value.count(c) for c in set(value)]
    entropy = -sum(n / len(value) * math.log2(n / len(value)) for n in counts)
    if kinds >= 3 and entropy >= 2.5:
        return True
    return len(value) >= 20 and kinds >= 2 and any(c.isdigit() for c in value) and entropy >= 3.0


def _given_secrets(text: str) -> list[Redaction]:
    """Values given to secret-like names, on command lines and in URLs, that look random."""
    found = []
    searches = [(ASSIGNED_VALUE, text.translate(_ASCII_LOWER))]  # the values are read from `text`, at the same offsets
    if ("-u" in text and "-p" in text) or "--password" in text or ("login" in text and "password" in text):
        searches.append((CLI_SECRET, text))
    if "://" in text:
        searches.append((URL_CREDENTIAL, text))
    for pattern, searched in searches:
        for match in pattern.finditer(searched):
            group = "bare" if match.group("bare") is not None else "quoted"
            start, end = match.span(group)
            if _looks_random(text[start:end]):
                found.append(Redaction(start, end, "SECRET"))
    return found


# What must never survive cleaning: the Great Expectations suite and the tests check for these.
# Card numbers and IBANs are not here: a regex cannot check their checksums, and without them it
# would flag every long integer; the tests plant valid ones instead.
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


def _secrets(text: str) -> list[Redaction]:
    spans = [m.span() for m in PRIVATE_KEY.finditer(text)]
    spans += [_secret_span(m) for pattern in _token_patterns() for m in pattern.finditer(text)]
    if any(prefix in text for prefix in EXTRA_TOKEN_PREFIXES):
        spans += [m.span() for m in EXTRA_TOKENS.finditer(text)]
    return [Redaction(start, end, "SECRET") for start, end in spans] + _assigned_secrets(text) + _given_secrets(text)


def _assigned_secrets(text: str) -> list[Redaction]:
    """The values the keyword and entropy detectors report on lines assigning to a secret-like name,
    wherever they occur on that line (the detectors give values, not positions)."""
    if not SECRET_NAME_RE.search(text):
        return []
    found, line_start = [], 0
    with default_settings():
        for number, line in enumerate(text.split("\n")):
            if SECRET_NAME_RE.search(line):
                values = {
                    secret.secret_value
                    for detector in _line_detectors()
                    for secret in detector.analyze_line(filename="x.py", line=line, line_number=number)
                }
                found += [
                    Redaction(line_start + m.start(), line_start + m.end(), "SECRET")
                    for value in values
                    if value
                    for m in re.finditer(re.escape(value), line)
                ]
            line_start += len(line) + 1
    return found


def _line_around(text: str, start: int, end: int) -> tuple[int, int]:
    """The span of the line holding text[start:end], without its newline."""
    line_end = text.find("\n", end)
    return text.rfind("\n", 0, start) + 1, len(text) if line_end < 0 else line_end


def _is_address(text: str, match: re.Match) -> bool:
    """Whether four dotted numbers, public if an address, are one rather than a version or a section."""
    line_start, _ = _line_around(text, *match.span())
    before = text[max(line_start, match.start() - CONTEXT_CHARS) : match.start()]
    # Without such a word, a public address is taken for one whatever its digits: a few version
    # numbers in the corpus lose their digits, and no `x = '8.8.8.8'` slips through.
    return not (VERSION_BEFORE.search(before) or VERSION_NAME.search(before) or VERSION_AFTER.match(text, match.end()))


def _public_ip(candidate: str) -> bool:
    if ":" in candidate and sum(1 for group in candidate.split(":") if group) < 3:
        return False  # `x[1::2]` is a slice, not the address 1::2
    try:
        return ipaddress.ip_address(candidate).is_global
    except ValueError:
        return False


def _ip_addresses(text: str) -> list[Redaction]:
    found = [
        Redaction(*m.span(), "IP_ADDRESS")
        for m in IPV4_RE.finditer(text)
        if _public_ip(m.group()) and _is_address(text, m)
    ]
    if "::" in text or text.count(":") >= 7:
        found += [Redaction(*m.span(), "IP_ADDRESS") for m in IPV6_RE.finditer(text) if _public_ip(m.group())]
    return found


def _phone_numbers(text: str) -> list[Redaction]:
    found, position = [], 0
    while candidate := PHONE_CANDIDATE.search(text, position):
        line_start, line_end = _line_around(text, candidate.start(), candidate.end())
        line, position = text[line_start:line_end], line_end
        # VALID: the number must exist in its country's plan (1234567890 does not); STRICT_GROUPING:
        # its digit groups must be the country's (`aix-6107-1415-32` and `33471-90901` are not).
        # max_tries at least the line's length, so that a line full of numbers is searched to its end.
        matches = phonenumbers.PhoneNumberMatcher(
            line, PHONE_REGION, leniency=phonenumbers.Leniency.STRICT_GROUPING, max_tries=max(len(line), 65535)
        )
        found += [
            Redaction(line_start + m.start, line_start + m.end, "PHONE")
            for m in matches
            if PHONE_WRITTEN.search(m.raw_string) and not DECIMAL_PART.match(line, m.end)
        ]
    return found


def _luhn_valid(value: str) -> bool:
    # `\d` matched any script's digits, which Presidio's check read with int(); stdnum wants ASCII.
    return luhn.is_valid("".join(str(int(c)) for c in value if c not in " -"))


def _cards(text: str) -> list[Redaction]:
    """Presidio's CreditCardRecognizer, less Presidio: its pattern, the Luhn check on the digits."""
    if not CARD_CANDIDATE.search(text):
        return []
    return [Redaction(*m.span(), "CARD_NUMBER") for m in CARD_RE.finditer(text) if _luhn_valid(m.group())]


def _ibans(text: str) -> list[Redaction]:
    """Presidio's IbanRecognizer, less Presidio: its pattern, then from the longest of its three
    ends to the shortest, the first that is a valid IBAN."""
    if not IBAN_CANDIDATE.search(text):
        return []
    found = []
    for match in IBAN_RE.finditer(text):
        for group in (3, 2, 1):
            end = match.end(group) or match.end()
            if match.start() < end and iban.is_valid(text[match.start() : end], check_country=False):
                found.append(Redaction(match.start(), end, "IBAN"))
                break
    return found


def _card_numbers(text: str) -> list[Redaction]:
    return [
        card
        for card in _cards(text)
        if not (card.start >= 2 and GLUED_BEFORE.match(text, card.start - 2)) and not GLUED_AFTER.match(text, card.end)
    ]


def _merge(found: list[Redaction]) -> list[Redaction]:
    """Sorted, non-overlapping spans covering all of `found`. Overlapping spans become one, of the
    kind of the earliest (the longest among those starting together), or SECRET if one is a secret."""
    merged: list[Redaction] = []
    for span in sorted(found, key=lambda s: (s.start, -s.end)):
        if span.end <= span.start:
            continue
        last = merged[-1] if merged else None
        if last and (span.start < last.end or (span.start == last.end and span.kind == last.kind)):
            kind = "SECRET" if "SECRET" in (last.kind, span.kind) else last.kind
            merged[-1] = Redaction(last.start, max(last.end, span.end), kind)
        else:
            merged.append(span)
    return merged


def find_personal_data(text: str, params: AnonymizeParams) -> list[Redaction]:
    """The spans of `text` holding the kinds `params` enables: sorted, non-overlapping, exact."""
    found: list[Redaction] = []
    if params.secrets:
        found += _secrets(text)
    if params.emails and "@" in text:
        found += [Redaction(*m.span(), "EMAIL") for m in EMAIL_RE.finditer(text)]
    if params.ip_addresses:
        found += _ip_addresses(text)
    if params.phone_numbers:
        found += _phone_numbers(text)
    if params.payment_cards:
        found += _card_numbers(text)
    if params.ibans:
        found += _ibans(text)
    return _merge(found)


def anonymize(text: str, params: AnonymizeParams) -> tuple[str, Counter]:
    """`text` with each span of `find_personal_data` replaced by its placeholder, and the count of each kind."""
    redactions = find_personal_data(text, params)
    pieces, last = [], 0
    for redaction in redactions:
        pieces += [text[last : redaction.start], redaction.placeholder]
        last = redaction.end
    pieces.append(text[last:])
    return "".join(pieces), Counter(r.kind for r in redactions)
