"""The `basin` command: run a study, report on a run directory, list shipped configs and
optimizers, print a resolved config or the config reference."""

from __future__ import annotations

import argparse
import json
import os
import sys

# One BLAS thread per process: the group program's own threads use the cores (on a
# small CPU, OpenBLAS's pool beside XLA's oversubscribes them). Set before numpy loads.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import transforms as tx  # noqa: E402

from experiments import config as cfglib  # noqa: E402
from experiments import rundir, studies  # noqa: E402
from experiments.run import load, run, write_report  # noqa: E402
from experiments.store import StoreError  # noqa: E402


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage block
        print(f"basin: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="basin", description="Basin: the geometry of optimization.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    r = sub.add_parser("run", help="run a study (default: the sharpness-vs-generalization study)")
    r.add_argument("config", nargs="?", help="a .toml path or the name of a shipped config")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (TOML literal), e.g. --set train.steps=500")
    r.add_argument("--out", help="run directory (default runs/<name>-<time>)")
    r.add_argument("--resume", metavar="DIR", help="continue a run, skipping finished groups")
    r.add_argument("--add", action="store_true",
                   help="add this study's groups to an --out that holds another study")
    r.add_argument("--yes", action="store_true",
                   help=f"run a grid above {cfglib.MAX_MEMBERS:,} members")
    r.add_argument("--no-report", action="store_true", help="skip writing the report")
    rep = sub.add_parser("report", help="write report.md and figures for a run directory")
    rep.add_argument("dir")
    ls_ = sub.add_parser("list", help="list the shipped configs")
    ls_.add_argument("--optimizers", action="store_true",
                     help="list every name `optimizer.name` accepts, with its defaults")
    c = sub.add_parser("config", help="print a resolved config, or the config reference")
    c.add_argument("config", nargs="?", help="config path or shipped name")
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, as for run")
    c.add_argument("--reference", action="store_true",
                   help="print every table, key, type and default (Markdown)")
    return p


def _list(optimizers: bool) -> None:
    if optimizers:
        for name, source, hyper in tx.describe():
            defaults = ", ".join(f"{k}={v!r}" for k, v in hyper.items())
            print(f"{name:24s} {source:14s} {defaults}")
        return
    for name in cfglib.list_configs():
        print(f"{name:32s} {load(name)['description']}")


def _one_line(error: Exception) -> str:
    """An error's message on one line (a stored name may carry newlines)."""
    return " ".join(str(error).split())


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "list":
            _list(args.optimizers)
            return 0
        if args.command == "config":
            if args.reference and (args.config or args.set):
                raise cfglib.ConfigError("--reference prints the reference of every "
                                         "config; drop the config and --set arguments")
            print(cfglib.reference(studies.tables()) if args.reference else
                  json.dumps(load(args.config, args.set), indent=2))
            return 0
        if args.command == "report":
            print(write_report(args.dir))
            return 0
        if args.resume and (args.config or args.set):
            raise cfglib.ConfigError("--resume takes the run's stored config; drop the "
                                     "config and --set arguments")
        def log(msg: str) -> None:
            print(f"basin: {msg}", file=sys.stderr, flush=True)

        results = run(args.config, overrides=args.set, out=args.out, resume=args.resume,
                      add=args.add, allow_large=args.yes,
                      progress="bar" if sys.stderr.isatty() else "lines",
                      log=log)
        if not args.no_report:
            print(write_report(results.path))
        else:
            print(results.path)
        return 0
    except (cfglib.ConfigError, rundir.RunDirError, StoreError, FileNotFoundError,
            NotADirectoryError, PermissionError) as e:
        print(f"basin: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `basin list | head`: the reader has gone; not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("basin: interrupted; finished groups are stored (continue with --resume)",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
