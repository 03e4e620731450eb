"""`stairs-serve`: an OpenAI-compatible completions server with continuous batching.

The command line builds one ServeConfig; `main` loads the pair and serves it with uvicorn, or
(--ray) as a Ray Serve deployment whose replicas each build the same app (`ray_app`, also what
serve_config.yaml imports).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import signal
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path

from engine import EngineError, InputError
from engine import options as opt
from engine.cli import ASSISTANT_HELP, Parser, add_load_flags, add_option_flags, load_config

from . import config as c
from .config import ServeConfig

log = logging.getLogger("stairs.serve")


def _seconds(zero_ok: bool):
    """argparse type: a finite number of seconds > 0 (>= 0 if zero_ok)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a number of seconds {'>= 0' if zero_ok else '> 0'}"
            )
        return value

    return parse


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--main", required=True, help="exported main model folder")
    p.add_argument("--assistant", help=ASSISTANT_HELP)
    p.add_argument(
        "--strategy",
        default="auto",
        choices=opt.STRATEGY_NAMES,
        help="what every request runs (auto: assisted, or lookup without an assistant, its"
        " draft length by the number of active requests)",
    )
    add_option_flags(p)  # one flag per option of the engine's schema
    add_load_flags(p)
    p.add_argument(
        "--self-check", action="store_true",
        help="at start, check that a row's logits are the same bits in every call shape on this"
        " machine (as stairs-verify --exact); exit 2 instead of serving if not",
    )  # fmt: skip


SECONDS_FLAGS = (
    ("--timeout", c.DEFAULT_TIMEOUT_S, "seconds of generation per request, then 504"),
    ("--body-timeout", c.DEFAULT_BODY_TIMEOUT_S, ("seconds to receive a request's body (then"
     " 408), and the longest a response waits for a client that stopped reading it (then the"
     " connection is closed)")),
    ("--header-timeout", c.DEFAULT_HEADER_TIMEOUT_S, ("seconds from a request's first byte to the"
     " end of its headers, then the connection is closed")),
    ("--idle-timeout", c.DEFAULT_IDLE_TIMEOUT_S, ("seconds a connection may stay open without"
     " sending a request, then closed")),
)  # fmt: skip


def _add_serving_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0: every one)")
    p.add_argument("--port", type=opt.count_type(65535), default=8000, help="TCP port")
    p.add_argument(
        "--max-batch-tokens",
        type=opt.count_type(c.MAX_COUNT),
        help="rows x padded tokens of one main call (default: the engine's)",
    )
    p.add_argument(
        "--max-queue",
        type=opt.count_type(c.MAX_COUNT),
        default=c.DEFAULT_MAX_QUEUE,
        help="prompts in the server at once (waiting or generating); beyond it 429",
    )
    p.add_argument(
        "--max-active",
        type=opt.count_type(c.MAX_COUNT),
        help="prompts generating at once (1: one at a time; default: every one admitted)",
    )
    for flag, default, text in SECONDS_FLAGS:
        p.add_argument(flag, type=_seconds(False), default=default, help=text)
    p.add_argument(
        "--max-connections",
        type=opt.count_type(c.MAX_COUNT),
        default=c.DEFAULT_MAX_CONNECTIONS,
        help="open connections served at once; beyond it the oldest idle one is closed, or,"
        " with none idle, 503",
    )
    p.add_argument(
        "--drain-grace",
        type=_seconds(True),
        default=c.DEFAULT_DRAIN_GRACE_S,
        help="after SIGTERM: seconds /ready answers 503 before the listener closes",
    )
    p.add_argument("--model-name", help="the model id clients send (default: the main folder's)")
    p.add_argument(
        "--api-key", help=f"require 'Authorization: Bearer KEY' (default: ${c.API_KEY_ENV} if set)"
    )


def _add_process_flags(p: argparse.ArgumentParser) -> None:
    """How many processes serve: uvicorn workers on one port, or Ray Serve replicas."""
    p.add_argument(
        "--workers",
        type=opt.count_type(c.MAX_WORKERS),
        default=1,
        help="server processes sharing the port, each with its own engine; their weights are"
        " mapped from one weights cache (one copy per machine and user)",
    )
    p.add_argument("--listen-fd", type=int, help=argparse.SUPPRESS)  # a worker's socket
    p.add_argument("--ray", action="store_true", help="serve as a Ray Serve deployment")
    p.add_argument(
        "--replicas", type=opt.count_type(c.MAX_THREADS), default=1, help="--ray: replicas"
    )
    p.add_argument(
        "--ray-address",
        help="--ray: the cluster to join ('auto': the local one; default: start one)",
    )


