"""Fast unit tests of the training engine: EMA maths, accumulation, checkpoints, data order, precision."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from meddiff3d.engine import EMA, DiffusionTrainer, build_network, load_checkpoint
from meddiff3d.engine.checkpoint import capture_rng_state, restore_rng_state
from meddiff3d.engine.data import BatchStream
from meddiff3d.engine.precision import resolve_precision
from meddiff3d.engine.selftest import EpsilonMSE, blob_volumes, tiny_unet_meta
from meddiff3d.errors import InputError

torch.set_num_threads(1)


class TinyConv(torch.nn.Module):
    """A 3D conv denoiser without batch-coupled layers, so per-sample losses are independent of batch composition."""

    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Conv3d(1, width, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv3d(width, 1, 3, padding=1)
        )

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor | None = None) -> torch.Tensor:
        return self.body(x)


def reconstruction_loss(network: torch.nn.Module, batch: dict) -> torch.Tensor:
    """A deterministic objective: per-sample MSE of reconstructing the image."""
    x = batch["image"]
    return (network(x) - x).pow(2).flatten(1).mean(1)


def make_trainer(tmp_path, network=None, objective=reconstruction_loss, **kwargs) -> DiffusionTrainer:
    options = dict(run_dir=tmp_path / "run", max_iterations=2, batch_size=2, device="cpu", progress=False)
    options.update(kwargs)
    return DiffusionTrainer(network or TinyConv(), objective, blob_volumes(4, 8), **options)


# ----------------------------------------------------------------------------------------------------- EMA
def test_ema_follows_the_formula_with_and_without_warmup():
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = EMA(model, decay=0.9, warmup=False)
    expected = 0.0
    for value in (1.0, 2.0, 4.0):
        with torch.no_grad():
            model.weight.fill_(value)
        ema.update(model)
        expected = 0.9 * expected + 0.1 * value
        assert ema.module.weight.item() == pytest.approx(expected, rel=1e-6)

    warm = EMA(model, decay=0.99, warmup=True)  # starts at the current weight 4.0
    assert warm.current_decay() == pytest.approx(1 / 10)
    with torch.no_grad():
        model.weight.fill_(14.0)
    warm.update(model)  # 0.1 * 4 + 0.9 * 14
    assert warm.module.weight.item() == pytest.approx(13.0, rel=1e-6)
    assert warm.current_decay() == pytest.approx(2 / 11)
    warm.num_updates = 10_000
    assert warm.current_decay() == pytest.approx(0.99)


def test_ema_copies_buffers_and_leaves_training_weights_alone():
    model = torch.nn.BatchNorm1d(2)
    ema = EMA(model, decay=0.5, warmup=False)
    model.running_mean.fill_(3.0)
    ema.update(model)
    assert torch.equal(ema.module.running_mean, model.running_mean)
    assert not any(p.requires_grad for p in ema.module.parameters())


# ----------------------------------------------------------------------------------------- accumulation
def test_k_accumulated_micro_batches_equal_one_big_batch(tmp_path):
    torch.manual_seed(0)
    net = TinyConv()
    sgd = lambda params: torch.optim.SGD(params, lr=0.5)  # noqa: E731
    accum = make_trainer(tmp_path / "a", copy.deepcopy(net), optimizer=sgd, grad_accum=3)
    whole = make_trainer(tmp_path / "b", copy.deepcopy(net), optimizer=sgd)
    images = torch.randn(6, 1, 8, 8, 8)
    micro = [{"image": images[i : i + 2]} for i in range(0, 6, 2)]
    out_a = accum.train_step(micro)
    out_b = whole.train_step([{"image": images}])
    assert out_a["loss"] == pytest.approx(out_b["loss"], rel=1e-5)
    for pa, pb in zip(accum.network.parameters(), whole.network.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)
    assert not torch.equal(next(accum.network.parameters()), next(net.parameters()))  # it did train


def test_gradient_clipping_limits_the_update(tmp_path):
    torch.manual_seed(0)
    net = TinyConv()
    before = [p.detach().clone() for p in net.parameters()]
    trainer = make_trainer(tmp_path, net, optimizer=lambda p: torch.optim.SGD(p, lr=1.0), grad_clip=1e-3)
    out = trainer.train_step([{"image": torch.randn(2, 1, 8, 8, 8) * 10}])
    assert out["grad_norm"] > 1e-3
    step = torch.sqrt(sum(((p - b) ** 2).sum() for p, b in zip(net.parameters(), before)))
    assert step.item() == pytest.approx(1e-3, rel=1e-3)


def test_non_finite_gradients_skip_the_step(tmp_path):
    net = TinyConv()
    before = [p.detach().clone() for p in net.parameters()]
    trainer = make_trainer(tmp_path, net)
    out = trainer.train_step([{"image": torch.full((2, 1, 8, 8, 8), float("nan"))}])
    assert out["skipped"]
    assert all(torch.equal(p, b) for p, b in zip(net.parameters(), before))
    assert trainer.ema.num_updates == 0


# ------------------------------------------------------------------------------------------- checkpoints
def test_checkpoint_is_weights_only_and_holds_everything(tmp_path):
    trainer = make_trainer(tmp_path, meta={"network": {"class": "x.Y", "args": {"k": (1, 2)}}})
    result = trainer.run()
    data = torch.load(result.checkpoint, weights_only=True)
    assert data["iteration"] == 2 and data["ema_num_updates"] == 2
    assert set(data) >= {"model", "ema", "optimizer", "grad_scaler", "rng", "meta", "train_config"}
    assert data["meta"]["network"]["args"]["k"] == [1, 2]
    rank0 = data["rng"]["per_rank"][0]
    assert set(rank0) == {"torch", "cuda", "numpy", "python"}
    export = torch.load(result.inference, weights_only=True)
    assert set(export) == {"format", "iteration", "ema", "meta"}
    for key, value in trainer.ema.state_dict().items():
        assert torch.equal(export["ema"][key], value)


def test_rng_state_round_trip():
    import random

    import numpy as np

    state = capture_rng_state()
    first = (torch.rand(3), np.random.rand(3), random.random())
    restore_rng_state(state)
    second = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], second[0]) and np.array_equal(first[1], second[1]) and first[2] == second[2]


def test_checkpoint_of_another_architecture_is_rejected_with_the_keys(tmp_path):
    meta = tiny_unet_meta(channels=(8, 16))
    trainer = make_trainer(tmp_path, build_network(meta), objective=EpsilonMSE(), meta=meta, max_iterations=1)
    path = trainer.run().checkpoint
    other = build_network(tiny_unet_meta(channels=(8, 8)))
    with pytest.raises(InputError) as err:
        load_checkpoint(path, other)
    message = str(err.value)
    assert str(path) in message and "shape mismatches" in message and "DiffusionModelUNet" in message
    with pytest.raises(InputError, match="missing keys: body.0.weight"):
        load_checkpoint(path, TinyConv())
    network = build_network(meta)  # the meta rebuilds the right network
    loaded_meta = load_checkpoint(path, network)["meta"]
    assert loaded_meta == meta
    for key, value in network.state_dict().items():
        assert torch.equal(value, trainer.ema.state_dict()[key])


def test_build_network_errors_name_the_problem():
    with pytest.raises(InputError, match="no network description"):
        build_network({"schedule": {}})
    with pytest.raises(InputError, match="cannot be imported"):
        build_network({"network": {"class": "monai.networks.nets.NoSuchNet", "args": {}}})
    with pytest.raises(InputError, match="rejects the arguments"):
        build_network({"class": "torch.nn.Linear", "args": {"size": 3}})
    with pytest.raises(InputError, match="does not exist"):
        load_checkpoint("/nonexistent/last.pt")


def test_meta_must_be_json(tmp_path):
    with pytest.raises(InputError, match="JSON"):
        make_trainer(tmp_path, meta={"bad": object()})


# ---------------------------------------------------------------------------------------------- data order
def test_data_stream_resumes_mid_epoch_and_shards_disjointly():
    items = [{"image": torch.tensor([float(i)])} for i in range(10)]
    stream = BatchStream(items, batch_size=2, seed=3)
    assert stream.batches_per_epoch == 5

    def take(it, n):
        return [batch["image"].flatten().tolist() for batch, _ in zip(it, range(n))]

    full = take(stream.iter_from(0), 12)
    assert take(stream.iter_from(7), 5) == full[7:12]
    assert sorted(sum(full[:5], [])) == list(range(10)) and full[:5] != full[5:10]  # new permutation per epoch
    shards = [BatchStream(items, batch_size=1, seed=3, rank=r, world_size=3) for r in range(3)]
    seen = [sum(take(s.iter_from(0), 3), []) for s in shards]
    assert len(set(sum(seen, []))) == 9  # 10 items, 3 ranks: one dropped, no overlap


def test_too_little_data_is_an_input_error():
    with pytest.raises(InputError, match="too few"):
        BatchStream([{"image": torch.zeros(1)}], batch_size=2)


# ---------------------------------------------------------------------------------------------- precision
def test_bf16_autocast_runs_on_cpu(tmp_path):
    seen = []

    def objective(network, batch):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        out = network(batch["image"])
        seen.append(out.dtype)
        return (out.float() - batch["image"]).pow(2).flatten(1).mean(1)

    trainer = make_trainer(tmp_path, objective=objective, amp="bf16")
    assert trainer.precision.name == "bf16" and trainer.grad_scaler is None
    result = trainer.run()
    assert seen[0] == (True, torch.bfloat16) and seen[1] == torch.bfloat16
    assert result.last_loss is not None and torch.isfinite(torch.tensor(result.last_loss))
    assert all(p.dtype == torch.float32 for p in result.network.parameters())


def test_grad_scaler_path_saves_and_skips(tmp_path):
    """The fp16 branch (GradScaler) is CUDA-only in use; forced onto the CPU here to exercise its bookkeeping."""
    from meddiff3d.engine.precision import Precision

    trainer = make_trainer(tmp_path)
    trainer.precision = Precision("cpu", torch.float16)
    trainer.grad_scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    result = trainer.run()
    assert torch.load(result.checkpoint, weights_only=True)["grad_scaler"]["scale"] == 1024.0
    out = trainer.train_step([{"image": torch.full((2, 1, 8, 8, 8), float("inf"))}], step=2)
    assert out["skipped"] and trainer.grad_scaler.get_scale() == 512.0


def test_precision_choices():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu).dtype is None
    assert resolve_precision(False, cpu).dtype is None
    assert resolve_precision("bf16", cpu).dtype == torch.bfloat16
    with pytest.raises(InputError, match="fp16"):
        resolve_precision("fp16", cpu)
    with pytest.raises(InputError, match="unknown amp"):
        resolve_precision("fp8", cpu)


# ------------------------------------------------------------------------------------------ bundle / MONAI
def test_trainer_from_a_bundle_config_with_a_monai_handler(tmp_path):
    from monai.bundle import ConfigParser

    unet = tiny_unet_meta()["network"]
    config = {
        "run_dir": str(tmp_path / "bundle_run"),
        "network": {"_target_": unet["class"], **unet["args"]},
        "trainer": {
            "_target_": "meddiff3d.engine.DiffusionTrainer",
            "network": "@network",
            "objective": {"_target_": "meddiff3d.engine.selftest.EpsilonMSE"},
            "train_data": {"_target_": "meddiff3d.engine.selftest.blob_volumes", "n": 4, "size": 8},
            "run_dir": "@run_dir",
            "max_iterations": 2,
            "batch_size": 2,
            "device": "cpu",
            "progress": False,
            "meta": {"network": unet},
            "handlers": [
                {
                    "_target_": "StatsHandler",
                    "tag_name": "train_loss",
                    "output_transform": "$lambda out: out['loss']",
                }
            ],
        },
    }
    trainer = ConfigParser(config).get_parsed_content("trainer")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # StatsHandler warns when it is handed a non-scalar
        result = trainer.run()
    assert result.iteration == 2 and result.checkpoint.is_file()


def test_dataloader_input_keeps_its_batch_size(tmp_path):
    from torch.utils.data import DataLoader

    seen = []

    def objective(network, batch):
        seen.append(batch["image"].shape[0])
        return reconstruction_loss(network, batch)

    loader = DataLoader(blob_volumes(6, 8), batch_size=3, shuffle=True)
    options = dict(run_dir=tmp_path, max_iterations=3, device="cpu", progress=False)
    DiffusionTrainer(TinyConv(), objective, loader, **options).run()
    assert seen == [3, 3, 3]


def test_with_the_library_diffusion_objective(tmp_path):
    """The real ``DiffusionObjective`` through the engine."""
    from meddiff3d.diffusion.objectives import DiffusionObjective
    from meddiff3d.diffusion.schedules import NoiseSchedule

    objective = DiffusionObjective(NoiseSchedule(num_train_timesteps=100), prediction="epsilon")
    meta = tiny_unet_meta()
    trainer = make_trainer(tmp_path, build_network(meta), objective=objective, meta=meta, max_iterations=3)
    result = trainer.run()
    assert result.iteration == 3 and torch.isfinite(torch.tensor(result.last_loss))


def test_build_network_refuses_classes_outside_trusted_packages():
    with pytest.raises(InputError, match="outside the trusted packages"):
        build_network({"network": {"class": "os.system", "args": {}}})


def test_store_for_autocast_halves_weights_and_keeps_the_autocast_result():
    from meddiff3d.engine.precision import store_for_autocast

    torch.manual_seed(0)
    net = build_network(tiny_unet_meta()).eval()
    for p in net.parameters():  # zero-initialised output layers would make every output 0
        p.data.normal_(0, 0.1)
    stored = store_for_autocast(copy.deepcopy(net), torch.bfloat16)
    x, t = torch.randn(1, 1, 8, 8, 8), torch.tensor([300])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected, got = net(x, timesteps=t), stored(x, timesteps=t)
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(got, expected, atol=0, rtol=0)  # autocast casts those weights to bf16 anyway
    dtypes = {type(m).__name__: m.weight.dtype for m in stored.modules() if getattr(m, "weight", None) is not None}
    assert dtypes["Conv3d"] == torch.bfloat16 and dtypes["Linear"] == torch.bfloat16
    assert dtypes["GroupNorm"] == torch.float32  # autocast runs norms in float32
    size = lambda m: sum(p.numel() * p.element_size() for p in m.parameters())  # noqa: E731
    assert size(stored) < 0.55 * size(net)
    assert store_for_autocast(net, None) is net and next(net.parameters()).dtype == torch.float32


def test_loading_into_a_meta_network_assigns_the_file_tensors(tmp_path):
    from meddiff3d.engine.checkpoint import load_weights

    source = build_network(tiny_unet_meta())
    data = {"ema": source.state_dict()}
    net = build_network(tiny_unet_meta(), device="meta")
    assert all(p.is_meta for p in net.parameters())
    load_weights(data, net, assign=True, source="test file")
    for name, p in net.named_parameters():
        assert not p.is_meta and p.dtype == torch.float32
        assert p.data_ptr() == data["ema"][name].data_ptr()  # the file's tensor itself: no second copy
    data["ema"].pop(next(iter(data["ema"])))
    with pytest.raises(InputError, match="test file .*missing keys"):
        load_weights(data, build_network(tiny_unet_meta(), device="meta"), assign=True, source="test file")


def test_wall_clock_budget_counts_fetching_the_batch(tmp_path, monkeypatch):
    """A slow batch fetch (0.1 s, e.g. augmentation) is training time: a 0.5 s budget stops after about 5 steps."""
    import time

    from meddiff3d.engine import WallClockBudget
    from meddiff3d.engine.data import BatchStream

    real_iter_from = BatchStream.iter_from

    def slow_iter_from(self, micro_batch):
        for batch in real_iter_from(self, micro_batch):
            time.sleep(0.1)
            yield batch

    monkeypatch.setattr(BatchStream, "iter_from", slow_iter_from)
    budget = WallClockBudget(minutes=0.5 / 60)
    trainer = make_trainer(tmp_path, max_iterations=100, handlers=[budget])
    trainer.run()
    assert budget.exhausted and 0.5 <= budget.seconds < 0.9 and trainer.state.iteration <= 7


def test_recipe_trainer_settings_merge_over_defaults_and_refuse_a_mistyped_name():
    from meddiff3d.engine.recipes import TRAINER_SETTINGS, trainer_settings

    assert {"batch_size", "lr", "max_iterations", "seed", "amp"} <= set(TRAINER_SETTINGS)
    assert "meta" not in TRAINER_SETTINGS and "run_dir" not in TRAINER_SETTINGS  # the recipe builds those
    assert trainer_settings({"lr": 1e-4, "seed": 0}, {"seed": 3}) == {"lr": 1e-4, "seed": 3}
    with pytest.raises(InputError, match="unknown setting 'max_iteration' \\(did you mean 'max_iterations'\\?\\)"):
        trainer_settings({"lr": 1e-4}, {"max_iteration": 5}, "latent diffusion training")
