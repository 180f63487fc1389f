"""Rectified-flow training (issue 15 item 5): the training-time distributions against closed form and MONAI's
``RFlowScheduler``, the schedule's file format, convergence on the toy mixture through the real engine, and a tiny
latent flow model trained by the recipe and generated with every sampler.

Convergence: a ToyNet trained on ``DiffusionObjective(FlowSchedule(...), "flow")`` for 1000 optimiser steps is sampled
from fixed noise; its energy distance to exact draws must be near what the exact denoiser
(:class:`~meddiff3d.diffusion.GaussianMixtureDenoiser`) gets with the same sampler and steps, and far below an untrained
net's (0.32). Measured on this noise and reference (2000 samples each; exact Heun-32 gives 0.0055, the floor of the
measure): exact Euler-4 / 16 / 32 0.033 / 0.0074 / 0.0060, Heun-4 / 8 0.0081 / 0.0056; trained (seeds 0-2, uniform and
logit-normal) Euler-4 0.025-0.043, Euler-16 0.007-0.012, Heun-8 0.004-0.009.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from toy_mixture import ToyNet, data, energy_distance, exact_denoiser, mode_error

from meddiff3d.diffusion import DiffusionObjective, FlowSchedule, make_denoiser, sample, schedule_from_dict
from meddiff3d.engine import seed_everything, train
from meddiff3d.errors import InputError

pytestmark = pytest.mark.usefixtures("one_thread")

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "brain_mri_ldm"
NOISE = torch.randn((2000, 2, 1), generator=torch.Generator().manual_seed(7))
REFERENCE = data(2000, seed=1)
#: (sampler, steps) the trained nets are checked at, with the margin over the exact denoiser's energy distance
CHECKS = {("euler", 4): 0.03, ("euler", 16): 0.012, ("euler", 32): 0.012, ("heun", 4): 0.012, ("heun", 8): 0.012}


def quality(denoiser, schedule, sampler: str, steps: int) -> float:
    return energy_distance(sample(denoiser, NOISE, schedule, sampler=sampler, steps=steps), REFERENCE)


@pytest.fixture(scope="module", params=[{}, {"sample_method": "logit-normal"}], ids=["uniform", "logit-normal"])
def trained(request, tmp_path_factory):
    """``(schedule, EMA network)`` of 1000 steps of flow training on the toy mixture (batch 256, ~5 s)."""
    schedule = FlowSchedule(**request.param)
    items = [{"image": x} for x in data(20000, seed=3)]
    seed_everything(0)
    result = train(ToyNet(), DiffusionObjective(schedule, "flow"), items, run_dir=tmp_path_factory.mktemp("toy"),
                   max_iterations=1000, batch_size=256, lr=2e-3, ema_decay=0.995, checkpoint_every=10**6,
                   log_every=10**6, device="cpu", seed=0, progress=False)
    return schedule, result.ema.module.eval()


# ------------------------------------------------------------------------------------------------ convergence
def test_flow_training_converges_on_the_toy_mixture(trained):
    schedule, network = trained
    denoiser, exact = make_denoiser(network, schedule, "flow"), exact_denoiser(schedule)
    measured = {key: quality(denoiser, schedule, *key) for key in CHECKS}
    reference = {key: quality(exact, schedule, *key) for key in CHECKS}
    seed_everything(0)
    untrained = quality(make_denoiser(ToyNet().eval(), schedule, "flow"), schedule, "euler", 16)
    print(schedule.sample_method, {f"{s}-{n}": (round(measured[s, n], 4), round(reference[s, n], 4))
                                   for s, n in CHECKS}, f"untrained {untrained:.3f}")
    for key, margin in CHECKS.items():
        assert measured[key] < reference[key] + margin, (key, measured[key], reference[key])
    assert untrained > 0.1 and max(measured.values()) < untrained / 5
    assert measured["euler", 32] < measured["euler", 4]  # more steps, closer to the data: the ODE converges
    x = sample(denoiser, NOISE, schedule, sampler="heun", steps=8)
    assert mode_error(x) < 0.03 and x.abs().max() < 4  # every mode at its weight, nothing flung away


def test_trained_flow_model_samples_with_ddim_and_dpmpp_2m(trained):
    """DDIM on a flow schedule is Euler; DPM-Solver++(2M) runs on the flow's own timesteps (default log_snr)."""
    schedule, network = trained
    denoiser = make_denoiser(network, schedule, "flow")
    euler = sample(denoiser, NOISE, schedule, sampler="euler", steps=8)
    torch.testing.assert_close(sample(denoiser, NOISE, schedule, sampler="ddim", steps=8), euler)
    dpm = {spacing: energy_distance(sample(denoiser, NOISE, schedule, sampler="dpmpp_2m", steps=8,
                                           spacing=spacing), REFERENCE) for spacing in ("linspace", "log_snr")}
    assert max(dpm.values()) < energy_distance(euler, REFERENCE) + 0.005, dpm


