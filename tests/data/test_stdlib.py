"""The built-in corpus: real interpreter text, deterministic, no import side effects."""


from pyllm.data import Document, iter_stdlib_documents, stdlib_docstrings
from pyllm.data.stdlib import stdlib_source_files


def test_documents_are_real_and_deterministic():
    first = [(d.id, len(d.text)) for d in iter_stdlib_documents()]
    again = [(d.id, len(d.text)) for d in iter_stdlib_documents()]
    assert first == again
    ids = [i for i, _ in first]
    assert len(ids) == len(set(ids)) > 500
    assert "stdlib:json/__init__.py" in ids and "pydoc-topic:for" in ids
    # sources come first in sorted path order, then topics in sorted name order
    sources = [i for i in ids if i.startswith("stdlib:")]
    assert sources == sorted(sources)
    assert ids.index(sources[-1]) < ids.index("pydoc-topic:for")


def test_documents_carry_text_and_kind():
    docs = {d.id: d for d in iter_stdlib_documents(sources=False)}
    assert all(isinstance(d, Document) and d.meta["kind"] == "topic" for d in docs.values())
    assert "for" in docs["pydoc-topic:for"].text


def test_tests_excluded_by_default():
    default = stdlib_source_files()
    assert not any("test" in p.parts[:-1] for p in default)
    assert len(stdlib_source_files(include_tests=True)) > len(default)


def test_docstrings_public_sorted_unique():
    pairs = stdlib_docstrings()
    names = [n for n, _ in pairs]
    assert names == sorted(names) and len(names) == len(set(names)) > 1000
    assert all(not part.startswith("_") for n in names for part in n.split("."))
    doc = dict(pairs)
    assert "JSON" in doc["json.dumps"]
    assert "builtins.len" in doc  # builtin modules compiled into the interpreter
    assert pairs == stdlib_docstrings()
