"""pyllm.data: curate text into token shards.

Sources -> cleaning -> quality rules -> trained classifier -> PII redaction -> exact and near-duplicate
removal -> BPE tokenizer training -> packing into token shards, with a report:
``pyllm.data.run(DataConfig()) -> DataResult`` or ``pyllm data``. The built-in default corpus is the
running interpreter's own standard library (``pyllm.data.stdlib``); ``pyllm.data.loader.ShardLoader``
feeds the shards to training.
"""

from .document import Document
from .stdlib import iter_stdlib_documents, stdlib_docstrings

__all__ = ["Document", "iter_stdlib_documents", "stdlib_docstrings", "DataConfig", "DataResult", "run",
           "ShardLoader"]

_LAZY = {"DataConfig": "pipeline", "DataResult": "pipeline", "run": "pipeline", "ShardLoader": "loader"}


def __getattr__(name):
    # the pipeline pulls in numpy, tokenizers and the stage modules: import it only when asked for
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'pyllm.data' has no attribute {name!r}")
