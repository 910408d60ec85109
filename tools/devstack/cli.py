"""tools/dev's command line (run inside the build environment by tools/dev; see tools/dev for the commands).

    up | down | status | pay | follow PAYMENT_ID... | trigger JOB | restart SERVICE | stop SERVICE | logs PART | fund
    | soak

The workspace comes from TELEPAY_DEV_WORKSPACE (tools/dev sets it); the stack folder from
TELEPAY_DEV_DIR (default <workspace>/.dev); every other knob from TELEPAY_DEV_* (stack.Settings).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from decimal import Decimal
from pathlib import Path

from telepay_shared.db import Database
from tools.devstack import pipeline
from tools.devstack.stack import SERVICES, Stack, StackError, workspace_bin_root


# What /proc/net shows for a loopback-only listener (gRPC listens on an IPv6 socket bound to ::ffff:127.0.0.1).
LOOPBACK_ADDRESSES = (None, "127.0.0.1", "::1", "::ffff:127.0.0.1")


def make_stack(say=print) -> Stack:
    """The stack of this workspace (tools/dev says where it is; so does `bazel run`, for the benchmarks)."""
    workspace = Path(os.environ.get("TELEPAY_DEV_WORKSPACE") or os.environ.get("BUILD_WORKSPACE_DIRECTORY")
                     or Path.cwd())
    folder = Path(os.environ.get("TELEPAY_DEV_DIR") or workspace / ".dev")
    return Stack(folder, source_root=workspace, bin_root=workspace_bin_root(workspace), say=say)


def show_status(stack: Stack, _args) -> int:
    """Print what runs where; exit 1 when a part is down or unhealthy."""
    rows = stack.status()
    print(f"{'part':<22} {'pid':>7}  {'listening on':<22} health")
    for row in rows:
        address = f"{row['listen'] or '-'}:{row['port']}"
        warning = "" if row["listen"] in LOOPBACK_ADDRESSES else "  (not loopback!)"
        print(f"{row['part']:<22} {row['pid'] or '-':>7}  {address:<22} {row['health']}{warning}")
    missing = [name for name in SERVICES if name not in stack.services()]
    if missing:
        print(f"not built, not run: {', '.join(missing)}")
    if stack.pid("tasks"):
        queued = {queue: len(tasks) for queue, tasks in stack.queued_tasks().items() if tasks}
        print(f"queued tasks: {json.dumps(queued) if queued else 'none'}")
    if stack.pid("chain"):
        chain = stack.chain_info()
        print(f"chain: {chain['rpc_url']}, host wallet {chain['host_address']} holds "
              f"{Decimal(stack.host_wallet_wei(chain['host_address'])).scaleb(-18):.6f} ETH "
              "(tools/dev fund --eth N tops it up)")
    healthy = all(row["pid"] and row["health"] in ("healthy", "accepting") for row in rows)
    return 0 if healthy else 1


def print_hop(payment: pipeline.Payment, hop: pipeline.Hop, row: dict) -> None:
    """One line per step a payment reaches, with its time since the notification."""
    seconds = payment.reached[hop.name] - payment.sent_at
    print(f"  {payment.payment_id}  +{seconds:6.3f}s  {hop.service:<16} {hop.text.format(**row)}", flush=True)


def print_job(job: str, answer: dict) -> None:
    """One line per scheduler run (Cloud Scheduler's part)."""
    print(f"  scheduler -> {job}: HTTP {answer.get('http_status')} {answer.get('message', '')}", flush=True)


def pay(stack: Stack, args) -> int:
    """Notify payments and follow them hop by hop; exit 1 unless every payment reached its end state."""
    channel = pipeline.CHANNELS[args.mode]
    eth = (args.amount_usd / pipeline.ETH_USD).quantize(pipeline.ETH_STEP)
    if not args.json:
        print(f"tools/dev pay: {args.count} {args.mode} payment(s) of ${args.amount_usd} (~{eth} ETH) to channel "
              f"{channel.open_channel_id}, paid out in {channel.currency.upper()} to {channel.wallet}")
    verbose = not args.json and args.count <= args.trace_up_to
    with Database.from_dsn(stack.dsn, max_size=2) as database:
        quiet = lambda *a: None  # noqa: E731
        tracker = pipeline.Tracker(database, pipeline.Endpoints.of(stack), on_hop=print_hop if verbose else quiet,
                                   on_job=quiet if args.json else print_job)
        payments = pipeline.pay(tracker, args.mode, args.amount_usd, args.count, args.rate, args.timeout)
    result = pipeline.summary(payments)
    if args.json:
        print(json.dumps(result))
    else:
        for payment in payments:
            if not payment.done:
                waiting = payment.next_hop()
                print(f"  {payment.payment_id}  NOT DONE: waiting for {waiting.service} ({waiting.name}); "
                      f"IPN answer {payment.answer}")
        print(f"{result['done']}/{result['payments']} done; notification -> payout mined: "
              f"p50 {_seconds(result['p50_s'])}, p95 {_seconds(result['p95_s'])}; "
              f"throughput {_rate(result['throughput_per_s'])}")
    return 0 if result["done"] == result["payments"] else 1


def _seconds(value: float | None) -> str:
    """A duration for humans."""
    return "-" if value is None else f"{value:.3f} s"


def _rate(value: float | None) -> str:
    """A rate for humans."""
    return "-" if value is None else f"{value:.1f} payments/s"


def follow(stack: Stack, args) -> int:
    """Follow payments notified earlier (e.g. before a down/up) to their end state, hop by hop."""
    with Database.from_dsn(stack.dsn, max_size=2) as database:
        tracker = pipeline.Tracker(database, pipeline.Endpoints.of(stack), on_hop=print_hop, on_job=print_job)
        for payment_id in args.payment_ids:
            tracker.payments[payment_id] = pipeline.known_payment(database, payment_id)
        done = tracker.follow(lambda: all(p.done for p in tracker.payments.values()), args.timeout)
    for payment in tracker.payments.values():
        waiting = payment.next_hop()
        print(f"  {payment.payment_id}  " + ("done" if waiting is None else f"NOT DONE: waiting for {waiting.service}"))
    return 0 if done else 1


def trigger(stack: Stack, args) -> int:
    """Run a scheduler job once, as Cloud Scheduler would."""
    answer = pipeline.run_scheduler_job(pipeline.SCHEDULER_JOBS[args.job](pipeline.Endpoints.of(stack)), stack.secrets)
    print(json.dumps(answer, indent=2))
    return 0 if answer["http_status"] == 200 else 1


def restart(stack: Stack, args) -> int:
    """Stop one service (if running) and start it again."""
    stack.stop_part(args.service)
    stack.start_service(args.service)
    return 0


def stop(stack: Stack, args) -> int:
    """Stop one service (its queued tasks wait and are redelivered once it is back)."""
    print(f"{args.service}: {'stopped' if stack.stop_part(args.service) else 'was not running'}")
    return 0


def logs(stack: Stack, args) -> int:
    """Print the end of a part's log."""
    lines = stack.path("logs", f"{args.part}.log").read_text(errors="replace").splitlines()
    print("\n".join(lines[-args.lines:]))
    return 0


def fund(stack: Stack, args) -> int:
    """Top up the host wallet from the chain's funder."""
    before, after = stack.fund_host_wallet(args.eth)
    print(f"host wallet {stack.chain_info()['host_address']}: {Decimal(before).scaleb(-18)} ETH -> "
          f"{Decimal(after).scaleb(-18)} ETH")
    return 0


def soak(stack: Stack, args) -> int:
    """The fault-injection soak (soak.py): exit 1 on any invariant violation."""
    from tools.devstack import soak as soaking

    return soaking.main_command(stack, args)


def decimal_argument(text: str) -> Decimal:
    """A command-line amount as a Decimal (never a float); argparse's own error names the option."""
    try:
        return Decimal(text)
    except ArithmeticError:
        raise argparse.ArgumentTypeError(f"not a decimal number: {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    """Parse the command and run it."""
    parser = argparse.ArgumentParser(prog="tools/dev", description="the local TelePay stack")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("up", help="start everything (idempotent)")
    commands.add_parser("down", help="drain the queues, stop everything, keep all state")
    commands.add_parser("status", help="what runs where")
    paying = commands.add_parser("pay", help="send NowPayments IPNs and follow each payment to its end state")
    paying.add_argument("--mode", choices=sorted(pipeline.CHANNELS), default="instant")
    paying.add_argument("--amount-usd", type=decimal_argument, default=Decimal("25"))
    paying.add_argument("--count", type=int, default=1)
    paying.add_argument("--rate", type=float, help="notifications per second (default: as fast as possible)")
    paying.add_argument("--timeout", type=float, default=120.0, help="seconds to follow the payments")
    paying.add_argument("--trace-up-to", type=int, default=3, help="print every hop when count is at most this")
    paying.add_argument("--json", action="store_true", help="print only the summary, as JSON")
    following = commands.add_parser("follow", help="follow payments notified earlier to their end state")
    following.add_argument("payment_ids", type=int, nargs="+")
    following.add_argument("--timeout", type=float, default=60.0)
    triggering = commands.add_parser("trigger", help="run a Cloud Scheduler job once")
    triggering.add_argument("job", choices=sorted(pipeline.SCHEDULER_JOBS))
    for name, text in (("restart", "restart one service"), ("stop", "stop one service (tools/dev restart starts it)")):
        commands.add_parser(name, help=text).add_argument("service", choices=SERVICES)
    logging = commands.add_parser("logs", help="the end of a part's log")
    logging.add_argument("part")
    logging.add_argument("-n", "--lines", type=int, default=40)
    funding = commands.add_parser("fund", help="send ETH from the chain's funder to the host wallet (payouts spend it)")
    funding.add_argument("--eth", type=decimal_argument, default=Decimal("100"), help="ETH to send (default 100)")
    soaking = commands.add_parser("soak", help="payments under injected faults, then the invariants (soak.py)")
    soaking.add_argument("--payments", type=int, default=1000)
    soaking.add_argument("--seed", type=int, default=1)
    soaking.add_argument("--threshold-share", type=float, default=0.2, help="share of threshold payments")
    soaking.add_argument("--rate", type=float, default=4.0, help="payments notified per second")
    soaking.add_argument("--settle-timeout", type=float, default=600.0, help="seconds to wait for quiescence")
    soaking.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    stack = make_stack()
    actions = {"up": lambda s, a: s.up() or 0, "down": lambda s, a: s.down() or 0, "status": show_status, "pay": pay,
               "follow": follow, "trigger": trigger, "restart": restart, "stop": stop, "logs": logs,
               "fund": fund, "soak": soak}
    try:
        return actions[args.command](stack, args)
    except (StackError, ValueError) as exc:
        print(f"tools/dev: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