# ------------------------------------------------------------------------------------------------ time distributions
def _ks(draws: torch.Tensor, cdf) -> float:
    """Kolmogorov-Smirnov statistic of ``draws`` against the closed-form ``cdf``."""
    x = draws.double().sort().values
    n = len(x)
    f = cdf(x)
    return float(torch.maximum(torch.arange(1, n + 1) / n - f, f - torch.arange(n) / n).max())


def _normal_cdf(z: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1 + torch.erf(z / math.sqrt(2)))


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("method,loc,scale", [("uniform", 0.0, 1.0), ("logit-normal", 0.0, 1.0),
                                              ("logit-normal", 0.5, 0.6)])
def test_training_times_follow_their_closed_form(method, loc, scale, shift):
    schedule = FlowSchedule(num_train_timesteps=1000, sample_method=method, loc=loc, scale=scale, shift=shift,
                            shift_training=shift != 1.0)
    n = 20000
    t = schedule.sample_timesteps(n, torch.Generator().manual_seed(0))
    assert t.shape == (n,) and t.dtype == torch.float32 and 0 <= t.min() and t.max() <= 1000
    s = t / 1000

    def cdf(y):  # P(s' <= y) with s' = shift s / (1 + (shift - 1) s), so s = y / (shift - (shift - 1) y)
        u = (y / (shift - (shift - 1) * y)).clamp(1e-12, 1 - 1e-12)
        return u if method == "uniform" else _normal_cdf((torch.log(u / (1 - u)) - loc) / scale)

    assert _ks(s, cdf) < 1.63 / math.sqrt(n)  # the 1% critical value
    if method == "logit-normal" and shift == 1.0:
        logit = torch.log(s / (1 - s)).double()
        assert abs(logit.mean() - loc) < 4 * scale / math.sqrt(n) and abs(logit.std() / scale - 1) < 0.03


@pytest.mark.parametrize("method,kwargs", [("uniform", {}), ("logit-normal", {"loc": 0.3, "scale": 1.2})])
def test_training_times_equal_monai_rflow(method, kwargs):
    """With the global RNG: MONAI ``RFlowScheduler.sample_timesteps`` (continuous timesteps), unshifted and with
    ``use_timestep_transform`` (our ``shift_training`` with ``shift = resolution_shift(latent shape)``)."""
    from monai.networks.schedulers import RFlowScheduler
    from monai.networks.schedulers.rectified_flow import timestep_transform

    latents = torch.zeros(64, 3, 20, 28, 20)
    ratio = FlowSchedule.resolution_shift((20, 28, 20))
    assert ratio == pytest.approx((20 * 28 * 20 / 32**3) ** (1 / 3))
    t = torch.tensor([0.0, 100.0, 500.0, 900.0, 1000.0], dtype=torch.float64)
    torch.testing.assert_close(FlowSchedule(shift=ratio).shifted(t / 1000) * 1000,
                               timestep_transform(t, input_img_size_numel=20 * 28 * 20))
    for transform in (False, True):
        monai = RFlowScheduler(1000, use_discrete_timesteps=False, sample_method=method,
                               use_timestep_transform=transform, **kwargs)
        ours = FlowSchedule(sample_method=method, shift=ratio if transform else 1.0, shift_training=transform,
                            **kwargs)
        torch.manual_seed(3)
        expected = monai.sample_timesteps(latents).float()
        torch.manual_seed(3)
        torch.testing.assert_close(ours.sample_timesteps(64), expected, atol=1e-3, rtol=0)
    monai = RFlowScheduler(1000, use_discrete_timesteps=False, use_timestep_transform=True)
    monai.set_timesteps(10, input_img_size_numel=20 * 28 * 20)  # MONAI rounds these to float16
    torch.testing.assert_close(FlowSchedule(shift=ratio).timesteps(10), monai.timesteps.float(), atol=0.5, rtol=0)


def test_log_snr_spacing_of_a_flow():
    schedule = FlowSchedule()
    for n in (1, 2, 3, 4):
        torch.testing.assert_close(schedule.timesteps(n, "log_snr"), schedule.timesteps(n))
    for shift in (1.0, 3.0):
        t = FlowSchedule(shift=shift).timesteps(12, "log_snr").double()
        linspace = FlowSchedule(shift=shift).timesteps(12).double()
        assert t[0] == 1000 and t[1] == pytest.approx(linspace[1]) and t[-1] == pytest.approx(linspace[-1])
        s = t[1:] / 1000
        steps = torch.diff(2 * torch.log((1 - s) / s))
        torch.testing.assert_close(steps, steps.mean().expand_as(steps), atol=1e-4, rtol=0)
    with pytest.raises(InputError, match="spacings 'linspace' and 'log_snr'.*got spacing='leading'"):
        schedule.timesteps(8, "leading")


