"""A standard-library client for the meddiff3d MONAI Label server: fetch any result, float volumes included.

Slicer's MONAI Label module loads every result as a label map, so float results (probability, uncertainty, anomaly
map, healed or generated images) come through this client instead. It needs nothing but Python's standard library,
so Slicer's Python console can run it straight from the file (docs/slicer.md)::

    exec(open("/path/to/meddiff3d/label/client.py").read())
    path, info = infer("http://127.0.0.1:8000", "brats_mri_segdiff", "BraTS2021_00000_flair",
                       {"result": "entropy", "region": "WT"})
    slicer.util.loadVolume(path)              # float results
    slicer.util.loadSegmentation(path)        # .seg.nrrd results

Errors of the server (unknown model or image, bad parameters, three sequences instead of four) raise
:class:`ServerError` carrying the HTTP status and the server's one-line message.
"""

import email.parser
import email.policy
import json
import os
import tempfile
import uuid
import urllib.error
import urllib.parse
import urllib.request

__all__ = ["ServerError", "infer", "info", "encode_multipart"]


class ServerError(RuntimeError):
    """An HTTP error answer of the server: ``status`` and the server's ``detail`` message."""

    def __init__(self, status, detail):
        super().__init__(f"HTTP {status}: {detail}")
        self.status, self.detail = status, detail


def encode_multipart(fields, files):
    """``(content type, body)`` of a multipart/form-data request: ``fields`` {name: text}, ``files`` {name: path}."""
    boundary = uuid.uuid4().hex
    parts = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for name, path in files.items():
        with open(path, "rb") as f:
            data = f.read()
        head = (f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; '
                f'filename="{os.path.basename(path)}"\r\nContent-Type: application/octet-stream\r\n\r\n')
        parts.append(head.encode() + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return f"multipart/form-data; boundary={boundary}", b"".join(parts)


def _open(request, timeout):
    try:
        return urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        body = err.read().decode("utf-8", errors="replace")
        try:
            detail = json.loads(body).get("detail", body)
        except (ValueError, AttributeError):
            detail = body
        raise ServerError(err.code, detail) from None


def info(server, timeout=30):
    """The server's ``/info/`` (models, their labels and options)."""
    with _open(urllib.request.Request(server.rstrip("/") + "/info/"), timeout) as response:
        return json.loads(response.read().decode("utf-8"))


def infer(server, model, image_id="", params=None, file=None, out_dir=None, timeout=3600):
    """Run ``model`` on a datastore image (``image_id``) or an uploaded ``file``; returns ``(result path, info)``.

    The result file keeps the server's name and suffix (``.seg.nrrd`` or ``.nii.gz``) and is written into
    ``out_dir`` (default: a new temporary folder).
    """
    query = urllib.parse.urlencode({"image": image_id or "", "output": "all"})
    url = f"{server.rstrip('/')}/infer/{urllib.parse.quote(model)}?{query}"
    content_type, body = encode_multipart({"params": json.dumps(params or {})}, {"file": file} if file else {})
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": content_type})
    with _open(request, timeout) as response:
        payload, ctype = response.read(), response.headers.get("Content-Type", "")
    if not ctype.startswith("multipart/"):
        return None, json.loads(payload.decode("utf-8"))
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + ctype.encode() + b"\r\n\r\n" + payload)
    out_dir = out_dir or tempfile.mkdtemp(prefix="meddiff3d-")
    path, result = None, {}
    for part in message.iter_parts():
        name = part.get_filename()
        if name:
            path = os.path.join(out_dir, os.path.basename(name))
            with open(path, "wb") as f:
                f.write(part.get_payload(decode=True))
        else:
            result = json.loads(part.get_payload(decode=True).decode("utf-8"))
    return path, result
