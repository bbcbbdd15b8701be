"""The anonymiser's spans: each kind found exactly, look-alikes in code left alone, overlaps merged."""

from __future__ import annotations

import itertools
import random
import string
import subprocess
import sys

import pytest

from tisslm.core.config import AnonymizeParams
from tisslm.data.anonymize import REDACTION_TYPES, Redaction, _merge, anonymize, find_personal_data

PARAMS = AnonymizeParams()


def luhn_valid(prefix: str, length: int, rng: random.Random) -> str:
    """A random card number starting with `prefix` whose last digit makes the Luhn sum a multiple of 10."""
    body = prefix + "".join(rng.choices(string.digits, k=length - len(prefix) - 1))
    total = sum(sum(divmod(int(d) * (2 if i % 2 == 0 else 1), 10)) for i, d in enumerate(reversed(body)))
    return body + str(-total % 10)


def iban(country: str, bban: str) -> str:
    """`bban` with the mod-97 check digits of `country`."""
    number = int("".join(str(int(c, 36)) for c in bban + country + "00"))
    return f"{country}{98 - number % 97:02d}{bban}"


def grouped(value: str, separator: str) -> str:
    return separator.join(value[i : i + 4] for i in range(0, len(value), 4))


# (line, the personal data in it, its kind)
FOUND = [
    ("    dns = '8.8.8.8'", "8.8.8.8", "IP_ADDRESS"),
    ("$ ping 1.1.1.1", "1.1.1.1", "IP_ADDRESS"),
    ("nameserver 9.9.9.9", "9.9.9.9", "IP_ADDRESS"),
    ("resolver = ('1.1.1.1', 53)", "1.1.1.1", "IP_ADDRESS"),
    ("curl http://8.8.4.4/status", "8.8.4.4", "IP_ADDRESS"),
    ("upstream 9.9.9.9:53", "9.9.9.9", "IP_ADDRESS"),
    ("x = '8.8.8.8:53'", "8.8.8.8", "IP_ADDRESS"),
    ("fallbacks = ['1.1.1.1']", "1.1.1.1", "IP_ADDRESS"),  # no word either way: an address, not a version
    ("    server = connect('93.184.216.34', port=8080)", "93.184.216.34", "IP_ADDRESS"),
    ("addr = '2001:4860:4860::8888'", "2001:4860:4860::8888", "IP_ADDRESS"),
    ("# London office: +44 20 7946 0958", "+44 20 7946 0958", "PHONE"),
    ("BERLIN = '+49 30 901820'", "+49 30 901820", "PHONE"),
    ("Paris: +33 1 42 68 53 00.", "+33 1 42 68 53 00", "PHONE"),
    ("tokyo_phone = '+81 3-3224-5000'", "+81 3-3224-5000", "PHONE"),
    ("call (415) 555-0132 after 5pm", "(415) 555-0132", "PHONE"),
    ("'phone': '415-555-0132',", "415-555-0132", "PHONE"),
    ("sms.send(to='+14155550132')", "+14155550132", "PHONE"),
    ("card = '4111 1111 1111 1111'", "4111 1111 1111 1111", "CARD_NUMBER"),
    ("Mastercard 5555-5555-5555-4444 exp 12/29", "5555-5555-5555-4444", "CARD_NUMBER"),
    ("amex: 3782 822463 10005", "3782 822463 10005", "CARD_NUMBER"),
    ("charge(6011111111111117, 100)", "6011111111111117", "CARD_NUMBER"),
    ("iban = 'GB82 WEST 1234 5698 7654 32'", "GB82 WEST 1234 5698 7654 32", "IBAN"),
    ("Konto: DE89370400440532013000", "DE89370400440532013000", "IBAN"),
    ("FR14 2004 1010 0505 0001 3M02 606 (Paris)", "FR14 2004 1010 0505 0001 3M02 606", "IBAN"),
    ("'NL91ABNA0417164300'", "NL91ABNA0417164300", "IBAN"),
    ("ES91 2100 0418 4502 0005 1332", "ES91 2100 0418 4502 0005 1332", "IBAN"),
    ("to IT60X0542811101000000123456 by Friday", "IT60X0542811101000000123456", "IBAN"),
]


