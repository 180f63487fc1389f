"""meddiff3d in 3D Slicer: a MONAI Label app serving the three bundles (docs/slicer.md).

Plain-Python parts, importable without MONAI Label: :mod:`~meddiff3d.label.params` (request parameters),
:mod:`~meddiff3d.label.sequences` (how the four BraTS sequences arrive), :mod:`~meddiff3d.label.slicer_io`
(``.seg.nrrd`` and float volumes), :mod:`~meddiff3d.label.bundles` (the calls into the pipelines),
:mod:`~meddiff3d.label.serve` (``meddiff3d label serve``), :mod:`~meddiff3d.label.client` (a standard-library client
for float results, usable from Slicer's Python console). :mod:`~meddiff3d.label.app` needs MONAI Label and runs in
the label environment (``make label-venv``).
"""
