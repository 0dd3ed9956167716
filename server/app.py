"""The Quart app factory: state, auth / size / drain gates, OpenAI-shaped error handlers, blueprints."""

from __future__ import annotations

import hmac
import logging
from dataclasses import dataclass

from quart import Quart, jsonify, request
from quart_schema import Info, QuartSchema
from werkzeug.exceptions import HTTPException

from jaxllm.engine.async_engine import AsyncEngine
from server.errors import APIError, status_phrase
from server.metrics import Metrics

logger = logging.getLogger(__name__)

# Open without a key, as in vLLM: load balancers and Prometheus must not need the secret.
OPEN_PATHS = frozenset({"/health", "/ping", "/metrics"})


@dataclass
class ServerSettings:
    served_model_name: str | None = None  # None: the engine's model name
    model_root: str | None = None  # what /v1/models reports as root (the path or hub id loaded)
    api_key: str | None = None
    max_request_bytes: int = 16 * 2**20
    drain_timeout: float = 30.0
    enable_auto_tool_choice: bool = False  # tool_choice "auto" parses tool calls out of free text
    tool_call_parser: str | None = None  # hermes | llama3_json | mistral


class ServerState:
    """Everything a route needs, reachable as current_app.extensions["jaxllm"]."""

    def __init__(self, engine: AsyncEngine, settings: ServerSettings, metrics: Metrics):
        self.engine = engine
        self.settings = settings
        self.metrics = metrics
        self.draining = False

    def served_model_names(self) -> list[str]:
        if self.settings.served_model_name:
            return [self.settings.served_model_name]
        return [getattr(self.engine.engine, "model_name", None) or "jaxllm"]

    def tokenizer(self):
        return self.require_engine().tokenizer

    def max_model_len(self) -> int:
        return int(self.require_engine().max_model_len)

    def require_engine(self):
        if not self.engine.ready:
            msg = "the model is still loading" if self.engine.error is None else f"engine failed: {self.engine.error}"
            raise APIError(msg, 503, headers={"Retry-After": "5"})
        return self.engine.engine


def create_app(engine: AsyncEngine, settings: ServerSettings | None = None) -> Quart:
    settings = settings or ServerSettings()
    app = Quart("jaxllm")
    # Generation can legitimately take minutes; bodies are bounded by size instead.
    app.config["RESPONSE_TIMEOUT"] = None
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes
    app.config["JSON_SORT_KEYS"] = False
    metrics = Metrics(stats_source=lambda: engine.stats if engine.ready else None)
    engine.observer = metrics
    state = ServerState(engine, settings, metrics)
    app.extensions["jaxllm"] = state
    # The CDN-hosted doc UIs cannot load offline; the machine-readable schema is what clients use.
    QuartSchema(app, openapi_path="/openapi.json", swagger_ui_path=None, redoc_ui_path=None,
                scalar_ui_path=None, info=Info(title="jaxllm OpenAI-compatible API", version=_version()))

    @app.before_serving
    async def _start_engine() -> None:
        if engine._thread is None:
            engine.start()

        def _named(fut) -> None:
            if not fut.cancelled() and fut.exception() is None:
                metrics.set_model_name(state.served_model_names()[0])
        engine.ready_future.add_done_callback(_named)

    @app.before_request
    async def _gates():
        path = request.path
        if state.draining and path not in ("/metrics",):
            raise APIError("the server is shutting down", 503, headers={"Retry-After": "1", "Connection": "close"})
        key = settings.api_key
        if key and path not in OPEN_PATHS:
            header = request.headers.get("Authorization", "")
            given = header[7:] if header[:7].lower() == "bearer " else request.headers.get("X-Api-Key", "")
            # Constant-time compare so the key cannot be recovered by timing.
            if not hmac.compare_digest(given.encode(), key.encode()):
                raise APIError("invalid or missing API key", 401, code="invalid_api_key")
        length = request.content_length
        if length is not None and length > settings.max_request_bytes:
            raise APIError(f"request body of {length} bytes exceeds the limit of "
                           f"{settings.max_request_bytes} bytes", 413)
        return None

    @app.errorhandler(APIError)
    async def _api_error(err: APIError):
        resp = jsonify(err.body())
        resp.status_code = err.status
        for k, v in err.headers.items():
            resp.headers[k] = v
        return resp

    @app.errorhandler(HTTPException)
    async def _http_error(err: HTTPException):
        status = err.code or 500
        msg = {413: f"request body exceeds the limit of {settings.max_request_bytes} bytes",
               404: f"no route {request.path}", 405: f"method {request.method} not allowed on {request.path}"}
        return await _api_error(APIError(msg.get(status, err.description or status_phrase(status)), status))

    @app.errorhandler(Exception)
    async def _unexpected(err: Exception):
        logger.exception("unhandled error on %s", request.path)
        return await _api_error(APIError(f"internal error: {type(err).__name__}", 500, type="server_error"))

    from server.chat import bp as chat_bp
    from server.completions import bp as completions_bp
    from server.embeddings import bp as embeddings_bp
    from server.info import bp as info_bp
    app.register_blueprint(completions_bp)
    app.register_blueprint(chat_bp)
    app.register_blueprint(embeddings_bp)
    app.register_blueprint(info_bp)
    return app


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("jaxllm")
    except Exception:  # noqa: BLE001 - running from a source tree
        return "0.1.0"
