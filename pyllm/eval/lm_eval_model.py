"""An lm-evaluation-harness model class for pyllm checkpoints, registered as "pyllm".

lm-eval finds model classes through its registry, so this module must be imported before lm-eval
resolves ``--model pyllm``. From the shell, run lm-eval through this module (it registers the class,
then hands the command line to lm-eval's own CLI unchanged)::

    python -m pyllm.eval.lm_eval_model run --model pyllm --model_args path=runs/x/final \\
        --tasks hellaswag --batch_size 16

From Python: ``import pyllm.eval.lm_eval_model`` then ``lm_eval.simple_evaluate(model="pyllm", ...)``,
or pass ``PyllmLM(model=..., tokenizer=...)`` directly.

Scoring goes through the same code as pyllm's own evaluator (``Scorer``, ``encode_pair``,
``rolling_windows``, ``generate_text``), so harness tasks and pyllm tasks see identical log-likelihoods.
"""

from __future__ import annotations

import sys
import warnings
from collections import defaultdict

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from .generation import generate_text
from .loglik import Scorer, encode_pair
from .perplexity import rolling_windows

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@register_model("pyllm")
class PyllmLM(LM):
    """``path``: a pyllm model directory (save_model, with tokenizer files); or pass ``model`` and
    ``tokenizer`` objects. ``max_length`` caps the context (default: the model's); ``stride`` is the
    rolling-window stride of loglikelihood_rolling (default max_length: lm-eval's disjoint windows).
    ``max_batch_size`` is accepted because lm-eval always passes it; batches are ``batch_size``."""

    def __init__(self, path: str | None = None, model=None, tokenizer=None, device: str | None = None,
                 dtype: str = "float32", batch_size: int | str = 16, max_length: int | None = None,
                 stride: int | None = None, max_batch_size: int | None = None):
        super().__init__()
        if (path is None) == (model is None):
            raise ValueError("PyllmLM: give either path=<model dir> or model= and tokenizer=")
        if dtype not in _DTYPES:
            raise ValueError(f"PyllmLM: dtype={dtype!r}; use one of {', '.join(_DTYPES)}")
        if device and device.startswith("cuda") and not torch.cuda.is_available():
            # lm-eval's CLI passes device="cuda" unless told otherwise
            warnings.warn(f"PyllmLM: device={device!r} but CUDA is not available; running on the CPU")
            device = "cpu"
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if path is not None:
            from pyllm.model import load_model
            from pyllm.tokenizer import load_tokenizer

            model, tokenizer = load_model(path, device=device, dtype=_DTYPES[dtype]), load_tokenizer(path)
        elif tokenizer is None:
            raise ValueError("PyllmLM: model= needs tokenizer= too")
        self.model, self.tok = model.eval(), tokenizer
        # lm-eval passes batch_size as a string ("16", or "auto" which we treat as the default)
        size = int(batch_size) if str(batch_size).isdigit() else 16
        self.scorer = Scorer(self.model, batch_size=size, max_len=int(max_length) if max_length else None)
        self.stride = int(stride) if stride else None
        self._device = next(model.parameters()).device

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        # Requests with the same context (the choices of one item) are scored together, running the
        # context once.
        groups: dict[tuple, list[tuple[int, list[int]]]] = defaultdict(list)
        for i, req in enumerate(requests):
            ctx, cont = encode_pair(self.tok, *req.args)
            groups[tuple(ctx)].append((i, cont))
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        for ctx, members in tqdm(groups.items(), desc="pyllm loglikelihood", disable=disable_tqdm):
            scores = self.scorer.choices(list(ctx), [cont for _, cont in members])
            for (i, _), s in zip(members, scores):
                out[i] = (s.logprob, s.is_greedy)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for req in tqdm(requests, desc="pyllm loglikelihood_rolling", disable=disable_tqdm):
            (text,) = req.args
            windows = list(rolling_windows(self.tok.encode(text), self.tok.eos_id, self.scorer.max_len, self.stride))
            out.append(sum(s.logprob for s in self.scorer.score_windows(windows)))
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        # requests with the same generation settings run together, ``batch_size`` prompts per call
        groups: dict[tuple, list[tuple[int, str]]] = defaultdict(list)
        for i, req in enumerate(requests):
            context, kwargs = req.args
            groups[self._generation_settings(kwargs)].append((i, context))
        out: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="pyllm generate_until", disable=disable_tqdm)
        for (until, max_new, temperature, top_p), members in groups.items():
            for start in range(0, len(members), self.scorer.batch_size):
                chunk = members[start:start + self.scorer.batch_size]
                texts = generate_text(self.model, self.tok, [c for _, c in chunk], max_new_tokens=max_new,
                                      stop=list(until), temperature=temperature, top_p=top_p)
                for (i, _), text in zip(chunk, texts):
                    out[i] = text
                bar.update(len(chunk))
        bar.close()
        return out

    @staticmethod
    def _generation_settings(kwargs: dict) -> tuple:
        """(stop strings, max new tokens, temperature, top_p) from lm-eval's generation kwargs; greedy
        unless do_sample (or, without do_sample, a temperature above 0) asks for sampling."""
        kwargs = dict(kwargs)
        until = kwargs.pop("until", None) or []
        until = (until,) if isinstance(until, str) else tuple(until)
        max_new = int(kwargs.pop("max_gen_toks", 256))
        temperature = float(kwargs.pop("temperature", 0.0))
        do_sample = kwargs.pop("do_sample", None)
        sample = bool(do_sample) if do_sample is not None else temperature > 0
        top_p = float(kwargs.pop("top_p", 1.0))
        if kwargs:
            warnings.warn(f"PyllmLM.generate_until: ignoring unsupported generation arguments {sorted(kwargs)}")
        return until, max_new, (temperature or 1.0) if sample else 0.0, top_p


def main(argv: list[str] | None = None) -> int:
    """lm-eval's CLI with the "pyllm" model class registered."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = [sys.argv[0], *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
