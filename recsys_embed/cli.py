"""``recsys-embed``: LightningCLI subcommands ``fit``/``validate``/``test`` over ``CTRTask`` + ``CTRDataModule``,
and ``recsys-embed bench`` (the method x budget sweep, see :mod:`recsys_embed.benchmark.cli`).

Sizes that come from the data (cardinalities, number of dense features) are linked from the data module to the
model, so a config never repeats them. ``fit --test_after_fit true`` also tests the best checkpoint.

Checkpoints describe the model and method form that wrote them: with ``--ckpt_path FILE``, LightningCLI takes the
model's settings from the checkpoint's hyperparameters, so ``test``/``validate`` (and ``fit``) rebuild the net from
the checkpoint's ``description`` (its model class, its method's resolved form: no budget solve, no id counts read),
after checking that its tables match the data's.

Staged methods (more than one :class:`~recsys_embed.methods.Stage`): ``fit`` runs every stage from the same YAML,
each as its own ``Trainer.fit`` with checkpoints under ``--stages_dir`` (default ``<trainer.default_root_dir>/stages``,
one folder per stage and a ``state.json``, see :mod:`recsys_embed.training.stages`). Running the same command again
resumes where a killed run stopped; ``--stage NAME`` reruns from that stage. Single-stage methods train exactly as a
plain ``fit``.
"""

from __future__ import annotations

import copy
import logging
import sys
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningDataModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from recsys_embed.data import CTRDataModule
from recsys_embed.methods import Stage
from recsys_embed.training import CTRTask
from recsys_embed.training.stages import StagedRun, fingerprint, run_stages

log = logging.getLogger(__name__)


class RecsysCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.cardinalities", "model.cardinalities", apply_on="instantiate")
        parser.link_arguments("data.num_dense", "model.num_dense", apply_on="instantiate")
        parser.link_arguments("data.data_dir", "model.id_counts_dir", compute_fn=str, apply_on="instantiate")
        parser.add_argument("--test_after_fit", type=bool, default=False, help="After fit, test the best checkpoint.")
        parser.add_argument(
            "--stage",
            type=str | None,
            default=None,
            help="Staged methods: (re)start fit at this stage, from the previous stage's final checkpoint.",
        )
        parser.add_argument(
            "--stages_dir",
            type=str | None,
            default=None,
            help="Staged methods: the stages' checkpoints and state.json (default <trainer.default_root_dir>/stages).",
        )

    def fit(self, model: CTRTask, datamodule: LightningDataModule | None = None, **kwargs: Any) -> None:
        """A plain ``Trainer.fit`` for single-stage methods; every stage, resumable, for staged ones."""
        config = self.config.fit
        stages = model.embedding.stages()
        names = [s.name for s in stages]
        if config.stage is not None and config.stage not in names:
            raise ValueError(f"--stage {config.stage!r} is not a stage of method {model.embedding.name!r}: {names}.")
        if len(stages) == 1:
            self.trainer.fit(model, datamodule=datamodule, **kwargs)
            return
        if kwargs.get("ckpt_path") is not None:
            raise ValueError(
                f"Method {model.embedding.name!r} has stages {names}: a staged fit resumes from its stage folders "
                "when the same command runs again (or from --stage NAME); drop --ckpt_path."
            )
        stages_dir = Path(config.stages_dir or Path(self.trainer.default_root_dir) / "stages")
        settings = {key: _plain(config[key]) for key in ("model", "data", "seed_everything")}
        run = run_stages(
            model,
            datamodule,  # type: ignore[arg-type]
            self._stage_trainer,
            stages_dir=stages_dir,
            start=config.stage,
            run_fingerprint=fingerprint(_plain(settings)),
        )
        self._staged_run = run
        self.model = run.task
        if run.trainer is not None:
            self.trainer = run.trainer

    def _stage_trainer(self, stage: Stage, folder: Path | None) -> Trainer:
        """The configured Trainer for one stage: copies of the configured callbacks (ModelCheckpoints writing to
        the stage's folder), the same loggers, the stage's own ``max_epochs`` if it has one."""
        settings = dict(self._get(self.config_init, "trainer", default={}))
        configured = settings.get("callbacks") or []
        configured = configured if isinstance(configured, list) else [configured]
        callbacks = [copy.deepcopy(callback) for callback in configured]
        checkpoints = [c for c in callbacks if isinstance(c, ModelCheckpoint)]
        if not checkpoints and settings.get("enable_checkpointing") is not False:
            checkpoints = [ModelCheckpoint(save_last=True)]
            callbacks += checkpoints
        for checkpoint in checkpoints:
            checkpoint.dirpath = str(folder) if folder is not None else None
            if not checkpoint.save_last:
                checkpoint.save_last = True  # the stage's resume point
        callbacks += [c for c in self.trainer.callbacks if isinstance(c, SaveConfigCallback)]
        settings["callbacks"] = callbacks
        if stage.max_epochs is not None:
            settings["max_epochs"] = stage.max_epochs
        return Trainer(**settings)

    def after_fit(self) -> None:
        if not self.config.fit.get("test_after_fit"):
            return
        run: StagedRun | None = getattr(self, "_staged_run", None)
        if run is not None and run.trainer is None:  # every stage was done before: test the final form
            stage = self.model.embedding.stages()[-1]
            self._stage_trainer(stage, None).test(self.model, datamodule=self.datamodule)
            return
        ckpt = "best" if self.trainer.checkpoint_callback and self.trainer.checkpoint_callback.best_model_path else None
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=ckpt)


def _plain(value: Any) -> Any:
    """A parsed config section as plain dicts and lists (for fingerprints)."""
    if hasattr(value, "as_dict"):
        return value.as_dict()
    return value


BENCH_HINT = (
    "More commands: recsys-embed bench (the method x budget sweep; bench --help), recsys-embed methods (every "
    "compression method with its options, memory formula and reachable ratios) and recsys-embed data "
    "{criteo,frappe,movielens} (public datasets -> dataset folders; data --help)."
)


def main(args: list[str] | None = None) -> int | None:
    argv = args if args is not None else sys.argv[1:]
    package_log = logging.getLogger("recsys_embed")
    if not package_log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        package_log.addHandler(handler)
        package_log.setLevel(logging.INFO)
        package_log.propagate = False  # libraries (torchrec) may configure the root logger too: print once
    if argv[:1] == ["bench"]:
        from recsys_embed.benchmark.cli import main as bench_main

        return bench_main(argv[1:])
    if argv[:1] == ["methods"]:
        from recsys_embed.catalog import main as methods_main

        return methods_main(argv[1:])
    if argv[:1] == ["data"]:
        from data_scripts.cli import main as data_main

        return data_main(argv[1:])
    RecsysCLI(
        CTRTask,
        CTRDataModule,
        args=argv,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"inference_mode": False},
        parser_kwargs={"default_env": False, "epilog": BENCH_HINT},
    )
    return None


if __name__ == "__main__":
    sys.exit(main())
