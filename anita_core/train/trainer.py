"""The training loop shared by SFT and DPO.

An *objective* turns one micro-batch into gradients; the trainer owns
everything around it: gradient accumulation with exact normalization (each
objective counts its units — target tokens for SFT, pairs for DPO — over the
whole optimizer step before the first micro-batch runs), AdamW, the schedule,
clipping, logging, atomic checkpoints (every save_steps steps and every
save_minutes minutes), exact resume, non-finite values anywhere (loss, gradient
norm, weights after the update, eval metrics) and stops by signal.

The host waits for the device twice per optimizer step, however many
micro-batches it has: once for the step's sums and gradient norm together
(read before the update, which a non-finite one stops), once for the check that
the weights are finite after it. The micro-batches read nothing back.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Protocol, Sequence

import torch

from anita_core.memory.budget import device_memory_gib
from anita_core.train.distributed import SINGLE, DistContext, all_gather_objects, all_reduce_sums, rank_slice
from anita_core.train.host_reads import all_finite, read_floats
from anita_core.train.optim import build_optimizer, lr_multiplier, warmup_steps_for
from anita_core.train.report import Reporter
from anita_core.train.run_checkpoint import latest_checkpoint, rng_restore, rng_snapshot
from anita_core.train.run_folder import METRICS_FILE
from anita_core.train.stop_signals import Interrupted, signals_deferred, stop_on_signals  # noqa: F401  (callers' names)
from anita_core.train.trainer_state import CheckpointState, ResumeRefused  # noqa: F401  (callers' names)
from anita_core.train import stop_points


class Objective(Protocol):
    def units(self, batch) -> int:
        """How many normalization units (target tokens, pairs) the batch holds."""

    def micro_step(self, batch, grad_scale: float) -> Dict[str, object]:
        """Add grad_scale * d(loss sum)/d(params) into .grad; return sums:
        {"loss": loss sum, "tokens": tokens processed (not padding), "computed":
        positions computed, padding included (default: tokens), <metric>: sum over
        units}, each a Python number or a 0-dim device tensor (read back once per step).
        A non-finite loss need not be caught here: the step's check sees it."""

    def evaluate(self, batches: Sequence) -> Dict[str, float]:
        """Metrics over held-out batches, e.g. {"eval_loss": ...}."""


@dataclass
class TrainConfig:
    output_dir: str
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    optimizer: str = "adamw"
    lr_scheduler: str = "linear"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    num_epochs: float = 1.0
    max_steps: int = -1
    logging_steps: int = 1
    eval_steps: int = 0          # 0: evaluate only at the end
    save_steps: int = 0          # checkpoint every N steps (0: off)
    save_minutes: float = 0.0    # and every M minutes of wall time (0: off); always at the end
    save_total_limit: int = 2
    seed: int = 42
    progress: bool = True
    # what makes a checkpoint belong to this run (model, LoRA config, seed, data...):
    # a resume whose settings differ is refused, listing each difference
    run_settings: Dict[str, object] = field(default_factory=dict)


GRAD_NORM = "grad_norm"


class TrainingDiverged(RuntimeError):
    """A loss, gradient norm, weight or eval metric became NaN/inf; that step is
    never checkpointed."""


