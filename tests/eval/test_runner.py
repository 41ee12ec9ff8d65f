import importlib
import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pyllm.eval import Scorer, make_eval_fn, perplexity, run_tasks
from pyllm.eval.cli import main as eval_main
from pyllm.model import save_model
from pyllm.tokenizer import ByteTokenizer

from .conftest import tiny_model

perplexity_module = importlib.import_module("pyllm.eval.perplexity")  # the name perplexity is the function

ITEMS = [{"q": f"item {i}", "opts": ["yes", "no", "maybe " * (1 + i % 3)], "label": i % 3} for i in range(7)]
TEXTS = ["first held-out text " * 5, "second one", "third, the last\n" * 3]


def write_task(tmp_path):
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(i) + "\n" for i in ITEMS))
    (tmp_path / "t.yaml").write_text('name: quiz\nkind: multiple_choice\ndata: d.jsonl\ntemplate: "{{q}}?"\n'
                                     'choices: opts\nanswer: label\n')
    return str(tmp_path / "t.yaml")


class Wrapper(torch.nn.Module):
    """Like post-training's model-with-heads or DDP: holds the Transformer as an attribute."""

    def __init__(self, model):
        super().__init__()
        self.module = model


def test_make_eval_fn_for_the_trainer(tmp_path, tok):
    model = tiny_model(tok.vocab_size).train()
    eval_fn = make_eval_fn(tok, texts=TEXTS, tasks=[write_task(tmp_path)])
    out = eval_fn(Wrapper(model))
    assert model.training  # mode restored
    ppl = perplexity(model, tok, TEXTS)
    assert out["val/bits_per_byte"] == pytest.approx(ppl["bits_per_byte"])
    assert set(out) == {"val/bits_per_byte", "val/token_perplexity", "val/nll_per_token",
                        "quiz/acc", "quiz/acc_norm", "quiz/acc_bytes"}
    assert all(isinstance(v, float) for v in out.values())
    with pytest.raises(ValueError, match="give held-out texts, tasks, or both"):
        make_eval_fn(tok)


def test_cli_writes_json_and_markdown(tmp_path, tok, capsys):
    model = tiny_model(tok.vocab_size)
    save_model(model, tmp_path / "m", tokenizer=tok)
    (tmp_path / "held.txt").write_text(TEXTS[0])
    task = write_task(tmp_path)
    rc = eval_main(["--model", str(tmp_path / "m"), "--tasks", task, "--text", str(tmp_path / "held.txt"),
                    "--out", str(tmp_path / "r.json")])
    assert rc == 0
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["results"]["quiz"] == run_tasks(model, tok, [task])["quiz"]
    held = perplexity(model, tok, [TEXTS[0]])
    assert res["results"]["text:held.txt"]["bits_per_byte"] == pytest.approx(held["bits_per_byte"])
    md = (tmp_path / "r.md").read_text()
    assert "| quiz | acc_norm |" in md and "| text:held.txt | bits_per_byte |" in md
    assert "| quiz | acc |" in capsys.readouterr().out
    # bad input: one line naming the problem, exit code 2
    rc = eval_main(["--model", str(tmp_path / "m"), "--tasks", "nonsense", "--out", str(tmp_path / "x.json")])
    assert rc == 2 and "task 'nonsense' is neither a built-in task" in capsys.readouterr().err
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    for text, message in (("latin1.txt", "data file '{}' is not UTF-8 text (byte 3)"),
                          ("missing.txt", "data path '{}' does not exist")):
        rc = eval_main(["--model", str(tmp_path / "m"), "--text", str(tmp_path / text),
                        "--out", str(tmp_path / "x.json")])
        assert rc == 2 and capsys.readouterr().err == f"pyllm eval: {message.format(tmp_path / text)}\n"