def _parser() -> Parser:
    """stairs-serve's flags."""
    p = Parser(prog="stairs-serve", description=__doc__.split("\n\n")[0])
    _add_model_flags(p)
    _add_serving_flags(p)
    _add_process_flags(p)
    return p


def parse_args(argv: list[str] | None = None) -> ServeConfig:
    """stairs-serve's arguments as a ServeConfig; api_key falls back to $STAIRS_API_KEY."""
    p = _parser()
    ns = p.parse_args(argv)
    # ServeConfig's fields from their flags; its load settings from add_load_flags' LoadConfig
    named = {f.name for f in fields(ServeConfig)} - set(c.LOAD_FIELDS) - {"options"}
    a = {k: v for k, v in vars(ns).items() if k in named}
    try:
        load = load_config(ns)
        a.update((k, getattr(load, k)) for k in c.LOAD_FIELDS)
        options = opt.flag_options(ns.strategy, {k: getattr(ns, k) for k in opt.OPTIONS})
        cfg = ServeConfig(options=options, **a)
    except InputError as exc:
        p.error(str(exc))
    if cfg.workers > 1 and cfg.ray:
        p.error("--workers is for uvicorn processes; with --ray use --replicas")
    return cfg.with_env()


def _parent_death_signal():
    """A preexec_fn for a worker: SIGTERM when the parent dies, even by SIGKILL (Linux
    PR_SET_PDEATHSIG), and exit at once if it is already gone. prctl is looked up here, in the
    parent, so the forked child only calls it (no dlopen between fork and exec)."""
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux: workers outlive a killed parent
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:
            os._exit(1)

    return preexec


def _exit_status(rc: int) -> int:
    """A worker's return code as a shell would report it (killed by signal s: 128 + s)."""
    return 128 - rc if rc < 0 else rc


def _how(rc: int) -> str:
    """'exit status N' or 'killed by SIGNAME'."""
    if rc >= 0:
        return f"exit status {rc}"
    with contextlib.suppress(ValueError):
        return f"killed by {signal.Signals(-rc).name}"
    return f"killed by signal {-rc}"


def _say(msg: str) -> None:
    print(f"stairs-serve: {msg}", file=sys.stderr, flush=True)


def _run_workers(cfg: ServeConfig, argv: list[str]) -> int:
    """--workers N: bind the port here, start N `stairs-serve` processes that accept on it
    (the kernel spreads connections) and supervise them (_Arbiter): a worker that dies is
    logged and started again while the others keep serving; SIGTERM/SIGINT are forwarded.
    The workers run in their own session, so a terminal's Ctrl-C reaches them once, through
    here."""
    import socket
    import subprocess

    sock = socket.create_server((cfg.host, cfg.port), backlog=2048)
    sock.set_inheritable(True)
    cmd = [sys.executable, "-m", "serve", *argv, "--workers", "1", "--listen-fd"]
    cmd.append(str(sock.fileno()))
    preexec = _parent_death_signal()  # prctl only, in the child: no lock, no allocation

    def spawn() -> subprocess.Popen:
        return subprocess.Popen(
            cmd,
            pass_fds=(sock.fileno(),),
            preexec_fn=preexec,  # noqa: PLW1509 - see _parent_death_signal
            start_new_session=True,
        )

    arbiter = _Arbiter(spawn, cfg.workers, sock.close)
    _say(
        f"{cfg.workers} workers (pids {', '.join(str(p.pid) for p in arbiter.procs)}) on"
        f" http://{cfg.host}:{cfg.port}"
    )
    return arbiter.run()