# ------------------------------------------------------------------------------------------------ the file format
def test_schedule_dict_round_trips_and_reads_old_files():
    schedule = FlowSchedule(shift=2.0, sample_method="logit-normal", loc=0.2, scale=0.8, shift_training=True)
    saved = json.loads(json.dumps(schedule.to_dict()))
    assert saved == {"type": "FlowSchedule", "num_train_timesteps": 1000, "shift": 2.0, "sample_method": "logit-normal",
                     "loc": 0.2, "scale": 0.8, "shift_training": True}
    assert schedule_from_dict(saved) == schedule
    old = schedule_from_dict({"type": "FlowSchedule", "num_train_timesteps": 1000, "shift": 2.0})  # before the fields
    assert old == FlowSchedule(shift=2.0) and old.sample_method == "uniform" and not old.shift_training
    with pytest.raises(InputError, match=r"unknown FlowSchedule field\(s\) \['sample'\]"):
        schedule_from_dict({"type": "FlowSchedule", "sample": "uniform"})
    for bad, message in [({"sample_method": "lognormal"}, "sample_method must be one of"),
                         ({"scale": 0.0}, "must be > 0"), ({"shift": -1.0}, "must be > 0"),
                         ({"loc": float("nan")}, "loc must be a finite number"),
                         ({"shift_training": "yes"}, "shift_training must be true or false"),
                         ({"num_train_timesteps": 0}, "num_train_timesteps must be an integer >= 1")]:
        with pytest.raises(InputError, match=message):
            FlowSchedule(**bad)


def test_epsilon_prediction_is_refused_on_a_flow_schedule():
    with pytest.raises(InputError, match="prediction 'epsilon' cannot be sampled on a FlowSchedule"):
        DiffusionObjective(FlowSchedule(), "epsilon")
    for prediction in ("flow", "v", "x0"):
        DiffusionObjective(FlowSchedule(), prediction)


# ------------------------------------------------------------------------------------------------ latent flow model
def test_flow_preset_declares_the_flow_objective_and_its_own_files():
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / f) for f in ("common.yaml", "train_diffusion.yaml",
                                                             "data/synthetic_healthy.yaml", "presets/demo.yaml",
                                                             "presets/demo_flow.yaml")])
    parser["bundle_root"] = str(BUNDLE)
    objective = parser.get_parsed_content("train#inferer")
    assert objective.prediction == "flow" and objective.min_snr_gamma is None
    assert objective.schedule == FlowSchedule(sample_method="logit-normal")
    assert parser.get_parsed_content("diffusion_path").endswith("models/model_flow.pt")
    assert parser.get_parsed_content("run_dir") == "outputs/runs/brain_mri_ldm_flow"
    demo = {"diffusion_max_iterations": 3000, "diffusion_batch_size": 4, "diffusion_network": "tiny_cpu",
            "coordinates": True, "diffusion_lr": 1e-3, "ema_decay": 0.995, "cond_dropout": 0.15}  # the v demo's budget
    assert {key: parser[key] for key in demo} == demo


def test_tiny_latent_flow_model_trains_and_generates_with_every_sampler(tmp_path):
    from meddiff3d.pipelines.benchmark import untrained_pair
    from meddiff3d.pipelines.data import synthetic_datalist
    from meddiff3d.pipelines.generation import generate
    from meddiff3d.pipelines.training import train_latent_diffusion

    datalist = synthetic_datalist(tmp_path / "data", n=4, shape=(32, 48, 32), progress=False)
    codec, _ = untrained_pair(tmp_path / "pair")
    out = tmp_path / "models" / "model_flow.pt"
    schedule = {"type": "FlowSchedule", "sample_method": "logit-normal"}
    summary = train_latent_diffusion(codec, datalist, tmp_path / "run", out=out, network="test", schedule=schedule,
                                     prediction="flow", max_iterations=2, batch_size=2, lr=1e-3, checkpoint_every=10,
                                     device="cpu", amp="none", progress=False)
    assert summary["iteration"] == 2 and np.isfinite(summary["last_loss"])
    meta = torch.load(out, weights_only=True)["meta"]
    assert meta["prediction"] == "flow"
    assert meta["schedule"] == FlowSchedule(sample_method="logit-normal").to_dict()  # how it was trained
    cov = {"sex": 1.0, "age": 0.5, "ventricular_volume": 0.5, "brain_volume": 0.5}
    for sampler in ("euler", "heun", "ddim", "dpmpp_2m"):
        (nifti,) = generate(codec, out, covariates=cov, sampler=sampler, steps=3, output_dir=tmp_path / sampler,
                            amp="none", progress=False)
        sidecar = json.loads(nifti.with_name("sample_seed0.json").read_text())
        assert sidecar["sampler"] == sampler and sidecar["steps"] == 3
        volume = np.asarray(nib.load(nifti).dataobj)
        assert volume.shape == (32, 48, 32) and np.isfinite(volume).all()
