"""``recsys-embed``: LightningCLI subcommands ``fit``/``validate``/``test`` over ``CTRTask`` + ``CTRDataModule``
(or ``GraphTask`` + ``GraphDataModule`` for a YAML with ``task: graph``, see :mod:`recsys_embed.graph_cli`),
and ``recsys-embed bench`` (the method x budget sweep, see :mod:`recsys_embed.benchmark.cli`).

Sizes that come from the data (cardinalities, number of dense features) are linked from the data module to the
model, so a config never repeats them. ``fit --test_after_fit true`` also tests the best checkpoint.

Checkpoints describe the model and method form that wrote them: with ``--ckpt_path FILE``, LightningCLI takes the
model's settings from the checkpoint's hyperparameters, so ``test``/``validate`` (and ``fit``) rebuild the net from
the checkpoint's ``description`` (its model class, its method's resolved form: no budget solve, no id counts read),
after checking that its tables match the data's.

``predict --ckpt_path FILE`` writes the click probability of every row of the test split (``--predict_split``,
or any parquet file of the data's schema with ``--predict_file``) to parquet (``--predict_output``, default
``<trainer.default_root_dir>/predictions/<split or file name>.parquet``; see
:mod:`recsys_embed.training.predictions`).

One ``fit`` writes one run folder, ``<save_dir>/lightning_logs/version_N/``: the CSV metrics, the TensorBoard
events, ``hparams.yaml``, ``config.yaml`` and ``checkpoints/`` (see :mod:`recsys_embed.training.run_folder`).

A user error (a ``ValueError`` of ours, a bad option) prints one line, ``error: ...``, and exits with status 2;
``--debug`` (or ``RECSYS_EMBED_DEBUG=1``) shows its traceback instead. Internal bugs always show theirs (see
:mod:`recsys_embed.console`).

Staged methods (more than one :class:`~recsys_embed.methods.Stage`): ``fit`` runs every stage from the same YAML,
each as its own ``Trainer.fit`` with checkpoints under ``--stages_dir`` (default ``<trainer.default_root_dir>/stages``,
one folder per stage and a ``state.json``, see :mod:`recsys_embed.training.stages`). Running the same command again
resumes where a killed run stopped; ``--stage NAME`` reruns from that stage. Single-stage methods train exactly as a
plain ``fit``.
"""

from __future__ import annotations

import argparse
import copy
import difflib
import logging
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningDataModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI, SaveConfigCallback
from torch.utils.data import DataLoader

from recsys_embed.console import (
    CompactHelpFormatter,
    HeldLogs,
    UsageError,
    debug_requested,
    package_logger,
    quiet_iterable_length_warning,
    quiet_library_noise,
    user_error_message,
)
from recsys_embed.data import CTRDataModule, GraphDataModule
from recsys_embed.methods import Stage, available_methods
from recsys_embed.training import CTRTask, GraphTask
from recsys_embed.training.predictions import PredictionBatches, PredictionWriter
from recsys_embed.training.run_folder import share_run_folder
from recsys_embed.training.stages import StagedRun, fingerprint, run_stages

log = logging.getLogger(__name__)


