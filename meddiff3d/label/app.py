"""The MONAI Label app: one infer task per served bundle, user errors as HTTP 4xx with their message.

MONAI Label loads ``<app>/main.py`` (written by ``meddiff3d label serve``), which imports :class:`MedDiff3DApp`.
The served bundles are ``--conf models name1,name2`` (default: every folder in ``<app>/model``), each read by
:func:`meddiff3d.label.bundles.load_bundle`. Infer requests reach it through :mod:`meddiff3d.label.server` (the
server's ``POST /infer/<model>``), which calls :meth:`MedDiff3DApp.prepare_request` and then
:meth:`MedDiff3DApp.infer`.

The stock ``BundleInferTask`` calls ``inferer(inputs, network)``, which a diffusion sampler cannot satisfy, so
:class:`BundleDiffusionTask` subclasses ``BasicInferTask`` with no transforms and overrides ``run_inferer`` to call the
bundle's own pipeline (:func:`meddiff3d.label.bundles.run_request`) and ``writer`` to hand over its file.

Errors: an unknown model, image id or session is a 404; a bad request (``params`` not a JSON object, an unknown
parameter or a bad value, no image, an unsafe upload name, three sequences instead of four, an unreadable image, a
grid over :data:`~meddiff3d.label.request.MAX_REQUEST_VOXELS`) a 422; a request computing longer than the time limit
(``--conf request_timeout SECONDS``, default :data:`~meddiff3d.label.request.DEFAULT_TIMEOUT_S`; 0: none) a 504;
anything else a 500 with the exception's message. Each ``detail`` is one line naming the user's image (upload name
or image id), never a server path. Requests compute one at a time (a lock; waiting does not count against the
limit); no request can stop the server. The datastore (:class:`CheckedDatastore`) refuses new image ids and label
tags that are not safe file names (422), so ``PUT /datastore/...`` writes nothing outside the studies folder.

This module imports MONAI Label: it runs in the label environment (``make label-venv``) only.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from fastapi import HTTPException
from monailabel.config import settings
from monailabel.datastore.local import LocalDatastore
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random
from monailabel.tasks.infer.basic_infer import BasicInferTask

from meddiff3d.checks import check_number, safe_name
from meddiff3d.errors import InputError, find_input_error
from meddiff3d.label.bundles import DESCRIPTIONS, BundleModel, load_bundle, run_request
from meddiff3d.label.params import check_param_names, config_of, parse_params, parse_params_json
from meddiff3d.label.request import DEFAULT_TIMEOUT_S, RequestNames, RequestTimeout, call_with_timeout, save_upload

logger = logging.getLogger("meddiff3d.label")

__all__ = ["MedDiff3DApp", "BundleDiffusionTask", "CheckedDatastore"]

#: MONAI Label model type per kind: Slicer's Auto Segmentation lists "segmentation" models only
INFER_TYPES = {"segmentation": InferType.SEGMENTATION, "anomaly": InferType.SEGMENTATION,
               "generation": InferType.OTHERS}
#: the user's names of the images of the request this thread computes (set by MedDiff3DApp.infer; MONAI Label deep
#: copies the request dict on its way to the task, so the names travel beside it)
_NAMES: ContextVar[RequestNames] = ContextVar("meddiff3d_request_names")


def _unprocessable(err: InputError, names: RequestNames | None = None) -> HTTPException:
    detail = names.message(str(err)) if names is not None else str(err)
    return HTTPException(status_code=422, detail=detail)


class CheckedDatastore(LocalDatastore):
    """MONAI Label's local datastore whose new image ids and label tags (``PUT /datastore/image?image=<id>``,
    ``PUT /datastore/label?tag=<tag>``: they become file and folder names in the studies folder) pass
    :func:`meddiff3d.checks.safe_name` first. A refused one is a 422, and the copy of the upload MONAI Label made in
    the temp folder for it is removed (MONAI Label removes it only after a success)."""

    def add_image(self, image_id: str, image_filename: str, image_info: dict[str, Any]) -> str:
        if image_id:  # else MONAI Label names it after its own temp copy
            self._check("image id", image_id, image_filename)
        return super().add_image(image_id, image_filename, image_info)

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        self._check("label tag", label_tag, label_filename)
        return super().save_label(image_id, label_filename, label_tag, label_info)

    @staticmethod
    def _check(what: str, value: Any, upload: str) -> None:
        try:
            safe_name(what, value)
        except InputError as err:
            if upload and os.path.dirname(os.path.realpath(upload)) == os.path.realpath(tempfile.gettempdir()):
                os.remove(upload)
            raise _unprocessable(err) from None


class BundleDiffusionTask(BasicInferTask):
    """A bundle served by MONAI Label: request params -> the bundle's pipeline -> one result file + JSON."""

    def __init__(self, model: BundleModel, datastore):
        self.model, self._datastore = model, datastore
        super().__init__(path=None, network=None, type=INFER_TYPES[model.kind], labels=model.labels or None,
                         dimension=3, description=DESCRIPTIONS[model.kind], config=config_of(model.params))
        self._config.pop("device", None)  # the bundle's own device setting applies

    def is_valid(self) -> bool:
        return not self.model.missing

    def info(self) -> dict[str, Any]:
        return {**super().info(), "kind": self.model.kind, "bundle": str(self.model.root)}

    def pre_transforms(self, data=None):
        return []

    def post_transforms(self, data=None):
        return []

    def run_inferer(self, data: dict[str, Any], convert_to_batch: bool = True, device: str = "cpu") -> dict:
        names = _NAMES.get(None) or RequestNames()

        def uri_of(image_id: str) -> str:  # params 'sequences': datastore ids, named by their ids in messages
            uri = self._datastore.get_image_uri(image_id) if isinstance(image_id, str) and image_id else ""
            if uri:
                names.add(uri, image_id)
            return uri

        parsed = parse_params(self.model.params, data)
        image = data.get("image") if isinstance(data.get("image"), str) else None
        result, info = run_request(self.model, image, data, parsed, uri_of, names)
        data["meddiff3d_result"], data["meddiff3d_info"] = str(result), {**info, "model": self.model.name}
        return data

    def writer(self, data: dict[str, Any], extension=None, dtype=None):
        return data["meddiff3d_result"], dict(data["meddiff3d_info"])