def test_cli_bad_device_data_folder_and_report_path_are_one_line(tmp_path, tok, capsys):
    save_model(tiny_model(tok.vocab_size), tmp_path / "m", tokenizer=tok)
    (tmp_path / "held.txt").write_text(TEXTS[0])
    base = ["--model", str(tmp_path / "m"), "--text", str(tmp_path / "held.txt")]
    assert eval_main([*base, "--device", "bogus", "--out", str(tmp_path / "x.json")]) == 2
    assert capsys.readouterr().err == "pyllm eval: --device 'bogus': use 'auto', 'cpu', 'cuda' or 'cuda:N'\n"
    # "auto" (the default) is this machine's device, as in pyllm train
    assert eval_main([*base, "--device", "auto", "--out", str(tmp_path / "a.json")]) == 0
    capsys.readouterr()
    assert json.loads((tmp_path / "a.json").read_text())["meta"]["device"] == ("cuda" if torch.cuda.is_available()
                                                                              else "cpu")
    # the report path is a folder: the results are printed before the one-line error, not lost in a traceback
    (tmp_path / "r.json").mkdir()
    assert eval_main([*base, "--out", str(tmp_path / "r.json")]) == 2
    out, err = capsys.readouterr()
    assert "bits_per_byte" in out and err.startswith("pyllm eval: cannot write the report: ") and err.count("\n") == 1
    # a task whose data is a folder
    (tmp_path / "t.yaml").write_text('name: quiz\nkind: multiple_choice\ndata: .\ntemplate: "Q"\n'
                                     'choices: c\nanswer: a\n')
    assert eval_main(["--model", str(tmp_path / "m"), "--tasks", str(tmp_path / "t.yaml"),
                      "--out", str(tmp_path / "y.json")]) == 2
    assert "data is not a file" in capsys.readouterr().err


def _spy_on_scoring(tok) -> dict[str, list]:
    """Record, in this process, the quiz items (their questions) and the held-out texts the model scores."""
    scored = {"items": [], "texts": []}
    choices, rolling_windows = Scorer.choices, perplexity_module.rolling_windows

    def spy_choices(scorer, ctx, conts):
        scored["items"].append(tok.decode(ctx[1:]))  # ctx[0] is the eos prefix
        return choices(scorer, ctx, conts)

    def spy_rolling_windows(tokens, *args, **kwargs):
        scored["texts"].append(tok.decode(tokens))
        return rolling_windows(tokens, *args, **kwargs)

    Scorer.choices = spy_choices
    perplexity_module.rolling_windows = spy_rolling_windows
    return scored


def _worker(rank, world_size, store, task, out_dir):
    torch.set_num_threads(1)  # two processes on a small CPU
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(0)
        tok = ByteTokenizer()
        model = tiny_model(tok.vocab_size)
        scored = _spy_on_scoring(tok)  # a spawned process: the patch dies with it
        res = run_tasks(model, tok, [task], distributed=True)
        res["ppl"] = make_eval_fn(tok, texts=TEXTS)(model)
        res["scored"] = scored
        (out_dir / f"rank{rank}.json").write_text(json.dumps(res))
    finally:
        dist.destroy_process_group()


def test_data_parallel_evaluation_equals_single_process(tmp_path, tok):
    task = write_task(tmp_path)
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), task, tmp_path), nprocs=2, join=True)
    torch.manual_seed(0)
    model = tiny_model(tok.vocab_size)
    single = run_tasks(model, tok, [task])
    single["ppl"] = make_eval_fn(tok, texts=TEXTS)(model)
    got = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for res in got:
        assert res["quiz"]["n"] == 7  # 4 items on rank 0, 3 on rank 1, summed
        assert res["quiz"] == pytest.approx(single["quiz"])
        assert res["ppl"] == pytest.approx(single["ppl"], rel=1e-6)
    # each rank scored its own share, not everything: 4 and 3 of the 7 items, 2 and 1 of the 3 texts
    items = [res["scored"]["items"] for res in got]
    assert [len(i) for i in items] == [4, 3] and sorted(items[0] + items[1]) == sorted(f"{i['q']}?" for i in ITEMS)
    texts = [res["scored"]["texts"] for res in got]
    assert [len(t) for t in texts] == [2, 1] and sorted(texts[0] + texts[1]) == sorted(TEXTS)


def test_trainer_calls_eval_fn_at_its_interval(tmp_path, tok):
    import numpy as np

    from pyllm.train import TrainConfig, Trainer
    from pyllm.train.data import RandomWindows

    tokens = np.array(tok.encode("a small training text. " * 40), dtype=np.int64)
    model = tiny_model(tok.vocab_size)
    calls = []
    eval_fn = make_eval_fn(tok, texts=TEXTS[:1], tasks=[write_task(tmp_path)])

    def counted(m):
        calls.append(m.training)
        return eval_fn(m)

    cfg = TrainConfig(max_steps=2, eval_every=1, out_dir=str(tmp_path / "run"), batch_size=2, seq_len=16,
                      device="cpu")
    summary = Trainer(model, cfg, RandomWindows(tokens, 16, 2, seed=0), eval_fn=counted).fit()
    assert len(calls) == 2 and not any(calls)  # every step, in eval mode
    assert summary["eval"]["val/bits_per_byte"] == pytest.approx(perplexity(model, tok, TEXTS[:1])["bits_per_byte"])
    assert {"quiz/acc", "quiz/acc_norm"} <= set(summary["eval"])
