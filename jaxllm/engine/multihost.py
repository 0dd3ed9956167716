"""Many hosts (--nnodes N --node-rank R --master-addr A --master-port P): one mesh over every device of
every host, one engine.

All N processes call jax.distributed.initialize (its coordinator on A:P, run by rank 0), so jax.devices()
lists every device of every host and the ("data", "model") mesh spans them; each process holds only its
own shards of the weights and the page pool. Rank 0 runs the engine (server / LLM / batch job, scheduler,
tokenizer); every other rank runs `run_follower`: it loads its shards of the same weights, builds the
same ModelRunner and enqueues the same jitted programs (forward / sample / pool) in the same order as
rank 0, as the collectives inside them require (a rank out of order deadlocks them all). Warm-up is
mirrored like any step, so it compiles the same programs in the same order everywhere.

Step inputs reach the followers over a TCP channel from rank 0 (A:P+1), not through
multihost_utils.broadcast_one_to_all, because:
  - a broadcast is itself a collective of fixed shape: followers would first need a header broadcast to
    learn each step's buckets, i.e. two more cross-host collectives per program (and their programs to
    compile in lock step);
  - it returns host arrays, so rank 0 would wait for every follower at each step, defeating async
    scheduling; a socket send of a few KiB returns at once;
  - the same socket tells rank 0 that a follower died, naming it: EOF as soon as its process exits, a
    missed heartbeat when its machine hangs. Without it, gloo only says "connection closed by peer", and
    jax's coordination service SIGABRTs the survivors after its heartbeat timeout.
Messages are a JSON header plus raw array bytes: no pickle, nothing received is ever executed.

Failure: a lost rank makes rank 0 raise LostRankError out of the engine step (LLM.generate raises it,
the server fails every open request with it and exits 1, a batch job exits 1); whatever happens, the
process exits 1 at most _EXIT_GRACE_S after the loss (a thread may be stuck in a collective that never
returns). A lost rank 0 makes the followers exit 1. Both skip jax.distributed's shutdown barrier, which
would wait for the dead rank. A clean exit of rank 0 tells the followers to exit 0.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import select
import signal
import socket
import struct
import sys
import threading
import time

import jax
import numpy as np

from jaxllm.config import EngineConfig, ParallelConfig

logger = logging.getLogger(__name__)

_EXIT_GRACE_S = 10.0  # after a lost rank, the longest rank 0 waits for its engine to fail and exit
_CONNECT_TIMEOUT_S = 300.0  # jax.distributed's own default initialization timeout


class LostRankError(RuntimeError):
    """A node of the mesh is gone: nothing can run any more (every program spans all nodes)."""


# ---- the channel ------------------------------------------------------------------------------

def _frame(kind: str, meta: dict | None = None, leaves=()) -> bytes:
    leaves = [np.asarray(a, order="C") for a in leaves]  # (ascontiguousarray would make 0-d arrays 1-d)
    header = json.dumps({"kind": kind, "meta": meta or {},
                         "leaves": [[a.dtype.str, list(a.shape)] for a in leaves]}).encode()
    body = b"".join([struct.pack("!I", len(header)), header] + [a.tobytes() for a in leaves])
    return struct.pack("!Q", len(body)) + body


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise ConnectionError("connection closed")
        buf += chunk
    return bytes(buf)


def _read_frame(sock: socket.socket) -> tuple[str, dict, list[np.ndarray]]:
    (n,) = struct.unpack("!Q", _recv_exact(sock, 8))
    body = _recv_exact(sock, n)
    (h,) = struct.unpack("!I", body[:4])
    header = json.loads(body[4:4 + h])
    leaves, off = [], 4 + h
    for dtype, shape in header["leaves"]:
        dt = np.dtype(dtype)
        size = dt.itemsize * int(np.prod(shape, dtype=np.int64))
        leaves.append(np.frombuffer(body, dt, count=size // dt.itemsize, offset=off).reshape(tuple(shape)))
        off += size
    return header["kind"], header["meta"], leaves


class Leader:
    """Rank 0's end: sends every device call to the followers and watches that they are alive.

    The runner calls attach / forward / sample / sampled / pool / reset (runner.py's `mirror`)."""

    def __init__(self, par: ParallelConfig):
        self.nnodes, self.timeout = par.nnodes, par.node_timeout
        self.lost: LostRankError | None = None
        self.on_lost: list = []  # callbacks(exc), run on the watcher thread
        self.runner = None
        self._last_sampled = None
        self._closed = False
        self._cond = threading.Condition()
        self._pongs: dict[int, int] = {}
        self._last_seen: dict[int, float] = {}
        self._conns: dict[int, socket.socket] = {}
        self._peers: dict[int, str] = {}
        server = socket.create_server((par.master_addr, par.master_port + 1))
        server.settimeout(1.0)
        deadline = time.monotonic() + _CONNECT_TIMEOUT_S
        try:
            while len(self._conns) < self.nnodes - 1:
                if time.monotonic() > deadline:
                    missing = sorted(set(range(1, self.nnodes)) - set(self._conns))
                    raise TimeoutError(f"node rank(s) {missing} never connected to {par.master_addr}:"
                                       f"{par.master_port + 1}")
                try:
                    conn, peer = server.accept()
                except socket.timeout:
                    continue
                conn.settimeout(30.0)
                _, meta, _ = _read_frame(conn)
                rank = int(meta["rank"])
                if not 0 < rank < self.nnodes or rank in self._conns:
                    conn.close()
                    raise RuntimeError(f"unexpected node rank {rank} connected from {peer}")
                conn.settimeout(None)
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self._conns[rank], self._peers[rank] = conn, f"{peer[0]}:{peer[1]}"
                self._pongs[rank], self._last_seen[rank] = 0, time.monotonic()
        finally:
            server.close()
        self._ranks = {conn.fileno(): rank for rank, conn in self._conns.items()}
        threading.Thread(target=self._watch, name="jaxllm-multihost-watch", daemon=True).start()
        logger.info("multi-host: %d follower(s) connected: %s", len(self._conns), self._peers)

    # -- the runner's mirror ------------------------------------------------------------------

    def attach(self, runner) -> None:
        self.runner = runner
        self._send("init", runner.init_args)

    def forward(self, x, prev_sampled) -> None:
        # Followers keep the last step's sampled ids on their own devices; they only need to know
        # whether this step reads them.
        prev = prev_sampled is not self.runner.no_samples
        if prev and prev_sampled is not self._last_sampled:
            raise RuntimeError("multi-host: a step may only read the previous step's samples")
        self._last_sampled = None
        self._send("forward", {"prev": prev}, jax.tree.leaves(x))

    def sample(self, x) -> None:
        self._send("sample", {}, jax.tree.leaves(x))

    def sampled(self, sampled) -> None:
        self._last_sampled = sampled

    def pool(self, segments) -> None:
        self._send("pool", {}, [segments])

    def reset(self) -> None:
        """After a failed step: only if every follower still answers is the device state rebuilt."""
        self.check_alive()
        self._send("reset")

    # -- liveness -----------------------------------------------------------------------------

    def check_alive(self) -> None:
        """A ping round trip through every follower's command queue; raises LostRankError."""
        with self._cond:
            before = dict(self._pongs)
        self._send("ping")
        deadline = time.monotonic() + self.timeout
        with self._cond:
            while self.lost is None and any(self._pongs[r] <= before[r] for r in before):
                left = deadline - time.monotonic()
                if left <= 0:
                    late = [r for r in before if self._pongs[r] <= before[r]]
                    self._lose(late[0], f"no answer to a ping within {self.timeout:.0f} s")
                    break
                self._cond.wait(left)
        if self.lost is not None:
            raise self.lost

    def _send(self, kind: str, meta: dict | None = None, leaves=()) -> None:
        if self.lost is not None:
            raise self.lost
        data = _frame(kind, meta, leaves)
        for rank, conn in self._conns.items():
            try:
                conn.sendall(data)
            except OSError as exc:
                self._lose(rank, f"sending to it failed ({exc})")
                raise self.lost from exc

    def _watch(self) -> None:
        socks = list(self._conns.values())
        while not self._closed and self.lost is None:
            readable, _, _ = select.select(socks, [], [], 0.25)
            now = time.monotonic()
            for sock in readable:
                rank = self._ranks[sock.fileno()]
                try:
                    data, why = sock.recv(4096), "its connection closed"
                except OSError as exc:
                    data, why = b"", f"its connection failed ({exc})"
                why += ": the process exited or was killed"
                if not data:
                    if not self._closed:
                        self._lose(rank, why)
                    return
                with self._cond:
                    self._last_seen[rank] = now
                    self._pongs[rank] += data.count(b"p")
                    self._cond.notify_all()
            for rank, seen in self._last_seen.items():
                if now - seen > self.timeout and not self._closed:
                    self._lose(rank, f"no heartbeat for {now - seen:.0f} s")
                    return

    def _lose(self, rank: int, why: str) -> None:
        with self._cond:
            if self.lost is not None:
                return
            self.lost = LostRankError(f"node rank {rank} of {self.nnodes} ({self._peers[rank]}) is lost: {why}")
            self._cond.notify_all()
        logger.error("multi-host: %s; failing the requests in flight, exiting in at most %.0f s",
                     self.lost, _EXIT_GRACE_S)
        timer = threading.Timer(_EXIT_GRACE_S, _hard_exit, args=(f"multi-host: {self.lost}",))
        timer.daemon = True
        timer.start()
        for callback in self.on_lost:
            try:
                callback(self.lost)
            except Exception:  # noqa: BLE001
                logger.exception("multi-host: a lost-node callback failed")

    def close(self) -> None:
        """Tells the followers to exit (they then leave jax.distributed with rank 0)."""
        if self._closed:
            return
        self._closed = True
        if self.lost is None:
            data = _frame("exit")
            for conn in self._conns.values():
                try:
                    conn.sendall(data)
                except OSError:
                    pass


class Follower:
    """A rank > 0's end: commands from rank 0 in order, heartbeats and ping answers back."""

    def __init__(self, par: ParallelConfig):
        addr = (par.master_addr, par.master_port + 1)
        deadline = time.monotonic() + _CONNECT_TIMEOUT_S
        while True:  # rank 0 listens once jax.distributed is up everywhere, which it waits for too
            try:
                self.sock = socket.create_connection(addr, timeout=10.0)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        self.sock.settimeout(None)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._lock = threading.Lock()
        self.sock.sendall(_frame("hello", {"rank": par.node_rank}))
        self._interval = max(0.2, par.node_timeout / 5)
        threading.Thread(target=self._heartbeat, name="jaxllm-multihost-heartbeat", daemon=True).start()

    def _heartbeat(self) -> None:
        # A thread of its own: the GIL is free while XLA runs, so a busy follower still beats.
        while True:
            time.sleep(self._interval)
            try:
                self._write(b"h")
            except OSError:
                return

    def _write(self, data: bytes) -> None:
        with self._lock:
            self.sock.sendall(data)

    def recv(self) -> tuple[str, dict, list[np.ndarray]]:
        return _read_frame(self.sock)

    def pong(self) -> None:
        self._write(b"p")


# ---- set-up -----------------------------------------------------------------------------------

_channel: Leader | Follower | None = None


def initialize(par: ParallelConfig) -> Leader | Follower | None:
    """Joins the N processes into one JAX runtime and opens the step channel (once per process; before
    any device use). None on one host."""
    global _channel
    if par.nnodes <= 1:
        return None
    if _channel is not None:
        return _channel
    if not 0 <= par.node_rank < par.nnodes:
        raise ValueError(f"node_rank must be in 0..{par.nnodes - 1}, got {par.node_rank}")
    if par.data_parallel_size != 1:
        raise ValueError("data_parallel_size > 1 is not supported with nnodes > 1 yet; use tensor parallel "
                         "over all nodes' devices")
    # Cross-process collectives on CPU (the default in jax 0.10; set so that no site config changes it).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    main_thread = threading.current_thread() is threading.main_thread()
    sigterm = signal.getsignal(signal.SIGTERM) if main_thread else None
    jax.distributed.initialize(coordinator_address=f"{par.master_addr}:{par.master_port}",
                               num_processes=par.nnodes, process_id=par.node_rank,
                               # Our own channel notices a lost rank first; this abort is the backstop.
                               heartbeat_timeout_seconds=max(100, int(3 * par.node_timeout)))
    if main_thread:
        # jax.distributed's preemption notifier swallows SIGTERM (a TPU-pod convention): a follower
        # would then outlive `kill`, and the server would lose its drain-on-SIGTERM. Put ours back.
        signal.signal(signal.SIGTERM, sigterm if sigterm is not None else signal.SIG_DFL)
    n = jax.device_count()
    if par.tensor_parallel_size != n:
        raise ValueError(f"with nnodes {par.nnodes}, tensor_parallel_size must span every device of every node "
                         f"({n} = {par.nnodes} x {jax.local_device_count()}), got {par.tensor_parallel_size}")
    _channel = Leader(par) if par.node_rank == 0 else Follower(par)
    atexit.register(_at_exit)  # after jax's own atexit hook, so it runs first (LIFO)
    return _channel


def _hard_exit(message: str) -> None:
    logger.error("%s; exiting 1", message)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)  # jax.distributed's shutdown barrier would wait for the lost rank


