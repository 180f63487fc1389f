"""Task commands on plain inputs: ``meddiff3d generate``, ``segment``, ``detect``, ``calibrate``.

Each is a thin layer over one bundle config (:mod:`meddiff3d.tasks.bundle`): its flags are bundle config keys (one
table per command, in its module docstring and its ``--help``), its plain inputs (a BraTS case folder, T1 files)
become what the config reads, and the bundle runs its own components, checks and errors.
"""
