"""The status page at ``/`` (and ``/ui``): the pool as a memory map, the models, live.

The page is plain HTML, CSS and JavaScript shipped in ``ui/`` as package
data: no build step, and nothing fetched from anywhere but this router, so it
works offline (its Content-Security-Policy allows nothing else). Its files
hold no data and are served without the API key; the data comes from
``GET /mux/status``, which needs the key like every other endpoint. The page
asks for the key in a small form, keeps it in ``sessionStorage`` (gone with
the tab) and sends it as ``Authorization: Bearer``; a 401 shows the form
again. For automation (a kiosk screen, a headless browser) the key may come
in the URL's fragment, ``http://HOST:PORT/#key=sk-...``: a fragment is never
sent to the server, and the page removes it from the address bar once read.

``/mux/status`` is the daemon's status cut to what the page draws, with the
router's own word on each model (queue, restarts, serve's state): the pool's
``chunk_map`` (per chunk: the holding instance's id, minus the id of the
sleeper whose bytes a free chunk still holds, or 0), the host copies, the
instances (to colour a chunk by its holder's model) and one row per model.
"""

import time
from importlib.resources import files

from fastapi import APIRouter, Depends
from fastapi.responses import Response

from vllm_mux.router.metrics import model_states

# The page's own files and nothing else: no inline script or style, no other
# origin, not framed by another site.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
)
ASSETS = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css"}


def routes(router) -> APIRouter:
    from vllm_mux.router.app import own_json  # app imports this module

    ui = files(__package__) / "ui"
    body = {name: (ui / name).read_bytes() for name in ASSETS}
    api = APIRouter()

    def asset(name: str):
        headers = {
            "Content-Security-Policy": CSP,
            "Cache-Control": "no-cache",
            "X-Content-Type-Options": "nosniff",
        }

        async def serve() -> Response:
            return Response(body[name], media_type=ASSETS[name], headers=headers)

        return serve

    # HEAD too: what a monitor or a link checker asks of a page.
    for path in ("/", "/ui"):
        api.add_api_route(path, asset("index.html"), methods=["GET", "HEAD"])
    for name in ("app.js", "style.css"):
        api.add_api_route(f"/ui/{name}", asset(name), methods=["GET", "HEAD"])

    @api.get("/mux/status", dependencies=[Depends(router.authorize)])
    async def status():
        return own_json(view(router, await router.status()))

    return api


def view(router, status: dict | None) -> dict:
    """What the page draws, from the daemon's ``status`` (None: it did not
    answer; the models are then "unknown" and there is no pool to draw)."""
    states = model_states(router.upstreams, status)
    instances = status["instances"] if status else []
    # The instance that speaks for a model, as in model_states: a live one
    # before a disconnected predecessor still holding its chunks.
    live = {}
    for inst in instances:
        if live.get(inst["model"], {"state": "disconnected"})["state"] == "disconnected":
            live[inst["model"]] = inst
    models = []
    for name, state in states.items():
        mine = [i for i in instances if i["model"] == name]
        inst = live.get(name, {})
        upstream = router.upstreams.get(name)
        models.append(
            {
                "name": name,
                "state": state,
                # Summed: an instance that died holds its chunks until its
                # process is gone, and should be seen doing so.
                "chunks": sum(i["chunks"] for i in mine),
                "bytes": sum(i["bytes"] for i in mine),
                "in_flight": sum(i.get("in_flight", 0) for i in mine),
                "waiting": sum(i.get("waiting", 0) for i in mine),
                "wakes": sum(i["wakes"] for i in mine),
                "last_wake": inst.get("last_wake") or None,
                # Asleep, its chunks still holding its bytes: a wake maps them
                # back without a copy (the warm tier).
                "kept_chunks": inst.get("resident_chunks", 0) if state == "asleep" else 0,
                "host_copy": bool(inst.get("host_copy")),
                "cold": state == "asleep" and not inst.get("host_copy"),
                "pinned": bool(inst.get("pinned")),
                "queued": router.queued.get(name, 0),
                "restarts": upstream.restarts if upstream else 0,
                "error": upstream.error if upstream else None,
            }
        )
    out = {"time": time.time(), "daemon": status is not None, "models": models}
    if status:
        keys = ("device", "chunk_size", "total_chunks", "free_chunks", "chunk_map")
        keys += ("host_budget", "host_used", "host_copies")
        out["pool"] = {k: status[k] for k in keys}
        out["instances"] = [
            {"id": i["id"], "model": i["model"], "state": i["state"]} for i in instances
        ]
    return out
