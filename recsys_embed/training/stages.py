"""A method's training stages, run in order: one ``Trainer.fit`` per stage, each with its own checkpoints, resumable.

A method declares its stages (:meth:`~recsys_embed.methods.EmbeddingMethod.stages`; single-stage methods have one,
``"train"``, and train exactly as a plain ``fit``). :func:`run_stages` fits each stage with a fresh ``Trainer``
(fresh optimizers; the new form's tables are fused again) and builds the next stage's form from the trained one
(:meth:`~recsys_embed.training.CTRTask.advance_stage`).

With a ``stages_dir`` (the CLI: ``<trainer.default_root_dir>/stages`` unless ``--stages_dir`` says otherwise) a
run is resumable. Layout::

    stages_dir/state.json          per stage: status (pending/running/done), time_s, steps, final checkpoint
    stages_dir/<stage>/last.ckpt   the stage's ModelCheckpoint files (the resume point inside the stage)
    stages_dir/<stage>/final.ckpt  the stage's trained form; the next stage starts from it

Running the same command again skips the done stages, resumes the running one from its ``last.ckpt`` (at the step
of the last checkpoint; add ``every_n_train_steps`` to the ModelCheckpoint for finer resume points) or, without
one, restarts it from the previous stage's ``final.ckpt``. ``start="name"`` (``--stage name``) reruns that stage
and the later ones from the previous stage's final checkpoint. ``state.json`` is replaced atomically, and a stage
is marked done only after its ``final.ckpt`` is written, so a kill at any point leaves a resumable folder. A
stage's recorded time is that of the segment that finished it (time spent before a kill is not counted).

After each stage's training the method's :meth:`~recsys_embed.methods.EmbeddingMethod.finish_stage` runs with
:func:`validation_auc` (a stage with ``max_epochs=0`` does only that, e.g. OptEmbed's evolutionary search); it is
part of the stage's time, and a kill inside it reruns it from the stage's start (the stage is not done yet).

Without a ``stages_dir`` (the benchmark runner) the stages run in memory, one after another, with no checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torchmetrics.functional.classification import binary_auroc

from recsys_embed.methods import Stage
from recsys_embed.training.ctr_task import CTRTask
from recsys_embed.training.distributed_checkpoint import remove_checkpoints

log = logging.getLogger(__name__)

#: builds the Trainer of one stage; the folder is where its checkpoints go (``None``: no checkpoints)
StageTrainerFactory = Callable[[Stage, Path | None], pl.Trainer]
STATE_FILE = "state.json"
STATE_FORMAT = "recsys_embed.stages/1"
FINAL_CHECKPOINT = "final.ckpt"
LAST_CHECKPOINT = "last.ckpt"


@dataclass
class StageResult:
    """One stage of a run: its wall time (all segments), steps, and the step it resumed from (``None``: none)."""

    name: str
    time_s: float
    steps: int
    resumed_from_step: int | None = None
    skipped: bool = False  # done before this call


@dataclass
class StagedRun:
    """What :func:`run_stages` leaves: the task in its last stage's trained form, the last stage's trainer
    (``None`` when every stage was already done), and every stage's result."""

    task: CTRTask
    trainer: pl.Trainer | None
    results: list[StageResult] = field(default_factory=list)

    def stage_times(self) -> dict[str, float]:
        return {r.name: round(r.time_s, 3) for r in self.results}


def fingerprint(settings: Any) -> str:
    """A short stable hash of a run's settings (JSON-able; anything else is turned into its string)."""
    blob = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class StageState:
    """``stages_dir/state.json``: the stages of one run (same fingerprint, same stage names) and where they are."""

    def __init__(self, folder: Path, run_fingerprint: str, method: str, names: list[str]) -> None:
        self.folder = folder
        self.path = folder / STATE_FILE
        if self.path.is_file():
            saved = json.loads(self.path.read_text())
            if saved.get("fingerprint") != run_fingerprint or saved.get("order") != names:
                raise ValueError(
                    f"{folder} holds the stages of another run (method {saved.get('method')!r}, stages "
                    f"{saved.get('order')}; its model/data settings differ from this command's): pass --stages_dir "
                    "with a new folder (or change trainer.default_root_dir), or delete the folder to start over."
                )
            self.data = saved
        else:
            self.data = {
                "format": STATE_FORMAT,
                "fingerprint": run_fingerprint,
                "method": method,
                "order": names,
                "stages": {n: {"status": "pending", "time_s": 0.0, "steps": 0} for n in names},
            }

    def __getitem__(self, name: str) -> dict[str, Any]:
        return self.data["stages"][name]

    def done(self, name: str) -> bool:
        return self[name]["status"] == "done" and (self.folder / name / FINAL_CHECKPOINT).is_file()

    def reset(self, name: str) -> None:
        """Forget a stage (it reruns from its start): pending, no time, its checkpoint files removed."""
        self.data["stages"][name] = {"status": "pending", "time_s": 0.0, "steps": 0}
        remove_checkpoints(self.folder / name)  # and their shards folders, if a sharded run wrote them

    def save(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{STATE_FILE}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.data, indent=2, sort_keys=True))
        os.replace(tmp, self.path)


