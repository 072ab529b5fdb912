"""potluck serve: model folders over HTTP (TEI-style /predict routes, /info, /metrics, /docs, a web page)."""

from pathlib import Path
from typing import Annotated

import typer

from potluck.cli.options import with_settings
from potluck.cli.render import console
from potluck.errors import UserError
from potluck.serving.settings import ServeSettings  # a light module: a dataclass only

app = typer.Typer()


@app.command()
@with_settings(ServeSettings, "Serving")
def serve(
    models: Annotated[list[Path], typer.Argument(help="model folders; each is served at /v1/models/<folder name>/predict")],
    host: Annotated[str, typer.Option(help="address to listen on (0.0.0.0 for every interface)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8080,
    api_key_file: Annotated[Path | None, typer.Option(help="bearer tokens, one per line; without it anyone who "
                                                           "can reach the port may use it")] = None,
    **settings,
):
    """Serve model folders over HTTP: TEI-style /predict routes, /info, /metrics, /docs and a web page at /."""
    import uvicorn

    from potluck.serving.app import create_app
    from potluck.serving.auth import KeyRing

    serve_settings = ServeSettings(**settings)
    keys = KeyRing.from_file(api_key_file) if api_key_file else None
    check_port_free(host, port)
    application = create_app(models, serve_settings, keys=keys)
    names = ", ".join(application.state.models)
    if keys is None and host not in ("127.0.0.1", "localhost", "::1"):
        console.print(f"[yellow]warning:[/] listening on {host} without --api-key-file: anyone who can reach "
                      "the port can use the models")
    console.print(f"serving [bold]{names}[/] on http://{host}:{port}/  (API docs: /docs; Ctrl+C stops "
                  "after the requests in flight)")
    uvicorn.run(application, host=host, port=port, log_level="warning", access_log=False,
                timeout_graceful_shutdown=serve_settings.graceful_timeout)


def check_port_free(host: str, port: int) -> None:
    """A UserError now, rather than a uvicorn traceback after the models load, if the port is taken."""
    import socket

    if not 1 <= port <= 65535:
        raise UserError(f"--port {port} is not a TCP port", hint="use 1 to 65535, e.g. 8080")
    try:
        with socket.create_server((host, port)):
            pass
    except OSError as err:
        raise UserError(f"cannot listen on {host}:{port} ({err.strerror})",
                        hint="pick another --port, or stop the program using it") from err
