"""``overcommitd trace convert`` and ``overcommitd trace info``: arguments and output."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from overcommitd.model import parse_kib
from sim.memory import traces as trace_io
from sim.memory.trace_convert import SOURCE_FORMATS, PercentLayout, convert, parse_start
from sim.memory.trace_info import describe, format_info
from sim.memory.trace_loader import load_all
from sim.memory.traces import TraceError


def add_trace_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("trace", help="traces: convert to overcommitd's format (docs/trace-format.md), describe them")
    trace_sub = p.add_subparsers(dest="trace_command", required=True)

    p = trace_sub.add_parser("convert", help="write traces in overcommitd's documented format")
    p.add_argument("--from", dest="source", choices=SOURCE_FORMATS, required=True, help="the input format")
    p.add_argument("paths", type=Path, nargs="+", metavar="PATH", help="input files or directories")
    p.add_argument("--out", type=Path, required=True, help="output directory (guests-<format>.csv.gz)")
    p.add_argument("--parquet", action="store_true", help="write Parquet instead of gzipped CSV")
    p.add_argument("--machine-size", default="512GiB", help="google2019: the machine its values are normalised to")
    g = p.add_argument_group("percent: utilisation in %% of a VM size")
    g.add_argument("--vm-size", help="the size the percentages are of, e.g. 4GiB")
    g.add_argument("--period-s", type=float, help="seconds between rows (without --time-column)")
    g.add_argument("--start", default="0", help="time of the first row: epoch seconds or ISO 8601 (default 0)")
    g.add_argument(
        "--layout",
        choices=("wide", "long"),
        default="wide",
        help="wide: a column per VM (or a file per VM); long: a row per VM per sample",
    )
    g.add_argument(
        "--column",
        action="append",
        default=[],
        help="value column(s), by name or 0-based index (wide: default all but the time column)",
    )
    g.add_argument("--id-column", help="long: the VM id column")
    g.add_argument("--time-column", help="a column of times in seconds (else row number x --period-s)")
    g.add_argument("--no-header", action="store_true", help="the CSV has no header row (give columns by index)")
    g.add_argument("--delimiter", default=",", help="field separator (default ,)")
    p.set_defaults(func=convert_command)

    p = trace_sub.add_parser("info", help="per guest and overall: span, period, gaps, size, use, rises, notes")
    p.add_argument("paths", type=Path, nargs="+", metavar="PATH", help="trace files or directories (any format)")
    p.add_argument("--json", type=Path, help="also write the figures as JSON here")
    p.add_argument(
        "--max-gap-s",
        type=float,
        default=trace_io.DEFAULT_MAX_GAP_S,
        help="gaps longer than this are cut (default %(default)s, as the replay does)",
    )
    p.add_argument("--machine-size", default="512GiB", help="google2019: the machine its values are normalised to")
    p.set_defaults(func=info_command)


def _size_kib(option: str, text: str) -> int:
    try:
        kib = parse_kib(text)
    except ValueError as e:
        raise TraceError(f"{option}: {e}") from None
    if not isinstance(kib, int) or kib <= 0:
        raise TraceError(f"{option}: {text!r} must be a size > 0, e.g. 4GiB")
    return kib


def convert_command(args: argparse.Namespace) -> int:
    percent = None
    if args.source == "percent":
        if args.vm_size is None or (args.period_s is None and args.time_column is None):
            raise TraceError("--from percent needs --vm-size and --period-s (or --time-column)")
        percent = PercentLayout(
            vm_size_kib=_size_kib("--vm-size", args.vm_size),
            period_s=args.period_s or 0.0,
            start_s=parse_start(args.start),
            layout=args.layout,
            value_columns=tuple(args.column),
            id_column=args.id_column,
            time_column=args.time_column,
            header=not args.no_header,
            delimiter=args.delimiter,
        )
    result = convert(
        args.source,
        args.paths,
        args.out,
        machine_kib=_size_kib("--machine-size", args.machine_size),
        percent=percent,
        parquet=args.parquet,
    )
    for note in result.notes:
        print(f"overcommitd: note: {note}", file=sys.stderr)
    print(f"{result.out}: {result.guests} guests, {result.rows} rows")
    return 0


def info_command(args: argparse.Namespace) -> int:
    loaded = load_all(args.paths, machine_kib=_size_kib("--machine-size", args.machine_size), max_gap_s=args.max_gap_s)
    info = describe(loaded)
    print(format_info(info))
    if args.json:
        args.json.write_text(json.dumps(info.as_dict(), indent=2) + "\n")
    return 0
