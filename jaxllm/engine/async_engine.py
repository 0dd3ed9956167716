"""AsyncEngine: the server's handle on an LLMEngine that lives in its own thread.

LLMEngine is not thread-safe and its step() blocks for a whole device iteration, so it gets a dedicated
thread (JAX releases the GIL while the device works). The event loop never calls it: adds and aborts go
to that thread through a thread-safe queue, and each step's outputs come back to the loop in one
`call_soon_threadsafe`, fanned out to per-request asyncio queues.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from jaxllm.outputs import RequestOutput

logger = logging.getLogger(__name__)

_IDLE_WAIT_S = 0.05  # how long the idle engine thread blocks on the command queue before re-checking


class EngineNotReady(RuntimeError):
    pass


class EngineOverloaded(RuntimeError):
    pass


class EngineDeadError(RuntimeError):
    """The engine failed while this request was in flight; the server reports it and keeps serving."""


class Observer(Protocol):
    """Metrics hooks; called on the engine thread (prometheus_client objects are thread-safe)."""

    def on_step(self, stats: Any, outputs: list[RequestOutput], now: float) -> None: ...
    def on_abort(self, request_id: str) -> None: ...


class RequestStream:
    """The outputs of one request, in order (each shaped by its params' output_kind); iterate with
    `async for`, `close()` aborts."""

    def __init__(self, engine: "AsyncEngine", request_id: str):
        self.request_id = request_id
        self._engine = engine
        self._queue: asyncio.Queue = asyncio.Queue()
        self.finished = False
        self.started = False  # has produced at least one output (no longer "waiting")

    def _put(self, item: RequestOutput | BaseException) -> None:
        self._queue.put_nowait(item)

    def __aiter__(self):
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self.finished = True  # the engine dropped it; nothing left to abort
            self._engine._forget(self.request_id)
            raise item
        if item.finished:
            self.finished = True
            self._engine._forget(self.request_id)
        return item

    def close(self) -> None:
        """Idempotent; aborts in the engine (pages freed at once) unless the request already finished."""
        if not self.finished:
            self.finished = True
            self._engine._forget(self.request_id)
            self._engine._commands.put(("abort", self.request_id))


class AsyncEngine:
    def __init__(self, engine_factory: Callable[[], Any], *, sampling_params_cls: type | None = None,
                 max_waiting_requests: int | None = None, observer: Observer | None = None):
        self._factory = engine_factory
        self._sampling_params_cls = sampling_params_cls
        self.max_waiting_requests = max_waiting_requests
        self.observer = observer
        self.engine: Any = None  # set once built; read-only attributes (tokenizer, names) are safe to read
        self.error: BaseException | None = None
        self.stats: Any = None  # snapshot taken on the engine thread after every step / command batch
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}  # event-loop side only
        self._in_engine: set[str] = set()  # engine-thread side only: added, not yet finished or aborted
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stopped = False
        self.ready_future: asyncio.Future | None = None
        self.dead_future: asyncio.Future | None = None  # set when the engine thread dies after start-up

    # ------------------------------------------------------------------ lifecycle (event loop side)

    def start(self) -> None:
        """Starts the engine thread, which builds the engine (loading + compiling) and then serves."""
        self._loop = asyncio.get_running_loop()
        self.ready_future = self._loop.create_future()
        self.dead_future = self._loop.create_future()
        self._thread = threading.Thread(target=self._run, name="jaxllm-engine", daemon=True)
        self._thread.start()

    @property
    def ready(self) -> bool:
        return self._ready.is_set() and self.error is None

    @property
    def healthy(self) -> bool:
        """Ready, and not rebuilding its device state after a failed step."""
        return self.ready and getattr(self.stats, "healthy", True)

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stopped = True
        self._commands.put(("stop",))
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def num_inflight(self) -> int:
        return len(self._streams)

    @property
    def num_waiting(self) -> int:
        """Accepted requests that have not produced output yet (queued or in prefill)."""
        return sum(1 for s in self._streams.values() if not s.started)

    def make_sampling_params(self, **kwargs: Any) -> Any:
        cls = self._sampling_params_cls
        if cls is None:
            from jaxllm.sampling_params import SamplingParams as cls  # imported late: engine may be absent
        return cls(**kwargs)

    # ------------------------------------------------------------------ requests (event loop side)

    async def add_request(self, request_id: str, prompt: str | None, params: Any, *,
                          prompt_token_ids: list[int] | None = None, priority: int = 0,
                          cache_salt: str | None = None, pooling: str | bool | None = None) -> RequestStream:
        """Hands the request to the engine thread and waits for it to be accepted.

        Raises ValueError (bad input, from the engine), EngineNotReady, EngineOverloaded.
        """
        if not self.ready:
            raise EngineNotReady("the model is still loading" if self.error is None else
                                 f"the engine failed: {self.error}")
        if self.max_waiting_requests is not None and self.num_waiting >= self.max_waiting_requests:
            raise EngineOverloaded(f"more than {self.max_waiting_requests} requests are waiting")
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        stream = RequestStream(self, request_id)
        self._streams[request_id] = stream
        ack: concurrent.futures.Future = concurrent.futures.Future()
        kwargs = {"prompt_token_ids": prompt_token_ids, "priority": priority, "cache_salt": cache_salt}
        if pooling:
            kwargs["pooling"] = pooling  # an embedding request
        self._commands.put(("add", request_id, prompt, params, kwargs, ack))
        try:
            await asyncio.wrap_future(ack)
        except BaseException:
            # Rejected (ValueError) or cancelled while waiting: make sure nothing stays behind.
            stream.close()
            raise
        return stream

    async def reset_prefix_cache(self) -> int:
        """Forgets the engine's cached pages (on the engine thread); returns how many were named."""
        if not self.ready:
            raise EngineNotReady("the model is still loading" if self.error is None else
                                 f"the engine failed: {self.error}")
        done: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put(("reset_prefix_cache", done))
        return await asyncio.wrap_future(done)

    def _forget(self, request_id: str) -> None:
        self._streams.pop(request_id, None)

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is not None:  # None: the client went away and the request was aborted
                stream.started = True
                stream._put(out if out.error is None else EngineDeadError(out.error))

    def _fail(self, request_ids: list[str], exc: BaseException) -> None:
        for request_id in request_ids:
            stream = self._streams.get(request_id)
            if stream is not None:
                stream._put(exc)

    def _post(self, fn: Callable, *args: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: the server is shutting down
            pass

    # ------------------------------------------------------------------ the engine thread

    def _run(self) -> None:
        try:
            t0 = time.perf_counter()
            self.engine = self._factory()
            self.stats = self._snapshot()
            logger.info("engine ready in %.1f s", time.perf_counter() - t0)
        except BaseException as exc:  # noqa: BLE001 - reported to the server, which exits
            logger.exception("engine failed to start")
            self.error = exc
            self._ready.set()
            self._post(self._resolve_ready, exc)
            return
        self._ready.set()
        self._post(self._resolve_ready, None)
        on_fatal = getattr(self.engine, "on_fatal", None)
        if on_fatal is not None:  # multi-host: a lost node, reported while this thread may be stuck on it
            on_fatal(lambda exc: self._post(self._die, exc))
        try:
            while not self._stopped:
                try:
                    if not self._iterate():
                        break
                except Exception as exc:  # noqa: BLE001 - one bad step must not kill the server
                    if not getattr(self.engine, "healthy", True):
                        raise  # the device state could not be rebuilt: nothing more can run
                    # A host-side fault (the engine recovers device faults itself): only the requests
                    # inside the engine now are failed (and aborted, so the next step does not hit the
                    # same fault); requests still queued are untouched.
                    logger.exception("engine step failed; failing the requests in flight")
                    failed = list(self._in_engine)
                    for request_id in failed:
                        self._abort(request_id)
                    self._post(self._fail, failed, EngineDeadError(f"engine step failed: {exc}"))
        except BaseException as exc:  # noqa: BLE001 - the thread dies: nobody may be left waiting
            logger.exception("engine thread died")
            self.error = exc
            self._post(self._die, exc)
            if not isinstance(exc, Exception):
                raise

    def _die(self, exc: BaseException) -> None:
        """Event-loop side of a dead engine: every open stream fails, and the server is told to exit."""
        self._fail(list(self._streams), EngineDeadError(f"the engine died: {exc!r}"))
        if self.dead_future is not None and not self.dead_future.done():
            self.dead_future.set_result(exc)

    def _iterate(self) -> bool:
        """Applies queued commands, then runs one step if there is work; False once stopped."""
        engine = self.engine
        if not engine.has_unfinished_requests():
            wait = _IDLE_WAIT_S
        else:  # async scheduling: hold the next dispatch until the step in flight nearly ends, so that
            # a request arriving meanwhile joins it (LaunchPacer); the first command ends the wait
            wait = engine.launch_delay()
        if not self._drain_commands(wait):
            return False
        if engine.has_unfinished_requests():
            outputs = engine.step()
            now = time.time()
            self.stats = self._snapshot()
            if self.observer is not None:
                try:
                    self.observer.on_step(self.stats, outputs, now)
                except Exception:  # noqa: BLE001 - metrics must never break serving
                    logger.exception("metrics observer failed")
            for out in outputs:
                if out.finished:
                    self._in_engine.discard(out.request_id)
            if outputs:
                self._post(self._dispatch, outputs)
                if getattr(engine, "idle_after_async_step", False):
                    # Typically a first token: hand the GIL to the event loop now, so that it sends the
                    # outputs before this thread builds the next step (else it waits for that step's
                    # fetch, ~1.1 ms later at c=1). Steps that overlap keep the GIL: the loop runs then.
                    time.sleep(0)
        return True

    def _resolve_ready(self, exc: BaseException | None) -> None:
        if self.ready_future is not None and not self.ready_future.done():
            if exc is None:
                self.ready_future.set_result(True)
            else:
                self.ready_future.set_exception(exc)

    def _drain_commands(self, wait: float) -> bool:
        """Applies every queued add/abort, waiting up to `wait` seconds for the first; False on stop."""
        try:
            cmd = self._commands.get(timeout=wait) if wait > 0 else self._commands.get_nowait()
        except queue.Empty:
            return True
        changed = False
        while True:
            if cmd[0] == "stop":
                return False
            changed = True
            if cmd[0] == "add":
                _, request_id, prompt, params, kwargs, ack = cmd
                if ack.set_running_or_notify_cancel():
                    try:
                        self.engine.add_request(request_id, prompt, params, **kwargs)
                        self._in_engine.add(request_id)
                        ack.set_result(None)
                    except Exception as exc:  # noqa: BLE001 - ValueError for bad input, passed back
                        ack.set_exception(exc)
            elif cmd[0] == "abort":
                self._abort(cmd[1])
            elif cmd[0] == "reset_prefix_cache":
                try:
                    cmd[1].set_result(self.engine.reset_prefix_cache())
                except Exception as exc:  # noqa: BLE001
                    cmd[1].set_exception(exc)
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                break
        if changed:
            self.stats = self._snapshot()
        return True

    def _abort(self, request_id: str) -> None:
        self._in_engine.discard(request_id)
        try:
            self.engine.abort_request(request_id)
        except Exception:  # noqa: BLE001 - unknown / already finished ids are fine
            logger.debug("abort of %s ignored", request_id, exc_info=True)
            return
        if self.observer is not None:
            self.observer.on_abort(request_id)

    def _snapshot(self) -> Any:
        try:
            return copy.copy(self.engine.get_stats())
        except Exception:  # noqa: BLE001
            logger.exception("get_stats failed")
            return self.stats
