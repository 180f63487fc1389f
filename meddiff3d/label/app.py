"""The MONAI Label app: one infer task per served bundle, user errors as HTTP 4xx with their message.

MONAI Label loads ``<app>/main.py`` (written by ``meddiff3d label serve``), which imports :class:`MedDiff3DApp`.
The served bundles are ``--conf models name1,name2`` (default: every folder in ``<app>/model``), each read by
:func:`meddiff3d.label.bundles.load_bundle`.

The stock ``BundleInferTask`` calls ``inferer(inputs, network)``, which a diffusion sampler cannot satisfy, so
:class:`BundleDiffusionTask` subclasses ``BasicInferTask`` with no transforms and overrides ``run_inferer`` to call the
bundle's own pipeline (:func:`meddiff3d.label.bundles.run_request`) and ``writer`` to hand over its file.

Errors: an unknown model or image id is a 404, a bad request (parameters, three sequences instead of four, an
unreadable image) a 422, each with a one-line ``detail`` naming the problem; anything else is a 500 with the
exception's message. No request can stop the server (inference runs in the request; MONAI Label serialises them).

This module imports MONAI Label: it runs in the label environment (``make label-venv``) only.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from fastapi import HTTPException
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random
from monailabel.tasks.infer.basic_infer import BasicInferTask

from meddiff3d.errors import InputError, find_input_error
from meddiff3d.label.bundles import DESCRIPTIONS, BundleModel, load_bundle, run_request
from meddiff3d.label.params import config_of, parse_params

logger = logging.getLogger("meddiff3d.label")

__all__ = ["MedDiff3DApp", "BundleDiffusionTask"]

#: MONAI Label model type per kind: Slicer's Auto Segmentation lists "segmentation" models only
INFER_TYPES = {"segmentation": InferType.SEGMENTATION, "anomaly": InferType.SEGMENTATION,
               "generation": InferType.OTHERS}


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

    def _uri_of(self, image_id: str) -> str:
        return self._datastore.get_image_uri(image_id) if image_id else ""

    def run_inferer(self, data: dict[str, Any], convert_to_batch: bool = True, device: str = "cpu") -> dict:
        parsed = parse_params(self.model.params, data)
        image = data.get("image") if isinstance(data.get("image"), str) else None
        result, info = run_request(self.model, image, data, parsed, self._uri_of)
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
        super().__init__(app_dir=app_dir, studies=studies, conf=conf, name="meddiff3d",
                         description="meddiff3d diffusion models: BraTS segmentation with uncertainty, anomaly "
                                     "detection, brain MRI generation", version=__version__)

    def init_infers(self):
        return {name: BundleDiffusionTask(bundle, self._datastore) for name, bundle in self.bundles.items()}

    def init_trainers(self):
        return {}

    def init_strategies(self):
        return {"first": First(), "random": Random()}

    def infer(self, request, datastore=None):
        model = request.get("model")
        task = self._infers.get(model)
        if task is None or not task.is_valid():
            served = ", ".join(n for n, t in self._infers.items() if t.is_valid())
            raise HTTPException(status_code=404, detail=f"unknown model {model!r}; this server serves: {served}")
        image = request.get("image")
        if isinstance(image, str) and image and not os.path.exists(image):
            if not (datastore or self.datastore()).get_image_uri(image):
                raise HTTPException(status_code=404, detail=f"no image {image!r} in the datastore (upload it first, "
                                                            f"or send the file)")
        try:
            return super().infer(request, datastore)
        except HTTPException:
            raise
        except Exception as err:  # noqa: BLE001 - user errors become 422, the rest 500, the server stays up
            user_error = find_input_error(err)
            if user_error is not None:
                logger.info("model %s: bad request: %s", model, user_error)
                raise HTTPException(status_code=422, detail=str(user_error)) from None
            logger.exception("model %s failed", model)
            raise HTTPException(status_code=500, detail=f"{type(err).__name__}: {err}") from None