def _checkpoint_step(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("global_step", 0))


def _log_stage_time(trainer: pl.Trainer, name: str, seconds: float) -> None:
    for logger in trainer.loggers:
        logger.log_metrics({f"stage_time_s/{name}": seconds}, step=trainer.global_step)
        logger.save()


def validation_auc(task: CTRTask, datamodule: pl.LightningDataModule) -> Callable[[int | None], float]:
    """``evaluate(max_batches)`` for :meth:`~recsys_embed.methods.EmbeddingMethod.finish_stage`: the AUC of ``task``
    (as it is at each call, in eval mode, no gradients) on the first ``max_batches`` validation batches, or on the
    whole validation split (``None``). The first ``max_batches`` batches are read once, on the task's device, and
    kept for the later calls (a search scores many candidates on them); the whole split is streamed at each call,
    never held. One process only: each rank would score its own slice of the data and the ranks' searches would
    part ways."""
    cached: list[Any] = []
    sources: list[Iterator[Any]] = []  # the val loader is opened at the first call only

    def first(max_batches: int) -> list[Any]:
        if not sources:
            sources.append(iter(datamodule.val_dataloader()))
        while len(cached) < max_batches and (batch := next(sources[0], None)) is not None:
            cached.append(batch.to(task.device))
        return cached[:max_batches]

    def evaluate(max_batches: int | None = None) -> float:
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            raise ValueError(
                "This stage's evaluation (a search on validation data) runs on one process, not "
                f"{torch.distributed.get_world_size()}: run this stage with --trainer.devices 1 (the stages before and "
                "after it may use more; resume with --stage NAME)."
            )
        batches = (
            first(max_batches) if max_batches is not None else (b.to(task.device) for b in datamodule.val_dataloader())
        )
        was_training = task.training
        task.eval()
        scores, labels = [], []
        with torch.no_grad():
            for batch in batches:
                scores.append(task(batch).float())
                labels.append(batch.labels.long())
        task.train(was_training)
        if not scores:
            raise ValueError("The stage's evaluation needs validation data: the datamodule's val split is empty.")
        return float(binary_auroc(torch.cat(scores), torch.cat(labels)))

    return evaluate


def _fit_stage(trainer: pl.Trainer, task: CTRTask, datamodule: pl.LightningDataModule, ckpt_path: str | None) -> None:
    """The stage's training, then the method's end-of-stage hook (a search on validation data, for example)."""
    trainer.fit(task, datamodule=datamodule, ckpt_path=ckpt_path)
    task.embedding.finish_stage(validation_auc(task, datamodule))


