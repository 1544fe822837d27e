"""The core training loop: parts in, optimiser steps out, checkpoints and exact resume.

Owns :func:`run_steps`, the one step loop every training task runs through (steps, hooks,
periodic checkpoints, Ctrl-C / SIGTERM: save and stop), and :class:`Trainer`, the diffusion
task behind :func:`train`: the core step (AdamW with linear warm-up then cosine or constant
learning rate, gradient accumulation and clipping, mixed precision, non-finite detection,
EMA and post-hoc EMA), the run (logging, time budget, early stopping), save / restore, and
the RNG state.  The autoencoder (:mod:`difflab.train.autoencoder`) is another task of the
same loop.

The trainer receives ready-made parts: :func:`train` builds them from the config with
:func:`difflab.train.parts.build_parts` and passes them in (``Trainer(parts)``;
:meth:`Trainer.from_config` does both) — the conditioning (class labels, text encoders,
autoencoder latents, encoder caches: :mod:`~difflab.train.conditioning`), the fine-tuning
set-up (:mod:`~difflab.train.finetune_setup`), the diffusion loss of one micro-batch
(:mod:`~difflab.train.diffusion_loss`) and the hooks that look at the run (grids,
validation, periodic eval: :mod:`~difflab.train.hooks`) — and never branches on them.
Data parallelism (DDP, or FSDP2 by ``train.parallel``: :mod:`~difflab.train.fsdp`) is one
method, :meth:`Trainer._wrap_parallel`.

Randomness: no global RNG is drawn by the loop.  A generator of the parts
(:class:`~difflab.train.seeds.RunGenerators`, seeded from ``config.seed``, the same on every
rank) draws condition dropout, timesteps and noise for the whole *global* batch, and each
rank keeps its rows, so N ranks compute exactly what one process does with the same global
batch.  Dropout layers inside the model use torch's
global RNG; it is seeded at start (``seed + rank``), saved per rank in the checkpoint and
restored on resume (and the caller's global RNG state is restored when :func:`train` returns).
"""

from __future__ import annotations

import contextlib
import functools
import math
import signal
import sys
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import Dataset

from ..samplers.common import progress as progress_bar
from .budget import TimeBudget, format_duration, parse_duration
from .checkpoint import (
    Checkpoint,
    find_checkpoint,
    load_checkpoint,
    repair_run_dir,
    save_checkpoint,
)
from .compiled import COMPILE_CACHE, inductor_cache
from .config import TrainConfig, changed_keys, save_config
from .diffusion_loss import MicroBatch
from .distributed import all_gather_objects, any_rank, rank0_says, teardown_distributed
from .early_stop import BEST_FILE, EarlyStopping
from .ema import EMA
from .finetune_setup import word_weight
from .fsdp import (
    clip_grad_norm,
    is_sharded,
    is_sharded_checkpoint,
    load_sharded,
    no_sync,
    parallelize,
    save_sharded,
)
from .monitor import MetricsLog, log_line, plot_metrics, truncate_metrics
from .nonfinite import NonFiniteError, first_nonfinite_grad, first_nonfinite_module
from .optim import build_optimizer, match_param_layout, step_lr_schedule
from .parts import TrainParts, build_parts
from .posthoc_ema import PostHocEMA, PostHocEMAConfig
from .protocols import StepTask
from .seeds import preserve_global_rng, subseed
from .signals import TrainingInterrupted, stop_on_signals

__all__ = ["TrainResult", "Trainer", "TrainingInterrupted", "run_steps", "train", "word_weight"]

_subseed = subseed  # the name tests and older code import from here


@dataclass
class TrainResult:
    """What :func:`train` returns.

    :param run_dir: the run directory.
    :param step: optimiser steps done (skipped non-finite steps included).
    :param final_loss: loss of the last step (averaged over ranks and micro-batches).
    :param losses: the loss of every step run by this call.
    :param skipped_steps: steps skipped by ``on_nonfinite: skip`` in this call.
    :param ema_updates: EMA updates so far.
    :param grids: sample-grid PNGs written by this call.
    :param evals: the periodic metric records (``train.eval_every``) written by this call.
    :param validation: the validation-loss records (``train.val_every``) of this call
        (rank 0 only; empty on the other ranks).
    :param stop_reason: ``max_steps``, ``time budget`` (``train.max_time``) or ``early
        stopping`` (``train.patience``).
    """

    run_dir: Path
    step: int
    final_loss: float
    losses: list[float] = field(default_factory=list)
    skipped_steps: list[int] = field(default_factory=list)
    ema_updates: int = 0
    grids: list[Path] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    validation: list[dict[str, Any]] = field(default_factory=list)
    stop_reason: str = "max_steps"