class MedDiff3DApp(MONAILabelApp):
    """meddiff3d's bundles behind MONAI Label's REST API (and so in 3D Slicer)."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]):
        from meddiff3d import __version__

        model_dir = Path(app_dir) / "model"
        names = [n.strip() for n in (conf.get("models") or "").split(",") if n.strip()] or sorted(
            p.name for p in model_dir.iterdir() if p.is_dir())
        self.bundles: dict[str, BundleModel] = {}
        for name in names:
            if not (model_dir / name).is_dir():
                raise InputError(f"model {name!r}: no bundle folder {model_dir / name}")
            bundle = load_bundle(model_dir / name, name)
            if bundle.missing:
                logger.warning("model %s is not served: missing %s", name, "; ".join(bundle.missing))
            self.bundles[name] = bundle
        #: seconds one request may compute (0: no limit)
        self.timeout = check_number("--conf request_timeout", conf.get("request_timeout", DEFAULT_TIMEOUT_S), 0.0)
        self._compute = threading.Lock()  # one request computes at a time
        super().__init__(app_dir=app_dir, studies=studies, conf=conf, name="meddiff3d",
                         description="meddiff3d diffusion models: BraTS segmentation with uncertainty, anomaly "
                                     "detection, brain MRI generation", version=__version__)

    def init_datastore(self):
        if self.studies.startswith(("http://", "https://")):
            return super().init_datastore()
        return CheckedDatastore(self.studies, extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT,
                                auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
                                read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY)

    def init_infers(self):
        return {name: BundleDiffusionTask(bundle, self._datastore) for name, bundle in self.bundles.items()}

    def init_trainers(self):
        return {}

    def init_strategies(self):
        return {"first": First(), "random": Random()}

    # ------------------------------------------------------------------------------------------ requests
    def _task(self, model: Any) -> BundleDiffusionTask:
        task = self._infers.get(model) if isinstance(model, str) else None
        if task is None or not task.is_valid():
            served = ", ".join(n for n, t in self._infers.items() if t.is_valid())
            raise HTTPException(status_code=404, detail=f"unknown model {model!r}; this server serves: {served}")
        return task

    def _datastore_image(self, image_id: Any, names: RequestNames) -> str:
        """The file of a datastore image id (registered in ``names``); ids are looked up, never used as paths."""
        uri = self.datastore().get_image_uri(image_id) if isinstance(image_id, str) and image_id else ""
        if not uri:
            try:
                safe_name("image id", image_id)
            except InputError as err:
                raise _unprocessable(err) from None
            raise HTTPException(status_code=404, detail=f"no image {image_id!r} in the datastore (upload it first, "
                                                        f"or send the file)")
        names.add(uri, image_id)
        names.add_folder(Path(uri).parent)
        return uri

    def prepare_request(self, model: str, image: str, session_id: str, params: str | None, upload, label,
                        output: str | None, scratch: Path) -> tuple[dict[str, Any], RequestNames]:
        """Check an infer request before anything computes, save its upload into ``scratch`` (the caller removes
        it) and return ``(request for infer, the user's names of its images)``; raises HTTPException 404 / 422."""
        task = self._task(model)
        names = RequestNames()
        try:
            if label is not None:
                raise InputError("the served models take no label input; send the image only")
            if output == "dicom_seg":
                raise InputError("output=dicom_seg needs a DICOMweb datastore; this server answers with "
                                 ".seg.nrrd / NIfTI files (output=image, json or all)")
            values = parse_params_json(params)
            check_param_names(task.model.params, values, task.model.extra_keys, f"model {model!r}")
            parse_params(task.model.params, values)  # bad values fail now, not after the wait for the lock
            if upload is not None:
                path = save_upload(upload.file, upload.filename, scratch / "upload")
                names.add(path, path.name)
                names.add_folder(scratch / "upload")
            elif session_id:
                path = self._session_image(safe_name("session id", session_id), names)
            elif image:
                path = self._datastore_image(image, names)
            else:
                raise InputError("no input image: give the id of a datastore image (?image=<id>) or upload a file")
        except InputError as err:
            raise _unprocessable(err, names) from None
        return {**values, "model": model, "image": str(path)}, names

    def _session_image(self, session_id: str, names: RequestNames) -> str:
        session = self.sessions().get_session(session_id) if self.sessions() is not None else None
        if session is None or not session.image:
            raise HTTPException(status_code=404, detail=f"no session {session_id!r} (expired, or sessions are off)")
        names.add(session.image, f"session {session_id}")
        return session.image

    def infer(self, request, datastore=None, names: RequestNames | None = None):
        """Run one request (from :meth:`prepare_request`, with its ``names``; without them, e.g. MONAI Label's
        batch inference, ``request["image"]`` must be a datastore image id) under the lock and the time limit."""
        task = self._task(request.get("model"))
        if names is None:
            names = RequestNames()
            request = {**request, "image": self._datastore_image(request.get("image"), names)}
        with self._compute:
            token = _NAMES.set(names)
            try:
                return call_with_timeout(super().infer, self.timeout, request, datastore)
            except HTTPException:
                raise
            except RequestTimeout:
                logger.warning("model %s: stopped after the time limit of %g s", task.model.name, self.timeout)
                raise HTTPException(status_code=504, detail=(
                    f"model {task.model.name!r}: the request took longer than the server's time limit of "
                    f"{self.timeout:g} s (meddiff3d label serve --timeout); ask for fewer steps or samples")) from None
            except Exception as err:  # noqa: BLE001 - user errors become 422, the rest 500, the server stays up
                user_error = find_input_error(err)
                if user_error is not None:
                    logger.info("model %s: bad request: %s", task.model.name, user_error)
                    raise _unprocessable(user_error, names) from None
                logger.exception("model %s failed", task.model.name)
                raise HTTPException(status_code=500, detail=names.message(f"{type(err).__name__}: {err}")) from None
            finally:
                _NAMES.reset(token)
