"""PII and secret redaction: matches are replaced by typed placeholders such as ``<EMAIL>``.

Precision matters as much as recall: a redaction in the wrong place damages text (and code) for no
benefit. Each detector is therefore a candidate regex anchored at token boundaries followed by a
validity check:

- credit cards: 13-19 digits in one of the usual groupings, a known issuer prefix and the Luhn checksum;
- IP addresses: parsed by ``ipaddress``; by default only globally routable addresses are redacted
  (``127.0.0.1``, ``192.168.x.x`` and documentation ranges in examples are not personal). A dotted quad
  is read as a version or section number, not an address, when it is made of four single digits, or
  follows a keyword ("version", "v", "release", "build", "rev", "section"..., also with "=" or ":") or a
  package name with a specifier or a hyphen ("numpy==1.26.4.1", "numpy-1.26.4.1.tar.gz"). After a plain
  word and a space ("numpy 1.26.4.1", "AWS 3.15.20.7") it stays an address: recall comes first;
- US social security numbers: ``ddd-dd-dddd`` outside the ranges the SSA never issues (000, 666, 9xx,
  group 00, serial 0000);
- phone numbers: North-American ``(ddd) ddd-dddd`` / ``ddd-ddd-dddd`` forms or ``+`` international
  numbers with 8-15 digits, never inside a longer run of digits or dots (versions, dates, decimals);
- e-mail addresses (documentation domains such as example.com are kept, and so is the "git@host" of an
  SSH remote such as ``git@github.com:user/repo.git``, a service account, not a person);
- secrets: AWS access key ids and secret keys, GitHub and Slack tokens, PEM private-key blocks.

Dates (2024-01-31, 31/01/2024), versions (3.11.7, v1.2.3.4), times, hex constants and plain integers
do not match any detector.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from dataclasses import dataclass, field

from pyllm.typecheck import check_fields

PII_TYPES = ("PRIVATE_KEY", "AWS_ACCESS_KEY", "AWS_SECRET_KEY", "GITHUB_TOKEN", "SLACK_TOKEN", "EMAIL",
             "CREDIT_CARD", "US_SSN", "PHONE", "IP_ADDRESS")

_PRIVATE_KEY = re.compile(
    r"-----BEGIN ((?:RSA |EC |DSA |OPENSSH |ENCRYPTED |PGP )?PRIVATE KEY(?: BLOCK)?)-----"
    r".*?-----END \1-----", re.DOTALL)
_AWS_ACCESS_KEY = re.compile(r"\b(?:AKIA|ASIA|AIDA|AROA|AGPA|ANPA)[0-9A-Z]{16}\b")
# 40 base64 characters only count as a secret next to a name that says so
_AWS_SECRET_KEY = re.compile(
    r"(?i)(aws_?secret_?(?:access_?)?key\W{0,4}?[\s=:]\s*['\"]?)([A-Za-z0-9/+]{40})(?![A-Za-z0-9/+])")
_GITHUB_TOKEN = re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{36}|github_pat_[A-Za-z0-9_]{82})\b")
_SLACK_TOKEN = re.compile(r"\bxox[abposr]-[A-Za-z0-9-]{10,}\b")
# the local part cannot start with a dot (so "...name@host" redacts name@host), and the domain cannot run
# into another "@" (so "a@b.com.c@d.com" is two addresses, not "a@b.com.c" and a leftover "@d.com"). It is at
# most 64 characters (RFC 5321, 4.5.3.1.1): unbounded, a long run of these characters with no "@" ("%2Fa%2Fa...",
# "1.2.3...") was rescanned to its end from every "%" or "." in it, quadratic time.
_EMAIL = re.compile(r"(?<![\w+-])[A-Za-z0-9_%+-][A-Za-z0-9._%+-]{0,63}@((?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,24})"
                    r"(?![\w(@-])")
_CARD = re.compile(r"(?<![\w.,-])\d(?:[ -]?\d){12,18}(?![\w-]|[.,]\d)")
_SSN = re.compile(r"(?<![\w.-])(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}(?![\w-]|\.\d)")
_PHONE_NA = re.compile(r"(?<![\w.+/-])(?:\+?1[ .-]?)?(?:\(\d{3}\) ?|\d{3}[ .-])\d{3}[ .-]\d{4}(?![\w/-]|\.\d)")
_PHONE_INTL = re.compile(r"(?<![\w+])\+[1-9]\d{0,2}(?:[ -]\(?\d{1,4}\)?){2,5}(?![\w-]|\.\d)")
_IPV4 = re.compile(r"(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
                   r"(?![\w]|\.\d)")
_IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{1,4}|(?:\d{1,3}\.){3}\d{1,3})?"
                   r"(?![\w:]|\.\d)")
# what makes a dotted quad right after it a version: a keyword, or a package name joined to it by a version
# specifier or a hyphen (an sdist or wheel file name)
_VERSION_BEFORE = re.compile(
    r"(?i)(?:\b(?:versions?|releases?|ver\.?|builds?|rev(?:ision)?|patch|python|v|sections?|chapter)|§)"
    r"\s*[=:]?\s*[\"'(]?$|[A-Za-z][\w.-]*(?:[=!<>~]=|-)$")
# "git@github.com:user/repo.git", "ssh://git@host/path": the service account of an SSH remote
_SSH_PATH_AFTER = re.compile(r"[:/][\w~.-]")
_CARD_GROUPING = re.compile(r"\d{4}([ -])\d{4}\1\d{4}\1\d{1,7}|\d{4}([ -])\d{6}\2\d{4,5}|\d{13,19}")
# issuer prefixes: Visa, Mastercard, Amex, Discover, Diners, JCB, UnionPay/Maestro
_CARD_PREFIX = re.compile(r"4|5[1-5]|2[2-7]|3[47]|6(?:011|5|4[4-9]|2)|3(?:0[0-5]|[689])|35")


@dataclass
class PIIConfig:
    enabled: bool = True
    """Redact at all."""
    types: tuple[str, ...] = PII_TYPES
    """Which detectors run (any of pyllm.data.pii.PII_TYPES)."""
    redact_non_public_ips: bool = False
    """Also redact loopback, private, link-local and documentation addresses (usually not personal)."""
    keep_email_domains: tuple[str, ...] = ("example.com", "example.org", "example.net", "localhost")
    """Placeholder domains whose addresses are kept."""

    def __post_init__(self):
        check_fields(self, label="pii")
        unknown = set(self.types) - set(PII_TYPES)
        if unknown:
            raise ValueError(f"pii.types has unknown {sorted(unknown)}; choose from {PII_TYPES}")
        self.types = tuple(self.types)
        self.keep_email_domains = tuple(d.lower() for d in self.keep_email_domains)


def luhn_valid(digits: str) -> bool:
    """The Luhn (mod 10) checksum of a digit string."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _is_card(candidate: str) -> bool:
    digits = candidate.replace(" ", "").replace("-", "")
    return (13 <= len(digits) <= 19 and _CARD_GROUPING.fullmatch(candidate) is not None
            and _CARD_PREFIX.match(digits) is not None and luhn_valid(digits))