def _at_exit() -> None:
    if isinstance(_channel, Leader):
        if _channel.lost is not None:
            _hard_exit(f"multi-host: {_channel.lost}")
        _channel.close()


def global_mesh(par: ParallelConfig):
    from models import sharding
    return sharding.make_mesh(par.tensor_parallel_size, 1)


# ---- rank 0 -----------------------------------------------------------------------------------

class LeaderEngine:
    """Rank 0's engine: an LLMEngine whose device calls are mirrored to the followers. A lost rank
    makes `step` raise LostRankError (also when idle: has_unfinished_requests turns true), so the
    server fails every open request with it and exits non-zero."""

    def __init__(self, config: EngineConfig):
        from jaxllm.engine.engine import LLMEngine
        par = config.parallel
        if par.node_rank != 0:
            raise ValueError(f"node rank {par.node_rank} runs jaxllm.engine.multihost.run_follower, not an engine")
        self.leader = initialize(par)
        self.engine = LLMEngine(config, mesh=global_mesh(par), mirror=self.leader)

    def __getattr__(self, name):
        if name in ("engine", "leader"):
            raise AttributeError(name)
        return getattr(self.engine, name)

    @property
    def healthy(self) -> bool:
        return self.leader.lost is None and self.engine.healthy

    def has_unfinished_requests(self) -> bool:
        return self.leader.lost is not None or self.engine.has_unfinished_requests()

    def step(self):
        if self.leader.lost is not None:
            raise self.leader.lost
        try:
            return self.engine.step()
        except Exception as exc:
            if self.leader.lost is not None and exc is not self.leader.lost:
                raise self.leader.lost from exc
            raise

    def on_fatal(self, callback) -> None:
        """callback(exc) runs (on another thread) as soon as a node is lost. The engine thread may not see
        the error for a long time: measured on CPU, a step whose peer died mid-way leaves it blocked in
        `fetch` until XLA's CPU collective timeout (--xla_cpu_collective_timeout_seconds, long by default;
        at 3 s the step fails in 3 s), so the server fails its streams from here (AsyncEngine)."""
        self.leader.on_lost.append(callback)

    def get_stats(self):
        stats = self.engine.get_stats()
        stats.healthy = self.healthy
        return stats

    def close(self) -> None:
        self.leader.close()


