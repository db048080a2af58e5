"""``python -m data_scripts COMMAND ...``: the same as ``recsys-embed data COMMAND ...``."""

import sys

from data_scripts.cli import main

sys.exit(main(prog="python -m data_scripts"))
