"""pyllm.data: curate text into token shards.

Sources -> cleaning -> quality filters -> classifier -> exact and near-duplicate removal -> PII
redaction -> BPE tokenizer training -> packing into token shards, with a report. The built-in default
corpus is the running interpreter's own standard library (``pyllm.data.stdlib``).
"""

from .document import Document
from .stdlib import iter_stdlib_documents, stdlib_docstrings

__all__ = ["Document", "iter_stdlib_documents", "stdlib_docstrings"]