def run_steps(
    task: StepTask, steps: Iterable[Any], last: int, *, save_every: int, signals: bool = True
) -> int:
    """The core loop: for each item of ``steps`` (a progress bar) one ``task.train_step()``,
    then ``task.after_step`` (which may make this step the last), a checkpoint every
    ``save_every`` steps and at the last; returns the last step.

    :param signals: Ctrl-C / SIGTERM save a checkpoint after the step and raise
        :class:`TrainingInterrupted` (off: the default handlers stay).
    """
    guard: contextlib.AbstractContextManager[list[int]] = (
        stop_on_signals() if signals else contextlib.nullcontext([])
    )
    with guard as stop:
        for _ in steps:
            record = task.train_step()
            step = task.step
            last = task.after_step(record, last)
            saved = bool(save_every and step % save_every == 0) or step == last
            if saved:
                task.save()
            if task.stopping(stop) and step < last:  # Ctrl-C / SIGTERM: save and stop
                if not saved:
                    task.save()
                raise TrainingInterrupted(step, stop[0], task.run_dir)
            if step >= last:  # the time budget or early stopping ended the run here
                break
    return last


@dataclass
class _Window:
    """The steps since the last logged line: their losses, split losses, last good record."""

    losses: list[float] = field(default_factory=list)
    parts: dict[str, list[float]] = field(default_factory=dict)
    good: dict[str, Any] = field(default_factory=dict)
    tick: float = field(default_factory=time.perf_counter)