def _ipv6_plausible(candidate: str) -> bool:
    # "a::b" or "dead::beef" parse as IPv6 but in text they are C++ scopes or words
    groups = [g for g in candidate.split(":") if g]
    return len(groups) >= 3 and any(c.isdigit() for c in candidate)


def _ipv4_plausible(m: re.Match) -> bool:
    # "version 1.2.3.4", "section 8.2.4.44", "numpy==1.26.4.1" and four single-digit parts ("1.5.2.1",
    # "7.1.0.0") are versions or section numbers far more often than addresses
    if _VERSION_BEFORE.search(m.string, max(0, m.start() - 40), m.start()):
        return False
    return not all(len(part) == 1 for part in m.group(0).split("."))


def _email_redactable(m: re.Match, cfg: PIIConfig) -> bool:
    ssh_remote = m.group(0).startswith("git@") and _SSH_PATH_AFTER.match(m.string, m.end()) is not None
    return m.group(1).lower() not in cfg.keep_email_domains and not ssh_remote


def _ip_redactable(candidate: str, cfg: PIIConfig) -> bool:
    try:
        ip = ipaddress.ip_address(candidate)
    except ValueError:
        return False
    return cfg.redact_non_public_ips or ip.is_global


@dataclass
class PIIRedactor:
    """Applies the configured detectors in a fixed order; ``counts`` accumulates matches per type."""

    cfg: PIIConfig
    counts: Counter = field(default_factory=Counter)

    def _sub(self, pattern: re.Pattern, kind: str, text: str, accept=None, group: int = 0) -> str:
        if kind not in self.cfg.types:
            return text

        def placeholder(m: re.Match) -> str:
            self.counts[kind] += 1
            if group:  # redact only the secret, keep the name in front of it
                return m.group(0)[: m.start(group) - m.start(0)] + f"<{kind}>"
            return f"<{kind}>"

        # A rejected candidate must not hide a later one that starts inside it (re.sub would resume after its
        # end): "(555) 123-4567 4111 1111 1111 1111" first offers "123-4567 4111 1111 1111" to the card check,
        # and the card starts at its 8th digit. So after a rejection the search resumes one character on.
        out, pos, done = [], 0, 0
        while (m := pattern.search(text, pos)) is not None:
            if accept is None or accept(m):
                out += [text[done:m.start()], placeholder(m)]
                done = m.end()
                pos = done if m.end() > m.start() else done + 1  # (an empty match must not stall the search)
            else:
                pos = m.start() + 1
        return "".join(out) + text[done:]

    def redact(self, text: str) -> str:
        if not self.cfg.enabled:
            return text
        cfg = self.cfg
        # secrets first: their bodies contain runs that other detectors could half-match
        text = self._sub(_PRIVATE_KEY, "PRIVATE_KEY", text)
        text = self._sub(_AWS_ACCESS_KEY, "AWS_ACCESS_KEY", text)
        text = self._sub(_AWS_SECRET_KEY, "AWS_SECRET_KEY", text, group=2)
        text = self._sub(_GITHUB_TOKEN, "GITHUB_TOKEN", text)
        text = self._sub(_SLACK_TOKEN, "SLACK_TOKEN", text)
        text = self._sub(_EMAIL, "EMAIL", text, accept=lambda m: _email_redactable(m, cfg))
        text = self._sub(_CARD, "CREDIT_CARD", text, accept=lambda m: _is_card(m.group(0)))
        text = self._sub(_SSN, "US_SSN", text)
        text = self._sub(_PHONE_NA, "PHONE", text)
        text = self._sub(_PHONE_INTL, "PHONE", text,
                         accept=lambda m: 8 <= sum(c.isdigit() for c in m.group(0)) <= 15)
        text = self._sub(_IPV4, "IP_ADDRESS", text,
                         accept=lambda m: _ipv4_plausible(m) and _ip_redactable(m.group(0), cfg))
        text = self._sub(_IPV6, "IP_ADDRESS", text,
                         accept=lambda m: _ipv6_plausible(m.group(0)) and _ip_redactable(m.group(0), cfg))
        return text


def redact(text: str, cfg: PIIConfig | None = None) -> tuple[str, Counter]:
    """Redacted text and the number of matches per type."""
    redactor = PIIRedactor(cfg or PIIConfig())
    return redactor.redact(text), redactor.counts