class Trainer(CheckpointState):
    """``epoch_batches(epoch)`` returns that epoch's list of micro-batches (already
    shuffled by the caller's seed, so the same epoch always yields the same list).

    On several ranks (``dist``), every rank builds the same list; an optimizer
    step takes the next world x accumulation micro-batches of it (the global
    batch) and each rank runs its own contiguous share, so the position (epoch,
    global micro-batch index) means the same on any world size. An epoch's last
    micro-batches that do not split evenly over the ranks (fewer than world)
    are left out. ``grad_buckets`` sums the LoRA gradients over the ranks.
    ``split_eval``: each rank evaluates every world-th eval batch and the means
    are combined by unit counts (False in the sharded-base mode, where every
    rank must run the same forwards: there every rank evaluates them all)."""

    def __init__(self, model, adapters, objective: Objective,
                 epoch_batches: Callable[[int], List], config: TrainConfig,
                 eval_batches: Optional[Sequence] = None, log: Callable[[str], None] = print,
                 dist: DistContext = SINGLE, grad_buckets=None, split_eval: bool = True):
        self.model, self.adapters, self.objective = model, adapters, objective
        self.epoch_batches, self.config, self.eval_batches = epoch_batches, config, eval_batches
        self.log = log
        self.dist, self.grad_buckets, self.split_eval = dist, grad_buckets, split_eval
        self.output_dir = Path(config.output_dir)
        self.params = list(adapters.parameters())
        self.optimizer = build_optimizer(config.optimizer, self.params, config.learning_rate,
                                         config.weight_decay)
        world = dist.world_size
        n_batches = len(epoch_batches(0))
        self.batches_per_epoch = n_batches - n_batches % world
        if self.batches_per_epoch == 0:
            raise ValueError(f"the training set produced {n_batches} micro-batches, fewer than "
                             f"the {world} ranks" if world > 1 else "the training set produced no batches")
        accum = config.gradient_accumulation_steps * world
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / accum)
        if config.max_steps > 0:
            self.total_steps = config.max_steps
        else:
            self.total_steps = max(1, math.ceil(config.num_epochs * self.steps_per_epoch))
        self.warmup = warmup_steps_for(self.total_steps, config.warmup_steps, config.warmup_ratio)
        self.step = 0           # optimizer steps done
        self.epoch = 0          # position of the next micro-batch
        self.batch_index = 0
        self.metrics_path = self.output_dir / METRICS_FILE
        self._step_start = None
        self._last_eval: dict = {}        # the latest eval metrics, and the step they are of
        self._last_eval_step: Optional[int] = None
        self._last_save_time = time.monotonic()
        self.tokens_trained = self.tokens_computed = 0    # over this process's steps
        # metrics.jsonl (rank 0); the CLI adds the --report-to backends
        self.reporter = Reporter(self.output_dir, writes=dist.is_main, log=log)

    # ---------------------------------------------------------------- loop
    def _next_group(self) -> List:
        """This rank's micro-batches of the next optimizer step (never straddling
        epochs): its share of the next world x accumulation micro-batches."""
        world = self.dist.world_size
        batches = self.epoch_batches(self.epoch)[:self.batches_per_epoch]
        span = self.config.gradient_accumulation_steps * world
        group = batches[self.batch_index:self.batch_index + span]
        self.batch_index += len(group)
        if self.batch_index >= len(batches):
            self.epoch, self.batch_index = self.epoch + 1, 0
        return rank_slice(group, world, self.dist.rank)

    def _train_one_step(self) -> dict:
        position = (self.epoch, self.batch_index)
        # an interrupted step is rolled back to here, so a resume replays it whole
        self._step_start = (position, rng_snapshot(getattr(self.model, "dropout_generator", None)))
        group = self._next_group()
        # normalized by the units of the whole global batch, counted before the first micro-batch
        (units,) = all_reduce_sums(self.dist, [sum(self.objective.units(b) for b in group)])
        units = int(units)
        for p in self.params:
            p.grad = None
        totals: Dict[str, object] = {}
        where = f"step {self.step + 1} (epoch {position[0]}, batch {position[1]})"
        failure = None
        if units > 0:
            for k, batch in enumerate(group):
                if self.grad_buckets is not None:
                    self.grad_buckets.sync = k == len(group) - 1
                try:
                    sums = self.objective.micro_step(batch, 1.0 / units)
                except FloatingPointError as e:
                    failure = f"{where}: {e}"
                    if not self.dist.active:
                        raise TrainingDiverged(failure) from e
                    break       # the other ranks still expect this rank's gradients
                for key, v in sums.items():
                    # a device value stays there, summed in float64 (exactly what summing
                    # Python floats gives), until the step's one read below
                    v = v.detach().double() if isinstance(v, torch.Tensor) else v
                    totals[key] = totals.get(key, 0.0) + v
                stop_points.reached(f"step:{self.step + 1}.{k + 1}")
            if self.grad_buckets is not None:
                self.grad_buckets.finish()
        # clipped on the device before anything is read: a non-finite norm makes the
        # clipped gradients non-finite too, and then no update uses them
        grads = [p.grad for p in self.params if p.grad is not None]
        if grads:
            totals[GRAD_NORM] = torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
        totals = read_floats(totals)            # the step's first read: sums and norm together
        grad_norm = totals.pop(GRAD_NORM, 0.0)
        if self.dist.active:
            totals, failure = self._sum_over_ranks(totals, failure)
        if failure is not None:
            raise TrainingDiverged(failure)
        if not math.isfinite(totals.get("loss", 0.0)):
            raise TrainingDiverged(f"{where}: loss is {totals['loss']}; the update was not applied")
        lr = self.config.learning_rate * lr_multiplier(self.step, self.total_steps, self.warmup,
                                                       self.config.lr_scheduler)
        for group_ in self.optimizer.param_groups:
            group_["lr"] = lr
        if not math.isfinite(grad_norm):
            raise TrainingDiverged(f"{where}: gradient norm is {grad_norm}; the update was not applied")
        with signals_deferred():
            if units > 0:
                self.optimizer.step()
                if not all_finite(self.params):    # the step's second read
                    raise TrainingDiverged(f"{where}: the LoRA weights are not finite after the update")
            self.step += 1
            self._step_start = None
        record = {"step": self.step, "epoch": round(self.epoch + self.batch_index /
                                                     self.batches_per_epoch, 4),
                  "lr": lr, "grad_norm": grad_norm, "units": units}
        tokens = totals.pop("tokens", 0.0)
        computed = totals.pop("computed", tokens)
        for k, v in totals.items():
            record[k] = v / max(units, 1)
        record["tokens"], record["computed_tokens"] = int(tokens), int(computed)
        self.tokens_trained += record["tokens"]
        self.tokens_computed += record["computed_tokens"]
        return record

    def _sum_over_ranks(self, totals: Dict[str, float], failure: Optional[str]):
        """Every rank's metric sums added up, and the first rank's failure if any."""
        gathered = all_gather_objects(self.dist, (totals, failure))
        summed: Dict[str, float] = {}
        for rank_totals, _ in gathered:
            for key, v in rank_totals.items():
                summed[key] = summed.get(key, 0.0) + v
        failures = [f"rank {r}: {f}" for r, (_, f) in enumerate(gathered) if f is not None]
        return summed, (failures[0] if failures else None)

    def train(self, resume_from: Optional[Path] = None) -> dict:
        """Run to total_steps; returns the last logged record."""
        if resume_from is not None:
            used = self.resume(resume_from)
            self.log(f"resumed from {used} at step {self.step}")
        # the backends are cut back to the step metrics.jsonl was cut back to
        with self.reporter.session(self.step):
            return self._train_from_here()

    def _train_from_here(self) -> dict:
        from tqdm.auto import tqdm
        bar = tqdm(total=self.total_steps, initial=self.step,
                   disable=not (self.config.progress and self.dist.is_main),
                   desc="train", unit="step", dynamic_ncols=True)
        last: dict = {}
        started, tokens_seen = time.perf_counter(), 0
        self._last_save_time = time.monotonic()
        try:
            while self.step < self.total_steps:
                record = self._train_one_step()
                tokens_seen += record["tokens"]
                record["tokens_per_s"] = round(tokens_seen / max(time.perf_counter() - started, 1e-9), 1)
                record.update(device_memory_gib(self.params[0].device))
                if self.step % self.config.logging_steps == 0 or self.step == self.total_steps:
                    self.reporter.log(record)
                bar.update(1)
                bar.set_postfix(loss=f"{record.get('loss', float('nan')):.4f}",
                                lr=f"{record['lr']:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
                last = record
                if self.config.eval_steps and self.step % self.config.eval_steps == 0:
                    self._evaluate()
                if self._periodic_save_due():
                    self.save()
                stop_points.reached(f"step:{self.step}")
            bar.close()
            if self.eval_batches:
                # never a second eval record for one step (e.g. resuming a finished run)
                last.update(self._last_eval if self._last_eval_step == self.step else self._evaluate())
            self.save()
        except KeyboardInterrupt as e:
            bar.close()
            if self._step_start is not None:
                (self.epoch, self.batch_index), rng = self._step_start
                rng_restore(rng, getattr(self.model, "dropout_generator", None))
            if isinstance(e, Interrupted):
                self.log(f"{e.args[0]} received: stopping")
            path = self.save()
            if path is not None:
                self.log(f"interrupted: checkpoint of step {self.step} written to {path}; "
                         f"resume with --resume")
            raise
        except TrainingDiverged as e:
            bar.close()
            good = latest_checkpoint(self.output_dir)
            raise TrainingDiverged(f"{e}; stopping. Last good checkpoint: "
                                   f"{good if good else 'none written yet'}") from e
        return last

    def _evaluate_over_ranks(self) -> Dict[str, float]:
        d = self.dist
        if not (d.active and self.split_eval):
            return self.objective.evaluate(self.eval_batches)
        mine = list(self.eval_batches)[d.rank::d.world_size]
        units = sum(self.objective.units(b) for b in mine)
        gathered = all_gather_objects(d, (self.objective.evaluate(mine) if mine else {}, units))
        total = sum(u for _, u in gathered)
        keys = list(dict.fromkeys(k for result, _ in gathered for k in result))  # the objective's order
        # each metric is a mean over units (target tokens, pairs): weight by them
        return {k: sum(result.get(k, 0.0) * u for result, u in gathered) / max(total, 1)
                for k in keys}

    def _evaluate(self) -> dict:
        if not self.eval_batches:
            return {}
        result = self._evaluate_over_ranks()
        bad = {k: v for k, v in result.items() if not math.isfinite(v)}
        if bad:
            raise TrainingDiverged(f"step {self.step}: eval metrics are not finite ("
                                   + ", ".join(f"{k}={v}" for k, v in bad.items()) + ")")
        self._last_eval, self._last_eval_step = result, self.step
        self.reporter.log({"step": self.step, **result})
        if self.dist.is_main:
            self.log("  ".join(f"{k}={v:.4f}" for k, v in result.items()))
        return result