class Trainer:
    """One diffusion training run, from ready-made parts; :func:`train` is the usual way in.

    :param parts: what :func:`difflab.train.parts.build_parts` built from the run's config
        (the loop's own options — steps, optimiser, EMA, logging — are read from
        ``parts.config``).
    :param progress: progress bar on/off; None: on when stderr is a terminal (rank 0 only).
    :param clock: seconds from any origin, read for ``train.max_time`` (default
        ``time.monotonic``; tests inject a scripted one).
    """

    def __init__(
        self,
        parts: TrainParts,
        *,
        progress: bool | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.cfg = cfg = parts.config
        tc = cfg.train
        self.dist, self.device, self.run_dir = parts.dist, parts.dist.device, parts.run_dir
        self.precision = parts.precision
        self.gens = parts.generators
        self.stream, self.val_set = parts.stream, parts.val_set
        self.conditioning, self.finetune = parts.conditioning, parts.finetune
        self.model, self.loss, self.hooks = parts.model, parts.loss, parts.hooks

        self.ema = EMA(self.model, tc.ema_decay, warmup=tc.ema_warmup)
        self.posthoc: PostHocEMA | None = None  # EDM2 power-function EMA snapshots
        if tc.posthoc_ema is not None:
            self.posthoc = PostHocEMA(
                self.model, PostHocEMAConfig.from_dict(tc.posthoc_ema), self.run_dir,
                last_step=tc.max_steps, write=self.dist.is_main,
            )  # fmt: skip
        self._exit = contextlib.ExitStack()  # undone by close()
        self.ddp: Any = self._wrap_parallel(self.model)  # wrapped, then maybe compiled
        self._compile_pending = tc.compile  # the first step compiles; its time is logged
        if tc.compile:  # DDP first, then compile (DDP's buckets split the compiled graph)
            self._exit.enter_context(inductor_cache(self.run_dir / COMPILE_CACHE))
            self.ddp = torch.compile(self.ddp)
        self.budget: TimeBudget | None = None  # train.max_time
        if tc.max_time is not None:
            seconds = parse_duration(tc.max_time)
            self.budget = TimeBudget(seconds, tc.max_steps, clock=clock or time.monotonic)
        self.early = EarlyStopping(tc.patience, tc.min_delta) if tc.patience else None
        self.stop_reason = ""
        progress_of = self.budget.effective_step if self.budget is not None else None
        self.optimizer, self.lr_schedule = build_optimizer(self.model, tc, progress=progress_of)
        self.scaler = self.precision.grad_scaler()
        self.step = 0
        self.last_loss = float("nan")
        self.show_progress = progress
        self.log: MetricsLog | None = None
        self._last_records: dict[str, dict[str, Any]] = {}  # latest val / eval record

    @classmethod
    def from_config(
        cls,
        config: TrainConfig,
        *,
        dataset: Dataset | None = None,
        model: nn.Module | None = None,
        progress: bool | None = None,
        clock: Callable[[], float] | None = None,
    ) -> Trainer:
        """Build the parts from ``config`` (:func:`~difflab.train.parts.build_parts`; the
        ``dataset`` and ``model`` defaults are the config's) and the trainer around them."""
        parts = build_parts(config, dataset=dataset, model=model)
        return cls(parts, progress=progress, clock=clock)

    def _wrap_parallel(self, model: nn.Module) -> nn.Module:
        """The network the step runs: ``model`` itself in one process; under torchrun
        wrapped by DDP or sharded in place by FSDP2 (``train.parallel``; the optimiser, EMA
        and checkpoints use ``model``)."""
        return parallelize(self.cfg, model, self.ema, self.dist, self.precision)

    # ------------------------------------------------------------------ one step
    def train_step(self) -> dict[str, Any]:
        """One optimiser step over ``grad_accum`` micro-batches; returns its metrics."""
        tc = self.cfg.train
        k = self.step + 1
        self._step_began = time.perf_counter()  # the first compiled step's time is logged
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        micro = []
        for i in range(tc.grad_accum):
            mb = self.loss.draw(self.stream.next())
            mb.rng = self._local_rng()  # to re-run this forward for a diagnosis
            sync = i == tc.grad_accum - 1 or not self.dist.distributed
            with contextlib.nullcontext() if sync else no_sync(self.ddp):
                loss, per_sample = self.loss.loss(self.ddp, mb)
                self.scaler.scale(loss / tc.grad_accum).backward()
            self.loss.observe(mb, per_sample)
            total += loss.detach().float() / tc.grad_accum
            micro.append(mb)
        self.scaler.unscale_(self.optimizer)
        max_norm = tc.grad_clip if tc.grad_clip > 0 else math.inf
        grad_norm = clip_grad_norm(self.model.parameters(), max_norm)  # global over shards
        flags = torch.stack(
            [total, (~torch.isfinite(total)).float(), 1.0 - torch.isfinite(grad_norm).float()]
        )
        if self.dist.distributed:
            dist.all_reduce(flags)
        loss_value = float(flags[0]) / self.dist.world_size
        bad_loss = bool(flags[1] > 0)
        bad_grad = bool(flags[2] > 0) and not self.precision.needs_scaler  # fp16: scaler skips
        lr = self.optimizer.param_groups[0]["lr"]
        record = {"step": k, "loss": loss_value, "lr": lr, "grad_norm": float(grad_norm)}
        record.update(self.loss.step_record())  # instance / prior (main / mix) losses
        if bad_loss or bad_grad:
            what = "loss" if bad_loss else "gradient"
            module = self._diagnose(micro)
            if tc.on_nonfinite == "stop":
                self._log({"step": k, "event": "nonfinite", "nonfinite": what, "module": module})
                raise NonFiniteError(k, what, module)
            self.optimizer.zero_grad(set_to_none=True)
            if self.precision.needs_scaler:
                self.scaler.update()
            self._lr_step()
            self.step = k
            return {**record, "skipped": True, "nonfinite": what, "module": module}
        scale = self.scaler.get_scale() if self.precision.needs_scaler else 1.0
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self._lr_step()
        self.step = k
        self.last_loss = loss_value
        if self.precision.needs_scaler and self.scaler.get_scale() < scale:
            return {**record, "fp16_overflow": True}  # GradScaler skipped the step: no EMA
        self.ema.update(self.model)
        if self.posthoc is not None:
            self.posthoc.update(self.model, k)
        return record

    def _lr_step(self) -> None:
        step_lr_schedule(self.lr_schedule)

    def _diagnose(self, micro: list[MicroBatch]) -> str | None:
        """Re-run each micro-batch with hooks (same RNG states) to name the first bad module."""
        now = self._local_rng()
        found = None
        try:
            for mb in micro:
                self._set_local_rng(mb.rng)
                found = first_nonfinite_module(
                    self.model, functools.partial(self.loss.loss, self.model, mb)
                )
                if found is not None:
                    break
            if found is None:
                found = first_nonfinite_grad(self.model)
        finally:
            self._set_local_rng(now)
        names = [n for n in all_gather_objects(found, self.dist) if n is not None]
        return names[0] if names else None

    # ------------------------------------------------------------------ RNG state
    def _local_rng(self) -> dict[str, Tensor]:
        """RNG states that differ per rank: global CPU/CUDA (dropout), aux and data flips."""
        out = {"torch_cpu": torch.get_rng_state(), "aux": self.gens.aux.get_state()}
        out["data"] = self.gens.data.get_state()
        if self.device.type == "cuda":
            out["torch_cuda"] = torch.cuda.get_rng_state(self.device)
        return out

    def _set_local_rng(self, states: dict[str, Tensor]) -> None:
        torch.set_rng_state(states["torch_cpu"])
        self.gens.aux.set_state(states["aux"])
        self.gens.data.set_state(states["data"])
        if self.device.type == "cuda" and "torch_cuda" in states:
            torch.cuda.set_rng_state(states["torch_cuda"], self.device)

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> None:
        """Write a checkpoint (rank 0; every rank's RNG states are gathered first)."""
        per_rank = all_gather_objects(self._local_rng(), self.dist)
        sharded = is_sharded(self.model)  # FSDP: every rank writes its shards
        if self.dist.is_main or sharded:
            rng = {f"rank{r}.{k}": v for r, st in enumerate(per_rank) for k, v in st.items()}
            rng["shared.noise"] = self.gens.shared.get_state()
            meta = {
                "step": self.step,
                "loss": self.last_loss,
                "ema_updates": self.ema.num_updates,
                "data_position": self.stream.position,
                "lr_schedule": self.lr_schedule.state_dict(),
                "scaler": self.scaler.state_dict(),
                "timestep_sampler": self.loss.state_dict(),
                "world_size": self.dist.world_size,
            }
            if self.budget is not None:
                meta["train_time"] = self.budget.elapsed
            if self.early is not None:
                meta["early_stopping"] = self.early.state_dict()
            if sharded:
                save_sharded(self.run_dir, self.model, self.ema, self.optimizer, rng, meta,
                             self.dist)  # fmt: skip
            else:
                ckpt = Checkpoint(
                    model=self.model.state_dict(),
                    ema=self.ema.state_dict(),
                    optimizer=self.optimizer.state_dict(),
                    rng=rng,
                    meta=meta,
                )
                if self.posthoc is not None:  # before the checkpoint that refers to it
                    self.posthoc.save_state(self.step)
                save_checkpoint(self.run_dir, ckpt)
        if self.dist.is_main:
            if self.cfg.train.plot_metrics and self.log is not None:
                try:  # the picture of metrics.jsonl so far; never worth stopping a run for
                    plot_metrics(self.run_dir)
                except Exception as err:  # noqa: BLE001 - reported, and training goes on
                    warnings.warn(f"metrics.png not drawn: {err!r}", stacklevel=2)
            self.finetune.save(self.ema.model, self.run_dir, self.step)
        if self.dist.distributed:
            dist.barrier()

    def restore(self) -> bool:
        """Load the run directory's checkpoint if there is one; returns whether it did."""
        if find_checkpoint(self.run_dir) is None:
            return False
        self.conditioning.check_resume(self.run_dir)
        if is_sharded(self.model) or is_sharded_checkpoint(self.run_dir):  # DCP reshards
            ck = load_sharded(self.run_dir, self.model, self.ema, self.optimizer)
        else:
            ck = load_checkpoint(self.run_dir, optimizer_like=self.optimizer.state_dict())
            try:
                self.model.load_state_dict(ck.model)
            except RuntimeError as err:  # size mismatch / missing keys: one line, not a page
                detail = str(err).splitlines()[1].strip() if "\n" in str(err) else str(err)
                raise ValueError(
                    f"{self.run_dir} holds a checkpoint of another architecture ({detail}); "
                    "resume with the run's own config.yaml, or train into a new run_dir"
                ) from None
            self.ema.load_state_dict(ck.ema, ck.meta["ema_updates"])
            self.optimizer.load_state_dict(ck.optimizer)
            match_param_layout(self.optimizer)
        meta = ck.meta
        if self.posthoc is not None:
            self.posthoc.load_state(int(meta["step"]))
        self.lr_schedule.load_state_dict(meta["lr_schedule"])
        if meta["scaler"]:
            self.scaler.load_state_dict(meta["scaler"])
        self.loss.load_state_dict(meta["timestep_sampler"])
        self.step, self.last_loss = int(meta["step"]), float(meta["loss"])
        if self.budget is not None:
            self.budget.spent = float(meta.get("train_time", 0.0))
        if self.early is not None and meta.get("early_stopping") is not None:
            self.early.load_state_dict(meta["early_stopping"])
        self.stream.set_position(meta["data_position"])
        self.gens.shared.set_state(ck.rng["shared.noise"])
        prefix = f"rank{self.dist.rank}."
        if meta["world_size"] != self.dist.world_size or prefix + "torch_cpu" not in ck.rng:
            warnings.warn(
                f"checkpoint was written by {meta['world_size']} process(es), now "
                f"{self.dist.world_size}: per-rank RNG states restart from rank 0's",
                stacklevel=2,
            )
            prefix = "rank0."
        local = {k[len(prefix) :]: v for k, v in ck.rng.items() if k.startswith(prefix)}
        self._set_local_rng(local)
        return True

    # ------------------------------------------------------------------ the run
    def run(self, *, resume: bool = False, stop_at: int | None = None) -> TrainResult:
        """Train to ``train.max_steps`` (continuing from the checkpoint when ``resume``).

        :param stop_at: stop (and save) after this step, as if the job were cut off there;
            the LR schedule still runs to ``max_steps``.
        """
        tc = self.cfg.train
        last = tc.max_steps if stop_at is None else min(stop_at, tc.max_steps)
        self._start(resume)
        result = self._result = TrainResult(self.run_dir, self.step, self.last_loss)
        main = self.dist.is_main
        disable = (not main) or (None if self.show_progress is None else not self.show_progress)
        # Output to a file (no terminal) gets a plain line per logged step instead of a bar.
        self._plain = main and self.show_progress is None and not sys.stderr.isatty()
        self._start_step, self._start_time = self.step, time.perf_counter()
        if self.budget is not None:
            self.budget.start()
            if self.budget.exhausted:  # a resumed run whose budget was already spent
                last, self.stop_reason = self.step, "time budget"
        self._bar = bar = progress_bar(
            range(self.step, last), total=max(0, last - self.step), desc="train",
            disable=disable, leave=True,
        )  # fmt: skip
        self._window = _Window()
        run_steps(self, bar, last, save_every=tc.save_every)
        if hasattr(bar, "close"):
            bar.close()
        result.step, result.final_loss = self.step, self.last_loss
        result.stop_reason = self.stop_reason or "max_steps"
        if main:
            spent = self.budget.elapsed if self.budget is not None else None
            seconds = time.perf_counter() - self._start_time
            print(self._summary(self._start_step, seconds, spent), flush=True)
        result.ema_updates = self.ema.num_updates
        if result.skipped_steps and main:  # never silent: a skipped step trained nothing
            shown = ", ".join(map(str, result.skipped_steps[:10]))
            more = len(result.skipped_steps) - 10
            warnings.warn(
                f"on_nonfinite=skip skipped {len(result.skipped_steps)} of "
                f"{len(result.losses)} steps for a non-finite loss or gradient (step "
                f"{shown}{f' and {more} more' if more > 0 else ''}; see metrics.jsonl)",
                stacklevel=2,
            )
        return result

    def _start(self, resume: bool) -> bool:
        """Repair the run directory, restore the checkpoint when resuming, write the config
        and open the metrics log; returns whether a checkpoint was restored."""
        if self.dist.is_main:  # what a killed save left: temp files, a stale top-level file
            for fixed in repair_run_dir(self.run_dir):
                print(f"{self.run_dir}: {fixed}")
        if self.dist.distributed:
            dist.barrier()
        if resume:
            resumed = self.restore()
            changed = changed_keys(self.run_dir / "config.yaml", self.cfg)
            if changed:  # allowed (e.g. more steps), but worth a word
                warnings.warn(
                    f"resuming with changed config keys: {', '.join(changed)}", stacklevel=3
                )
            if resumed and self.dist.is_main:
                print(f"resuming {self.run_dir} from step {self.step}", flush=True)
        elif find_checkpoint(self.run_dir) is not None:
            raise ValueError(
                f"{self.run_dir} already holds a checkpoint; pass resume=True to continue it "
                "or choose another run_dir"
            )
        else:
            resumed = False
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, self.run_dir / "config.yaml")
            self.conditioning.write(self.run_dir)
            if resumed:  # the steps after the checkpoint run again: log them once
                truncate_metrics(self.run_dir, self.step)
            self.log = MetricsLog(self.run_dir, tensorboard=self.cfg.train.tensorboard)
            self.log.log({"event": "resume" if resumed else "start", "step": self.step})
        return resumed

    def after_step(self, rec: dict[str, Any], last: int) -> int:
        """After each step: the result, the log line, the hooks (grids, validation, periodic
        eval), the time budget and early stopping; returns the (possibly earlier) last step."""
        tc, result, win = self.cfg.train, self._result, self._window
        step = self.step
        if self._compile_pending:
            self._compile_pending = False
            self._report_compile(step, time.perf_counter() - self._step_began)
        result.losses.append(rec["loss"])
        if rec.get("skipped"):
            result.skipped_steps.append(step)
            self._log(rec)
        else:
            win.losses.append(rec["loss"])
            for key in ("loss_instance", "loss_prior", "loss_main", "loss_mix"):
                if rec.get(key) is not None:
                    win.parts.setdefault(key, []).append(rec[key])
            win.good = rec
        if step < last and self._budget_spent():  # train.max_time: this is the last
            last = self._end_early(step, "time budget")
        if hasattr(self._bar, "set_postfix"):
            left = {} if self.budget is None else {
                "left": format_duration(self.budget.remaining)}  # fmt: skip
            self._bar.set_postfix(loss=f"{rec['loss']:.4f}", **left)
        if win.losses and (step % tc.log_every == 0 or step == last):
            self._log_window(step, last)
        if tc.sample_every and step % tc.sample_every == 0:
            result.grids += self._grids()
        if tc.val_every and (step % tc.val_every == 0 or step == last):
            if record := self._validation():  # {} on ranks other than 0
                result.validation.append(record)
            if self._early_stop("val") and step < last:
                last = self._end_early(step, "early stopping")
        if tc.eval_every and (step % tc.eval_every == 0 or step == last):
            if record := self._periodic_eval():  # {} on ranks other than 0
                result.evals.append(record)
            if self._early_stop("eval") and step < last:
                last = self._end_early(step, "early stopping")
        return last

    def _log_window(self, step: int, last: int) -> None:
        """One metrics record (and, without a terminal, one printed line) for the steps
        since the last: their mean loss and throughput."""
        tc, win = self.cfg.train, self._window
        elapsed = max(time.perf_counter() - win.tick, 1e-9)
        n = len(win.losses) * tc.batch_size * tc.grad_accum
        mean = sum(win.losses) / len(win.losses)
        extra = {"step": step, "loss": mean, "imgs_per_s": n / elapsed, **self._extra()}
        extra.update({key: sum(v) / len(v) for key, v in win.parts.items()})
        record = {**win.good, **extra}
        self._log(record)
        if self._plain:
            since = time.perf_counter() - self._start_time
            left_s = None if self.budget is None else self.budget.remaining
            line = log_line(record, last, since, self._start_step, time_left=left_s)
            print(line, flush=True)
        self._window = _Window()

    def _summary(self, start_step: int, seconds: float, spent: float | None) -> str:
        """The run's last line: steps, time, last loss, why it stopped, where it is."""
        total = f", {format_duration(spent)} in all" if spent is not None else ""
        best = ""
        if self.early is not None and self.early.best_step >= 0:
            best = (f"; best {self.cfg.train.early_stop_metric} {self.early.best:.4g} at step "
                    f"{self.early.best_step} ({self.run_dir / BEST_FILE})")  # fmt: skip
        return (
            f"done: step {self.step} ({self.step - start_step} this session in "
            f"{format_duration(seconds)}{total}); last loss {self.last_loss:.4f}; stopped "
            f"by {self.stop_reason or 'max_steps'}{best}; run in {self.run_dir}"
        )

    def _end_early(self, step: int, reason: str) -> int:
        """This step is the run's last (time budget, early stopping): the post-hoc EMA gets
        its final snapshot here, as at ``max_steps``; returns the new last step."""
        self.stop_reason = reason
        ph = self.posthoc
        if ph is not None and ph.write and step % ph.config.every:
            ph.snapshot(step)
        return step

    def _budget_spent(self) -> bool:
        """Whether ``train.max_time`` is used up (every rank agrees, as rank 0 says)."""
        if self.budget is None:
            return False
        return rank0_says(self.budget.exhausted, self.dist)

    def _early_stop(self, kind: str) -> bool:
        """Early stopping after a validation (``kind="val"``) or periodic evaluation: keep
        the best EMA weights; True when patience ran out (every rank agrees)."""
        metric = self.cfg.train.early_stop_metric
        if self.early is None or metric.startswith("val") != (kind == "val"):
            return False
        stop = self.dist.is_main and self.early.observe(
            self._last_records.get(kind, {}), metric, self.step, self.ema.state_dict, self.run_dir
        )
        return rank0_says(stop, self.dist)

    def stopping(self, stop: list[int]) -> bool:
        """Whether a stop signal arrived on any rank (every rank stops after the same step)."""
        if not self.dist.distributed:
            return bool(stop)
        flag = any_rank(bool(stop), self.dist)
        if flag and not stop:
            stop.append(int(signal.SIGTERM))
        return flag

    def _report_compile(self, step: int, seconds: float) -> None:
        """Log (once) how long the first compiled step took, compilation included."""
        cache = self.run_dir / COMPILE_CACHE
        self._log({"step": step, "event": "compile", "seconds": seconds, "cache": str(cache)})
        if self.dist.is_main:
            print(
                f"train.compile: the first step took {seconds:.1f} s, compilation included "
                f"(inductor cache {cache})",
                flush=True,
            )

    def _extra(self) -> dict[str, Any]:
        return {
            "epoch": self.stream.epoch,
            "ema_decay": self.ema.current_decay,
            "ema_updates": self.ema.num_updates,
        }

    def _log(self, record: dict[str, Any]) -> None:
        if self.log is not None:
            self.log.log(record)

    # ------------------------------------------------------------------ hooks
    def _grids(self) -> list[Path]:
        return self.hooks.grids(self.step, self.model, self.ema.model)

    def _validation(self) -> dict[str, Any]:
        """Validation loss of the raw and EMA weights (rank 0), logged to metrics.jsonl."""
        record = self.hooks.validation(self.step, self.model, self.ema.model)
        if record:
            self._log(record)
            self._last_records["val"] = record
        return record

    def _periodic_eval(self) -> dict[str, Any]:
        """Score ``train.eval_n`` EMA samples (rank 0) and log them."""
        record = self.hooks.periodic_eval(self.step, self.ema.model)
        if record:
            self._log(record)
            self._last_records["eval"] = record
        return record

    def close(self) -> None:
        """Close logs, the data loader's workers and the process group this trainer created."""
        self.stream.close()
        if self.log is not None:
            self.log.close()
        self._exit.close()
        teardown_distributed(self.dist)


def train(
    config: TrainConfig,
    *,
    dataset: Dataset | None = None,
    model: nn.Module | None = None,
    resume: bool = False,
    progress: bool | None = None,
) -> TrainResult:
    """Train a diffusion model as ``config`` says; works alone and under ``torchrun``.

    :param config: the run (``load_config(path, overrides)``); the resolved config is written
        to ``run_dir/config.yaml``.
    :param dataset: data set of dicts; default ``difflab.data.build_dataset(config.data)``.
    :param model: a network honouring the contract; default the config's U-Net.
    :param resume: continue from ``run_dir``'s checkpoint bit for bit (fresh start if none).
    :param progress: progress bar on/off; None: on when stderr is a terminal.
    :raises NonFiniteError: on a NaN/inf loss or gradient with ``on_nonfinite: stop``.
    :raises TrainingInterrupted: on Ctrl-C or SIGTERM, after saving the step it stopped at.
    """
    with preserve_global_rng():
        parts = build_parts(config, dataset=dataset, model=model)
        trainer = Trainer(parts, progress=progress)
        try:
            return trainer.run(resume=resume)
        finally:
            trainer.close()
