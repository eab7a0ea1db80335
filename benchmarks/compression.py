"""Bytes to accuracy: compressed gossip (top-k + int8) against dense averaging.

Runs ``gossipfl demo`` twice in one go, same seed, same nodes and data shards:

* ``topk-int8``: the defaults (top 5% of entries, block-scaled int8, error
  feedback, consensus step 0.5);
* ``none``: dense float32 messages with consensus step 1.0, i.e. exact pairwise
  averaging.

For each it prints the bytes one node had sent (mean over nodes) when the mean
held-out accuracy first reached ``--target``, the wall time, and the final accuracy;
then the ratio dense / compressed of those bytes. The requirement is a ratio of at
least ``REQUIRED_RATIO``. Bytes are counted by the nodes themselves (every request
and reply they sent, headers and signatures included) and sampled by the demo's
watcher every quarter second, so the figure is the first sample at or above the
target. Seconds count from the launch of the processes, so they include the
interpreter and torch start-up; they are shown for context only: the two runs
share a machine but not an instant.

    python benchmarks/compression.py [--nodes 8] [--rounds 150] [--seed 0]
                                     [--target 0.92] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from typing import Any

from gossipfl.demo import DemoOptions, run_demo

REQUIRED_RATIO = 15.0
RUNS = {  # label: (compression, consensus step)
    "topk-int8": ("topk-int8", 0.5),
    "dense": ("none", 1.0),
}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for label, (compression, step) in RUNS.items():
        print(f"running {label}: {args.nodes} nodes, {args.rounds} rounds, seed "
              f"{args.seed} ...", file=sys.stderr, flush=True)
        opts = DemoOptions(nodes=args.nodes, rounds=args.rounds,
                           compression=compression, consensus_step=step,
                           seed=args.seed, target=args.target)
        with contextlib.redirect_stdout(sys.stderr):  # progress lines; stdout: result
            report = run_demo(opts)
        reach = report["first_reach"]
        results[label] = {
            "compression": compression,
            "consensus_step": step,
            "bytes_to_target_per_node": reach and reach["bytes_per_node"],
            "seconds_to_target": reach and reach["seconds"],
            "round_to_target": reach and reach["mean_round"],
            "wall_seconds": report["wall_seconds"],
            "final_accuracy_mean": report["final_accuracy"]["mean"],
            "final_accuracy_min": report["final_accuracy"]["min"],
            "consensus_distance": report["consensus_distance"],
            "merge_path": report["merge_path"],
        }
    compressed = results["topk-int8"]["bytes_to_target_per_node"]
    dense = results["dense"]["bytes_to_target_per_node"]
    ratio = dense / compressed if compressed and dense else None
    return {"nodes": args.nodes, "rounds": args.rounds, "seed": args.seed,
            "target": args.target, "runs": results,
            "ratio_dense_over_compressed": ratio, "required_ratio": REQUIRED_RATIO,
            "meets_requirement": ratio is not None and ratio >= REQUIRED_RATIO}


def _kb(value: float | None) -> str:
    return "never" if value is None else f"{value / 1024:.1f} KB"


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(result: dict[str, Any]) -> str:
    lines = [f"{result['nodes']} nodes, {result['rounds']} rounds, seed "
             f"{result['seed']}, target mean accuracy {result['target']:.2f}", "",
             f"{'run':11}{'to target/node':>16}{'s to target':>13}{'round':>7}"
             f"{'wall s':>8}{'final mean':>12}{'final min':>11}{'consensus':>11}"]
    for label, run in result["runs"].items():
        lines.append(f"{label:11}{_kb(run['bytes_to_target_per_node']):>16}"
                     f"{_num(run['seconds_to_target'], '.1f'):>13}"
                     f"{_num(run['round_to_target'], '.0f'):>7}"
                     f"{run['wall_seconds']:8.1f}{run['final_accuracy_mean']:12.4f}"
                     f"{run['final_accuracy_min']:11.4f}"
                     f"{run['consensus_distance']:11.4f}")
    ratio = result["ratio_dense_over_compressed"]
    lines.append("")
    if ratio is None:
        lines.append("ratio dense / compressed of bytes to target: n/a (a run never "
                     "reached the target)")
    else:
        verdict = "meets" if result["meets_requirement"] else "DOES NOT meet"
        lines.append(f"ratio dense / compressed of bytes to target: {ratio:.1f}x "
                     f"({verdict} the required {result['required_ratio']:g}x)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target", type=float, default=0.92)
    parser.add_argument("--json", action="store_true",
                        help="print the result as JSON instead of a table")
    args = parser.parse_args(argv)
    result = measure(args)
    print(json.dumps(result, indent=2) if args.json else table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
