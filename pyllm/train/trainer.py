"""The training loop every stage uses: pretraining here, SFT/reward/DPO/PPO/GRPO through their own
``loss_fn`` and batch source.

One optimiser step = ``grad_accum`` micro-steps (forward + backward under autocast, gradient sync only
on the last), then: unscale + overflow check (fp16), global-norm clipping, the fused AdamW step
(skipped on the device when the gradients overflowed), the loss-scale update. The host reads values
back only when it logs, evaluates or checkpoints.
"""

from __future__ import annotations

import json
import math
import random
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from pyllm.data.jsonl import strict_json
from pyllm.model import ModelConfig
from pyllm.model.flops import flops_per_token

from . import checkpoint, data, distributed, host_memory
from .checkpoint import CheckpointError, CheckpointManager
from .config import LOW_DTYPES, ConfigError, TrainConfig
from .metrics import EnergyMeter, MetricsLog, device_peak_flops, peak_memory_gb, warn_if_emulated
from .optimizer import AdamW
from .scaler import LossScaler
from .schedule import lr_at


def precision_autocast(precision: str, device: torch.device):
    """The autocast context of a run's precision ("fp32": none) on ``device``: the Trainer's forward passes,
    evaluations and batch sources run in it, and so should anything compared with them."""
    low = LOW_DTYPES.get(precision)
    return torch.autocast(device.type, dtype=low or torch.float32, enabled=low is not None)


LossFn = Callable[[nn.Module, dict], tuple[torch.Tensor, dict]]


