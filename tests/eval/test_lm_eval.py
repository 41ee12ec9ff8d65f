"""pyllm's own scores equal lm-evaluation-harness's on the same model and data (offline, local files).

lm-eval is a test-only dependency (the ``dev`` extra). The harness runs our ``PyllmLM`` adapter
(registered as "pyllm", loaded from a saved model directory) on harness YAML tasks that read local
JSONL files; pyllm runs its own task files over the same JSONL. The adapter's log-likelihoods are also
checked against a plain forward pass, so agreement is not just the same code read twice.
Few-shot is 0 here: the harness draws its examples with its own generator.
"""

import json

import pytest
import torch

from pyllm.eval import run_tasks
from pyllm.model import save_model

from .conftest import constant_model, tiny_model

MC = [{"q": "2 + 2", "opts": ["4", "five", "twenty two"], "label": 0},
      {"q": "capital of France", "opts": ["Paris", "Rome", "a very long answer here"], "label": 2},
      {"q": "colour of the sky", "opts": ["blue", "green"], "label": 1},
      {"q": "größte Stadt", "opts": ["Berlin", "München", "ëëë"], "label": 2},
      {"q": "", "opts": ["x", "yy"], "label": 0},
      {"q": "pick the long one", "opts": ["no", "the longest option"], "label": 1}]
TEXTS = [{"text": "The quick brown fox jumps over the lazy dog. " * 4},
         {"text": "def f(x):\n    return x * 2\n"}, {"text": "naïve café"}]
GEN = [{"q": "one", "a": "77"}, {"q": "two", "a": "7"}, {"q": "three", "a": "77"}]

HARNESS_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
"""


def write(tmp_path):
    for name, rows in (("mc", MC), ("text", TEXTS), ("gen", GEN)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    harness = tmp_path / "harness"
    harness.mkdir()
    head = lambda name, data: HARNESS_YAML.format(name=name, data=tmp_path / data, cache=tmp_path / "hf_cache")
    (harness / "mc.yaml").write_text(head("h_mc", "mc.jsonl") + """output_type: multiple_choice
doc_to_text: "Q: {{q}}\\nA:"
doc_to_choice: "{{opts}}"
doc_to_target: label
metric_list: [{metric: acc}, {metric: acc_norm}, {metric: acc_bytes}]
""")
    (harness / "ppl.yaml").write_text(head("h_ppl", "text.jsonl") + """output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list: [{metric: word_perplexity}, {metric: byte_perplexity}, {metric: bits_per_byte}]
""")
    (harness / "gen.yaml").write_text(head("h_gen", "gen.jsonl") + """output_type: generate_until
