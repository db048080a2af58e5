"""``recsys-embed fit/validate/test`` for graph collaborative filtering: ``GraphTask`` + ``GraphDataModule``.

A run is a graph run when its YAML says ``task: graph`` at the top (every ``experiments/graph/*.yaml`` does) or
the command line has ``--task graph``; everything else is a CTR run, unchanged. The graph CLI is the same
LightningCLI as the CTR one (one run folder, ``--test_after_fit``, one ``error:`` line per user error), with the
data's ``num_users``/``num_items`` and train degrees (the id counts of frequency-aware methods) linked to the
model::

    recsys-embed fit --config experiments/graph/ml100k_lightgcn.yaml --test_after_fit true
    recsys-embed fit --config experiments/graph/ml100k_lightgcn.yaml --model.embedding.method hash \\
        --model.embedding.budget.ratio 10
    recsys-embed test --config experiments/graph/ml100k_lightgcn.yaml --ckpt_path runs/.../last.ckpt

Staged methods (``optembed``, ``pep``, ``deeplight``) train their first stage inside ``GraphTask`` (the Python
API), but the graph CLI does not drive their later stages yet: it refuses them with one clear error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningArgumentParser

from recsys_embed.cli import RecsysCLI

TASK_OPTION = "--task"
TaskKind = Literal["ctr", "graph"]


def task_kind(argv: list[str]) -> str:
    """``graph`` when ``--task graph`` is given or a ``--config`` YAML has ``task: graph``; else ``ctr``."""
    kind = "ctr"
    for position, arg in enumerate(argv):
        value = None
        if arg in (TASK_OPTION, "--config", "-c") and position + 1 < len(argv):
            value = argv[position + 1]
        elif arg.startswith(TASK_OPTION + "=") or arg.startswith("--config="):
            value = arg.split("=", 1)[1]
        if value is None:
            continue
        if arg.startswith(TASK_OPTION):
            kind = value
        elif Path(value).is_file():
            loaded = yaml.safe_load(Path(value).read_text()) or {}
            kind = loaded.get("task", kind) if isinstance(loaded, dict) else kind
    return kind


def add_task_argument(parser: LightningArgumentParser, default: str = "ctr") -> None:
    """``--task ctr|graph``: which task a run trains (read before parsing, by :func:`task_kind`)."""
    parser.add_argument(
        TASK_OPTION,
        type=TaskKind,
        default=default,
        help="ctr (CTRTask + CTRDataModule) or graph (GraphTask + GraphDataModule; the experiments/graph "
        "configs set it).",
    )


class GraphCLI(RecsysCLI):
    """The CTR CLI's behaviour over ``GraphTask`` + ``GraphDataModule`` (sizes and degrees linked from the data)."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_users", "model.num_users", apply_on="instantiate")
        parser.link_arguments("data.num_items", "model.num_items", apply_on="instantiate")
        parser.link_arguments("data.id_counts", "model.id_counts", apply_on="instantiate")
        add_task_argument(parser, default="graph")
        parser.add_argument("--test_after_fit", type=bool, default=False, help="After fit, test the best checkpoint.")

    def fit(self, model: Any, datamodule: LightningDataModule | None = None, **kwargs: Any) -> None:
        names = [s.name for s in model.embedding.stages()]
        if len(names) > 1:
            raise ValueError(
                f"Method {model.embedding.name!r} has stages {names}: the graph CLI trains single-stage methods "
                "only (train its stages from Python with GraphTask, or pick another method)."
            )
        self.trainer.fit(model, datamodule=datamodule, **kwargs)

    def predict(self, model: Any, datamodule: LightningDataModule | None = None, **kwargs: Any) -> None:
        raise ValueError("recsys-embed predict writes click probabilities of CTR models; graph runs have fit/test.")
