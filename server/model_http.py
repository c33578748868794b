"""HTTP routes that serve published models to devices (a FastAPI router over a
``ModelPublisher`` folder).

    GET /models/latest              the latest model file
    GET /models/latest/manifest     its manifest (JSON)
    GET /models/{version}           a published model file
    GET /models/{version}/manifest  its manifest

Model responses carry ``ETag: "<sha256 of the model file>"`` and ``X-Fedpref-Version`` /
``-Key-Id`` / ``-Signature``; manifest responses carry ``ETag: "<sha256 of the manifest>"``.
A request whose ``If-None-Match`` names the current ETag gets 304 with no body, so a device
whose model is current downloads nothing. A device asks for the latest manifest first and then
for the model file by its version (``fedpref.client.model_fetch``). The routes are public: the
signature, not the transport, is what a device trusts, so mount this router outside any
operator authentication (``app.include_router(model_router(folder))``).
"""

# No "from __future__ import annotations": FastAPI reads the route functions' annotations as objects.

from pathlib import Path

from fastapi import APIRouter, HTTPException, Request, Response

from fedpref.models.published import (
    HEADER_KEY_ID,
    HEADER_SIGNATURE,
    HEADER_VERSION,
    LATEST_MANIFEST,
    MANIFEST_SUFFIX,
    MODEL_MEDIA_TYPE,
    MODEL_SUFFIX,
    MODELS_PATH,
    Manifest,
    PublishedFormatError,
    check_version,
    sha256_hex,
)

NOTHING_PUBLISHED = "no model has been published yet: the server publishes one after each training round; try again later"
# "latest" changes: a cache must ask again every time (cheap with If-None-Match). A version never changes.
LATEST_CACHE = "no-cache"
VERSION_CACHE = "public, max-age=31536000, immutable"


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    """Whether an ``If-None-Match`` header names ``etag`` (a list, weak tags and ``*`` included, RFC 9110)."""
    if not if_none_match:
        return False
    for tag in if_none_match.split(","):
        tag = tag.strip()
        if tag == "*" or tag.removeprefix("W/") == etag:
            return True
    return False


def model_router(folder: str | Path) -> APIRouter:
    """The routes of the module docstring, serving the models ``ModelPublisher(folder, ...)`` writes."""
    folder = Path(folder)
    router = APIRouter(prefix=MODELS_PATH, tags=["models"])

    def read_manifest(version: str | None) -> tuple[Manifest, bytes]:
        if version is None:
            path = folder / LATEST_MANIFEST
            missing = NOTHING_PUBLISHED
        else:
            try:
                check_version(version)
            except ValueError as exc:
                raise HTTPException(404, detail=str(exc)) from None
            path = folder / f"{version}{MANIFEST_SUFFIX}"
            missing = f"model version {version!r} is not published; GET {MODELS_PATH}/latest/manifest names the latest"
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise HTTPException(404, detail=missing) from None
        try:
            return Manifest.from_json(raw), raw
        except PublishedFormatError as exc:
            raise HTTPException(500, detail=f"the published manifest {path.name} cannot be served ({exc})") from None

    def model_response(request: Request, version: str | None) -> Response:
        manifest, _ = read_manifest(version)
        headers = {
            "ETag": manifest.etag,
            "Cache-Control": LATEST_CACHE if version is None else VERSION_CACHE,
            HEADER_VERSION: manifest.version,
            HEADER_KEY_ID: manifest.key_id,
            HEADER_SIGNATURE: manifest.signature,
        }
        if etag_matches(request.headers.get("if-none-match"), manifest.etag):
            return Response(status_code=304, headers=headers)
        try:
            data = (folder / f"{manifest.version}{MODEL_SUFFIX}").read_bytes()
        except FileNotFoundError:
            raise HTTPException(500, detail=f"the model file of published version {manifest.version!r} is missing; republish it") from None
        return Response(content=data, media_type=MODEL_MEDIA_TYPE, headers=headers)

    def manifest_response(request: Request, version: str | None) -> Response:
        _, raw = read_manifest(version)
        headers = {"ETag": f'"{sha256_hex(raw)}"', "Cache-Control": LATEST_CACHE if version is None else VERSION_CACHE}
        if etag_matches(request.headers.get("if-none-match"), headers["ETag"]):
            return Response(status_code=304, headers=headers)
        return Response(content=raw, media_type="application/json", headers=headers)

    # "latest" before "{version}": routes match in order, and "latest" is never a version.
    @router.get("/latest", summary="The latest published model file")
    def latest_model(request: Request) -> Response:
        return model_response(request, None)

    @router.get("/latest/manifest", summary="The manifest of the latest published model")
    def latest_manifest(request: Request) -> Response:
        return manifest_response(request, None)

    @router.get("/{version}", summary="A published model file")
    def version_model(version: str, request: Request) -> Response:
        return model_response(request, version)

    @router.get("/{version}/manifest", summary="The manifest of a published model")
    def version_manifest(version: str, request: Request) -> Response:
        return manifest_response(request, version)

    return router
