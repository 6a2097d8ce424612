"""The pool as an HTTP service: FastAPI app (JSON API, OpenAPI docs, web page) over one in-memory ``Pool``.

Why the pieces are here and not in ``PoE.query.pool``:

- Dynamic batching (``batching``): concurrent requests share one library forward.
- The cost of a query is the library's plus its experts' (the consolidated model shares those modules and
  adds no layer), so it is counted once per part at start-up rather than traced per request, which keeps
  ``/api/query`` within milliseconds for any of the 2^20 task sets (``core``).
- ``torch.export`` must not run beside anything else in the process (it pushes process-global tracing
  state), so exports wait for the running forwards and hold new ones back (``batching.ExportGate``).
- Everything a request can trigger is bounded (``limits``): body size, image count, the model registry, the
  caches of built models, accuracies and exported files.

Every user error is a 4xx with ``{"error": "<one line>"}``; nothing a client sends can produce a traceback.
Modules: ``app`` (routes), ``core`` (the service state), ``batching``, ``images``, ``schemas``, ``limits``,
``run`` (``serve``).
"""

from PoE.query.service.app import create_app
from PoE.query.service.limits import MAX_BODY_BYTES, MAX_IMAGES
from PoE.query.service.run import Settings, serve

__all__ = ["MAX_BODY_BYTES", "MAX_IMAGES", "Settings", "create_app", "serve"]
