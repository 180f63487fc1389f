"""Convert the MONAI model-zoo brain LDM checkpoints into meddiff3d model files.

    python scripts/convert_model_zoo_ldm.py <bundle>/models/autoencoder.pt <bundle>/models/model.pt \
        bundles/brain_mri_ldm/models/model_zoo

writes ``autoencoder.pt`` (codec, latent scale 1) and ``diffusion.pt`` into the output folder; then run
``configs/inference_anchor.yaml`` (see the bundle README, "Official model-zoo weights"). Errors (missing file, weights
of another architecture) print one ``error:`` line and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from meddiff3d.errors import InputError
from meddiff3d.models.model_zoo import convert_model_zoo_ldm


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("autoencoder_pt", type=Path, help="the model-zoo bundle's models/autoencoder.pt")
    p.add_argument("diffusion_pt", type=Path, help="the model-zoo bundle's models/model.pt")
    p.add_argument("out_dir", type=Path, help="folder for autoencoder.pt and diffusion.pt")
    args = p.parse_args(argv)
    try:
        codec, diffusion = convert_model_zoo_ldm(args.autoencoder_pt, args.diffusion_pt, args.out_dir)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {codec} and {diffusion}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
