"""The speech server scaled out on Ray Serve: ``serve.build_app`` in several replicas behind Ray's HTTP proxy.

    python -m melle_runtime.serve_ray --engine engines/demo --replicas 2 [--port 8000]
    python -m melle_runtime.serve_ray --engine engines/demo --min-replicas 1 --max-replicas 4
        [--target-ongoing-requests 1] [--replica-cpus 1] [--address auto] [serve.py's options]

Each replica is a Ray actor that builds the same FastAPI app as ``melle_runtime.serve`` (its own
engine, voices, worker thread and queue of ``--max-queue``) and is sent requests only once its
engine has loaded and spoken once. Streaming (audio bytes or SSE) passes through Ray's proxy as it
is made, and a client that hangs up stops its replica's decoding. Ray sends a replica at most
``--max-queue`` requests and holds up to ``--max-queue`` more at its proxy; beyond that it answers
429. Every response names the replica that made it in the ``X-Melle-Replica`` header.

Without ``--address`` a local Ray is started (``--num-cpus``, default all cores) and stopped on
Ctrl-C or SIGTERM; with it, the app joins that cluster and only the app is removed on exit.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass, replace

import ray
from fastapi import FastAPI
from ray import serve
from ray.serve.config import BackpressureConfig
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from melle.core.cli import ExitCode, UserError, run_cli
from melle.core.manifest import EngineError
from melle_runtime.serve import ServerSettings, add_server_arguments, build_app, server_settings

APP_NAME = "melle"
DEPLOYMENT_NAME = "MelleSpeech"
REPLICA_HEADER = "x-melle-replica"


@dataclass(frozen=True)
class Scaling:
    """How many replicas Ray runs, and what each one reserves."""

    replicas: int = 1  # a fixed count, used when min_replicas / max_replicas are not set
    min_replicas: int | None = None  # with max_replicas: autoscale between the two
    max_replicas: int | None = None
    target_ongoing_requests: float = 1.0  # per replica: above it Ray adds replicas (one decodes at a time)
    replica_cpus: float = 1.0  # Ray CPUs reserved per replica

    @property
    def autoscaling(self) -> bool:
        return self.max_replicas is not None

    def describe(self) -> str:
        if self.autoscaling:
            return (f"{self.min_replicas}-{self.max_replicas} replicas (autoscaling at "
                    f"{self.target_ongoing_requests:g} ongoing requests each)")
        return f"{self.replicas} replica{'s' * (self.replicas != 1)}"

    def deployment_options(self, max_queue: int) -> dict:
        """``serve.deployment`` options: replicas, CPUs, and Ray's queues sized like the server's own."""
        # A replica is sent at most max_queue requests, the proxy holds max_queue more, then Ray answers 429.
        options = {"ray_actor_options": {"num_cpus": self.replica_cpus},
                   "max_ongoing_requests": max_queue,
                   "max_queued_requests": max_queue,
                   "backpressure_config": BackpressureConfig(status_code=429)}
        if self.autoscaling:
            options["autoscaling_config"] = {"min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
                                             "target_ongoing_requests": self.target_ongoing_requests}
        else:
            options["num_replicas"] = self.replicas
        return options


class ReplicaHeader:
    """ASGI middleware: every response says which replica made it (streaming bodies pass untouched)."""

    def __init__(self, app: ASGIApp):
        self.app = app
        self.name: bytes | None = None  # read on the first request: the replica context exists by then

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.name is None:
            self.name = serve.get_replica_context().replica_id.unique_id.encode()

        async def send_named(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (REPLICA_HEADER.encode(), self.name)]
            await send(message)

        await self.app(scope, receive, send_named)


def speech_application(settings: ServerSettings, scaling: Scaling) -> serve.Application:
    """The Ray Serve application: ``build_app(settings)`` as the ingress of every replica."""
    # Ray bounds what a replica is sent; the replica's own queue is a backstop with room for requests
    # whose client has left (Ray no longer counts them) until their decoding stops at the next chunk.
    replica_settings = replace(settings, max_queue=2 * settings.max_queue)

    def build_replica_app() -> FastAPI:  # runs in each replica
        # The engine loads before the replica counts as started, so Ray routes nothing to it earlier.
        app = build_app(replica_settings, load_in_background=False)
        app.add_middleware(ReplicaHeader)
        return app

    ingress = serve.ingress(build_replica_app)()
    deployment = serve.deployment(ingress, name=DEPLOYMENT_NAME, **scaling.deployment_options(settings.max_queue))
    return deployment.bind()


def add_scaling_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--replicas", type=int, help="a fixed number of replicas (default: 1)")
    p.add_argument("--min-replicas", type=int, help="autoscale from this many replicas (with --max-replicas)")
    p.add_argument("--max-replicas", type=int, help="autoscale up to this many replicas")
    p.add_argument("--target-ongoing-requests", type=float, default=1.0,
                   help="autoscaling: requests per replica above which Ray adds one")
    p.add_argument("--replica-cpus", type=float, default=1.0,
                   help="Ray CPUs per replica; also its ONNX Runtime threads unless --threads is given")
    p.add_argument("--address", help="a running Ray cluster (e.g. 'auto'); default: start a local one")
    p.add_argument("--num-cpus", type=int, help="CPUs of the local Ray (default: all cores)")


def scaling_from_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> Scaling:
    if (args.min_replicas is None) != (args.max_replicas is None):
        p.error("give both --min-replicas and --max-replicas to autoscale, or neither (then --replicas)")
    if args.max_replicas is not None:
        if args.replicas is not None:
            p.error("choose a fixed --replicas or autoscaling with --min-replicas/--max-replicas, not both")
        if args.min_replicas < 0 or args.max_replicas < max(1, args.min_replicas):
            p.error(f"need 0 <= --min-replicas <= --max-replicas and --max-replicas >= 1, got "
                    f"{args.min_replicas} and {args.max_replicas}")
    elif args.replicas is not None and args.replicas < 1:
        p.error(f"--replicas must be at least 1, got {args.replicas}")
    if args.target_ongoing_requests <= 0 or args.replica_cpus <= 0:
        p.error("--target-ongoing-requests and --replica-cpus must be positive")
    if args.num_cpus is not None and args.address:
        p.error("--num-cpus sizes a local Ray; the cluster at --address has its own CPUs")
    if args.num_cpus is not None and args.num_cpus < 1:
        p.error(f"--num-cpus must be at least 1, got {args.num_cpus}")
    return Scaling(args.replicas or 1, args.min_replicas, args.max_replicas, args.target_ongoing_requests,
                   args.replica_cpus)


def check_health(url: str) -> None:
    """A replica whose engine failed to load still starts (it answers 503); say why and stop instead."""
    try:
        urllib.request.urlopen(f"{url}/health", timeout=30).close()
    except urllib.error.HTTPError as err:
        reason = json.loads(err.read() or b"{}").get("error", err.reason)
        raise UserError(f"the engine did not load on a replica: {reason}", ExitCode.MODEL) from None


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_server_arguments(p)
    add_scaling_arguments(p)
    args = p.parse_args(argv)
    scaling = scaling_from_args(p, args)
    if args.threads is None:  # each replica's engine uses the CPUs Ray reserved for it
        args.threads = max(1, math.floor(scaling.replica_cpus))
    settings = server_settings(p, args)

    local = args.address is None
    if local:  # the dashboard's processes would take CPU from the replicas
        ray.init(num_cpus=args.num_cpus, include_dashboard=False)
    else:
        ray.init(address=args.address)
    # SIGTERM stops like Ctrl-C, through `finally`. Set after ray.init, whose own SIGTERM handler aborts.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(speech_application(settings, scaling), name=APP_NAME, route_prefix="/")
        url = f"http://{args.host}:{args.port}"
        check_health(url)
        print(f"serving {url}/v1 with {scaling.describe()}; Ctrl-C stops", file=sys.stderr, flush=True)
        while True:
            signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        stop_serving(local)


def stop_serving(local: bool) -> None:
    """Remove the app (and the local Ray with its processes); a second Ctrl-C must not cut this short."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    print("stopping Ray Serve", file=sys.stderr, flush=True)
    if local:
        serve.shutdown()
    else:
        serve.delete(APP_NAME)
    ray.shutdown()


def cli() -> None:
    sys.exit(run_cli(main, {EngineError: ExitCode.MODEL}))


if __name__ == "__main__":
    cli()
