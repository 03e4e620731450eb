"""stairs-serve: an OpenAI-compatible completions server over the engine's public API.

`create_app(engine, config)` builds the ASGI app (FastAPI), `Server` runs it (uvicorn, bounded
connections, a drain on SIGTERM), `serve.cli.main` is the command line (`stairs-serve`,
`python -m serve`), `serve.cli.ray_app` the Ray Serve application. Needs the `[serve]` extra:
fastapi, uvicorn, prometheus_client; `import engine` never imports this package.
"""

from .app import build_app, create_app
from .config import ServeConfig
from .server import Server, free_port

__all__ = ["ServeConfig", "Server", "build_app", "create_app", "free_port"]