def run_stages(
    task: CTRTask,
    datamodule: pl.LightningDataModule,
    make_trainer: StageTrainerFactory,
    *,
    stages_dir: str | Path | None = None,
    start: str | None = None,
    run_fingerprint: str = "",
) -> StagedRun:
    """Fit every stage of ``task``'s method in order (see the module docstring); return the trained task.

    Args:
        task: the task in the method's first stage (as configured); rebuilt from checkpoints when resuming.
        datamodule: the data of every stage.
        make_trainer: ``(stage, folder) -> Trainer`` for one stage (its ModelCheckpoint should write to ``folder``).
        stages_dir: where the stages' checkpoints and ``state.json`` go (``None``: in memory, no resume).
        start: rerun from this stage (the previous stage's final checkpoint is loaded).
        run_fingerprint: the run's settings hash; a ``stages_dir`` of another run is a clear error.
    """
    stages = task.embedding.stages()
    names = [s.name for s in stages]
    if start is not None and start not in names:
        raise ValueError(f"--stage {start!r} is not a stage of method {task.embedding.name!r}; its stages: {names}.")
    if stages_dir is None:
        if start is not None and start != names[0]:
            raise ValueError("Starting at a later stage needs the stages' checkpoint folder (stages_dir).")
        return _run_in_memory(task, datamodule, make_trainer, stages)
    folder = Path(stages_dir)
    state = StageState(folder, run_fingerprint, task.embedding.name, names)
    if start is not None:
        first = names.index(start)
        missing = [n for n in names[:first] if not state.done(n)]
        if missing:
            raise ValueError(
                f"--stage {start!r} starts from the final checkpoint of stage {names[first - 1]!r}, but stage(s) "
                f"{missing} are not done under {folder}: run the earlier stages first (drop --stage)."
            )
        for name in names[first:]:
            state.reset(name)
    else:
        first = next((i for i, n in enumerate(names) if not state.done(n)), len(names))
    results = [StageResult(n, float(state[n]["time_s"]), int(state[n]["steps"]), skipped=True) for n in names[:first]]
    for name in names[:first]:
        log.info("Stage %r: done already (%s), skipped", name, folder / name / FINAL_CHECKPOINT)
    if first == len(names):
        log.info("Every stage of method %r is done under %s", task.embedding.name, folder)
        return StagedRun(task.from_checkpoint(folder / names[-1] / FINAL_CHECKPOINT), None, results)
    trainer: pl.Trainer | None = None
    for index in range(first, len(names)):
        stage, stage_dir = stages[index], folder / names[index]
        resume = stage_dir / LAST_CHECKPOINT
        resumed_from: int | None = None
        if index == first and start is None and resume.is_file():
            task = task.from_checkpoint(resume)
            resumed_from = _checkpoint_step(resume)
            log.info("Stage %r: resuming from %s (step %d)", stage.name, resume, resumed_from)
        else:
            remove_checkpoints(stage_dir)  # a stage started afresh leaves no files of an earlier try
            if index > 0:
                task = task.from_checkpoint(folder / names[index - 1] / FINAL_CHECKPOINT)
                task.advance_stage()
        if task.embedding.stage != stage.name:
            raise ValueError(
                f"Method {task.embedding.name!r}: the form built for stage {stage.name!r} says it is in stage "
                f"{task.embedding.stage!r}; next_stage() must build the next stage's form."
            )
        state[stage.name].update(status="running", started_at=_now())
        state.save()
        trainer = make_trainer(stage, stage_dir)
        started = time.perf_counter()
        _fit_stage(trainer, task, datamodule, str(resume) if resumed_from is not None else None)
        seconds = time.perf_counter() - started
        trainer.save_checkpoint(stage_dir / FINAL_CHECKPOINT)
        record = state[stage.name]
        record.update(
            status="done",
            time_s=round(float(record.get("time_s", 0.0)) + seconds, 3),
            steps=int(trainer.global_step),
            checkpoint=f"{stage.name}/{FINAL_CHECKPOINT}",
            finished_at=_now(),
        )
        state.save()
        _log_stage_time(trainer, stage.name, record["time_s"])
        log.info("Stage %r done: %.1f s, %d steps (%s)", stage.name, record["time_s"], trainer.global_step, stage_dir)
        results.append(StageResult(stage.name, record["time_s"], int(trainer.global_step), resumed_from))
    return StagedRun(task, trainer, results)


def _run_in_memory(
    task: CTRTask, datamodule: pl.LightningDataModule, make_trainer: StageTrainerFactory, stages: list[Stage]
) -> StagedRun:
    results = []
    trainer: pl.Trainer | None = None
    for index, stage in enumerate(stages):
        if index:
            task.advance_stage()
        trainer = make_trainer(stage, None)
        started = time.perf_counter()
        _fit_stage(trainer, task, datamodule, None)
        seconds = time.perf_counter() - started
        if len(stages) > 1:
            _log_stage_time(trainer, stage.name, seconds)
            log.info("Stage %r done: %.1f s, %d steps", stage.name, seconds, trainer.global_step)
        results.append(StageResult(stage.name, seconds, int(trainer.global_step)))
    return StagedRun(task, trainer, results)
