"""The HTTP service: a FastAPI app that serves one or more model folders, and its web page.

    potluck serve models/urgency models/intent --port 8080 [--api-key-file keys.txt]

Importing this package is cheap (it does not import FastAPI); `potluck.serving.app.create_app` builds the app.
"""

from potluck.serving.settings import ServeSettings

__all__ = ["ServeSettings"]