# ---- ranks > 0 --------------------------------------------------------------------------------

def run_follower(config: EngineConfig) -> int:
    """A rank > 0: its shards of the model, the programs rank 0 names, in its order, until rank 0 says
    exit (returns 0). If rank 0 goes away the process exits 1 at once."""
    from models import sharding
    from jaxllm.engine.engine import load_for
    from jaxllm.engine.runner import ModelRunner, SampleArrays
    from jaxllm.engine.sampler import SamplingTensors
    import jax.numpy as jnp

    par = config.parallel
    if par.node_rank == 0:
        raise ValueError("node rank 0 runs the engine, not a follower")
    channel = initialize(par)
    mesh = global_mesh(par)
    # The same steps as LLMEngine.__init__ before its runner, so that both sides place the same arrays.
    loaded = load_for(config, mesh)
    sharding.check_tensor_parallel(loaded.config, par.tensor_parallel_size)
    sharding.shard_model(loaded.model, mesh, expert_parallel=par.enable_expert_parallel)
    try:
        kind, meta, _ = channel.recv()
        if kind != "init":
            raise RuntimeError(f"multi-host: expected the runner's set-up from rank 0, got {kind!r}")
        meta = dict(meta, kv_dtype=jnp.dtype(meta["kv_dtype"]))
        runner = ModelRunner(loaded.model, loaded.config, mesh=mesh, **meta)
        logger.info("node rank %d following rank 0 with %d local devices", par.node_rank, jax.local_device_count())
        trees = {"forward": jax.tree.structure(runner._padding_inputs(1).forward),
                 "sample": jax.tree.structure(SampleArrays(np.zeros(1), np.zeros(1),
                                                           SamplingTensors.build([], R=1, B=1, W=1)))}
        hidden, sampled = None, runner.no_samples
        while True:
            kind, meta, leaves = channel.recv()
            if kind == "forward":
                x = jax.tree.unflatten(trees["forward"], leaves)
                hidden = runner._run_forward(x, sampled if meta["prev"] else runner.no_samples)
                sampled = runner.no_samples
            elif kind == "sample":
                _, sampled = runner._run_sample(hidden, jax.tree.unflatten(trees["sample"], leaves))
            elif kind == "pool":
                runner._run_pool(hidden, leaves[0])
            elif kind == "reset":
                runner.reset_device_state()
            elif kind == "ping":
                channel.pong()
            elif kind == "exit":
                break
            else:
                raise RuntimeError(f"multi-host: unknown command {kind!r} from rank 0")
    except (ConnectionError, OSError) as exc:
        _hard_exit(f"multi-host: node rank 0 is gone ({exc})")
    except BaseException:  # noqa: BLE001 - a follower that cannot run a step must not leave rank 0 hanging
        logger.exception("multi-host: node rank %d failed", par.node_rank)
        _hard_exit(f"multi-host: node rank {par.node_rank} failed")
    logger.info("node rank %d: rank 0 is done; leaving", par.node_rank)
    jax.distributed.shutdown()
    return 0
