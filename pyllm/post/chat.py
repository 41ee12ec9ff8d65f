"""Chat template: conversations -> token ids plus a mask of the tokens the model is trained to produce.

The template is Jinja (as in Hugging Face chat templates), rendered in a sandbox with ``messages`` (a
list of {"role", "content"}) and ``add_generation_prompt``. Special tokens are written as their strings
(``<|user|>``...); after rendering, every special string of the tokenizer becomes its id and the text
between them is encoded as plain text. Message contents are always plain text: a special string (or a
marker character) inside a message is escaped before rendering and encoded as the characters it is, so
data cannot open or close turns (special-token injection). The assistant's tokens are marked by a
``{% generation %}...{% endgeneration %}`` block (the same tag HF uses for assistant masks): only those
tokens get a loss. A template that renders no generation block has no assistant turn and is an error.
"""

from __future__ import annotations

import re
from pathlib import Path

from jinja2 import TemplateSyntaxError, nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

ROLES = ("system", "user", "assistant")

DEFAULT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m.role == 'assistant' %}<|assistant|>{% generation %}{{ m.content }}<|end|>{% endgeneration %}"
    "{% else %}<|{{ m.role }}|>{{ m.content }}<|end|>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
"""<|system|>...<|end|><|user|>...<|end|><|assistant|>...<|end|>; the assistant's text and its <|end|>
are trained (so the model learns to stop)."""

# Private-use code points mark the generation block in the rendered text; never produced by encode().
_GEN_START, _GEN_END = "\ue000", "\ue001"
# Escape character for message contents: _ESC + one code character stands for a special string or a
# marker character of the content (see ChatTemplate._escape).
_ESC = "\ue002"


class _GenerationTag(Extension):
    """``{% generation %}body{% endgeneration %}`` renders ``body`` between the two markers."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(lineno)

    def _mark(self, caller):
        return _GEN_START + caller() + _GEN_END


class ChatTemplate:
    """A compiled chat template bound to a tokenizer.

    ``encode(messages)`` -> (ids, train_mask): train_mask[i] is True for tokens inside a generation block.
    ``prompt_ids(messages)`` -> ids of the conversation followed by the assistant header, for generation.
    """

    def __init__(self, tokenizer, source: str = DEFAULT_TEMPLATE, origin: str = "<default template>"):
        self.tokenizer, self.source, self.origin = tokenizer, source, origin
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag])
        try:
            self.template = env.from_string(source)
        except TemplateSyntaxError as e:
            raise ValueError(f"{origin}:{e.lineno}: chat template syntax error: {e.message}") from None
        specials = sorted(tokenizer.specials, key=len, reverse=True)  # longest first for the regex
        self._split = re.compile("(" + "|".join(map(re.escape, [*specials, _GEN_START, _GEN_END])) + ")")
        # content escapes: _ESC + a private-use code character (no case, no whitespace: template filters such
        # as upper or trim leave it alone) for the escape and marker characters and each special string
        escaped = [_ESC, _GEN_START, _GEN_END, *specials]
        self._escapes = {t: _ESC + chr(0xE010 + i) for i, t in enumerate(escaped)}
        self._unescapes = {v[1]: k for k, v in self._escapes.items()}
        self._find = re.compile("|".join(map(re.escape, escaped)))
        # a template that hard-codes special strings the tokenizer lacks would silently encode them as text
        for tok in set(re.findall(r"<\|[a-z_]+\|>", source)) - set(tokenizer.specials):
            raise ValueError(f"{origin}: chat template uses {tok!r}, which is not a special token of this "
                             f"tokenizer ({sorted(tokenizer.specials)})")

    @classmethod
    def from_file(cls, tokenizer, path: str | Path) -> "ChatTemplate":
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: chat template is not UTF-8 text (byte {e.start})") from None
        return cls(tokenizer, text, origin=str(path))

    @staticmethod
    def _check(messages: list[dict]) -> None:
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise ValueError(f"message {i} must be {{'role': one of {ROLES}, 'content': str}}, got {m!r}")

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The conversation as text (for reading; encode() and prompt_ids() render with escaped contents)."""
        self._check(messages)
        return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt)

    def _escape(self, text: str) -> str:
        """``text`` with every special string and marker character replaced by its escape."""
        return self._find.sub(lambda m: self._escapes[m.group()], text)

    def _unescape(self, text: str) -> str:
        # an escape a template filter cut in two (content[:n]) stays as it is
        return re.sub(re.escape(_ESC) + "(.)", lambda m: self._unescapes.get(m.group(1), m.group(0)), text,
                      flags=re.S)

    def _render_escaped(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The rendered conversation with its message contents escaped (their specials stay text)."""
        self._check(messages)
        escaped = [{**m, "content": self._escape(m["content"])} for m in messages]
        return self.template.render(messages=escaped, add_generation_prompt=add_generation_prompt)

    def _tokenize(self, text: str) -> tuple[list[int], list[bool]]:
        ids, mask, inside = [], [], False
        for piece in self._split.split(text):
            if piece == _GEN_START:
                inside = True
            elif piece == _GEN_END:
                inside = False
            elif piece in self.tokenizer.specials:
                ids.append(self.tokenizer.specials[piece])
                mask.append(inside)
            elif piece:
                piece_ids = self.tokenizer.encode(self._unescape(piece))
                ids += piece_ids
                mask += [inside] * len(piece_ids)
        return ids, mask

    def encode(self, messages: list[dict]) -> tuple[list[int], list[bool]]:
        """Token ids of the whole conversation and the mask of assistant (trained) tokens."""
        ids, mask = self._tokenize(self._render_escaped(messages))
        if not any(mask):
            raise ValueError(f"chat template {self.origin} rendered no assistant turn "
                             "(no non-empty {% generation %} block)")
        return ids, mask

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """Ids of ``messages`` plus the generation prompt (the assistant header)."""
        return self._tokenize(self._render_escaped(messages, add_generation_prompt=True))[0]

    def encode_prompt_completion(self, prompt: str, completion: str) -> tuple[list[int], list[bool]]:
        """A single-turn example: the user's ``prompt`` and the assistant's ``completion``."""
        return self.encode([{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}])

    def end_ids(self) -> set[int]:
        """Ids that end an assistant turn (generation stops there)."""
        return {self.tokenizer.specials[t] for t in ("<|end|>", "<|endoftext|>") if t in self.tokenizer.specials}