class RecsysCLI(LightningCLI):
    """LightningCLI over ``CTRTask`` + ``CTRDataModule`` with data-linked sizes, staged fits and ``predict`` to
    parquet. ``on_ready`` is called once the classes are built and checked (``main`` prints the held setup logs
    then)."""

    def __init__(self, *args: Any, on_ready: Callable[[], None] | None = None, **kwargs: Any) -> None:
        self._on_ready = on_ready
        super().__init__(*args, **kwargs)

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        """Parse as LightningCLI does; a usage error becomes one :class:`UsageError` line (with the closest
        option to an unknown one, and where the options are listed)."""
        try:
            super().parse_arguments(parser, args)
        except argparse.ArgumentError as error:
            argv = [a for a in (args or []) if isinstance(a, str)]
            raise UsageError(self._usage_message(str(error), argv)) from error

    def _usage_message(self, message: str, argv: list[str]) -> str:
        subcommand = next((a for a in argv if a in self._subcommand_parsers), None)
        prog = "recsys-embed" + (f" {subcommand}" if subcommand else "")
        message = " ".join(message.split())
        unknown = re.findall(r"(--[\w.]+)", message) if "unrecognized arguments" in message else []
        if subcommand and unknown:
            known = [o for a in self._subcommand_parsers[subcommand]._actions for o in a.option_strings]
            close = difflib.get_close_matches(unknown[0], known, n=1, cutoff=0.7)
            if close:
                message += f"; did you mean {close[0]}?"
        return f"{message} (see {prog} --help)"

    def _add_subcommands(self, parser: LightningArgumentParser, **kwargs: Any) -> None:
        """Lightning's subcommands, listed with the sentences of :data:`SUBCOMMANDS` (Lightning lists the first
        line of each ``Trainer`` method's docstring, often cut mid-sentence), then the commands ``main`` runs
        itself (:data:`OTHER_COMMANDS`), so that ``recsys-embed --help`` lists every command."""
        super()._add_subcommands(parser, **kwargs)
        commands = parser._subcommands_action
        for listed in commands._choices_actions:  # argparse's help entries, one per subcommand
            listed.help = SUBCOMMANDS[listed.dest]
        for name, sentence in OTHER_COMMANDS.items():
            commands._choices_actions.append(commands._ChoicesPseudoAction(name, (), sentence))
        commands.metavar = "{" + ",".join([*SUBCOMMANDS, *OTHER_COMMANDS]) + "}"

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any) -> LightningArgumentParser:
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        for action in parser._actions:  # the embedding spec is a dataclass without per-field help
            if action.dest in EMBEDDING_HELP:
                action.help = EMBEDDING_HELP[action.dest].format(methods=", ".join(available_methods()))
        if subcommand == "predict":
            parser.add_argument(
                "--predict_split",
                type=str,
                default="test",
                help="The data's split to predict on (ignored with --predict_file).",
            )
            parser.add_argument(
                "--predict_file",
                type=str | None,
                default=None,
                help="A parquet file with the data's dense and categorical columns (label optional) to predict on.",
            )
            parser.add_argument(
                "--predict_output",
                type=str | None,
                default=None,
                help="Where to write the predictions (parquet: row, label if known, score = sigmoid(logit)); "
                "default <trainer.default_root_dir>/predictions/<split or file name>.parquet.",
            )
        return parser

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The configured Trainer, its CSV and TensorBoard loggers writing to one run folder (with the
        checkpoints and config.yaml, see :mod:`recsys_embed.training.run_folder`)."""
        trainer = super().instantiate_trainer(**kwargs)
        share_run_folder(trainer.loggers)  # the stages' trainers reuse these logger objects
        return trainer

    def after_instantiate_classes(self) -> None:
        """Check what can be checked before running (a fit's --stage), then let the setup logs out."""
        config = self.config.get(self.subcommand) if self.subcommand else None
        if self.subcommand == "fit" and config is not None and config.get("stage") is not None:
            names = [s.name for s in self.model.embedding.stages()]
            if config.stage not in names:
                raise ValueError(
                    f"--stage {config.stage!r} is not a stage of method {self.model.embedding.name!r}: use one of "
                    f"{names} (or drop --stage)."
                )
        if isinstance(self.datamodule, CTRDataModule) and self.datamodule.num_workers <= 1:
            quiet_iterable_length_warning()
        if self._on_ready is not None:
            self._on_ready()

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        from recsys_embed.graph_cli import add_task_argument

        add_task_argument(parser)
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
            raise ValueError(
                f"--stage {config.stage!r} is not a stage of method {model.embedding.name!r}: use one of {names}."
            )
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
        # the config-saving callback holds the parser (not copyable): the trainer's own one is added back below
        callbacks = [copy.deepcopy(c) for c in configured if not isinstance(c, SaveConfigCallback)]
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

    def predict(self, model: CTRTask, datamodule: LightningDataModule | None = None, **kwargs: Any) -> None:
        """Predict every row of a split (or a given parquet file) and write them to parquet."""
        if not isinstance(datamodule, CTRDataModule):
            raise ValueError("recsys-embed predict needs the CTR data module (--data) for the data's schema.")
        config = self.config.predict
        if config.predict_file:
            source = Path(config.predict_file)
        else:
            source = datamodule.schema.split_path(datamodule.data_dir, config.predict_split)
        name = source.stem if config.predict_file else config.predict_split
        output = Path(config.predict_output or Path(self.trainer.default_root_dir) / "predictions" / f"{name}.parquet")
        dataset = PredictionBatches(source, datamodule.schema, datamodule.eval_batch_size)
        self.trainer.callbacks.append(PredictionWriter(output, has_labels=dataset.has_labels))
        kwargs["return_predictions"] = False  # written to the file as they come, not kept in memory
        self.trainer.predict(model, dataloaders=DataLoader(dataset, batch_size=None), **kwargs)


def _plain(value: Any) -> Any:
    """A parsed config section as plain dicts and lists (for fingerprints)."""
    if hasattr(value, "as_dict"):
        return value.as_dict()
    return value


DESCRIPTION = "Train, evaluate and apply CTR models with compressed embedding tables (--debug: show tracebacks)."
EPILOG = "Run 'recsys-embed COMMAND --help' for a command's options."
#: one sentence per LightningCLI subcommand (Lightning's own are cut mid-sentence in the listing)
SUBCOMMANDS = {
    "fit": "Train a model (every stage of a staged method); --test_after_fit true also tests the best checkpoint.",
    "validate": "Evaluate a model (e.g. --ckpt_path FILE) on the validation split.",
    "test": "Evaluate a model (e.g. --ckpt_path FILE) on the test split.",
    "predict": "Write the click probability of every row of a split or parquet file to parquet (--ckpt_path FILE).",
}
#: the commands ``main`` runs itself (not LightningCLI subcommands), listed with those in ``--help``
OTHER_COMMANDS = {
    "bench": "Run the method x memory budget benchmark sweep, then write its report and Pareto plot.",
    "methods": "Show every compression method with its options, memory formula and reachable ratios.",
    "data": "Turn a downloaded public dataset (criteo, avazu, kdd12, frappe, movielens; graph) into a dataset folder.",
}
#: help of the embedding spec's options in fit/validate/test/predict --help ({methods}: the registered names)
EMBEDDING_HELP = {
    "model.embedding.method": "The compression method, one of: {methods} (recsys-embed methods NAME shows its "
    "options, memory formula and reachable ratios).",
    "model.embedding.budget": "The embedding memory budget the method sizes itself to: --model.embedding.budget."
    "ratio R (R times smaller than full fp32 tables) or ...budget.bytes N; leave out to give the method's options.",
    "model.embedding.options": "The method's own options (e.g. {{rows: 100000}} for hash), used as given without a "
    "budget; recsys-embed methods NAME lists them.",
}
SUBCOMMAND_USAGE = "%(prog)s [-c CONFIG] [--print_config] [--OPTION VALUE ...] [--debug]"


def main(args: list[str] | None = None) -> int | None:
    """The ``recsys-embed`` entry point: ``fit``/``validate``/``test``/``predict`` (LightningCLI), ``bench``,
    ``methods``, ``data``. Returns the exit status: ``None`` (success) or 2 after printing a user error's one line."""
    debug, argv = debug_requested(list(sys.argv[1:] if args is None else args))
    package_logger()
    quiet_library_noise()
    with HeldLogs() as held:
        try:
            return _run(argv, held)
        except Exception as error:
            message = user_error_message(error)
            if message is None or debug:
                held.release()
                raise
            held.discard()
            sys.stderr.write(f"error: {message}\n")
            return 2


def _run(argv: list[str], held: HeldLogs) -> int | None:
    if argv[:1] == ["bench"]:
        from recsys_embed.benchmark.cli import main as bench_main

        held.release()
        return bench_main(argv[1:])
    if argv[:1] == ["methods"]:
        from recsys_embed.catalog import main as methods_main

        held.release()
        return methods_main(argv[1:])
    if argv[:1] == ["data"]:
        from data_scripts.cli import main as data_main

        held.release()
        return data_main(argv[1:])
    parser_kwargs: dict[str, Any] = {"default_env": False, "epilog": EPILOG, "prog": "recsys-embed"}
    parser_kwargs |= {"exit_on_error": False, "formatter_class": CompactHelpFormatter, "description": DESCRIPTION}
    for subcommand, description in SUBCOMMANDS.items():
        parser_kwargs[subcommand] = {
            "exit_on_error": False,
            "formatter_class": CompactHelpFormatter,
            "usage": SUBCOMMAND_USAGE,  # the full one lists every option again (~90 lines)
            "description": description,
        }
    from recsys_embed.graph_cli import GraphCLI, task_kind

    graph = task_kind(argv) == "graph"  # a YAML with `task: graph`, or --task graph (see recsys_embed.graph_cli)
    (GraphCLI if graph else RecsysCLI)(
        GraphTask if graph else CTRTask,
        GraphDataModule if graph else CTRDataModule,
        args=argv,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"inference_mode": False},
        parser_kwargs=parser_kwargs,
        on_ready=held.release,
    )
    return None


if __name__ == "__main__":
    sys.exit(main())
