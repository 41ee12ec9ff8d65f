"""Tokenizers behind one small interface: encode/decode, special tokens, save/load.

- ``ByteTokenizer``: UTF-8 bytes (ids 0-255) plus special tokens; trains on any text with no preparation.
- ``CharTokenizer``: one id per character seen in a text (nanoGPT's character-level setup) plus specials.
- ``HFTokenizer``: a Hugging Face ``tokenizers`` model (tokenizer.json), e.g. the BPE the data stage trains.

Special tokens every pyllm tokenizer has (the chat template and document packing use them):
``<|endoftext|>`` (end of document, also the padding id), ``<|system|>``, ``<|user|>``,
``<|assistant|>``, ``<|end|>`` (end of a chat turn).
"""

from __future__ import annotations

import json
from pathlib import Path

SPECIAL_TOKENS = ("<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
EOS = "<|endoftext|>"
UNKNOWN = "\ufffd"  # how decode() shows an id outside the vocabulary (e.g. a model's padded vocab rows)


class Tokenizer:
    """Common interface. ``specials`` maps each special token string to its id."""

    kind: str
    specials: dict[str, int]

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    @property
    def eos_id(self) -> int:
        return self.specials[EOS]

    @property
    def pad_id(self) -> int:
        return self.specials[EOS]

    def token_id(self, special: str) -> int:
        if special not in self.specials:
            raise KeyError(f"tokenizer has no special token {special!r}; it has {sorted(self.specials)}")
        return self.specials[special]

    def encode(self, text: str) -> list[int]:
        """Ids of ``text``; special token strings inside the text are NOT interpreted (plain text)."""
        raise NotImplementedError

    def decode(self, ids) -> str:
        raise NotImplementedError

    def save(self, directory: str | Path) -> None:
        raise NotImplementedError


class ByteTokenizer(Tokenizer):
    kind = "byte"

    def __init__(self):
        self.specials = {tok: 256 + i for i, tok in enumerate(SPECIAL_TOKENS)}
        self._inverse = {i: tok for tok, i in self.specials.items()}

    @property
    def vocab_size(self) -> int:
        return 256 + len(self.specials)

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        out, buf = [], bytearray()
        for i in ids:
            i = int(i)
            if 0 <= i < 256:
                buf.append(i)
                continue
            out.append(buf.decode("utf-8", errors="replace"))
            buf = bytearray()
            out.append(self._inverse.get(i, UNKNOWN))
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    def save(self, directory) -> None:
        _write_meta(directory, {"kind": self.kind})


class CharTokenizer(Tokenizer):
    kind = "char"

    def __init__(self, chars: str):
        self.chars = "".join(sorted(set(chars)))
        self._ids = {c: i for i, c in enumerate(self.chars)}
        self.specials = {tok: len(self.chars) + i for i, tok in enumerate(SPECIAL_TOKENS)}
        self._inverse = {i: tok for tok, i in self.specials.items()}

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls(text)

    @property
    def vocab_size(self) -> int:
        return len(self.chars) + len(self.specials)

    def encode(self, text: str) -> list[int]:
        try:
            return [self._ids[c] for c in text]
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} is not in this character-level vocabulary") from None

    def decode(self, ids) -> str:
        n = len(self.chars)
        return "".join(self.chars[i] if 0 <= i < n else self._inverse.get(i, UNKNOWN) for i in map(int, ids))

    def save(self, directory) -> None:
        _write_meta(directory, {"kind": self.kind, "chars": self.chars})


class HFTokenizer(Tokenizer):
    kind = "hf"

    def __init__(self, tokenizer):
        from tokenizers import AddedToken

        self.tok = tokenizer
        missing = [t for t in SPECIAL_TOKENS if tokenizer.token_to_id(t) is None]
        if missing:
            tokenizer.add_special_tokens([AddedToken(t, special=True) for t in missing])
        self.specials = {t: tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}
        # encode() treats special-token strings in the text as plain text (not serialised with the file)
        tokenizer.encode_special_tokens = True

    @classmethod
    def from_file(cls, path: str | Path) -> "HFTokenizer":
        from tokenizers import Tokenizer as _HF

        try:
            tokenizer = _HF.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception naming no file (missing, not JSON, ...)
            raise ValueError(f"{path}: not a readable tokenizers file ({e})") from None
        return cls(tokenizer)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def _dense_size(self) -> int:
        """n when the ids in use are exactly 0..n-1 (every id below n decodes), else 0."""
        if not hasattr(self, "_dense"):
            used = set(self.tok.get_vocab(with_added_tokens=True).values())
            self._dense = len(used) if used == set(range(len(used))) else 0
        return self._dense

    def decode(self, ids) -> str:
        # tokenizers drops an unknown id without a trace (and refuses a negative one): decode the runs of known
        # ids between them so that each shows as UNKNOWN
        ids = [int(i) for i in ids]
        if not ids or (min(ids) >= 0 and max(ids) < self._dense_size()):
            return self.tok.decode(ids, skip_special_tokens=False)
        out, run = [], []
        for i in ids:
            if i >= 0 and self.tok.id_to_token(i) is not None:
                run.append(i)
                continue
            out += [self.tok.decode(run, skip_special_tokens=False), UNKNOWN]
            run = []
        out.append(self.tok.decode(run, skip_special_tokens=False))
        return "".join(out)

    def save(self, directory) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        self.tok.save(str(Path(directory) / "tokenizer.json"))
        _write_meta(directory, {"kind": self.kind, "file": "tokenizer.json"})


META_FILE = "pyllm_tokenizer.json"


def _write_meta(directory, meta: dict) -> None:
    Path(directory).mkdir(parents=True, exist_ok=True)
    (Path(directory) / META_FILE).write_text(json.dumps(meta, indent=1))


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """Load whatever tokenizer ``save`` wrote into ``directory`` (or a bare HF tokenizer.json there)."""
    directory = Path(directory)
    meta_path = directory / META_FILE
    if not meta_path.exists():
        if (directory / "tokenizer.json").exists():
            return HFTokenizer.from_file(directory / "tokenizer.json")
        raise FileNotFoundError(f"{directory}: no {META_FILE} or tokenizer.json found")
    from pyllm.data.jsonl import read_json_object

    meta = read_json_object(meta_path)
    kind = meta.get("kind")
    if kind == "byte":
        return ByteTokenizer()
    if kind == "char":
        if not isinstance(meta.get("chars"), str):
            raise ValueError(f"{meta_path}: kind 'char' needs field 'chars' (the vocabulary, a string)")
        return CharTokenizer(meta["chars"])
    if kind == "hf":
        file = meta.get("file", "tokenizer.json")
        if not isinstance(file, str):
            raise ValueError(f"{meta_path}: field 'file'={file!r} must be a file name")
        if not (directory / file).is_file():
            raise FileNotFoundError(f"{meta_path}: kind 'hf' needs {directory / file}, which does not exist")
        return HFTokenizer.from_file(directory / file)
    raise ValueError(f"{meta_path}: field 'kind'={kind!r} is not one of 'byte', 'char', 'hf'")
