"""Command line: `python -m lgur <command>`."""

from __future__ import annotations

import argparse
import json
import sys


def _print_table(rows: list[dict], keys: list[str]) -> None:
    widths = {k: max(len(k), *(len(_fmt(r.get(k))) for r in rows)) for k in keys}
    print("  ".join(k.ljust(widths[k]) for k in keys))
    for r in rows:
        print("  ".join(_fmt(r.get(k)).ljust(widths[k]) for k in keys))


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.2f}"
    if isinstance(v, int) and abs(v) >= 10_000:
        return f"{v:,}"
    return str(v)


def cmd_bench(args: argparse.Namespace) -> int:
    from . import bench

    if args.what == "model":
        rows = [bench.bench_model(p, batch=args.batch, repeats=args.repeats) for p in args.presets]
        result = {"benchmark": "model", "environment": bench.environment(), "presets": rows}
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            _print_table(
                rows,
                [
                    "preset",
                    "patch_grid",
                    "atoms",
                    "prototypes",
                    "embedding_dim",
                    "params_trainable",
                    "params_frozen",
                    "ms_per_image",
                    "ms_per_caption",
                ],
            )
        bench.write_json(result, args.out)
        return 0
    raise SystemExit(f"unknown benchmark {args.what!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lgur", description="LGUR Explorer: text-based person search")
    sub = parser.add_subparsers(dest="command", required=True)

    bench = sub.add_parser("bench", help="measure speed and size (prints figures, optionally JSON)")
    bench.add_argument("what", choices=["model"], help="what to benchmark")
    bench.add_argument("--presets", nargs="+", default=["cpu", "paper"], choices=["cpu", "paper"])
    bench.add_argument("--batch", type=int, default=8)
    bench.add_argument("--repeats", type=int, default=5)
    bench.add_argument("--json", action="store_true", help="print JSON instead of a table")
    bench.add_argument("--out", help="also write the JSON result to this file")
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