class _Arbiter:
    """Keeps N workers running, as gunicorn's arbiter does. A worker that dies unasked is
    logged (pid, exit status) and started again after a backoff that doubles with each recent
    restart; more than RESTART_LIMIT restarts within RESTART_WINDOW_S, or a first worker that
    refused its configuration (exit 2, as stairs-serve exits on a bad model or flag), stops
    them all. The parent holds the listening socket meanwhile, so connections wait in its
    backlog for a live worker; on a signal it closes its copy, so once the workers stop new
    clients are refused. The signal handler only records the signal: the loop acts on it."""

    RESTART_LIMIT = 5
    RESTART_WINDOW_S = 60.0
    BACKOFF_S = (0.5, 10.0)  # the first wait, the longest

    def __init__(self, spawn, n: int, close_listener):
        self.spawn, self.close_listener = spawn, close_listener
        self.procs = [spawn() for _ in range(n)]
        self.first = {p.pid for p in self.procs}
        self.due: dict[int, float] = {}  # slot -> when its worker starts again
        self.lost: set[int] = set()  # slots whose worker died unasked (not yet replaced)
        self.restarts: list[float] = []
        self.signals: list[int] = []  # appended by the handler, read by the loop
        self.forwarded: list[int] = []
        self.failed = 0  # exit status of the worker that made the parent give up

    def _on_signal(self, sig, frame=None) -> None:
        self.signals.append(sig)

    def run(self) -> int:
        """Supervise until every worker has stopped after a signal (or the parent gave up): 0
        when each stopped cleanly, else the first other status (see the class)."""
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        while True:
            self._forward()
            if not self.forwarded:
                self._reap()
                self._restart_due()
            elif all(p.poll() is not None for p in self.procs):
                break
            time.sleep(0.2)
        if self.failed:
            return self.failed
        clean = (0, *(-sig for sig in self.forwarded))  # stopped by the signal passed on
        codes = [p.returncode for s, p in enumerate(self.procs) if s not in self.lost]
        return next((_exit_status(rc) for rc in codes if rc not in clean), 0)

    def _forward(self) -> None:
        """Pass every signal not yet passed on to the live workers; the first stops restarts
        and closes the parent's listening socket."""
        while len(self.forwarded) < len(self.signals):
            sig = self.signals[len(self.forwarded)]
            if not self.forwarded:
                self.close_listener()
                self.due.clear()
            self.forwarded.append(sig)
            for proc in self.procs:
                if proc.poll() is None:
                    proc.send_signal(sig)

    def _reap(self) -> None:
        now = time.monotonic()
        for slot, proc in enumerate(self.procs):
            if proc.poll() is None or slot in self.due:
                continue
            _say(f"worker {proc.pid} died ({_how(proc.returncode)})")
            self.lost.add(slot)
            self.restarts = [t for t in self.restarts if now - t < self.RESTART_WINDOW_S]
            refused = proc.returncode == 2 and proc.pid in self.first
            if refused or len(self.restarts) >= self.RESTART_LIMIT:
                why = "refused its configuration (see its error above)"
                if not refused:
                    why = f"{len(self.restarts)} restarts in {self.RESTART_WINDOW_S:g} s"
                _say(f"giving up: worker {proc.pid} {why}; stopping the others")
                self.failed = _exit_status(proc.returncode) or 1
                self.signals.append(signal.SIGTERM)
                return
            first, most = self.BACKOFF_S
            wait = min(first * 2 ** len(self.restarts), most)
            self.restarts.append(now)
            self.due[slot] = now + wait
            _say(f"starting a new worker in {wait:g} s")

    def _restart_due(self) -> None:
        now = time.monotonic()
        for slot, when in list(self.due.items()):
            if now >= when:
                del self.due[slot]
                self.procs[slot] = self.spawn()
                self.lost.discard(slot)
                _say(f"worker {self.procs[slot].pid} started")


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: load the pair, build the app, serve until SIGTERM."""
    from .app import build_app
    from .server import Server

    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = parse_args(argv)
    fd = Parser(prog="stairs-serve", add_help=False)
    fd.add_argument("--listen-fd", type=int)
    listen_fd = fd.parse_known_args(argv)[0].listen_fd
    try:
        if cfg.ray:
            return _run_ray(cfg)
        if cfg.workers > 1:
            return _run_workers(cfg, argv)
        app = build_app(cfg)
    except (EngineError, OSError) as exc:
        print(f"stairs-serve: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    st = app.state.stairs
    print(
        f"stairs-serve: {st.model_name} ({st.strategy}: {st.ran} {st.ran_options}) on "
        f"http://{cfg.host}:{cfg.port}" + (" (API key required)" if cfg.api_key else ""),
        file=sys.stderr,
        flush=True,
    )
    server = Server(app, log_level="info", **({"fd": listen_fd} if listen_fd is not None else {}))
    _log_to_stderr(worker=listen_fd is not None)
    _log_drain(server)
    server.run()
    log.info("stopped (prompts unfinished: %d)", st.inflight)
    return 0


def _log_to_stderr(worker: bool) -> None:
    """Send stairs.serve's records (INFO and up) to stderr, as the other lines the command
    prints; a worker's carry its pid (several share the terminal)."""
    if log.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    tag = f"stairs-serve[{os.getpid()}]" if worker else "stairs-serve"
    handler.setFormatter(logging.Formatter(f"{tag}: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)


def _log_drain(server) -> None:
    """Log the drain of a serve.server.Server (which runs it): once when the first signal
    starts it (prompts in flight, seconds until the listener closes) and once when the
    listener closes. Wraps its uvicorn server's signal handler and tick, which uvicorn looks
    up on the instance when it runs."""
    uv, state = server.server, server.state
    handle_exit, on_tick = uv.handle_exit, uv.on_tick
    closed = []

    def handle(sig, frame):
        if not state.draining:
            log.info(
                "%s: draining (prompts in flight: %d); the listener closes in %g s",
                signal.Signals(sig).name, state.inflight, state.config.drain_grace,
            )  # fmt: skip
        handle_exit(sig, frame)

    async def tick(counter: int) -> bool:
        stop = await on_tick(counter)
        if uv.should_exit and not closed:
            closed.append(True)
            log.info(
                "closing the listener (prompts in flight: %d, given up to %g s to finish)",
                state.inflight, c.DRAIN_TIMEOUT_S,
            )  # fmt: skip
        return stop

    uv.handle_exit, uv.on_tick = handle, tick


# -- Ray Serve ---------------------------------------------------------------------------------


def ray_app(args: dict | None = None):
    """Ray Serve application builder: one Engine and scheduler per replica, each serving the same
    app (`serve run serve_config.yaml`, or `stairs-serve --ray`). args: ServeConfig's fields but
    the uvicorn process's (config.RAY_ARGS; replicas default 1); model paths are made absolute
    here, so every node needs the folders at the same path. The API key may also come from
    $STAIRS_API_KEY on the driver."""
    from ray import serve

    cfg = ServeConfig.of(dict(args or {}), refuse=c.SERVER_ONLY).with_env()
    if cfg.main is None:
        raise InputError("args.main (the exported main model folder) is required")
    cfg = cfg.replace(
        main=str(Path(cfg.main).resolve()),
        assistant=str(Path(cfg.assistant).resolve()) if cfg.assistant else None,
        threads=cfg.threads or 1,
    )
    deployment = serve.deployment(
        _replica_class(),
        name="stairs",
        num_replicas=cfg.replicas,
        max_ongoing_requests=cfg.max_queue,  # Ray's default (5) would starve the continuous batch
        ray_actor_options={"num_cpus": cfg.threads},
    )
    return deployment.bind(cfg)


def _replica_class():
    from ray import serve

    @serve.ingress()
    class StairsReplica:
        """One replica: loads the pair and serves build_app's app."""

        def __init__(self, cfg: ServeConfig):
            from .app import build_app

            self._app = build_app(cfg)

        def __serve_build_asgi_app__(self):
            return self._app

    return StairsReplica


def _run_ray(cfg: ServeConfig) -> int:
    """--ray: the same app as a Ray Serve deployment with cfg.replicas replicas."""
    try:
        import ray
        from ray import serve
    except ImportError:
        raise InputError("--ray needs Ray Serve: pip install 'stairs[ray]'") from None
    ray.init(address=cfg.ray_address)
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    args = {k: v for k, v in asdict(cfg).items() if k in c.RAY_ARGS}
    serve.run(ray_app(args), name="stairs", route_prefix="/")
    print(
        f"stairs-serve: {cfg.replicas} Ray replica(s) on http://{cfg.host}:{cfg.port}",
        file=sys.stderr,
        flush=True,
    )

    def stop(sig, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        with contextlib.suppress(Exception):  # Ray may already be going down with the signal
            serve.shutdown()
    return 0
