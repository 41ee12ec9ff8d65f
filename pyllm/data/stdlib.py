"""The built-in corpus: the text that ships with the running Python interpreter.

Every machine that runs pyllm has it, so the data pipeline (and the built-in post-training and
evaluation sets built from it) has real, messy text with nothing downloaded and nothing copied into the
repository. Everything is read at run time from the interpreter's standard-library directory:

- module sources (``*.py`` under ``sysconfig.get_paths()["stdlib"]``, excluding site-packages and, by
  default, the test suites), one document per file, code and docstrings as written;
- the pydoc documentation topics (``pydoc_data.topics.topics``): prose about the language, one
  document per topic.

Order is deterministic (sorted relative paths, then sorted topic names), so the same interpreter always
yields the same documents in the same order.
"""

from __future__ import annotations

import ast
import functools
import inspect
import io
import os
import sys
import sysconfig
import tokenize
from collections.abc import Iterator
from pathlib import Path

from .document import Document

_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}
_TEST_DIRS = {"test", "tests", "idle_test"}


def stdlib_root() -> Path:
    """The running interpreter's standard-library directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_source_files(include_tests: bool = False) -> list[Path]:
    """Relative paths of the stdlib's ``.py`` files, sorted (deterministic)."""
    root = stdlib_root()
    skip = _SKIP_DIRS if include_tests else _SKIP_DIRS | _TEST_DIRS
    found = []
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in skip]  # prune site-packages (and tests) before descending
        rel = Path(dirpath).relative_to(root)
        found.extend(rel / f for f in files if f.endswith(".py"))
    return sorted(found, key=lambda p: p.as_posix())


def _read_source(path: Path) -> str:
    # Honour PEP 263 coding cookies; a few stdlib files are not UTF-8 on every build.
    raw = path.read_bytes()
    encoding, _ = tokenize.detect_encoding(io.BytesIO(raw).readline)
    return raw.decode(encoding, errors="replace")


def _module_name(rel: Path) -> str:
    parts = list(rel.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def iter_stdlib_documents(sources: bool = True, topics: bool = True,
                          include_tests: bool = False) -> Iterator[Document]:
    """Yield the interpreter's stdlib module sources, then its pydoc topics, in a fixed order.

    ``include_tests`` adds the (large, ~20 MB on CPython 3.11) regression test suites.
    """
    if sources:
        root = stdlib_root()
        for rel in stdlib_source_files(include_tests):
            yield Document(id=f"stdlib:{rel.as_posix()}", text=_read_source(root / rel),
                           source=str(root / rel),
                           meta={"kind": "source", "module": _module_name(rel)})
    if topics:
        from pydoc_data.topics import topics as pydoc_topics

        for name in sorted(pydoc_topics):
            yield Document(id=f"pydoc-topic:{name}", text=pydoc_topics[name], source="pydoc_data.topics",
                           meta={"kind": "topic", "topic": name})


def _is_public(name: str) -> bool:
    return not name.startswith("_")


def _ast_docstrings(module: str, source: str) -> list[tuple[str, str]]:
    """(qualified name, docstring) of public module-level functions and public methods of public classes."""
    try:
        tree = ast.parse(source)
    except SyntaxError:  # e.g. lib2to3 test data written in Python 2
        return []
    out = []
    funcs = (ast.FunctionDef, ast.AsyncFunctionDef)
    for node in tree.body:
        if isinstance(node, funcs) and _is_public(node.name):
            doc = ast.get_docstring(node)
            if doc:
                out.append((f"{module}.{node.name}", doc))
        elif isinstance(node, ast.ClassDef) and _is_public(node.name):
            for item in node.body:
                if isinstance(item, funcs) and _is_public(item.name):
                    doc = ast.get_docstring(item)
                    if doc:
                        out.append((f"{module}.{node.name}.{item.name}", doc))
    return out


def _builtin_docstrings() -> list[tuple[str, str]]:
    """Docstrings of public functions of modules compiled into the interpreter (no source file).

    Only ``sys.builtin_module_names`` are imported: they are already linked in, so importing them has no
    side effects (unlike parsing-free imports of arbitrary stdlib modules such as ``antigravity``).
    """
    out = []
    for module in sorted(sys.builtin_module_names):
        if not _is_public(module):
            continue
        mod = __import__(module)
        for name in sorted(vars(mod)):
            obj = getattr(mod, name)
            if _is_public(name) and inspect.isbuiltin(obj) and obj.__doc__:
                out.append((f"{module}.{name}", inspect.cleandoc(obj.__doc__)))
    return out


@functools.lru_cache(maxsize=1)
def _all_docstrings() -> tuple[tuple[str, str], ...]:
    root = stdlib_root()
    out = _builtin_docstrings()
    for rel in stdlib_source_files(include_tests=False):
        module = _module_name(rel)
        if not all(_is_public(part) for part in module.split(".")):
            continue
        out.extend(_ast_docstrings(module, _read_source(root / rel)))
    # A property's getter and setter share a name: keep the first docstring of each qualified name.
    unique = dict(reversed(out))
    return tuple(sorted(unique.items()))


def stdlib_docstrings() -> list[tuple[str, str]]:
    """(qualified name, docstring) of the public functions and methods of the stdlib, sorted, names unique.

    Read with ``ast`` from the sources (nothing is imported, so no module's import side effects run),
    plus the builtin modules compiled into the interpreter. Deterministic for a given interpreter.
    """
    return list(_all_docstrings())
