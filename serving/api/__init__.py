"""The HTTP layer of ``flora-serve``: TGI's routes and wire format, OpenAI-compatible routes, admin routes.

``app`` builds the app; ``tgi_routes``, ``openai_routes`` and ``admin_routes`` hold the routes; ``generation``
drives the engine (and turns a stream's steps into event payloads), ``sse`` frames streams, ``errors`` shapes error
bodies, ``state`` is what the routes share (the app's ``AppContext`` and its ``RequestTracker``).
"""

from serving.api.app import create_app

__all__ = ["create_app"]