@pytest.mark.parametrize("line, value, kind", FOUND, ids=[f"{kind}:{value}" for _, value, kind in FOUND])
def test_each_kind_is_found_with_its_exact_span(line, value, kind):
    text = f"def f():\n{line}\n    return 0\n"
    [span] = find_personal_data(text, PARAMS)
    assert (text[span.start : span.end], span.kind) == (value, kind)
    assert anonymize(text, PARAMS) == (text.replace(value, f"<{kind}>"), {kind: 1})


KEPT = [
    "Python 2.7.2.2 is the last release",
    "version 1.2.3.4",
    "built with v8.2.4.44",
    "release 3.1.4.1 fixes it",
    "as section 8.2.4.4 says",
    "# rfc7231#section-7.1.1.1",
    "see 4.3.2.1 of RFC 9110",
    "§ 8.8.8.8 of the contract",
    "__version__ = '1.0.0.1'",
    "VERSION_STRING = '9.9.9.9'",
    '{"version": "8.8.8.8"}',
    "VERSION = (1, 2, 3)",
    "requires 1.2.3.4-beta or later",
    "host = '192.168.1.20'; lo = '127.0.0.1'; net = '10.0.0.0/8'",
    "MAX = 2147483647",
    "MASK = 0x7fffffff",
    "assert x == 1234567890",
    "created = 1700000000",
    "created_ms = 1700000000000",
    "day = '2024-01-15'",
    "when = '2024-01-15 12:30:00'",
    "phone_like = 4155550132",
    "n = 12345678901",
    "    e.g., 'aix-6107-1415-32' for AIX 6.1",
    "Decimal('+35236450.6')",
    "x = 0.6356910791873801",
    "not_a_card = '4111 1111 1111 1112'",
    "x = 1234567812345678",
    "UUID('{12345678-1234-5678-1234-567812345678}')",
    "pi = 3.1415926535897932",
    "bad_iban = 'DE89370400440532013001'",
    "bad_iban = 'GB82 WEST 1234 5698 7654 33'",
    "s = x[1::2]; t = 10.5 * 3",
]


@pytest.mark.parametrize("line", KEPT)
def test_versions_private_addresses_and_code_numbers_are_kept(line):
    text = f"def f():\n    {line}\n"
    assert find_personal_data(text, PARAMS) == []
    assert anonymize(text, PARAMS) == (text, {})


def every_kind(rng: random.Random) -> tuple[str, list[tuple[str, str]]]:
    """A document holding personal data of every kind, and each value with its kind."""
    alnum = string.ascii_letters + string.digits
    card = luhn_valid(rng.choice(["4", "51", "6011"]), 16, rng)
    values = [
        (f"{rng.choice(['ana', 'li', 'omar'])}.{rng.randint(1, 99)}@example.org", "EMAIL"),
        (f"{rng.randint(11, 99)}.{rng.randint(1, 254)}.{rng.randint(1, 254)}.{rng.randint(1, 254)}", "IP_ADDRESS"),
        (rng.choice(["+44 20 7946 0958", "+49 30 901820", "+33 1 42 68 53 00", "(415) 555-0132"]), "PHONE"),
        (grouped(card, rng.choice([" ", "-", ""])), "CARD_NUMBER"),
        (grouped(iban("DE", "".join(rng.choices(string.digits, k=18))), rng.choice([" ", ""])), "IBAN"),
        ("AKIA" + "".join(rng.choices(string.ascii_uppercase + string.digits, k=16)), "SECRET"),
        ("".join(rng.choices(alnum, k=24)), "SECRET"),
    ]
    lines = [
        "def send(report):",
        f"    owner = '{values[0][0]}'",
        f"    server = connect('{values[1][0]}', port=8080)",
        f"    fax = '{values[2][0]}'  # version 2.7.2.2",
        f"    pay(card='{values[3][0]}', iban='{values[4][0]}', amount=1234567890)",
        f"    client = boto3.client('s3', aws_access_key_id='{values[5][0]}')",
        f'    password = "{values[6][0]}"',
        "    return report.total(2147483647)",
    ]
    rng.shuffle(lines)
    return "\n".join(lines) + "\n", values


