"""``recsys-embed``: LightningCLI subcommands ``fit``/``validate``/``test`` over ``CTRTask`` + ``CTRDataModule``,
and ``recsys-embed bench`` (the method x budget sweep, see :mod:`recsys_embed.benchmark.cli`).

Sizes that come from the data (cardinalities, number of dense features) are linked from the data module to the
model, so a config never repeats them. ``fit --test_after_fit true`` also tests the best checkpoint.
"""

from __future__ import annotations

import logging
import sys

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from recsys_embed.data import CTRDataModule
from recsys_embed.training import CTRTask


class RecsysCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.cardinalities", "model.cardinalities", apply_on="instantiate")
        parser.link_arguments("data.num_dense", "model.num_dense", apply_on="instantiate")
        parser.link_arguments("data.data_dir", "model.id_counts_dir", compute_fn=str, apply_on="instantiate")
        parser.add_argument("--test_after_fit", type=bool, default=False, help="After fit, test the best checkpoint.")

    def after_fit(self) -> None:
        if self.config.fit.get("test_after_fit"):
            ckpt = (
                "best"
                if self.trainer.checkpoint_callback and self.trainer.checkpoint_callback.best_model_path
                else None
            )
            self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=ckpt)


BENCH_HINT = "Benchmark sweep (every method x budget): recsys-embed bench --help"


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
