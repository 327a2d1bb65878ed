"""``forvalue serve``: its flags, loading the model and the start-up references, and signals
(SIGTERM or SIGINT drains the server, then the process exits)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

import torch

from forvalue.engine.config import ValuationConfig

from ..server.auth import read_token
from ..server.metrics_http import MetricsServer
from ..server.server import DEFAULT_PORT, ServerConfig, ServerLimits, ValuationServer
from ..wire import REFERENCE_NAME
from .options import (
    add_covariance_argument,
    add_model_arguments,
    add_valuation_arguments,
    config_from_args,
    covariance_from_args,
    load_model_from_args,
)
from .report import USER_ERRORS, user_error

log = logging.getLogger("forvalue.server")


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``forvalue serve``."""
    limits = ServerLimits()
    add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: 127.0.0.1; 0.0.0.0 exposes the server)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help=f"default: {DEFAULT_PORT}; 0 picks a free one")
    parser.add_argument("--reference", action="append", default=[], metavar="NAME=FILE",
                        help="a reference to build at start-up from a JSONL of validation samples or "
                             "a saved .safetensors Reference (repeatable)")
    add_valuation_arguments(parser, "serve")
    add_covariance_argument(parser)
    parser.add_argument("--index", type=Path, default=None, metavar="IDX",
                        help="an index of `forvalue index build` (same model) to answer Query: each "
                             "streamed sample's most and least valuable stored training samples")
    parser.add_argument("--token-file", type=Path,
                        help="file holding the bearer token every call must carry (or set "
                             "FORVALUE_TOKEN); without either, calls are not authenticated")
    parser.add_argument("--tls-cert", type=Path, help="PEM certificate chain (with --tls-key: TLS)")
    parser.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    parser.add_argument("--max-streams", type=int, default=limits.max_streams,
                        help=f"concurrent streaming calls (default: {limits.max_streams})")
    parser.add_argument("--stream-window", type=int, default=limits.stream_window,
                        help=f"requests one stream may have unanswered (default: {limits.stream_window})")
    parser.add_argument("--max-queue", type=int,
                        help="engine waiting queue (default: max-streams x stream-window)")
    parser.add_argument("--queue-timeout", type=float, default=limits.queue_timeout,
                        help="seconds a stream waits for room in a full queue before the call ends "
                             f"with RESOURCE_EXHAUSTED (default: {limits.queue_timeout:g})")
    parser.add_argument("--max-message-mb", type=float, default=limits.max_message_bytes / 2**20,
                        help="largest message accepted or sent (default: 4)")
    parser.add_argument("--metrics-port", type=int, default=None, metavar="P",
                        help="serve Prometheus /metrics over HTTP on this port (needs prometheus_client: "
                             "pip install 'forvalue[metrics]'; 0 picks a free one)")
    parser.add_argument("--metrics-host", default=None,
                        help="address of the metrics endpoint (default: --host)")
    parser.add_argument("--drain-timeout", type=float, default=30.0,
                        help="seconds SIGTERM waits for accepted requests before cutting calls (default: 30)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads of the server (default: torch's default, the usable "
                             "cores, minus one left to the event loop and gRPC; at least 1)")


def run_serve(args: argparse.Namespace) -> int:
    """``forvalue serve``: serve until SIGTERM or SIGINT, then drain; returns the exit status."""
    _log_to_stderr()
    try:
        config, valuation = _server_config(args), config_from_args(args, "serve")
        references = dict(_parse_reference_spec(spec) for spec in args.reference)
        threads = torch_threads(args.threads)
    except USER_ERRORS as error:
        return user_error(error)
    # Once, before any thread runs torch: a thread keeps the count it had at its first op.
    torch.set_num_threads(threads)
    return asyncio.run(_serve(args, config, valuation, references))


