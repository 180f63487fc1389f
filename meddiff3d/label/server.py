"""The web app ``meddiff3d label serve`` starts (``--uvicorn_app meddiff3d.label.server:app``): MONAI Label's own
FastAPI app with its ``POST /infer/{model}`` replaced by :func:`infer`, everything else (``/info/``, ``/datastore/``,
Slicer's other calls) untouched.

MONAI Label's endpoint writes an upload to the system temp folder and removes it only after a successful answer,
answers malformed ``params`` and a request without an image with a bare 500, and lets ``params`` override the
request's own ``image``. This one checks the request first (:meth:`MedDiff3DApp.prepare_request`: 404 / 422 before
anything is written or computed), writes the upload into a scratch folder of its own that it removes when the
request ends, success or failure, then runs it (:meth:`MedDiff3DApp.infer`) and answers as MONAI Label does
(``output=image|json|all``; the result file is deleted once sent). It is a plain ``def``, so FastAPI runs it in a
worker thread: the server keeps answering ``/info/`` while a request computes, and the time limit can stop that
thread's computation.

This module imports MONAI Label: it runs in the label environment (``make label-venv``) only.
"""

import shutil
import tempfile
from pathlib import Path

from fastapi import BackgroundTasks, Depends, FastAPI, File, Form, HTTPException, UploadFile
from monailabel.app import app as monailabel_app
from monailabel.config import RBAC_USER, settings
from monailabel.endpoints.infer import ResultType, send_response
from monailabel.endpoints.user.auth import RBAC, User
from monailabel.interfaces.utils.app import app_instance

__all__ = ["app", "infer", "install", "INFER_PATH"]

INFER_PATH = f"{settings.MONAI_LABEL_API_STR}/infer/{{model}}"


def infer(
    background_tasks: BackgroundTasks,
    model: str,
    image: str = "",
    session_id: str = "",
    params: str = Form("{}"),
    file: UploadFile = File(None),
    label: UploadFile = File(None),
    output: ResultType | None = None,
    user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER)),
):
    """One infer request: checked, its upload kept in a scratch folder for the request's lifetime, run, answered."""
    instance = app_instance()
    scratch = Path(tempfile.mkdtemp(prefix="meddiff3d-request-"))
    try:
        request, names = instance.prepare_request(model, image, session_id, params, file, label,
                                                  output.value if output else None, scratch)
        result = instance.infer(request, names=names)
        if result is None:
            raise HTTPException(status_code=500, detail="Failed to execute infer")
        return send_response(instance.datastore(), result, output, background_tasks)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def install(api: FastAPI) -> FastAPI:
    """Route ``POST /infer/{model}`` of ``api`` to :func:`infer`: added as the first route, so it answers before
    MONAI Label's own (routes match in order), whatever the FastAPI version does with included routers."""
    if not any(getattr(route, "endpoint", None) is infer for route in api.router.routes):
        api.add_api_route(INFER_PATH, infer, methods=["POST"], tags=["Infer"],
                          summary=f"{RBAC_USER}Run Inference for supported model")
        api.router.routes.insert(0, api.router.routes.pop())
        api.openapi_schema = None
    return api


app = install(monailabel_app)
