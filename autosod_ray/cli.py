"""Shared command-line plumbing for jobs/*.py: --config, --set, errors as messages."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from .config import UserError, load_config

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


def add_force_unlock(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--force-unlock",
        action="store_true",
        help="take the output from another run that still holds its lease (if it is dead)",
    )


def add_labelling_args(p: argparse.ArgumentParser, source: str) -> None:
    """--input / --output / --overwrite / --force-unlock of the jobs that write pseudo-mask
    Parquet."""
    p.add_argument("--input", help="folder, URI (s3://, gs://, file://) or manifest of images")
    p.add_argument("--output", help="folder or URI for masks/, errors/ and run.json")
    p.add_argument(
        "--overwrite", action="store_true", help=f"replace an output written by another {source}"
    )
    add_force_unlock(p)


def config_flags(args: argparse.Namespace, keys: tuple[str, ...]) -> dict:
    """Each given flag in `keys` as a config value of its own type (a path stays a string,
    whatever it looks like); they win over --set and the file."""
    flags = {}
    for key in keys:
        value = getattr(args, key)
        if value is not None and value is not False:
            flags[key] = value
    return flags


def load_job_config(schema, args: argparse.Namespace, keys: tuple[str, ...]):
    """The job's config: --config file, then --set overrides, then the flags in `keys`."""
    return load_config(schema, args.config, args.set, config_flags(args, keys))


def run_job(main: Callable[[], int]) -> None:
    """Run a job's main; a user error becomes one clear line and exit status 2. Any other
    exception is a bug: its traceback is printed and the exit status is 1."""
    try:
        code = main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        code = 2
    sys.exit(code)
