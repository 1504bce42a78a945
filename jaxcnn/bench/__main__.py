"""`python -m jaxcnn.bench SUBCOMMAND ...`: see jaxcnn/bench/__init__.py."""

from jaxcnn.bench import main
from jaxcnn.config import run_cli

run_cli(main)
