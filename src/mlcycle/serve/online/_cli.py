"""``mlcycle serve ...``: start a server, and change a running one through its admin API.

Only typer and the standard library load here (the admin commands speak HTTP with urllib),
so ``mlcycle --help`` stays fast; ``serve start`` imports the server when it runs.
"""

from __future__ import annotations

import json
import signal
import urllib.error
import urllib.request
from pathlib import Path
from typing import Annotated, Any

import typer

serve_app = typer.Typer(
    help="Online serving (Clipper): SLO-aware batching, cache, model selection, cascades.",
    no_args_is_help=True,
)
app_cmds = typer.Typer(help="Register or remove apps on a running server.", no_args_is_help=True)
model_cmds = typer.Typer(
    help="Deploy or undeploy model versions on a running server.", no_args_is_help=True
)
serve_app.add_typer(app_cmds, name="app")
serve_app.add_typer(model_cmds, name="model")

UrlOpt = Annotated[
    str,
    typer.Option("--url", envvar="MLCYCLE_SERVE_URL", help="the running server's base URL"),
]
TokenOpt = Annotated[
    str | None,
    typer.Option(
        "--token", envvar="MLCYCLE_SERVE_TOKEN", help="admin token, if the server has one"
    ),
]
DEFAULT_URL = "http://127.0.0.1:8000"


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=code)


def _json_arg(text: str | None, what: str) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        _fail(f"{what} is not valid JSON ({exc}); quote it, e.g. --{what} '{{\"k\": 1}}'")


