"""A tiny healthy-brain model pair for the anomaly tests, trained once per test session (85 s on one thread
of a loaded 2-core machine).

A KL autoencoder (channels 8, 16, 16; x4) and an unconditional latent U-Net (the ``test`` preset) trained briefly
on the healthy training split of a procedural synthetic anomaly cohort at 32x48x32 (5 mm); the cohort's test split
holds tumour, multifocal, dark-lesion and healthy cases with masks.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

SHAPE, SPACING = (32, 48, 32), (5.0, 4.666667, 5.0)
AE_SETTINGS = dict(kind="kl", network={"channels": [8, 16, 16], "norm_num_groups": 8},
                   adv_weight=0.0, patch_size=(16, 16, 16), spacing=SPACING,
                   shape=SHAPE, batch_size=2, lr=1e-3, device="cpu", progress=False, calibrate_volumes=4,
                   eval_volumes=1, max_iterations=300, checkpoint_every=300, cache=True)
LDM_SETTINGS = dict(covariates=[], conditioning="none", network="test", max_iterations=400, batch_size=4, lr=2e-3,
                    ema_decay=0.99, checkpoint_every=400, device="cpu", amp="none", progress=False)
#: fast detector settings for the tests
DETECTOR = {"method": "latent_inpainting", "start_steps": [250, 400], "steps": 20, "resample": 2,
            "smoothing_sigma": 0.7}


def tiny_anomaly_models(base: Path) -> dict[str, Path]:
    """``{"datalist", "codec", "diffusion"}`` under ``base/anomaly_tiny`` (trained on first use, then reused)."""
    from meddiff3d.data.synthetic import write_cohort
    from meddiff3d.engine.trainer import seed_everything
    from meddiff3d.pipelines.autoencoder_training import train_autoencoder
    from meddiff3d.pipelines.training import train_latent_diffusion

    root = Path(base) / "anomaly_tiny"
    paths = {"datalist": root / "data" / "datalist.json", "codec": root / "models" / "autoencoder.pt",
             "diffusion": root / "models" / "diffusion.pt"}
    done = root / "done.json"
    if done.is_file():
        return paths
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is as fast, and immune to oversubscribed shared cores
    try:
        write_cohort("anomaly", root / "data", 30, seed=0, shape=SHAPE, source="procedural", progress=False)
        seed_everything(0)
        train_autoencoder(paths["datalist"], root / "runs" / "autoencoder", codec_out=paths["codec"], **AE_SETTINGS)
        train_latent_diffusion(paths["codec"], paths["datalist"], root / "runs" / "diffusion",
                               out=paths["diffusion"], **LDM_SETTINGS)
    finally:
        torch.set_num_threads(threads)
    done.write_text(json.dumps({k: str(v) for k, v in paths.items()}))
    return paths
