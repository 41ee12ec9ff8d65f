"""Chat template masking, packing without cross-contamination, and bad-input reporting."""

import pytest
import torch

from pyllm.model import Transformer, preset
from pyllm.post.chat import ChatTemplate
from pyllm.post.datasets import DataError, Example, load_examples, load_pairs
from pyllm.post.packing import IGNORE, encode_examples, example_tensors, pack
from pyllm.tokenizer import ByteTokenizer

TOK = ByteTokenizer()


def test_completion_only_mask():
    tpl = ChatTemplate(TOK)
    ids, train = tpl.encode([{"role": "system", "content": "S"}, {"role": "user", "content": "hi"},
                             {"role": "assistant", "content": "yo"}])
    sp = TOK.specials
    assert ids == [sp["<|system|>"], ord("S"), sp["<|end|>"], sp["<|user|>"], ord("h"), ord("i"), sp["<|end|>"],
                   sp["<|assistant|>"], ord("y"), ord("o"), sp["<|end|>"]]
    # only the assistant's text and its end-of-turn token are trained
    assert train == [False] * 8 + [True] * 3
    assert tpl.prompt_ids([{"role": "user", "content": "hi"}]) == ids[3:8]
    t = example_tensors(encode_examples(tpl, [Example("hi", "yo")], 64)[0])
    assert t["targets"][0].tolist() == [IGNORE, IGNORE, IGNORE, IGNORE, ord("y"), ord("o"), sp["<|end|>"], IGNORE]


def test_multi_turn_masks_every_assistant_turn():
    tpl = ChatTemplate(TOK)
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    ids, train = tpl.encode(msgs)
    assert [TOK.decode([i]) for i, t in zip(ids, train) if t] == ["b", "<|end|>", "d", "<|end|>"]


def test_user_template_and_template_errors(tmp_path):
    custom = "{% for m in messages %}{{ m.role }}: {% if m.role == 'assistant' %}{% generation %}{{ m.content }}<|endoftext|>{% endgeneration %}{% else %}{{ m.content }}\n{% endif %}{% endfor %}"
    ids, train = ChatTemplate(TOK, custom).encode_prompt_completion("q", "ans")
    assert TOK.decode(ids) == "user: q\nassistant: ans<|endoftext|>"
    assert TOK.decode([i for i, t in zip(ids, train) if t]) == "ans<|endoftext|>"
    no_assistant = tmp_path / "bad.jinja"
    no_assistant.write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    data = tmp_path / "sft.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    with pytest.raises(DataError, match=r"sft.jsonl:1: chat template .*bad.jinja rendered no assistant turn"):
        encode_examples(ChatTemplate.from_file(TOK, no_assistant), load_examples(data), 64)
    broken = tmp_path / "broken.jinja"
    broken.write_text("line one\n{% for m in messages %}")
    with pytest.raises(ValueError, match=r"broken.jinja:2: chat template syntax error"):
        ChatTemplate.from_file(TOK, broken)


def test_bad_jsonl_rows_name_file_and_line(tmp_path):
    p = tmp_path / "prefs.jsonl"
    p.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n\n{"prompt": "p", "chosen": "a"\n')
    with pytest.raises(DataError, match=r"prefs.jsonl:3: not valid JSON"):
        load_pairs(p)
    p.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "p", "chosen": "a", "rejected": "a"}\n')
    with pytest.raises(DataError, match=r"prefs.jsonl:2: 'chosen' and 'rejected' are identical"):
        load_pairs(p)
    p.write_text('{"prompt": "p", "chosen": "a", "rejected": 3}\n')
    with pytest.raises(DataError, match=r"prefs.jsonl:1: field 'rejected' must be a non-empty string"):
        load_pairs(p)
    p.write_text('{"prompt": "short", "completion": "ok"}\n{"prompt": "' + "x" * 100 + '", "completion": "ok"}\n')
    with pytest.raises(DataError, match=r"prefs.jsonl:2: example is \d+ tokens, longer than the context \(64\)"):
        encode_examples(ChatTemplate(TOK), load_examples(p), 64)


@pytest.mark.parametrize("name", ["tiny", "tiny_llama"])
def test_packed_logits_equal_unpacked(name):
    model = Transformer(preset(name, n_layer=2, d_model=32, n_head=2, vocab_size=TOK.vocab_size,
                               **({"n_kv_head": 1} if name == "tiny_llama" else {}))).eval()
    tpl = ChatTemplate(TOK)
    exs = encode_examples(tpl, [Example("3+4=", "7"), Example("reverse abc", "cba"), Example("sort 312", "123")], 64)
    rows = pack(exs, seq_len=48, pad_id=TOK.pad_id)
    assert rows["input_ids"].shape == (1, 48)  # all three fit in one row
    with torch.no_grad():
        packed = model(rows["input_ids"], positions=rows["positions"], doc_ids=rows["doc_ids"])
        start = 0
        for ex in exs:
            t = example_tensors(ex)
            alone = model(t["input_ids"], positions=t["positions"])
            n = len(ex.ids)
            torch.testing.assert_close(packed[0, start:start + n], alone[0], rtol=1e-5, atol=1e-5)
            assert rows["targets"][0, start:start + n].tolist() == t["targets"][0].tolist()
            start += n
        # without doc_ids the later examples would see the earlier ones: the test can fail
        mixed = model(rows["input_ids"], positions=rows["positions"])
        assert not torch.allclose(mixed[0, len(exs[0].ids):start], packed[0, len(exs[0].ids):start], atol=1e-3)