@pytest.mark.parametrize("seed", range(20))
def test_spans_are_exact_sorted_and_disjoint_and_anonymize_removes_every_value(seed):
    text, values = every_kind(random.Random(seed))
    spans = find_personal_data(text, PARAMS)
    assert all(a.end <= b.start for a, b in itertools.pairwise(spans))
    assert sorted((text[s.start : s.end], s.kind) for s in spans) == sorted(values)
    output, counts = anonymize(text, PARAMS)
    assert [value for value, _ in values if value in output] == []
    assert counts == {"EMAIL": 1, "IP_ADDRESS": 1, "PHONE": 1, "CARD_NUMBER": 1, "IBAN": 1, "SECRET": 2}
    assert "2.7.2.2" in output and "1234567890" in output and "2147483647" in output


def test_each_kind_is_found_only_when_its_parameter_is_on():
    text, values = every_kind(random.Random(0))
    switches = {"EMAIL": "emails", "IP_ADDRESS": "ip_addresses", "PHONE": "phone_numbers"}
    switches |= {"CARD_NUMBER": "payment_cards", "IBAN": "ibans", "SECRET": "secrets"}
    assert set(switches) == set(REDACTION_TYPES)
    for kind, switch in switches.items():
        only = AnonymizeParams(**{name: name == switch for name in switches.values()})
        found = {(text[s.start : s.end], s.kind) for s in find_personal_data(text, only)}
        assert found == {(value, k) for value, k in values if k == kind}


def test_a_secret_wins_over_the_personal_data_it_overlaps():
    text = 'api_key = "4111111111111111"\n'
    assert find_personal_data(text, PARAMS) == [Redaction(11, 27, "SECRET")]
    assert anonymize(text, AnonymizeParams(secrets=False))[0] == 'api_key = "<CARD_NUMBER>"\n'


def test_overlapping_spans_merge_into_the_earliest_and_longest():
    merged = _merge(
        [
            Redaction(10, 20, "PHONE"),
            Redaction(5, 12, "EMAIL"),
            Redaction(5, 8, "IBAN"),
            Redaction(30, 40, "CARD_NUMBER"),
            Redaction(35, 38, "SECRET"),
            Redaction(50, 55, "PHONE"),
            Redaction(55, 60, "PHONE"),  # touches the span before, same kind: one placeholder
            Redaction(70, 75, "PHONE"),
            Redaction(75, 80, "EMAIL"),  # touches, another kind: two placeholders
        ]
    )
    assert merged == [
        Redaction(5, 20, "EMAIL"),
        Redaction(30, 40, "SECRET"),
        Redaction(50, 60, "PHONE"),
        Redaction(70, 75, "PHONE"),
        Redaction(75, 80, "EMAIL"),
    ]


