"""flashsd3-serve: load the pipeline once and serve it over HTTP until Ctrl-C or SIGTERM.

    flashsd3-serve --demo                                  # offline toy model on http://127.0.0.1:7860/
    flashsd3-serve --lora jasperai/flash-sd3 --max-batch 4 # SD3-medium + Flash SD3, batching 4 images
    FLASHSD3_API_KEY=... flashsd3-serve --host 0.0.0.0     # other machines: a key is required

The model flags are flashsd3-sample's (`flashsd3.cli.add_model_arguments`). Exit codes: 0 stopped, 2 bad
flags / weights unavailable / port taken, 130 a second Ctrl-C (the running batch is abandoned) or Ctrl-C
while loading. The first Ctrl-C or SIGTERM stops accepting, answers queued requests 503 and lets the
running batch finish.
"""
from __future__ import annotations

import argparse
import contextlib
import ipaddress
import os
import signal
import socket
import sys
import threading

from .. import cli
from ..controlnet import flags as control_flags
from .limits import add_limit_arguments, limits_from

PROG = "flashsd3-serve"
DEFAULT_PORT = 7860  # AUTOMATIC1111's, so its clients find it
KEY_ENV = "FLASHSD3_API_KEY"


def build_parser() -> argparse.ArgumentParser:
    p = cli._Parser(prog=PROG, description="Serve one warm flashsd3 pipeline: a web page at /, the OpenAI Images "
                                           "API (/v1/images/...) and AUTOMATIC1111's (/sdapi/v1/...).",
                    epilog="Exit codes: 0 stopped, 2 bad flags / weights unavailable / port taken, 130 second Ctrl-C.")
    cli.add_model_arguments(p)
    control_flags.add_controlnet_flag(p.add_argument_group("ControlNet (repeatable)"),
                                      "its default conditioning scale (default 1). Loaded at start and named; "
                                      "requests choose among them by name and send their control images")
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s: this machine only); "
                   "any other needs --api-key or --no-auth")
    g.add_argument("--port", type=cli._number(high=65536), default=DEFAULT_PORT,
                   help="default %(default)s; 0 picks a free port (printed)")
    g.add_argument("--api-key", metavar="KEY", help=f"require 'Authorization: Bearer KEY' (default: ${KEY_ENV}, "
                   "which keeps the key out of the process list)")
    g.add_argument("--no-auth", action="store_true", help="serve a non-loopback --host without a key (you have "
                   "another gate in front, e.g. a reverse proxy with its own auth)")
    add_limit_arguments(p, cli._number(low=1))
    return p


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_security(args) -> str | None:
    """The API key to require (None: open); refuses a non-loopback host without --api-key or --no-auth."""
    key = args.api_key if args.api_key is not None else os.environ.get(KEY_ENV) or None
    if key is not None and len(key) < 8:
        raise cli.UsageError("--api-key must be at least 8 characters")
    if not is_loopback(args.host) and key is None and not args.no_auth:
        raise cli.UsageError(f"--host {args.host} serves other machines: give --api-key KEY (or ${KEY_ENV}) so that "
                             "requests need 'Authorization: Bearer KEY', or --no-auth if something else guards it")
    return key


def bind(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)  # connections wait in the backlog until uvicorn accepts them
    except OSError as e:
        raise cli.UsageError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}/"


def main(argv: list[str] | None = None) -> int:
    cli.reproducible_mkl()  # before anything imports torch
    args = build_parser().parse_args(argv)
    try:
        import uvicorn  # noqa: F401  (the optional extra)
        from fastapi import FastAPI  # noqa: F401
    except ImportError as e:
        print(f"{PROG}: error: {e.name} is not installed: pip install 'flashsd3[serve]' (or -e '.[serve]')",
              file=sys.stderr)
        return 2
    try:
        return serve(args)
    except cli.BAD_INPUT as e:
        print(f"{PROG}: error: {cli.one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


def serve(args) -> int:
    import uvicorn

    from ..distributed import resolve_device
    from .app import Server, create_app
    from .engine import load_engine
    from .worker import Worker

    key, limits = check_security(args), limits_from(args)
    try:
        device = resolve_device(args.device, None)
    except ValueError as e:
        raise cli.UsageError(str(e)) from None
    sock = bind(args.host, args.port)
    dtype, dtype_note = cli.run_dtype(args.dtype, device)  # flashsd3-sample's rule: auto = bf16/fp32/fp16
    if args.demo:
        print(f"{PROG}: note: --demo uses a random toy-width model: its images are noise-like by design",
              file=sys.stderr)
    if dtype_note:
        print(f"{PROG}: {dtype_note}")
    engine = load_engine(args, device, dtype)
    worker = Worker(engine, limits)
    worker.start()
    config = uvicorn.Config(create_app(Server(engine, worker, limits, key)), log_level="warning", lifespan="off")
    server = graceful_server(config, worker)
    auth = "API key required" if key else "no API key" + ("" if is_loopback(args.host) else " (--no-auth)")
    names = ", ".join(f"{n}:{s:g}" for n, _, s in engine.loras) or "none"
    nets = ", ".join(f"{c.name}:{c.scale:g}" for c in engine.controlnets)
    print(f"{PROG}: {engine.model_label} ({dtype} on {device}; LoRAs: {names}" + (f"; ControlNets: {nets}" if nets
          else "") + f") on {url_of(sock)} ({auth}; Ctrl-C to stop)", flush=True)
    server.run(sockets=[sock])
    if server.exit_code == 130:
        print(f"{PROG}: stopped at once (second Ctrl-C)", file=sys.stderr, flush=True)
        os._exit(130)  # the worker may be inside a model call: do not wait for it
    worker.shutdown()
    worker.join()
    print(f"{PROG}: stopped", file=sys.stderr, flush=True)
    return 0


def graceful_server(config, worker):
    """uvicorn's Server with flashsd3-serve's signals: the first Ctrl-C or SIGTERM drains (queued -> 503, the
    running batch finishes, open answers are sent); a second Ctrl-C stops at once with exit code 130."""
    import uvicorn

    class Server(uvicorn.Server):
        exit_code = 0

        @contextlib.contextmanager
        def capture_signals(self):  # uvicorn's re-raises the signal after shutdown; this exits 0 instead
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            old = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in old.items():
                    signal.signal(sig, handler)

        def handle_exit(self, sig, frame):
            if self.should_exit:
                if sig == signal.SIGINT:
                    self.exit_code = 130
                    worker.abort()
                    self.force_exit = True
                return
            print(f"{PROG}: stopping: no new requests, queued ones get 503, the running batch finishes "
                  "(Ctrl-C again to stop at once)", file=sys.stderr, flush=True)
            worker.shutdown()
            self.should_exit = True

    return Server(config)


if __name__ == "__main__":
    sys.exit(main())