doc_to_text: "Q: {{q}}\\nA:"
doc_to_target: "{{a}}"
generation_kwargs: {until: ["\\n"], max_gen_toks: 2, do_sample: false}
metric_list: [{metric: exact_match}]
""")
    tasks = {
        "mc": {"name": "mc", "kind": "multiple_choice", "data": "mc.jsonl", "template": "Q: {{q}}\nA:",
               "choices": "opts", "answer": "label"},
        "ppl": {"name": "ppl", "kind": "perplexity", "data": "text.jsonl"},
        "gen": {"name": "gen", "kind": "generation", "data": "gen.jsonl", "template": "Q: {{q}}\nA:",
                "answer": "a", "stop": ["\n"], "max_new_tokens": 2, "normalize": []},
    }
    for name, cfg in tasks.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(cfg))
    return harness


def test_pyllm_scores_equal_lm_eval_harness(tmp_path, tok, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is a dev dependency: pip install -e .[dev]")
    from lm_eval.tasks import TaskManager

    from pyllm.eval.lm_eval_model import PyllmLM

    harness = write(tmp_path)
    manager = TaskManager(include_path=str(harness), include_defaults=False)  # skip indexing its ~10k tasks
    model = tiny_model(tok.vocab_size, max_seq_len=48)  # the first text needs 5 rolling windows
    save_model(model, tmp_path / "model", tokenizer=tok)

    theirs = lm_eval.simple_evaluate(model="pyllm", model_args=f"path={tmp_path / 'model'},batch_size=4",
                                     tasks=["h_mc", "h_ppl"], task_manager=manager, bootstrap_iters=0,
                                     log_samples=False)["results"]
    ours = run_tasks(model, tok, [str(tmp_path / "mc.json"), str(tmp_path / "ppl.json")], batch_size=4)
    for metric in ("acc", "acc_norm", "acc_bytes"):
        assert theirs["h_mc"][f"{metric},none"] == pytest.approx(ours["mc"][metric]), metric
    assert len({ours["mc"][m] for m in ("acc", "acc_norm", "acc_bytes")}) > 1  # the metrics do differ here
    for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert theirs["h_ppl"][f"{metric},none"] == pytest.approx(ours["ppl"][metric], rel=1e-6), metric

    sevens = constant_model(tok.vocab_size, [ord("7")])  # always answers "77" in two tokens
    theirs = lm_eval.simple_evaluate(model=PyllmLM(model=sevens, tokenizer=tok), tasks=["h_gen"],
                                     task_manager=manager, bootstrap_iters=0, log_samples=False)["results"]
    ours = run_tasks(sevens, tok, [str(tmp_path / "gen.json")])
    assert theirs["h_gen"]["exact_match,none"] == pytest.approx(ours["gen"]["exact_match"]) == pytest.approx(2 / 3)


class _Request:
    def __init__(self, *args):
        self.args = args


def test_adapter_loglikelihood_equals_plain_forward(tok):
    from pyllm.eval.lm_eval_model import PyllmLM

    model = tiny_model(tok.vocab_size, max_seq_len=32)
    lm = PyllmLM(model=model, tokenizer=tok, batch_size=2)
    reqs = [_Request("Q: a\nA:", " yes"), _Request("Q: a\nA:", " no way"), _Request("", "hello"),
            _Request("Context ends in space ", "x"), _Request("z" * 40, " truncated")]
    got = lm.loglikelihood(reqs, disable_tqdm=True)
    for req, (logprob, _) in zip(reqs, got):
        ctx, cont = req.args
        stripped = ctx.rstrip()  # lm-eval moves the context's trailing whitespace into the continuation
        ids = [tok.eos_id, *tok.encode(stripped + ctx[len(stripped):] + cont)][-33:]
        n = len(cont) + len(ctx) - len(stripped)
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids[:-1]])).double(), -1)[0]
        assert logprob == pytest.approx(sum(float(logp[i - 1, ids[i]]) for i in range(len(ids) - n, len(ids))), rel=1e-5)
    rolling = lm.loglikelihood_rolling([_Request("abc")], disable_tqdm=True)[0]
    ids = [tok.eos_id, *tok.encode("abc")]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids[:-1]])).double(), -1)[0]
    assert rolling == pytest.approx(sum(float(logp[i - 1, ids[i]]) for i in range(1, 4)), rel=1e-5)


def test_hf_export_scores_equal_under_lm_eval_hf_model(tmp_path):
    """An independent path: pyllm's Hugging Face export, run by transformers inside lm-eval's own "hf"
    model (its tokenisation split, batching and rolling windows), gives pyllm's log-likelihoods."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from pyllm.eval.lm_eval_model import PyllmLM
    from pyllm.model.hf import save_hf
    from pyllm.tokenizer import HFTokenizer

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer, raw.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    raw.train_from_iterator(["The quick brown fox jumps over the lazy dog. Paris is the capital of France."] * 3,
                            trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = HFTokenizer(raw)
    # lm-eval's hf model adds a BOS only through the tokenizer: make it eos, pyllm's document start
    # (pyllm's own encode passes add_special_tokens=False, so this changes nothing on pyllm's side)
    raw.post_processor = processors.TemplateProcessing(single="<|endoftext|> $A",
                                                       special_tokens=[("<|endoftext|>", tok.eos_id)])
    model = tiny_model(tok.vocab_size, max_seq_len=64)
    save_hf(model, tmp_path / "hf", tok)

    pairs = [("Q: capital of France\nA:", " Paris"), ("Q: capital of France\nA:", " the lazy dog"),
             ("", "quick fox"), ("The quick ", "brown")]
    reqs = [Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)]
    theirs = HFLM(pretrained=str(tmp_path / "hf"), device="cpu", batch_size=4, add_bos_token=True)
    ours = PyllmLM(model=model, tokenizer=tok)
    for (a, greedy_a), (b, greedy_b) in zip(theirs.loglikelihood(reqs, disable_tqdm=True),
                                            ours.loglikelihood(reqs, disable_tqdm=True)):
        assert a == pytest.approx(b, rel=1e-5) and greedy_a == greedy_b
    # rolling windows: lm-eval prefixes the prefix token itself, so no BOS from the tokenizer here
    doc = "The quick brown fox jumps over the lazy dog. Paris is nice, the capital of France."
    assert len(tok.encode(doc)) > 3 * 8
    text = [Instance("loglikelihood_rolling", {}, (doc,), 0)]
    theirs = HFLM(pretrained=str(tmp_path / "hf"), device="cpu", batch_size=4, add_bos_token=False, max_length=8)
    ours = PyllmLM(model=model, tokenizer=tok, max_length=8)  # several windows
    assert theirs.loglikelihood_rolling(text, disable_tqdm=True)[0] == \
        pytest.approx(ours.loglikelihood_rolling(text, disable_tqdm=True)[0], rel=1e-5)
