"""The admin API: change apps and models at runtime, without a restart.

Routes (JSON in and out; errors are 4xx ``{"error": ...}``):

====== =================================== ==================================================
GET    /admin/config                        the running configuration
GET    /admin/apps                          every app: config, counters, learned weights
POST   /admin/apps                          register an app (an AppConfig object)
GET    /admin/apps/{app}                    one app
DELETE /admin/apps/{app}                    remove an app
POST   /admin/apps/{app}/link               ``{"model": name}`` (cascade: ``"thresholds"``)
POST   /admin/apps/{app}/unlink             ``{"model": name}``
GET    /admin/models                        every model: version, replicas, batching state
POST   /admin/models                        deploy a model version (a ModelConfig object); a
                                            new version of a deployed name replaces it once
                                            loaded, queued queries move over, and the cache
                                            drops the old version's outputs
GET    /admin/models/{model}                one model
DELETE /admin/models/{model}                undeploy (``?version=v`` to check which)
POST   /admin/models/{model}/replicas       ``{"replicas": n}``
====== =================================== ==================================================

When the server config sets ``admin_token``, every /admin call needs the header
``Authorization: Bearer <token>``. The admin API imports and runs model factories: keep the
server on loopback (the default) or set a token.
"""

from __future__ import annotations

import asyncio
import hmac
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from mlcycle.serve.online._apps import AppRuntime
from mlcycle.serve.online._config import AppConfig, ConfigError, ModelConfig
from mlcycle.serve.online._metrics import ModelMetrics
from mlcycle.serve.online._runtime import ModelRuntime
from mlcycle.serve.online._worker import ModelLoadError, resolve_factory
from mlcycle.serve.online.server import HTTPError, _method_not_allowed, settle_heap

if TYPE_CHECKING:
    from mlcycle.serve.online.server import Server


# ---- operations (also used at startup) -------------------------------------------------------


async def start_model(server: Server, config: ModelConfig) -> ModelRuntime:
    """Load a model version and make it the one its name serves."""
    if config.kind != "ray":  # fail fast on a bad factory (Ray imports it on the actor)
        await asyncio.get_running_loop().run_in_executor(None, resolve_factory, config.factory)
    metrics = server.model_metrics.get(config.key) or ModelMetrics()
    rt = ModelRuntime(
        config,
        server.cache,
        metrics,
        target_s=server.target_s(config.name),
        ray_address=server.config.ray_address,
        ray_num_cpus=server.config.ray_num_cpus,
    )
    await rt.start()
    server.model_metrics[config.key] = metrics
    old = server.models.get(config.name)
    server.models[config.name] = rt
    server.cache.invalidate(config.name, keep_version=config.version)
    if old is not None:
        await old.stop(successor=rt)
    _replace_config(server, config)
    if server.started:  # a deploy at runtime: freeze the new model's objects too
        settle_heap(collect=False)
    return rt


def _replace_config(server: Server, config: ModelConfig) -> None:
    models = [m for m in server.config.models if m.name != config.name]
    server.config.models = [*models, config]


def add_app(server: Server, config: AppConfig) -> AppRuntime:
    """Register an app (its models must be deployed)."""
    missing = [m for m in config.models if m not in server.models]
    if missing:
        raise ConfigError(
            f"app {config.name!r} links model(s) {missing} that are not deployed; deploy them "
            f"first (POST /admin/models) or link later (deployed: {sorted(server.models)})"
        )
    app = AppRuntime(config, server.models, server.cache, server.log, server._next_id)
    server.apps[config.name] = app
    server.config.apps = [a for a in server.config.apps if a.name != config.name] + [config]
    for model in config.models:
        _retarget(server, model)
    return app


def _retarget(server: Server, model: str) -> None:
    rt = server.models.get(model)
    if rt is not None:
        rt.set_target(server.target_s(model))


def _relink(server: Server, app: AppRuntime, models: list[str], body: dict[str, Any]) -> None:
    data = app.config.to_dict()
    data["models"] = models
    if "thresholds" in body:
        data["thresholds"] = body["thresholds"]
    data["policy_state"] = None  # the model set changed: learning starts afresh
    config = AppConfig.from_dict(data)
    app.configure(config)  # validates the policy (e.g. cascade thresholds) before changing
    server.config.apps = [a for a in server.config.apps if a.name != config.name] + [config]


# ---- routing ---------------------------------------------------------------------------------


async def handle(
    server: Server, method: str, path: str, scope: dict[str, Any], receive: Any
) -> tuple[int, Any]:
    """Route one /admin request; returns (status, JSON payload) or raises HTTPError."""
    token = server.config.admin_token
    if token is not None:
        auth = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        if not hmac.compare_digest(auth, f"Bearer {token}"):
            raise HTTPError(
                401,
                "the admin API needs 'Authorization: Bearer <admin_token>' (the token is in "
                "the server config)",
                [(b"www-authenticate", b"Bearer")],
            )
    parts = [p for p in path.split("/") if p][1:]  # after "admin"
    try:
        return await _route(server, method, parts, scope, receive)
    except ConfigError as exc:
        raise HTTPError(422, str(exc)) from None
    except ModelLoadError as exc:
        raise HTTPError(400, f"cannot load the model: {exc}") from None


async def _body(server: Server, scope: dict[str, Any], receive: Any) -> dict[str, Any]:
    data = await server.read_json(scope, receive)
    if type(data) is not dict:
        raise HTTPError(422, "the body must be a JSON object; see GET /openapi.json")
    return data