def lm_loss(model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
    """The default loss: mean next-token cross-entropy of a pyllm Transformer."""
    return model.loss(batch["input_ids"], batch["targets"], doc_ids=batch.get("doc_ids")), {}


def resolve_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


class Trainer:
    """Train ``model`` on ``batches`` (next_batch() -> dict of tensors; state_dict/load_state_dict, whose
    tensors the checkpoint keeps in state.safetensors and hands back as tensors). A source whose
    ``layout_free`` is True keeps the same state on every rank and loads it for any micro-batch size and
    number of processes (RandomWindows, ShardLoader): a run may resume on another number of processes.

    A batch may carry ``loss_weight``, the number of items its loss is a mean over (SFT's trained tokens):
    the step's loss is then the mean over all items of all its micro-batches and ranks, not the mean of
    the micro-batches' means (which depends on how the batch is split when the counts differ).

    ``loss_fn(model, batch) -> (loss, metrics)`` defaults to the language-model loss; ``eval_fn(model)
    -> dict`` runs every ``cfg.eval_every`` steps and at the end (in eval mode, without gradients).

    ``run`` names what defines the run (a post-training stage: its name, start model and data; default:
    ``cfg.data`` as an absolute path, and ``cfg.tokenizer``). It is saved in every checkpoint, and a checkpoint
    of another run (one of these differs) is refused on resume: its tensors may well fit this model.
    """

    def __init__(self, model: nn.Module, cfg: TrainConfig, batches, loss_fn: LossFn | None = None,
                 eval_fn: Callable[[nn.Module], dict] | None = None, run: dict | None = None,
                 settings: dict | None = None):
        self.cfg, self.batches, self.eval_fn = cfg, batches, eval_fn
        # the config a checkpoint records and a resume compares: the TrainConfig, plus the calling stage's own
        # settings (a post-training stage's beta, kl_coef, epochs...) under "stage"
        self.config_record = {**cfg.to_dict(), **({"stage": settings} if settings else {})}
        self.own_run = run is None  # the default identity, whose data is a path
        self.run = run if run is not None else {"data": data.data_identity(cfg.data), "tokenizer": cfg.tokenizer}
        self.dist = distributed.setup_for(cfg.device)
        self.device = resolve_device(cfg.device, self.dist.local_rank)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        elif self.device.type == "cpu" and cfg.keep_host_memory:
            host_memory.keep_freed_memory()
        self.mode = distributed.resolve_mode(cfg.distributed, self.dist.world_size)
        self.grad_accum = cfg.grad_accum_steps(self.dist.world_size)
        self.low_dtype = LOW_DTYPES.get(cfg.precision)
        if self.dist.is_main:
            warn_if_emulated(cfg.precision, self.device)

        self.model = model.to(self.device)
        if cfg.master_weights:
            self.model.to(self.low_dtype)
        self.model.train()
        self.loss_module = distributed.LossModule(self.model, loss_fn or lm_loss)
        self.wrapped = distributed.wrap(self.loss_module, self.mode, self.device)
        self.forward = torch.compile(self.wrapped) if cfg.compile else self.wrapped
        self.optimizer = AdamW(self.model, weight_decay=cfg.weight_decay, beta1=cfg.beta1, beta2=cfg.beta2,
                               eps=cfg.eps, master_weights=cfg.master_weights)
        self.scaler = (LossScaler(cfg.init_scale, cfg.growth_factor, cfg.backoff_factor, cfg.growth_interval,
                                  self.device) if cfg.precision == "fp16" else None)
        self.out_dir = Path(cfg.out_dir)
        if self.dist.is_main:
            try:
                self.out_dir.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise ConfigError(f"TrainConfig: out_dir={cfg.out_dir!r} cannot be created ({e.strerror})") from None
        self.ckpt = CheckpointManager(self.out_dir / "checkpoints", cfg.keep_last)
        self.step = 0
        self.best = math.inf
        self.history: list[dict] = []  # the logged records, in order
        self.last_eval: dict = {}
        self._best_metric_checked = False

    # ----------------------------------------------------------------------------------- one step
    def autocast(self):
        return precision_autocast(self.cfg.precision, self.device)

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    def train_step(self, lr: float) -> tuple[torch.Tensor, torch.Tensor, dict, int]:
        """One optimiser step. Returns (mean loss, grad norm, summed metrics, local tokens), on device."""
        loss_sum = torch.zeros((), device=self.device)
        metric_sums: dict = {}
        tokens = 0
        with self.autocast():  # what a batch source computes (RL rollouts: samples, old and reference log-probs)
            batches = [self._to_device(self.batches.next_batch()) for _ in range(self.grad_accum)]
        shares = self._loss_shares(batches)
        for micro, batch in enumerate(batches):
            last = micro == self.grad_accum - 1
            with distributed.no_sync(self.wrapped, self.mode, skip_sync=not last):
                with self.autocast():
                    loss, metrics = self.forward(batch)
                scaled = loss.float() / self.grad_accum if shares is None else loss.float() * shares[micro]
                if self.scaler is not None:
                    scaled = self.scaler.scale_loss(scaled)
                scaled.backward()
            loss_sum += loss.detach().float() if shares is None else loss.detach().float() * shares[micro]
            for k, v in metrics.items():
                metric_sums[k] = metric_sums.get(k, 0.0) + (v.detach().float() if torch.is_tensor(v) else v)
            tokens += batch["input_ids"].numel() if "input_ids" in batch else 0
        mean_loss = loss_sum / self.grad_accum if shares is None else loss_sum
        grads = self.optimizer.grads()
        found_inf = None
        if self.scaler is not None:
            reduce = (lambda t: distributed.all_reduce_(t, "max", self.dist)) if self.mode == "fsdp" else None
            found_inf = self.scaler.unscale_(grads, reduce)
        grad_norm = self._clip_(grads)
        self.optimizer.step(lr, found_inf)
        if self.scaler is not None:
            self.scaler.update()
        self.optimizer.zero_grad()
        return mean_loss, grad_norm, metric_sums, tokens

    def _loss_shares(self, batches: list[dict]) -> list[float] | list[torch.Tensor] | None:
        """Weights of the micro-batches' losses in the step's loss when the batches carry ``loss_weight``
        (how many items, e.g. trained tokens, the loss function averages over): w_i x world_size / (sum of
        w over every micro-batch of every rank), so the step's gradient is the mean over all those items,
        whatever the accumulation and number of processes (DDP/FSDP average over ranks). None: the plain
        mean of the micro-batch losses (equal weights)."""
        has = ["loss_weight" in b for b in batches]
        if not any(has):
            return None
        if not all(has):
            raise ValueError("some micro-batches carry loss_weight and some do not; a batch source must give it "
                             "always or never")
        weights = [float(b["loss_weight"]) for b in batches]
        if self.dist.world_size == 1:  # host numbers: no copy to the device, which would wait for its queue
            return [w / max(sum(weights), 1.0) for w in weights]
        local = torch.tensor(weights, dtype=torch.float64)
        if self.device.type == "cuda":
            local = local.pin_memory().to(self.device, non_blocking=True)
        total = distributed.all_reduce_(local.sum(), "sum", self.dist).clamp(min=1.0)
        return list((local * self.dist.world_size / total).float().unbind())

    @torch.no_grad()
    def _clip_(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """Global gradient norm (over all ranks' shards under FSDP); scales grads down to grad_clip."""
        sq = torch.stack([n.float() for n in torch._foreach_norm(grads)]).square().sum()
        if self.mode == "fsdp":
            distributed.all_reduce_(sq, "sum", self.dist)
        norm = sq.sqrt()
        if self.cfg.grad_clip > 0:
            coef = (self.cfg.grad_clip / (norm + 1e-6)).clamp(max=1.0)
            torch._foreach_mul_(grads, coef)
        return norm

    # ----------------------------------------------------------------------------------- the loop
    def fit(self) -> dict:
        """Train to cfg.max_steps (resuming from out_dir when cfg.resume); returns the run summary."""
        cfg = self.cfg
        if self.dist.is_main:
            self.ckpt.remove_stale_temps()
        resumed = self.resume() if cfg.resume else None
        start_step = self.step
        log = MetricsLog(self.out_dir, self.dist.is_main, cfg.progress, cfg.tensorboard, cfg.max_steps, start_step)
        if resumed is not None:
            log.write(f"resumed from {resumed} at step {start_step}" + (
                f", which is max_steps={cfg.max_steps} or more: nothing to train (raise max_steps to continue)"
                if start_step >= cfg.max_steps else ""))
        energy = EnergyMeter(self.device)
        model_cfg = getattr(self.model, "cfg", None)  # a pyllm Transformer; wrappers with heads: no MFU
        flops_tok = flops_per_token(model_cfg, cfg.seq_len) if isinstance(model_cfg, ModelConfig) else None
        peak = device_peak_flops(self.device, cfg.precision, cfg.peak_tflops)

        train_time, window_time, window_tokens, total_tokens = 0.0, 0.0, 0, 0
        try:
            while self.step < cfg.max_steps:
                t0 = time.perf_counter()
                loss, grad_norm, metric_sums, tokens = self.train_step(lr_at(cfg, self.step))
                self.step += 1
                window_tokens += tokens  # this rank's; _record sums them over ranks
                final = self.step == cfg.max_steps
                if self.step % cfg.log_every == 0 or final:
                    # reads back (the step has finished); window_tokens becomes the count of all ranks
                    record, window_tokens = self._record(loss, grad_norm, metric_sums, window_tokens)
                    window_time += time.perf_counter() - t0
                    record["tokens_per_s"] = window_tokens / window_time
                    if flops_tok and peak:
                        record["mfu"] = window_tokens * flops_tok / window_time / peak
                    record["peak_memory_gb"] = round(peak_memory_gb(self.device), 3)
                    log.record(self.step, record)
                    self.history.append({"step": self.step, **record})
                    train_time, total_tokens = train_time + window_time, total_tokens + window_tokens
                    window_time, window_tokens = 0.0, 0
                else:
                    window_time += time.perf_counter() - t0
                log.advance()
                energy.sample()
                metrics = {}
                if self.eval_fn is not None and ((cfg.eval_every and self.step % cfg.eval_every == 0) or final):
                    metrics = self.evaluate()
                    log.record(self.step, metrics)
                    log.write(f"step {self.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
                if (cfg.ckpt_every and self.step % cfg.ckpt_every == 0) or final:
                    self.save_checkpoint(metrics)
            kwh = self._total_kwh(energy)
            if kwh is not None:
                log.record(self.step, {"energy_kwh": kwh, "co2_kg": kwh * cfg.carbon_intensity})
        finally:
            log.close()
        if self.eval_fn is not None and not self.last_eval and start_step >= cfg.max_steps:
            self.evaluate()  # resumed at its last step (a crash after the final checkpoint): its final evaluation
        last = self.history[-1] if self.history else {}
        summary = {
            "steps": self.step, "resumed_from": start_step, "tokens": total_tokens, "train_time_s": train_time,
            "tokens_per_s": total_tokens / train_time if train_time else None, "final_loss": last.get("loss"),
            "eval": self.last_eval, "best": None if math.isinf(self.best) else self.best,
            "mfu": total_tokens * flops_tok / train_time / peak if (flops_tok and peak and train_time) else None,
            "peak_memory_gb": peak_memory_gb(self.device), "energy_kwh": kwh,
            "co2_kg": kwh * cfg.carbon_intensity if kwh is not None else None,
            "skipped_steps": int(self.scaler.skipped.item()) if self.scaler is not None else 0,
            "out_dir": str(self.out_dir), "history": self.history,
        }
        if self.dist.is_main:
            log_line = {k: v for k, v in summary.items() if k != "history"}
            (self.out_dir / "summary.json").write_text(json.dumps(strict_json(log_line), indent=1))
        return summary

    def _total_kwh(self, energy: EnergyMeter) -> float | None:
        """kWh of every rank's GPU (each rank meters its own); None unless every rank could measure."""
        kwh = energy.kwh()
        if self.dist.world_size == 1:
            return kwh
        total = torch.tensor([math.nan if kwh is None else kwh], dtype=torch.float64, device=self.device)
        value = distributed.all_reduce_(total, "sum", self.dist).item()
        return None if math.isnan(value) else value

    def _record(self, loss, grad_norm, metric_sums: dict, tokens: int) -> tuple[dict, int]:
        """Host values of one step's statistics (the loss function's metrics too), averaged over ranks, and
        ``tokens`` summed over ranks (one sync; float64, so a single process reads back exactly what it
        computed)."""
        names = list(metric_sums)
        stats = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=self.device)
                             for v in (loss, grad_norm, tokens, *(metric_sums[k] for k in names))])
        distributed.all_reduce_(stats, "avg", self.dist)  # grad_norm is already equal on every rank
        loss_v, norm_v, tokens_v, *metric_v = stats.tolist()
        record = {"loss": loss_v, "lr": lr_at(self.cfg, self.step - 1), "grad_norm": norm_v}
        for k, v in zip(names, metric_v):
            record[k] = v / self.grad_accum
        if self.scaler is not None:
            record["loss_scale"] = self.scaler.scale.item()
            record["skipped_steps"] = int(self.scaler.skipped.item())
        return record, round(tokens_v * self.dist.world_size)

    @torch.no_grad()
    def evaluate(self) -> dict:
        self.model.eval()
        if self.mode == "fsdp":
            self.wrapped.unshard()  # the root unit's weights (embeddings, heads); blocks gather on call
        try:
            with self.autocast():
                metrics = {k: float(v) for k, v in self.eval_fn(self.model).items()}
        finally:
            if self.mode == "fsdp":
                self.wrapped.reshard()
            self.model.train()
        self.last_eval = metrics
        # the default name is pretraining's; post-training stages evaluate other metrics and keep no best
        if not self._best_metric_checked and self.cfg.best_metric not in metrics \
                and self.cfg.best_metric != TrainConfig.best_metric and self.dist.is_main:
            warnings.warn(f"best_metric={self.cfg.best_metric!r} is not among the evaluation metrics "
                          f"({', '.join(metrics) or 'none'}): no best checkpoint is kept; use one of them",
                          RuntimeWarning, stacklevel=2)
        self._best_metric_checked = True
        return metrics

    # ---------------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self, metrics: dict | None = None) -> None:
        """Every rank gathers (FSDP) and rank 0 writes; the best metric also updates ``best/``."""
        model_tensors = distributed.full_tensors(self.model.state_dict())
        state = {f"optim.{k}": v for k, v in distributed.full_tensors(self.optimizer.state_tensors()).items()}
        if self.scaler is not None:
            state.update({f"scaler.{k}": v for k, v in self.scaler.state_dict().items()})
        state["rng.torch"] = torch.get_rng_state()
        if self.device.type == "cuda":
            state["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        # the batch source's tensors (an RL rollout buffer) go to state.safetensors, the rest to the manifest
        data_tensors: dict[str, torch.Tensor] = {}
        data_state = checkpoint.to_json(self.batches.state_dict(), data_tensors, f"data.{self.dist.rank}")
        per_rank = [(data_state, data_tensors)]
        if self.dist.world_size > 1:
            per_rank = [None] * self.dist.world_size
            dist.all_gather_object(per_rank, (data_state, data_tensors))
        data_states = [s for s, _ in per_rank]
        for _, tensors in per_rank:
            state.update(tensors)
        value = (metrics or {}).get(self.cfg.best_metric)
        is_best = value is not None and value < self.best
        if is_best:
            self.best = value
        if self.dist.is_main:
            np_state = np.random.get_state()
            meta = {"data": data_states, "best": None if math.isinf(self.best) else self.best,
                    "metrics": metrics or {}, "config": self.config_record, "run": self.run,
                    "world_size": self.dist.world_size,
                    "rng_python": random.getstate(),  # tuples: JSON lists
                    "rng_numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
            self.ckpt.save(self.step, model_tensors, state, meta, is_best=is_best)
        distributed.barrier(self.dist)

    def resume(self) -> Path | None:
        """Load the newest valid checkpoint in out_dir (if any); returns its path (None: there was none)."""
        path = self.ckpt.latest_valid() if self.dist.is_main else None
        if self.dist.world_size > 1:
            box = [path]
            dist.broadcast_object_list(box, src=0)
            path = box[0]
        if path is None:
            return None
        model_t, state_t, manifest = checkpoint.load(path)
        self._check_same_run(path, manifest["meta"])
        if self.dist.is_main:
            self._warn_config_changes(path, manifest["meta"].get("config"))
        own = self.model.state_dict()
        checkpoint.check_shapes(path, model_t, {k: tuple(v.shape) for k, v in own.items()})
        for k, v in own.items():
            distributed.copy_full_(v, model_t[k])
        try:
            for k, v in self.optimizer.state_tensors().items():
                distributed.copy_full_(v, state_t[f"optim.{k}"])
            if self.scaler is not None:
                self.scaler.load_state_dict({k: state_t[f"scaler.{k}"] for k in self.scaler.state_dict()})
        except KeyError as e:
            raise CheckpointError(f"checkpoint {path} has no {e.args[0]!r} (written with another precision or "
                                  f"master_weights setting?); use the same settings or another out_dir") from None
        meta = manifest["meta"]
        data_states = meta["data"]
        if len(data_states) != self.dist.world_size and not getattr(self.batches, "layout_free", False):
            raise CheckpointError(f"checkpoint {path} was written by {len(data_states)} rank(s), this run has "
                                  f"{self.dist.world_size}, and its batch source ({type(self.batches).__name__}) "
                                  "keeps a state per rank; resume with the same number of processes")
        own_state = data_states[self.dist.rank] if len(data_states) == self.dist.world_size else data_states[0]
        try:
            self.batches.load_state_dict(checkpoint.from_json(own_state, state_t, path))
        except CheckpointError:
            raise
        except ValueError as e:  # a data position this run cannot continue from (other seed, sizes)
            raise CheckpointError(f"checkpoint {path}: {e}") from None
        torch.set_rng_state(state_t["rng.torch"])
        if self.device.type == "cuda" and "rng.cuda" in state_t:
            torch.cuda.set_rng_state(state_t["rng.cuda"], self.device)
        random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in meta["rng_python"]))
        kind, keys, *rest = meta["rng_numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
        self.step = manifest["step"]
        self.best = meta["best"] if meta["best"] is not None else math.inf
        return path

    def _check_same_run(self, path: Path, meta: dict) -> None:
        """Refuse a checkpoint written by another run in this out_dir (another stage, start model or data)."""
        saved = dict(meta.get("run", {}))  # (none in a checkpoint of an older pyllm: nothing to compare)
        if self.own_run and "data" in saved:  # older checkpoints hold the path as typed
            saved["data"] = data.data_identity(saved["data"])
        differ = [f"{k}={saved[k]!r} (this run: {v!r})" for k, v in self.run.items() if k in saved and saved[k] != v]
        if differ:
            raise CheckpointError(f"out_dir {str(self.out_dir)!r} holds a checkpoint of another run ({path.name}: "
                                  f"{', '.join(differ)}); give this run a fresh --out_dir, or delete "
                                  f"{path.parent} to start over")

    # not warned of on resume: fields that change neither the weights nor the data order, and those
    # _check_same_run compares (data, tokenizer)
    UNWARNED = {"out_dir", "resume", "progress", "tensorboard", "log_every", "ckpt_every", "keep_last", "threads",
                "keep_host_memory", "peak_tflops", "carbon_intensity", "eval_every", "eval_batches", "best_metric",
                "data", "tokenizer"}

    def _warn_config_changes(self, path: Path, saved: dict | None) -> None:
        """One warning line listing the settings that differ from the checkpoint's (a longer max_steps
        stretches the schedule: the lr jumps): allowed, but the user should know."""
        if not isinstance(saved, dict):
            return
        # (a checkpoint of an older pyllm has no stage settings: nothing to compare them with)
        new = {k: v for k, v in self.config_record.items() if k != "stage" or k in saved}
        old, new = _flatten(saved), _flatten(new)
        changed = [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(old.keys() | new.keys())
                   if k.split(".")[0] not in self.UNWARNED and old.get(k) != new.get(k)]
        if changed:
            warnings.warn(f"resuming from {path} with settings that differ from its run: {'; '.join(changed)}",
                          RuntimeWarning, stacklevel=3)

    # ------------------------------------------------------------------------------------- export
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's unsharded weights (every rank must call this under FSDP)."""
        return distributed.full_tensors(self.model.state_dict())


def _flatten(config: dict, prefix: str = "") -> dict:
    """{"model": {"n_layer": 2}} -> {"model.n_layer": 2}"""
    out = {}
    for k, v in config.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out
