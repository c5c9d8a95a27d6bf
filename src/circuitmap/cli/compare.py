"""``compare``: two graph folders side by side: shared, vanished and new features and supernodes."""

from __future__ import annotations

import argparse
import json

from circuitmap.atomic import atomic_write, check_writable
from circuitmap.cli import positive_int
from circuitmap.graphs.compare import compare_graphs


def register(commands) -> None:
    parser = commands.add_parser(
        "compare",
        help="compare two graphs: the features and supernodes they share, and how their influence changes",
    )
    parser.add_argument("a", help="graph folder A (graph.json and graph.safetensors, as attribute writes)")
    parser.add_argument("b", help="graph folder B, of the same model and transcoder set")
    parser.add_argument(
        "--top", type=positive_int, default=10, metavar="N", help="rows listed per section (default 10)"
    )
    parser.add_argument("--json", metavar="FILE", help="also write the whole comparison as JSON to FILE")
    parser.set_defaults(run=_compare)


def _compare(args: argparse.Namespace) -> int:
    if args.json:
        check_writable(args.json, "the JSON file")
    comparison = compare_graphs(args.a, args.b)
    print(comparison.table(args.top))
    if args.json:
        text = json.dumps(comparison.as_json(), indent=1, ensure_ascii=False, allow_nan=False)
        atomic_write(args.json, lambda temporary: temporary.write_text(text, encoding="utf-8"))
        print(f"wrote {args.json}")
    return 0
