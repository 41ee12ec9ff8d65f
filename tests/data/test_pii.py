"""PII redaction: planted PII replaced by typed placeholders; look-alikes left exactly as they were."""

import pytest

from pyllm.data.pii import PIIConfig, luhn_valid, redact

PLANTED = [  # (text, the PII in it, its type)
    ("mail jane.doe@acme-corp.com today", "jane.doe@acme-corp.com", "EMAIL"),
    ("call (415) 555-0132 now", "(415) 555-0132", "PHONE"),
    ("call 415-555-0199 now", "415-555-0199", "PHONE"),
    ("call +1 415 555 0199 now", "+1 415 555 0199", "PHONE"),
    ("ring +44 20 7946 0958 please", "+44 20 7946 0958", "PHONE"),
    ("server 81.2.69.160 is down", "81.2.69.160", "IP_ADDRESS"),
    ("resolver 2001:4860:4860::8888 answers", "2001:4860:4860::8888", "IP_ADDRESS"),
    ("visa 4111 1111 1111 1111 ok", "4111 1111 1111 1111", "CREDIT_CARD"),
    ("mc 5500-0000-0000-0004 ok", "5500-0000-0000-0004", "CREDIT_CARD"),
    ("amex 378282246310005 ok", "378282246310005", "CREDIT_CARD"),
    ("ssn 123-45-6789 on file", "123-45-6789", "US_SSN"),
    ("key AKIAIOSFODNN7EXAMPLE set", "AKIAIOSFODNN7EXAMPLE", "AWS_ACCESS_KEY"),
    ("token ghp_abcdefghijklmnopqrstuvwxyz0123456789 set", "ghp_abcdefghijklmnopqrstuvwxyz0123456789", "GITHUB_TOKEN"),
    ("hook xoxb-123456789012-abcdefghijkl set", "xoxb-123456789012-abcdefghijkl", "SLACK_TOKEN"),
]


@pytest.mark.parametrize("text,pii,kind", PLANTED, ids=[k + str(i) for i, (_, _, k) in enumerate(PLANTED)])
def test_planted_pii_is_redacted(text, pii, kind):
    out, counts = redact(text)
    # exactly the PII was replaced: a match that stopped early ('ring <PHONE> 0958 please') leaked its rest
    assert out == text.replace(pii, f"<{kind}>") and dict(counts) == {kind: 1}


def test_secret_key_and_private_key_block():
    text = ("aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY\n"
            "-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA1x\n4111 1111 1111 1111\n"
            "-----END RSA PRIVATE KEY-----\nend")
    out, counts = redact(text)
    assert out == "aws_secret_access_key = <AWS_SECRET_KEY>\n<PRIVATE_KEY>\nend"
    assert dict(counts) == {"AWS_SECRET_KEY": 1, "PRIVATE_KEY": 1}


LOOK_ALIKES = [
    "Python 3.11.7 and version 1.2.3.4, v2.0.0.1, release 10.20.30.40",
    "see section 8.2.4.44 of the spec; tuple ('7.1.0.0', 1806)",
    "dates 2024-01-31, 31/01/2024, 12.05.2024, 2024-01-31T23:59:59Z, 2001-2024",
    "x = 0x4111111111111111; y = 4111111111111112; n = 1234567890123",
    "pi = 3.14159265358979323846; eps = 1.5e-10; big = 10**18",
    "loopback 127.0.0.1, lan 192.168.0.1, doc 203.0.113.9, ::1, fe80::1",
    "std::vector<int>, a::b, dead::beef, MAC 00:1a:2b:3c:4d:5e, time 12:30:45",
    "ISBN 978-3-16-148410-0, user@example.com, @property, a@b.T, m @ n",
    "ids 000-12-3456 and 666-12-3456 and 900-12-3456 are never issued",
    "range(1000000000000000), port 8080, 12-34-5678, 1-800-FLOWERS, values 123 4567 89",
]


@pytest.mark.parametrize("text", LOOK_ALIKES)
def test_look_alikes_are_kept(text):
    out, counts = redact(text)
    assert out == text and not counts


