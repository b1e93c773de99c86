"""`python -m data_prep {pages,render,evalset,recipe} ...`: see data_prep/cli.py."""

from common.errors import run_cli

from .cli import main

if __name__ == "__main__":
    run_cli(main)
