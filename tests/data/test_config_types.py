"""DataConfig and its sections check their field types when built from Python, as from JSON (pyllm.typecheck)."""

from pathlib import Path

import pytest

from pyllm.data import DataConfig
from pyllm.data.bpe import TokenizerConfig
from pyllm.data.classifier import ClassifierConfig
from pyllm.data.clean import CleanConfig
from pyllm.data.dedup import DedupConfig
from pyllm.data.filters import QualityConfig
from pyllm.data.pii import PIIConfig
from pyllm.data.shards import ShardConfig


@pytest.mark.parametrize("cls, kwargs, message", [
    (DataConfig, {"workers": True}, "DataConfig: workers=True must be an integer"),
    (DataConfig, {"progress": "no"}, "DataConfig: progress='no' must be a boolean"),
    (DataConfig, {"max_documents": 2.5}, "DataConfig: max_documents=2.5 must be an integer"),
    (DataConfig, {"inputs": ["a.txt", 3]}, "DataConfig: inputs=['a.txt', 3] must be a list of strings"),
    (DataConfig, {"inputs": "corpus/"}, "DataConfig: inputs='corpus/' must be a list of paths: inputs=['corpus/']"),
    (DataConfig, {"tokenizer": {"vocab_size": 300}},
     "DataConfig: tokenizer={'vocab_size': 300} must be a TokenizerConfig (DataConfig.from_dict takes sections as "
     "dicts)"),
    (TokenizerConfig, {"vocab_size": 1000.5}, "tokenizer: vocab_size=1000.5 must be an integer"),
    (ShardConfig, {"shard_tokens": True}, "shards: shard_tokens=True must be an integer"),
    (ClassifierConfig, {"threshold": "0.5"}, "classifier: threshold='0.5' must be a number"),
    (CleanConfig, {"max_blank_lines": 1.5}, "clean: max_blank_lines=1.5 must be an integer"),
    (DedupConfig, {"near": "false"}, "dedup: near='false' must be a boolean"),
    (PIIConfig, {"types": "EMAIL"}, "pii: types='EMAIL' must be a list of strings"),
    (QualityConfig, {"drop_lorem_ipsum": 1}, "quality: drop_lorem_ipsum=1 must be a boolean"),
    (QualityConfig, {"max_top_ngram_char_fraction": {2: "0.2"}},
     "quality.max_top_ngram_char_fraction[2]=0.2: n must be >= 1 and the fraction in [0, 1]"),
])
def test_wrong_type_is_a_one_line_error(cls, kwargs, message):
    with pytest.raises(ValueError) as e:
        cls(**kwargs)
    assert str(e.value) == message


def test_paths_may_be_path_objects():
    cfg = DataConfig(inputs=[Path("a"), "b"], out_dir=Path("o"), classifier=ClassifierConfig(train_file=Path("t")))
    assert (cfg.inputs, cfg.out_dir, cfg.classifier.train_file) == (["a", "b"], "o", "t")