def test_types_can_be_switched_off_and_private_ips_opted_in():
    out, counts = redact("a@b.org 127.0.0.1", PIIConfig(types=("IP_ADDRESS",), redact_non_public_ips=True))
    assert out == "a@b.org <IP_ADDRESS>" and dict(counts) == {"IP_ADDRESS": 1}
    assert redact("a@b.org", PIIConfig(enabled=False))[0] == "a@b.org"
    with pytest.raises(ValueError, match="unknown"):
        PIIConfig(types=("PASSPORT",))


def test_luhn():
    assert luhn_valid("4111111111111111") and luhn_valid("378282246310005")
    assert not luhn_valid("4111111111111112")


@pytest.mark.parametrize("text,expected", [
    # a candidate rejected by its check (here 19 digits that are no card) must not hide one starting inside it
    ("+1 (555) 123-4567 4111 1111 1111 1111", "<PHONE> <CREDIT_CARD>"),
    ("tel 555-123-4567 4111 1111 1111 1111.", "tel <PHONE> <CREDIT_CARD>."),
    # a local part cannot start with a dot, a domain cannot run into another address
    ("jane@acme.com...joe@acme.com", "<EMAIL>...<EMAIL>"),
    ("jane@acme.com.joe@acme.com", "<EMAIL>.<EMAIL>"),
])
def test_pii_next_to_other_pii_is_redacted(text, expected):
    # each of these left an address or a card number that a second pass then found
    assert redact(text)[0] == expected


def test_redaction_is_idempotent():
    # a second pass finds nothing the first left: random glued sequences of PII and look-alikes (found by a
    # fuzz: 75 of 20,000 such texts changed on a second pass before the two fixes above)
    import random

    parts = ["a", " ", "\n", ".", "-", "@", "1", "9", "é", "中", "4111 1111 1111 1111", "192.168.0.1", "81.2.69.160",
             "::1", "foo@bar.com", "+1 (555) 123-4567", "415-555-0199", "123-45-6789", "http://x.y/z?q=1", "..."]
    rng = random.Random(0)
    for _ in range(3000):
        text = "".join(rng.choice(parts) for _ in range(rng.randint(0, 40)))
        once = redact(text)[0]
        assert redact(once)[0] == once, text


@pytest.mark.parametrize("unit", ["%2Fa", "1."])
def test_email_search_is_linear_on_long_runs_of_local_part_characters(unit):
    # URL-encoded blobs and dotted numbers: the e-mail regex rescanned the run from every "%" or "." in it
    # (several seconds at this size)
    import time

    blob = "q=" + unit * 32_000
    start = time.perf_counter()
    assert redact(blob) == (blob, {})
    assert redact(blob + "@example.com")[0] == blob + "@example.com"  # a kept domain is not retried per start
    assert redact(blob + "@acme-corp.com")[0].endswith("<EMAIL>")
    assert time.perf_counter() - start < 2  # milliseconds now


@pytest.mark.parametrize("text", [
    "pip install numpy==1.26.4.1 'scipy>=1.11.3.2'; tar xf numpy-1.26.4.1.tar.gz",
    "build 20.10.30.40 released; Version=12.0.0.0, Culture=neutral; rev 12.1.4.2; § 8.2.4.44",
    "git clone git@github.com:user/repo.git && git remote add up ssh://git@gitlab.com/group/repo.git",
])
def test_versions_and_ssh_remotes_in_code_are_kept(text):
    out, counts = redact(text)
    assert out == text and not counts


@pytest.mark.parametrize("text,expected", [
    ("connect to 192.168.1.20 now", "connect to <IP_ADDRESS> now"),
    ("server 10.0.0.5:8080 is up", "server <IP_ADDRESS>:8080 is up"),
    # after a plain word a dotted quad stays an address, even one that could be a version ("numpy 1.26.4.1")
    ("connect to 3.15.20.7 now", "connect to <IP_ADDRESS> now"),
    ("AWS 3.15.20.7 and web1 3.15.20.8:443", "AWS <IP_ADDRESS> and web1 <IP_ADDRESS>:443"),
    ("ssh root@81.2.69.160 or admin@3.15.20.7", "ssh root@<IP_ADDRESS> or admin@<IP_ADDRESS>"),
    # "git@" is only an SSH remote when a path follows the host
    ("write to git@acme-corp.com: thanks", "write to <EMAIL>: thanks"),
])
def test_addresses_next_to_version_look_alikes_are_redacted(text, expected):
    assert redact(text, PIIConfig(redact_non_public_ips=True))[0] == expected
