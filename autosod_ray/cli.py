"""Shared command-line plumbing for jobs/*.py: --config, --set, errors as messages."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from .config import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def job_parser(description: str, default_config: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument(
        "--config",
        default=str(CONFIGS / default_config),
        help=f"YAML config (default: configs/{default_config})",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config key, e.g. potnet.num_clusters=4 (repeatable)",
    )
    return p


def run_job(main: Callable[[], int]) -> None:
    """Run a job's main; a user error becomes one clear line and exit status 2."""
    from .data.uris import InputError

    user_errors = (ConfigError, InputError, ValueError, FileNotFoundError)
    try:
        code = main()
    except user_errors as err:
        print(f"error: {err}", file=sys.stderr)
        code = 2
    sys.exit(code)
