"""The `voiced` command line: one entry point, one sub-command per task.

Exit status 0 on success; otherwise non-zero with one clear line on stderr.
``--json`` output is one JSON document on stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

from voiced import __version__
from voiced.config import Config, load_config, to_dict, to_toml
from voiced.errors import VoicedError
from voiced.logsetup import setup_logging

log = logging.getLogger("voiced")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="voiced", description="Voice-cloning speech daemon.")
    parser.add_argument("--version", action="version", version=f"voiced {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="run the daemon in the foreground")
    p.add_argument("--config", help="config file (default: $VOICED_CONFIG, then the usual places)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("embed", help="print the speaker embedding of audio files (no daemon needed)")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("--json", action="store_true", help="one JSON document on stdout")
    p.add_argument("--config", help="config file (for the cache folder and the encoder settings)")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the cache")
    p.add_argument("--raw", action="store_true", help="skip volume normalisation and silence trimming")
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("check-config", help="validate a config file and print the resolved values")
    p.add_argument("--config", help="config file (default: $VOICED_CONFIG, then the usual places)")
    p.add_argument("--json", action="store_true", help="one JSON document on stdout")
    p.set_defaults(func=cmd_check_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except VoicedError as exc:
        print(f"voiced: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _config(args: argparse.Namespace) -> Config:
    return load_config(getattr(args, "config", None))


def cmd_serve(args: argparse.Namespace) -> int:
    config = _config(args)
    setup_logging("debug" if args.verbose else config.log.level, config.log.format)
    from voiced.daemon import serve  # heavy imports (torch) only where needed

    return serve(config)


def cmd_check_config(args: argparse.Namespace) -> int:
    config = _config(args)
    if args.json:
        print(json.dumps({"source": str(config.source) if config.source else None, **to_dict(config)}, indent=2))
    else:
        print(f"# resolved from {config.source or 'built-in defaults'}")
        print(to_toml(config), end="")
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    setup_logging("debug" if args.verbose else "warning", "text")
    config = _config(args)
    from voiced.embedding import embed_files

    results = embed_files(
        [Path(f) for f in args.files],
        config,
        use_cache=not args.no_cache,
        preprocess=config.encoder.preprocess and not args.raw,
    )
    failed = 0
    out: list[dict[str, Any]] = []
    for result in results:
        if result.error:
            failed += 1
            print(f"voiced: {result.file}: {result.error}", file=sys.stderr)
        if args.json:
            out.append(result.to_dict())
        elif result.embedding is not None:
            values = " ".join(f"{x:.6f}" for x in result.embedding)
            print(f"{result.file}\t{values}")
    if args.json:
        print(json.dumps({"embeddings": out}))
    return 1 if failed else 0



