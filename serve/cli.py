"""`stairs-serve`: an OpenAI-compatible completions server with continuous batching.

The command line builds one ServeConfig; `main` loads the pair and serves it with uvicorn, or
(--ray) as a Ray Serve deployment whose replicas each build the same app (`ray_app`, also what
serve_config.yaml imports).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path

from engine import EngineError, InputError
from engine import options as opt
from engine.cli import add_load_flags, add_option_flags, load_args

from . import config as c
from .config import ServeConfig


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit 2) and defaults shown in --help."""

    def __init__(self, **kw):
        super().__init__(formatter_class=argparse.ArgumentDefaultsHelpFormatter, **kw)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


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
    p.add_argument("--assistant", help="exported assistant model folder")
    p.add_argument(
        "--strategy",
        default="auto",
        choices=opt.STRATEGY_NAMES,
        help="what every request runs (auto: assisted, or lookup without an assistant, its"
        " draft length by the number of active requests)",
    )
    add_option_flags(p)  # one flag per option of the engine's schema
    p.add_argument(
        "--threads", type=opt.count_type(c.MAX_THREADS), help="ORT threads (default: ORT's)"
    )
    p.add_argument("--provider", default="cpu", help="cpu, cuda, coreml or auto")
    add_load_flags(p)


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
        help="prompts generating at once (1: one at a time)",
    )
    p.add_argument(
        "--timeout",
        type=_seconds(False),
        default=c.DEFAULT_TIMEOUT_S,
        help="seconds of generation per request, then 504",
    )
    p.add_argument(
        "--body-timeout",
        type=_seconds(False),
        default=c.DEFAULT_BODY_TIMEOUT_S,
        help="seconds to receive a request's body, then 408",
    )
    p.add_argument(
        "--max-connections",
        type=opt.count_type(c.MAX_COUNT),
        default=c.DEFAULT_MAX_CONNECTIONS,
        help="open connections served at once; beyond it 503",
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


def parse_args(argv: list[str] | None = None) -> ServeConfig:
    """stairs-serve's arguments as a ServeConfig; api_key falls back to $STAIRS_API_KEY."""
    p = _Parser(prog="stairs-serve", description=__doc__.split("\n\n")[0])
    _add_model_flags(p)
    _add_serving_flags(p)
    _add_process_flags(p)
    ns = p.parse_args(argv)
    loading = load_args(ns)
    a = vars(ns)
    for k in ("no_verify", "no_weights_cache", "listen_fd"):
        a.pop(k)
    given = {k: a.pop(k) for k in opt.OPTIONS}
    try:
        options = opt.flag_options(a["strategy"], given)
        cfg = ServeConfig(options=options, **{**a, **loading})
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


def _run_workers(cfg: ServeConfig, argv: list[str]) -> int:
    """--workers N: bind the port here, start N `stairs-serve` processes that accept on it
    (the kernel spreads connections), forward SIGTERM/SIGINT to them and wait. The workers run
    in their own session, so a terminal's Ctrl-C reaches them once, through here. A worker
    that exits unasked stops the rest; the status is then that worker's, else 0 when every
    worker stopped cleanly after a signal."""
    import socket
    import subprocess

    sock = socket.create_server((cfg.host, cfg.port), backlog=2048)
    sock.set_inheritable(True)
    cmd = [sys.executable, "-m", "serve", *argv, "--workers", "1", "--listen-fd"]
    cmd.append(str(sock.fileno()))
    preexec = _parent_death_signal()  # prctl only, in the child: no lock, no allocation
    procs = []
    for _ in range(cfg.workers):
        procs.append(
            subprocess.Popen(
                cmd,
                pass_fds=(sock.fileno(),),
                preexec_fn=preexec,  # noqa: PLW1509 - see _parent_death_signal
                start_new_session=True,
            )
        )
    sock.close()  # the workers hold it: once they stop accepting, new clients are refused
    print(
        f"stairs-serve: {cfg.workers} workers (pids {', '.join(str(p.pid) for p in procs)}) on"
        f" http://{cfg.host}:{cfg.port}",
        file=sys.stderr,
        flush=True,
    )
    return _supervise(procs)


def _supervise(procs: list) -> int:
    """Forward SIGTERM/SIGINT to the workers and wait for all; see _run_workers."""
    stopping, unasked = [], []

    def forward(sig, frame):
        stopping.append(sig)
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(sig)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    while any(proc.poll() is None for proc in procs):
        if not stopping and (dead := [p for p in procs if p.poll() is not None]):
            unasked.append(dead[0])
            forward(signal.SIGTERM, None)  # the port must not stay half-served
        time.sleep(0.2)
    if unasked:
        return _exit_status(unasked[0].returncode) or 1
    return next((_exit_status(p.returncode) for p in procs if p.returncode), 0)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: load the pair, build the app, serve until SIGTERM."""
    from .app import build_app
    from .server import Server

    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = parse_args(argv)
    fd = _Parser(prog="stairs-serve", add_help=False)
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
    Server(app, log_level="info", **({"fd": listen_fd} if listen_fd is not None else {})).run()
    return 0


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
