"""The HTTP layer of ``flora-serve``: TGI's routes and wire format, OpenAI-compatible routes, admin routes.

``app`` builds the app; ``tgi_routes``, ``openai_routes`` and ``admin_routes`` hold the routes; ``generation``
drives the engine, ``sse`` frames streams, ``errors`` shapes error bodies, ``state`` is what the routes share.
"""

from serving.api.app import create_app

__all__ = ["create_app"]
