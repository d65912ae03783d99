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


def add_labelling_args(p: argparse.ArgumentParser, source: str) -> None:
    """--input / --output / --overwrite of the jobs that write pseudo-mask Parquet."""
    p.add_argument("--input", help="folder, URI (s3://, gs://, file://) or manifest of images")
    p.add_argument("--output", help="folder or URI for masks/, errors/ and run.json")
    p.add_argument(
        "--overwrite", action="store_true", help=f"replace an output written by another {source}"
    )


def config_overrides(args: argparse.Namespace, keys: tuple[str, ...]) -> list[str]:
    """--set values, then each given flag in `keys` as `key=value` (flags win)."""
    overrides = list(args.set)
    for key in keys:
        value = getattr(args, key)
        if value is True:
            overrides.append(f"{key}=true")
        elif value is not None and value is not False:
            overrides.append(f"{key}={value}")
    return overrides


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
