"""Pipeline benchmark: latency from NowPayments' notification to the payout mined, and sustained throughput.

Runs against the local stack (`tools/dev up` first), through the same code as `tools/dev pay`:

    tools/bazel run -c opt //bench:pipeline_bench -- [--latency-count 20] [--throughput-count 200]

1. Latency: instant payments one after the other, each alone in the pipeline; p50 and p95 of
   notification -> payout transfer mined (an instant payout has no deliberate wait).
2. Throughput: --throughput-count instant payments notified at once (or at --rate per second);
   payouts mined per second between the first notification and the last payout mined, and the
   latency under that load.
3. Threshold (one payment): the same measure, which includes the deliberate waits of a threshold
   payout (the scheduler's 1 s cadence, GCHostPay1's 1 s re-check of the conversion), shown apart.
Targets on the 2-core build machine: p50 < 1 s, >= 20 payments/s.

Where it stands (session 3, this 2-core machine, no other work running): p50 0.07 s, p95 0.08-0.10 s
one at a time; 200 at once 17-22 payments/s, median 19.9 (ten runs of this command: 17.2, 17.6, 18.9,
19.1, 19.8, 19.9, 20.1, 20.1, 20.2, 21.9; 1000 at once 19.7; the target, 20, is not reliably met). The work per payment is the same in every run, yet
its CPU time ranges from 84 to 120 ms, every process alike: the machine's own speed varies, and at
this load the stack is CPU-bound (two cores / ~100 ms). Session 2 stood at 15.1/s and ~116 ms.
What changed: GCHostPay3's wallet lock covers only the nonce decision (the node is asked before it,
a transfer recorded moments ago is not re-asked about under it, settling takes the payout's own
lock), an index for the per-payment subscription lookup (it read the whole table), the local chain
and ChangeNOW stand-in sign and recover with compiled curve arithmetic (fastecdsa), one fee quote
and one CoinGecko price serve a burst, the emulator reuses ID tokens, the tracker polls less.
What is left: the chain (py-evm, ~15-19 ms per payment for two mined transactions), the twelve
Cloud Tasks hops (~2 ms each across client, emulator and service), PostgreSQL (~9 ms).
"""
from __future__ import annotations

import argparse
import json
import sys
from decimal import Decimal

from telepay_shared.db import Database
from tools.devstack import pipeline
from tools.devstack.cli import make_stack

P50_TARGET_S, THROUGHPUT_TARGET = 1.0, 20.0
END_HOP = "mined"  # what is measured: notification -> payout transfer mined (the steps after it are not polled)


def run(tracker: pipeline.Tracker, mode: str, count: int, rate: float | None, amount_usd: str) -> dict:
    """Pay and follow; the run's summary (see pipeline.summary)."""
    payments = pipeline.pay(tracker, mode, Decimal(amount_usd), count, rate, timeout_s=60 + count,
                            until=lambda payment: END_HOP in payment.reached)
    return pipeline.summary(payments, END_HOP)


def latency(tracker: pipeline.Tracker, count: int) -> dict:
    """Instant payments one at a time: each payment's notification -> mined, alone in the pipeline."""
    singles = [run(tracker, "instant", 1, None, "25") for _ in range(count)]
    seconds = [single["p50_s"] for single in singles if single["p50_s"] is not None]
    return {"payments": count, "reached": len(seconds), "p50_s": pipeline.percentile(seconds, 0.5),
            "p95_s": pipeline.percentile(seconds, 0.95), "max_s": max(seconds, default=None)}


def report(name: str, result: dict) -> None:
    """One line per measurement."""
    def seconds(key: str) -> str:
        return "-" if result.get(key) is None else f"{result[key]:.3f} s"

    rate = result.get("throughput_per_s")
    print(f"{name:<34} {result['reached']:>4}/{result['payments']:<4} p50 {seconds('p50_s'):>9}  "
          f"p95 {seconds('p95_s'):>9}  max {seconds('max_s'):>9}" + (f"  {rate:6.1f} payments/s" if rate else ""))


def main(argv: list[str] | None = None) -> int:
    """Measure and print; exit 1 when the stack is not up."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--latency-count", type=int, default=20)
    parser.add_argument("--throughput-count", type=int, default=200)
    parser.add_argument("--rate", type=float, help="offered notifications per second (default: all at once)")
    parser.add_argument("--skip-threshold", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    stack = make_stack(say=lambda _: None)
    unhealthy = [row["part"] for row in stack.status() if not row["pid"]]
    if unhealthy:
        print(f"pipeline_bench: the local stack is not up ({', '.join(unhealthy)} down): run tools/dev up",
              file=sys.stderr)
        return 1
    results = {}
    with Database.from_dsn(stack.dsn, max_size=2) as database:
        tracker = pipeline.Tracker(database, pipeline.Endpoints.of(stack), follow_to=END_HOP)
        run(tracker, "instant", 1, None, "25")  # warm-up: connections, caches
        results["latency (one at a time)"] = latency(tracker, args.latency_count)
        results[f"throughput ({args.throughput_count} at once)"] = run(
            tracker, "instant", args.throughput_count, args.rate, "25")
        if not args.skip_threshold:
            results["threshold (incl. deliberate waits)"] = run(tracker, "threshold", 1, None, "30")
    if args.json:
        print(json.dumps(results))
        return 0
    print(f"{'measure':<34} {'done':>9} notification -> payout mined")
    for name, result in results.items():
        report(name, result)
    single = results["latency (one at a time)"]["p50_s"]
    sustained = next(r["throughput_per_s"] for n, r in results.items() if n.startswith("throughput")) or 0.0
    print(f"targets: p50 < {P50_TARGET_S} s: {'met' if single is not None and single < P50_TARGET_S else 'NOT met'}; "
          f">= {THROUGHPUT_TARGET} payments/s: {'met' if sustained >= THROUGHPUT_TARGET else 'NOT met'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