def _log_to_stderr() -> None:
    logger = logging.getLogger("forvalue")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("forvalue: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def _server_config(args: argparse.Namespace) -> ServerConfig:
    limits = ServerLimits(max_streams=args.max_streams, stream_window=args.stream_window,
                          max_queue=args.max_queue, queue_timeout=args.queue_timeout,
                          max_message_bytes=int(args.max_message_mb * 2**20))
    if min(limits.max_streams, limits.stream_window, limits.queue_size) < 1:
        raise ValueError("--max-streams, --stream-window and --max-queue must be positive")
    return ServerConfig(host=args.host, port=args.port, token=read_token(args.token_file),
                        tls_cert=args.tls_cert, tls_key=args.tls_key, limits=limits)


def torch_threads(requested: int | None = None) -> int:
    """The server's intra-op threads: ``requested``, or by default torch's count (the usable
    cores) minus one, left to the event loop and gRPC's threads: an OpenMP team's barriers wait
    for whichever of its threads lost its core to them (or to another process). On 2 shared
    cores, one 64-token sample took p50 382 ms (p90 496) with torch's 2 threads against 298 ms
    (p90 362) with 1 (bench/results/latency.md, "Threads")."""
    if requested is None:
        return max(1, torch.get_num_threads() - 1)
    if requested < 1:
        raise ValueError(f"--threads must be at least 1, got {requested}")
    return requested


def _parse_reference_spec(spec: str) -> tuple[str, Path]:
    name, sep, path = spec.partition("=")
    if not sep or not REFERENCE_NAME.fullmatch(name) or not path:
        raise ValueError(f"--reference must look like NAME=FILE (NAME: letters, digits, _.:-), got {spec!r}")
    if not Path(path).exists():
        raise FileNotFoundError(f"--reference {name}: no such file: {path}")
    return name, Path(path)


async def _serve(args: argparse.Namespace, config: ServerConfig, valuation: ValuationConfig,
                 references: dict[str, Path]) -> int:
    server = ValuationServer(config, valuation)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        port = await server.start()
    except (*USER_ERRORS, RuntimeError) as error:  # grpc raises RuntimeError on a bad address
        return user_error(error)
    try:
        metrics = _start_metrics(server, args)
    except USER_ERRORS as error:  # prometheus_client missing, or the port taken
        await server.drain(0)
        return user_error(error)
    log.info("listening on %s:%d (%s); loading %s (torch threads: %d)", config.host, port,
             "TLS" if config.tls_cert else "plaintext", args.model, torch.get_num_threads())
    status = await _load_until_stopped(server, args, references, stop)
    if status == 0:
        log.info("serving on %s:%d", config.host, port)
        await stop.wait()
        log.info("draining (up to %g s)", args.drain_timeout)
    await server.drain(args.drain_timeout)
    if metrics is not None:
        metrics.close()
    return status


def _start_metrics(server: ValuationServer, args: argparse.Namespace) -> MetricsServer | None:
    if args.metrics_port is None:
        return None
    metrics = MetricsServer(server, args.metrics_port, args.metrics_host or args.host)
    log.info("metrics on http://%s:%d/metrics", args.metrics_host or args.host, metrics.port)
    return metrics


async def _load_until_stopped(server: ValuationServer, args: argparse.Namespace,
                              references: dict[str, Path], stop: asyncio.Event) -> int:
    async def load() -> None:
        model = await asyncio.to_thread(load_model_from_args, args)
        covariance = covariance_from_args(args, server.valuation)
        # Named after its file: PutReference calls name it (or take it as the default).
        covariances = {} if covariance is None else {Path(args.covariance).stem: covariance}
        await server.load(model, references, covariances=covariances, index=args.index)

    loading = asyncio.ensure_future(load())
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait({loading, stopping}, return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    if not loading.done():  # stopped while loading
        loading.cancel()
        return 0
    try:
        loading.result()
    except USER_ERRORS as error:  # SampleError, ModelError, ReferenceMismatch, files
        return user_error(error)
    return 0
