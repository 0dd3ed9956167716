"""`python -m jaxllm.serve [MODEL] [flags]`: the OpenAI-compatible HTTP server (Quart app on Hypercorn).

The port is bound before the engine exists: the engine is built (weights loaded, every bucket compiled)
on its own thread while /health answers 503, so orchestrators see a live process at once. SIGTERM stops
accepting work (503), lets in-flight requests finish for up to --drain-timeout seconds, then exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable
from typing import Any

from jaxllm.config import EngineConfig, add_engine_args, config_from_args, parse_bytes

logger = logging.getLogger("jaxllm.serve")


def build_parser(prog: str = "python -m jaxllm.serve") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="OpenAI-compatible server for jaxllm (vLLM flag names)")
    parser.add_argument("model", nargs="?", default=None,
                        help="HF model dir, .gguf file or hub id (default: embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=os.environ.get("JAXLLM_API_KEY"),
                        help="require 'Authorization: Bearer KEY' (default: $JAXLLM_API_KEY)")
    parser.add_argument("--max-request-bytes", type=parse_bytes, default=16 * 2**20,
                        help="largest accepted request body (413 beyond); accepts 1MiB etc.")
    parser.add_argument("--drain-timeout", type=float, default=30.0,
                        help="seconds SIGTERM waits for in-flight requests before exiting")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--enable-auto-tool-choice", action="store_true",
                        help='let tool_choice "auto" parse tool calls out of the model\'s text')
    parser.add_argument("--tool-call-parser", choices=["hermes", "llama3_json", "mistral"], default=None,
                        help="how the model writes tool calls (hermes: Qwen2.5 / Qwen3 <tool_call> JSON)")
    add_engine_args(parser)
    return parser


def main(argv: list[str] | None = None, *, engine_factory: Callable[[EngineConfig], Any] | None = None,
         sampling_params_cls: type | None = None) -> int:
    """Runs until SIGTERM/SIGINT; returns the exit code. Tests pass a fake `engine_factory`."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.enable_auto_tool_choice and not args.tool_call_parser:
        parser.error("--enable-auto-tool-choice needs --tool-call-parser (hermes, llama3_json or mistral)")
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = config_from_args(args, args.model)
    if config.parallel.follows_rank0:
        from jaxllm.engine.multihost import run_follower
        return run_follower(config)  # no HTTP server: rank 0 serves, this rank runs its shards of each step
    if config.parallel.nnodes > 1:
        from jaxllm.engine.multihost import initialize
        initialize(config.parallel)  # on the main thread (signal handlers), before the port: all nodes joined
    code = asyncio.run(serve(config, args, engine_factory=engine_factory, sampling_params_cls=sampling_params_cls))
    if any(t.name == "jaxllm-engine" and t.is_alive() for t in threading.enumerate()):
        # Stopped during warm-up: the engine thread is inside XLA; interpreter teardown under it can
        # abort the process, so leave at once with our own exit code.
        logging.shutdown()
        os._exit(code)
    return code


def _check_bindable(host: str, port: int) -> str | None:
    """Fails fast on a taken port, before minutes of engine warm-up start."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Hypercorn binds
            sock.bind(infos[0][4])
    except OSError as exc:
        return f"cannot listen on {host}:{port}: {exc}"
    return None


def _default_factory(config: EngineConfig) -> Any:
    from jaxllm.engine.data_parallel import create_engine
    return create_engine(config)


async def serve(config: EngineConfig, args: argparse.Namespace, *, engine_factory=None,
                sampling_params_cls=None) -> int:
    problem = _check_bindable(args.host, args.port)
    if problem:
        logger.error(problem)
        return 1
    from hypercorn.asyncio import serve as hypercorn_serve
    from hypercorn.config import Config as HypercornConfig

    from jaxllm.engine.async_engine import AsyncEngine
    from server.app import ServerSettings, create_app

    factory = engine_factory or _default_factory
    engine = AsyncEngine(lambda: factory(config), sampling_params_cls=sampling_params_cls,
                         max_waiting_requests=config.scheduler.max_waiting_requests)
    settings = ServerSettings(served_model_name=config.model.served_model_name, model_root=config.model.model,
                              api_key=args.api_key or None, max_request_bytes=args.max_request_bytes,
                              drain_timeout=args.drain_timeout, enable_auto_tool_choice=args.enable_auto_tool_choice,
                              tool_call_parser=args.tool_call_parser)
    app = create_app(engine, settings)
    state = app.extensions["jaxllm"]

    hc = HypercornConfig()
    hc.bind = [f"{args.host}:{args.port}"]
    hc.accesslog = "-" if args.access_log else None
    hc.errorlog = "-"
    hc.graceful_timeout = 5.0  # after our own drain, only responses still being written remain

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    exit_code = 0

    async def drain() -> None:
        deadline = loop.time() + args.drain_timeout
        while engine.num_inflight and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if engine.num_inflight:
            logger.warning("drain timeout: %d requests still in flight are cut off", engine.num_inflight)
        stop.set()

    def on_signal(signum: int) -> None:
        if state.draining:
            return
        logger.info("received %s: refusing new requests, draining %d in flight (at most %.0f s)",
                    signal.Signals(signum).name, engine.num_inflight, args.drain_timeout)
        state.draining = True
        loop.create_task(drain())

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)

    async def watch_engine() -> None:
        nonlocal exit_code
        while engine.ready_future is None:
            await asyncio.sleep(0.01)
        try:
            await engine.ready_future
        except asyncio.CancelledError:
            raise
        except BaseException:  # noqa: BLE001 - logged by the engine thread
            logger.error("engine failed to start; exiting")
            exit_code = 1
            stop.set()
            return
        loop.create_task(exit_when_dead())
        # What start-up built (modules, compiled programs, the engine: ~350k objects) lives as long as
        # the server. Frozen, it is skipped by the collector's full passes, each of which would otherwise
        # stop every stream for ~0.2 s on a small CPU.
        gc.collect()
        gc.freeze()
        logger.info("%d start-up objects frozen out of garbage collection", gc.get_freeze_count())
        stats = engine.stats
        logger.info("serving %s on http://%s:%d (max_model_len=%s, compiled %s programs in %.1f s)",
                    state.served_model_names()[0], args.host, args.port, engine.engine.max_model_len,
                    getattr(stats, "num_compiles", "?"), getattr(stats, "warmup_seconds", 0.0) or 0.0)

    async def exit_when_dead() -> None:
        nonlocal exit_code
        exc = await engine.dead_future
        logger.error("engine died (%r); exiting non-zero so a supervisor restarts the server", exc)
        exit_code = 1
        state.draining = True
        stop.set()

    watcher = loop.create_task(watch_engine())
    logger.info("binding %s:%d; building the engine in the background (/health is 503 until ready)",
                args.host, args.port)
    try:
        await hypercorn_serve(app, hc, shutdown_trigger=stop.wait)
    finally:
        watcher.cancel()
        engine.shutdown(timeout=2.0)
    logger.info("server stopped")
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
