"""The web console (SPEC §8): `flowsdk ui`, its JSON API, and its pages.

Needs the `ui` extra (`pip install 'flowsdk[ui]'`: Starlette and uvicorn).
The API is a thin layer over `ControlService`; the pages are static files of
this package that read the API with the token the user typed.
"""

from __future__ import annotations

from flowsdk.ui._app import create_app
from flowsdk.ui._server import DEFAULT_HOST, DEFAULT_PORT, ListenError, is_loopback, serve

__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "ListenError", "create_app", "is_loopback", "serve"]
