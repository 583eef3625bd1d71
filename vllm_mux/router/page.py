"""The status page at ``/``: the pool as a memory map, the models, live."""

from fastapi import APIRouter


def routes(router) -> APIRouter:
    return APIRouter()