def test_card_numbers_and_ibans_need_neither_presidio_nor_torch():
    """Presidio's recognizers were two checksums behind an import of spaCy, transformers and torch
    (seconds); python-stdnum checks them now, and texts without a candidate do not even load it."""
    code = (
        "import sys\n"
        "from tisslm.core.config import AnonymizeParams\n"
        "from tisslm.data.anonymize import anonymize\n"
        "print(anonymize('card 4111 1111 1111 1111, iban DE89 3704 0044 0532 0130 00', AnonymizeParams())[0])\n"
        "print(sorted(m for m in ('presidio_analyzer', 'spacy', 'torch', 'transformers', 'sklearn') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.splitlines() == ["card <CARD_NUMBER>, iban <IBAN>", "[]"], result.stderr[-2000:]


# What Presidio's CreditCardRecognizer and IbanRecognizer (2.2.366) found in these, which the
# python-stdnum checks must find alike: (text, [(start, end, kind)]).
CHECKSUM_CASES = [
    ("card 4111-1111-1111-1111.", [(5, 24, "CARD_NUMBER")]),
    ("amex 378282246310005 ok", [(5, 20, "CARD_NUMBER")]),
    ("diners 3056 9309 0259 04", []),  # 4-4-4-2: the last group is too short for the pattern
    ("1234567812345670", [(0, 16, "CARD_NUMBER")]),  # the pattern leaves out only a 1 and 12 digits more
    ("1234567812347", []),
    ("4111 1111 1111 1111 1", [(0, 19, "CARD_NUMBER")]),
    ("x41111111111111111", []),  # no word boundary before it
    ("card 4" + "\u0661" * 15, [(5, 21, "CARD_NUMBER")]),  # digits of any script after the first
    ("I want my deposit in DE89370400440532013000 2 days from today.", [(21, 43, "IBAN")]),
    ("DE89-3704-0044-0532-0130-00", [(0, 27, "IBAN")]),
    ("xDE89370400440532013000", [(1, 23, "IBAN")]),  # only a capital or a digit before it hides it
    ("ADE89370400440532013000", []),
    ("DE89370400440532013000X", []),  # and after it
    ("de89370400440532013000", []),  # the pattern wants capitals
    ("GB82WEST12345698765432 AB1", [(0, 22, "IBAN")]),
    ("XX89370400440532013000", []),  # no such country
]


@pytest.mark.parametrize(("text", "expected"), CHECKSUM_CASES)
def test_card_and_iban_checks_find_what_presidio_found(text, expected):
    params = AnonymizeParams(secrets=False, emails=False, ip_addresses=False, phone_numbers=False)
    assert [(r.start, r.end, r.kind) for r in find_personal_data(text, params)] == expected


# Dotted quads in code: a version assigned to, compared with or passed to a version-like name is
# kept (it was taken for a public address and lost from the corpus); an address in code is not.
CODE_VERSIONS = [
    'PROTOCOL = "1.1.0.0"',
    "HTTP_PROTOCOL = '1.1.0.0'",
    "protocol_version = '8.8.8.8'",
    'setup(name="x", version="2.0.0.1")',
    '[assembly: AssemblyVersion("1.2.3.4")]',
    "min_version: '1.2.3.4'",
    "if firmware == '4.4.4.4':",
    'RELEASE = ("3.1.4.1")',
]
CODE_ADDRESSES = [
    ('host = "93.184.216.34"', "93.184.216.34"),
    ('sock.connect(("8.8.4.4", 80))', "8.8.4.4"),
    ("protocol_host = '1.1.0.0'", "1.1.0.0"),  # the name ends in host: an address
    ("build_server = '9.9.9.9'", "9.9.9.9"),
    ("PROTOCOL = 'tcp'; dns = '8.8.8.8'", "8.8.8.8"),  # the version word is not the value's name
    ("upstream = {'version': 2, 'addr': '1.1.1.1'}", "1.1.1.1"),
]


@pytest.mark.parametrize("line", CODE_VERSIONS)
def test_versions_named_in_code_are_kept(line):
    text = f"def f():\n    {line}\n"
    assert find_personal_data(text, PARAMS) == []


@pytest.mark.parametrize("line, value", CODE_ADDRESSES)
def test_addresses_in_code_are_still_redacted(line, value):
    text = f"def f():\n    {line}\n"
    [span] = find_personal_data(text, PARAMS)
    assert (text[span.start : span.end], span.kind) == (value, "IP_ADDRESS")


def test_private_addresses_in_code_stay_by_design():
    """Only public addresses are personal data here (docs/safety.md); loopback and private ones in
    code (`host = "10.0.0.1"`) are kept, as they were."""
    text = 'host = "10.0.0.1"\nsock.connect(("192.168.1.5", 80))\n'
    assert find_personal_data(text, PARAMS) == []


# Secrets given without quotes (issue 24): `safety scan` and the clean stage missed them.
UNQUOTED_SECRETS = [
    ("aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"),
    ("AWS_SECRET_ACCESS_KEY=q8Hd3kLz9PqW2mXv7RtY5nB1cJ4sF6gA0eU8iO2w", "q8Hd3kLz9PqW2mXv7RtY5nB1cJ4sF6gA0eU8iO2w"),
    ("export SESSION_SECRET=c9730b2662a81f9ee872172dcce4bbf5b4d28765", "c9730b2662a81f9ee872172dcce4bbf5b4d28765"),
    ("  client_secret: 8Q~kT9pXr2LmZ4vN7bW1cY6dF3gH5jK0sA", "8Q~kT9pXr2LmZ4vN7bW1cY6dF3gH5jK0sA"),
    ("url=jdbc:mysql://db:3306/x?user=root&password=p1iDWKhohwAZYJ&useSSL=false", "p1iDWKhohwAZYJ"),
    ("mysql -u root -p'_#o*Q*w_Zirf#F4eN1NI6' orders", "_#o*Q*w_Zirf#F4eN1NI6"),
    ('BROKER = "redis://:V7pm7O4N0GxOVfzu@cache.internal:6379/0"', "V7pm7O4N0GxOVfzu"),
    (
        "machine api.example.com login dana password ceaa4d00e7b382a4d1567358f806bb23",
        "ceaa4d00e7b382a4d1567358f806bb23",
    ),
    ("OPENAI_KEY=sk-proj-Mzj83pcgPIrWZHt7OSGqx7KXM1InwJNRHaFa87", "sk-proj-Mzj83pcgPIrWZHt7OSGqx7KXM1InwJNRHaFa87"),
]
NOT_SECRETS = [
    "aws_secret_access_key = ${AWS_SECRET_ACCESS_KEY}",
    "export AWS_SECRET_ACCESS_KEY=$(vault kv get -field=secret_key aws/ci)",
    "AWS_SECRET_ACCESS_KEY=<your secret key>",
    "OPENAI_API_KEY=your-api-key-here",
    "OPENAI_API_KEY: ${{ secrets.OPENAI_API_KEY }}",
    "max_tokens = 4096; password_min_length = 12",
    "secret_key = secrets.token_urlsafe(32)",
    "password = getpass.getpass('Password: ')",
    "private_key: PKCS7PrivateKeyTypes,",
    "private_key = ed25519.Ed25519PrivateKey.generate()",
    "next_token = md5_hash",
    "startToken:Token=None",
    '"Resource": "arn:aws:secretsmanager:*:*:secret:AmazonDataZone-*"',
    "jsonnet_token = r'[^\\W\\d]\\w*'",
    "STRIPE_SECRET_KEY=\nGITHUB_TOKEN=",
]


@pytest.mark.parametrize("line, value", UNQUOTED_SECRETS)
def test_secrets_given_without_quotes_are_found(line, value):
    text = f"{line}\n"
    spans = [text[s.start : s.end] for s in find_personal_data(text, PARAMS) if s.kind == "SECRET"]
    assert len(spans) == 1 and value in spans[0]  # `user:value@host` is also an email-shaped span: merged
    assert value not in anonymize(text, PARAMS)[0]


@pytest.mark.parametrize("line", NOT_SECRETS)
def test_references_placeholders_and_names_are_not_secrets(line):
    assert [s for s in find_personal_data(f"{line}\n", PARAMS) if s.kind == "SECRET"] == []
