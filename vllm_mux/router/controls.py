"""The router's controls under ``/mux/``: sleep, wake, pin and unpin a model by hand."""

from fastapi import APIRouter


def routes(router) -> APIRouter:
    return APIRouter()