def _need(method: str, allowed: str) -> None:
    if method not in allowed.split(" or "):
        raise _method_not_allowed(method, allowed)


def _app(server: Server, name: str) -> AppRuntime:
    app = server.apps.get(name)
    if app is None:
        raise HTTPError(
            404, f"unknown app {name!r}; registered apps: {sorted(server.apps) or 'none'}"
        )
    return app


def _model(server: Server, name: str) -> ModelRuntime:
    rt = server.models.get(name)
    if rt is None:
        raise HTTPError(
            404, f"unknown model {name!r}; deployed models: {sorted(server.models) or 'none'}"
        )
    return rt


def _model_field(body: dict[str, Any]) -> str:
    name = body.get("model")
    if not isinstance(name, str):
        raise HTTPError(422, 'send {"model": "<deployed model name>"}')
    return name


async def _route(
    server: Server, method: str, parts: list[str], scope: dict[str, Any], receive: Any
) -> tuple[int, Any]:
    lock = server._admin_lock
    if lock is None:
        raise HTTPError(503, "the server is still starting; retry in a moment")
    n = len(parts)
    if n == 1 and parts[0] == "config":
        _need(method, "GET")
        return 200, server.config.to_dict()
    if n >= 1 and parts[0] == "apps":
        if n == 1:
            _need(method, "GET or POST")
            if method == "GET":
                return 200, {"apps": [a.info() for _, a in sorted(server.apps.items())]}
            config = AppConfig.from_dict(await _body(server, scope, receive))
            async with lock:
                if config.name in server.apps:
                    raise HTTPError(
                        409,
                        f"app {config.name!r} exists; remove it first (DELETE /admin/apps/"
                        f"{config.name}) or link models to it",
                    )
                app = add_app(server, config)
            return 201, app.info()
        name = parts[1]
        if n == 2:
            _need(method, "GET or DELETE")
            app = _app(server, name)
            if method == "GET":
                return 200, app.info()
            async with lock:
                server.apps.pop(name, None)
                server.config.apps = [a for a in server.config.apps if a.name != name]
                for model in app.config.models:
                    _retarget(server, model)
            return 200, {"removed": name}
        if n == 3 and parts[2] in ("link", "unlink"):
            _need(method, "POST")
            body = await _body(server, scope, receive)
            model = _model_field(body)
            async with lock:
                app = _app(server, name)
                models = list(app.config.models)
                if parts[2] == "link":
                    _model(server, model)
                    if model in models:
                        raise HTTPError(409, f"model {model!r} is already linked to app {name!r}")
                    models.append(model)
                else:
                    if model not in models:
                        raise HTTPError(
                            404, f"model {model!r} is not linked to app {name!r} ({models})"
                        )
                    models.remove(model)
                _relink(server, app, models, body)
                _retarget(server, model)
            return 200, app.info()
    if n >= 1 and parts[0] == "models":
        if n == 1:
            _need(method, "GET or POST")
            if method == "GET":
                return 200, {"models": [rt.info() for _, rt in sorted(server.models.items())]}
            config = ModelConfig.from_dict(await _body(server, scope, receive))
            if not server.config.factory_allowed(config.factory):
                raise HTTPError(
                    403,
                    f"factory {config.factory!r} is outside this server's allowed_factories "
                    f"{server.config.allowed_factories}; add its module to that list",
                )
            async with lock:
                old = server.models.get(config.name)
                if old is not None and old.version == config.version:
                    raise HTTPError(
                        409,
                        f"model {config.key!r} is already deployed; give the new one another "
                        "'version' (or set replicas with POST /admin/models/{name}/replicas)",
                    )
                rt = await start_model(server, config)
            return 201, rt.info()
        name = parts[1]
        if n == 2:
            _need(method, "GET or DELETE")
            rt = _model(server, name)
            if method == "GET":
                return 200, rt.info()
            query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
            version = query.get("version", [None])[0]
            if version is not None and version != rt.version:
                raise HTTPError(
                    404, f"model {name!r} serves version {rt.version!r}, not {version!r}"
                )
            async with lock:
                users = sorted(a for a, app in server.apps.items() if name in app.config.models)
                if users:
                    raise HTTPError(
                        409,
                        f"model {name!r} is linked to app(s) {users}; unlink it first "
                        f"(POST /admin/apps/{{app}}/unlink) or remove those apps",
                    )
                server.models.pop(name, None)
                server.config.models = [m for m in server.config.models if m.name != name]
                server.cache.invalidate(name)
                await rt.stop()
            return 200, {"removed": rt.key}
        if n == 3 and parts[2] == "replicas":
            _need(method, "POST")
            body = await _body(server, scope, receive)
            replicas = body.get("replicas")
            if isinstance(replicas, bool) or not isinstance(replicas, int):
                raise HTTPError(422, 'send {"replicas": n} with n an integer in [1, 64]')
            if not 1 <= replicas <= 64:
                raise HTTPError(422, f"replicas must be in [1, 64], got {replicas}")
            async with lock:
                rt = _model(server, name)
                await rt.set_replicas(replicas)
            return 200, rt.info()
    raise HTTPError(
        404,
        f"no admin endpoint at /admin/{'/'.join(parts)}; see GET /openapi.json for the list "
        "(config, apps, apps/{app}, apps/{app}/link|unlink, models, models/{model}, "
        "models/{model}/replicas)",
    )
