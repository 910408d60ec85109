"""Benchmark of the token codec: median microseconds per encode and per decode, for every hop.

Run: tools/bazel run -c opt //bench:tokens_bench -- [--batches 31] [--per-batch 2000]
Each hop is timed in batches with time.perf_counter_ns; the median batch gives the per-operation
figure, which resists the noise of a shared machine better than the mean.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from telepay_shared import tokens
from telepay_shared.hops import HOPS

VECTORS_PATH = Path(__file__).parent.parent / "shared" / "testdata" / "token-vectors.json"


def median_us(operation, batches: int, per_batch: int) -> float:
    """Median over batches of the mean time of one call, in microseconds."""
    samples = []
    for _ in range(batches):
        start = time.perf_counter_ns()
        for _ in range(per_batch):
            operation()
        samples.append((time.perf_counter_ns() - start) / per_batch / 1000)
    return statistics.median(samples)


def main(argv: list[str] | None = None) -> int:
    """Time every hop of the golden vectors and print a table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=31)
    parser.add_argument("--per-batch", type=int, default=2000)
    args = parser.parse_args(argv)
    vectors = json.loads(VECTORS_PATH.read_text())
    keys, now = vectors["keys"], vectors["created_at"]
    print(f"{'hop':30} {'wire':14} {'encode us':>10} {'decode us':>10}")
    for name, vector in vectors["hops"].items():
        hop, fields, token = HOPS[name], vector["fields"], vector["token"]
        encode_us = median_us(lambda: tokens.encode(hop, fields, keys, now), args.batches, args.per_batch)
        decode_us = median_us(lambda: tokens.decode(hop, token, keys, now), args.batches, args.per_batch)
        print(f"{name:30} {hop.wire:14} {encode_us:10.2f} {decode_us:10.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