def _call(url: str, method: str, path: str, body: Any = None, token: str | None = None) -> Any:
    """One admin request; prints the server's error and exits non-zero on a 4xx/5xx."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url.rstrip("/") + path, data=data, method=method)
    req.add_header("content-type", "application/json")
    if token:
        req.add_header("authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=600) as resp:
            return json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read()).get("error", exc.reason)
        except (ValueError, AttributeError):
            message = exc.reason
        _fail(f"{method} {path}: HTTP {exc.code}: {message}", code=1)
    except urllib.error.URLError as exc:
        _fail(f"cannot reach {url} ({exc.reason}); is `mlcycle serve start` running there?", 1)


def _print(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2))


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


@serve_app.command("start")
def start(
    config: Annotated[
        Path | None, typer.Option("--config", help="JSON file with models and apps")
    ] = None,
    host: Annotated[str | None, typer.Option("--host", help="bind address")] = None,
    port: Annotated[int | None, typer.Option("--port", help="port (0: a free one)")] = None,
    ray_address: Annotated[
        str | None, typer.Option("--ray-address", help="Ray cluster for kind 'ray' replicas")
    ] = None,
) -> None:
    """Serve until Ctrl-C or SIGTERM; prints the URL once the models are loaded."""
    from mlcycle.serve.online._config import ConfigError, ServerConfig

    try:
        cfg = ServerConfig.load(config)
    except ConfigError as exc:
        _fail(str(exc))
    if ray_address is not None:
        cfg.ray_address = ray_address
    if host is not None:
        cfg.host = host
    if port is not None:
        cfg.port = port
    from mlcycle.serve.online.server import Server

    # uvicorn stops gracefully on SIGTERM, then re-raises it: exit 0 instead of dying by it.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        Server(cfg).run()
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        _fail(str(exc.strerror or exc))
    typer.echo("mlcycle serve: stopped")


@serve_app.command("status")
def status(url: UrlOpt = DEFAULT_URL, token: TokenOpt = None) -> None:
    """Health, apps and models of a running server."""
    _print(
        {
            "health": _call(url, "GET", "/health"),
            "models": _call(url, "GET", "/admin/models", token=token)["models"],
            "apps": _call(url, "GET", "/admin/apps", token=token)["apps"],
        }
    )


@app_cmds.command("register")
def app_register(
    name: Annotated[str, typer.Argument(help="the app's name (its URL is /NAME/predict)")],
    slo_ms: Annotated[float, typer.Option("--slo-ms", help="latency SLO in ms")] = 50.0,
    model: Annotated[
        list[str] | None, typer.Option("--model", help="a linked model (repeat for more)")
    ] = None,
    policy: Annotated[
        str, typer.Option("--policy", help="single | exp3 | exp4 | cascade")
    ] = "single",
    default: Annotated[
        str | None, typer.Option("--default", help="JSON answer when the SLO can't be met")
    ] = None,
    thresholds: Annotated[
        str | None, typer.Option("--thresholds", help="cascade: comma-separated, e.g. 0.9")
    ] = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="skip the cache")] = False,
    config_json: Annotated[
        str | None, typer.Option("--json", help="the whole AppConfig as JSON instead")
    ] = None,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
) -> None:
    """Register an app with an SLO, a default and its models."""
    body = _json_arg(config_json, "json")
    if body is None:
        body = {"name": name, "slo_ms": slo_ms, "models": model or [], "policy": policy}
        body["cache"] = not no_cache
        if default is not None:
            body["default"] = _json_arg(default, "default")
        if thresholds:
            try:
                body["thresholds"] = [float(t) for t in thresholds.split(",")]
            except ValueError:
                _fail(f"--thresholds must be numbers separated by commas, got {thresholds!r}")
    else:
        body.setdefault("name", name)
    _print(_call(url, "POST", "/admin/apps", body, token))


@app_cmds.command("remove")
def app_remove(
    name: Annotated[str, typer.Argument(help="the app to remove")],
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
) -> None:
    """Remove an app (its models stay deployed)."""
    _print(_call(url, "DELETE", f"/admin/apps/{name}", token=token))


@app_cmds.command("list")
def app_list(url: UrlOpt = DEFAULT_URL, token: TokenOpt = None) -> None:
    """Every app with its counters and learned weights."""
    _print(_call(url, "GET", "/admin/apps", token=token))


@model_cmds.command("deploy")
def model_deploy(
    name: Annotated[str, typer.Argument(help="the model's name")],
    factory: Annotated[
        str | None, typer.Option("--factory", help="'package.module:attr' returning the model")
    ] = None,
    version: Annotated[str, typer.Option("--version", help="version label")] = "1",
    replicas: Annotated[int, typer.Option("--replicas", help="how many replicas")] = 1,
    kind: Annotated[str, typer.Option("--kind", help="thread | process | ray")] = "thread",
    batching: Annotated[
        str, typer.Option("--batching", help="aimd | latency | fixed | none")
    ] = "aimd",
    max_batch_size: Annotated[int, typer.Option("--max-batch-size", help="batch cap")] = 64,
    wait_ms: Annotated[float, typer.Option("--wait-ms", help="delayed batching wait")] = 0.0,
    args: Annotated[str | None, typer.Option("--args", help="factory kwargs as JSON")] = None,
    config_json: Annotated[
        str | None, typer.Option("--json", help="the whole ModelConfig as JSON instead")
    ] = None,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
) -> None:
    """Deploy a model version; a new version of a deployed name replaces it once loaded."""
    body = _json_arg(config_json, "json")
    if body is None:
        if factory is None:
            _fail("give --factory 'package.module:attr' (or the whole config with --json)")
        body = {
            "name": name,
            "factory": factory,
            "version": version,
            "replicas": replicas,
            "kind": kind,
            "batching": {"policy": batching, "max_batch_size": max_batch_size, "wait_ms": wait_ms},
            "args": _json_arg(args, "args") or {},
        }
    else:
        body.setdefault("name", name)
    _print(_call(url, "POST", "/admin/models", body, token))


@model_cmds.command("undeploy")
def model_undeploy(
    name: Annotated[str, typer.Argument(help="the model to undeploy")],
    version: Annotated[
        str | None, typer.Option("--version", help="only if this version is serving")
    ] = None,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
) -> None:
    """Undeploy a model (unlink it from its apps first)."""
    query = f"?version={version}" if version else ""
    _print(_call(url, "DELETE", f"/admin/models/{name}{query}", token=token))


@model_cmds.command("list")
def model_list(url: UrlOpt = DEFAULT_URL, token: TokenOpt = None) -> None:
    """Every deployed model with replicas and batching state."""
    _print(_call(url, "GET", "/admin/models", token=token))


@serve_app.command("link")
def link(
    app: Annotated[str, typer.Argument(help="the app")],
    model: Annotated[str, typer.Argument(help="the model")],
    unlink: Annotated[bool, typer.Option("--unlink", help="unlink instead")] = False,
    thresholds: Annotated[
        str | None, typer.Option("--thresholds", help="cascade: new comma-separated thresholds")
    ] = None,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
) -> None:
    """Link a deployed model to an app (or unlink it)."""
    body: dict[str, Any] = {"model": model}
    if thresholds:
        try:
            body["thresholds"] = [float(t) for t in thresholds.split(",")]
        except ValueError:
            _fail(f"--thresholds must be numbers separated by commas, got {thresholds!r}")
    verb = "unlink" if unlink else "link"
    _print(_call(url, "POST", f"/admin/apps/{app}/{verb}", body, token))


@serve_app.command("replicas")
def replicas(
    model: Annotated[str, typer.Argument(help="the model")],
    n: Annotated[int, typer.Argument(help="the number of replicas")],
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
) -> None:
    """Set how many replicas a model runs."""
    _print(_call(url, "POST", f"/admin/models/{model}/replicas", {"replicas": n}, token))
