"""Progressive distillation: the target in closed form, the halving of steps on the four-Gaussian toy (known answer),
the recipe end to end on a tiny latent model with a resume after an interrupted round, and the bundle config."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from bundle_testing import ROOT, Bundle
from test_bundle_conventions import _strings, config_names
from toy_mixture import ToyNet, data, energy_distance, exact_denoiser

from meddiff3d.diffusion import (DistillationObjective, FlowSchedule, GaussianDenoiser, NoiseSchedule,
                                 distillation_grid, distillation_spacing, make_denoiser, sample, sample_ddim)
from meddiff3d.diffusion.distillation import _grid_coefs
from meddiff3d.diffusion.samplers import ddim_step
from meddiff3d.engine import train
from meddiff3d.errors import InputError

pytestmark = pytest.mark.usefixtures("one_thread")

ANCHOR = NoiseSchedule("scaled_linear_beta", beta_start=0.0015, beta_end=0.0205)


class DenoiserNet(torch.nn.Module):
    """An exact denoiser called as an x0-predicting network (``net(x, timesteps=t)``): a round-0 teacher."""

    def __init__(self, denoiser) -> None:
        super().__init__()
        self.denoiser = denoiser

    def forward(self, x, timesteps, **_):
        return self.denoiser(x, timesteps)


# ------------------------------------------------------------------------------------------------ the target
@pytest.mark.parametrize("schedule, prediction", [(ANCHOR, "v"), (ANCHOR, "epsilon"), (FlowSchedule(), "flow")],
                         ids=["vp-v", "vp-epsilon", "flow"])
def test_one_student_step_with_the_target_is_two_teacher_steps(schedule, prediction):
    """With the exact Gaussian denoiser as teacher, one DDIM step from x_t with x0~ lands where the teacher's two DDIM
    steps (the sampler's own loop over t -> t' -> t'') land, at every point of the student's grid."""
    teacher = GaussianDenoiser(0.4, 0.7, schedule)
    objective = DistillationObjective(DenoiserNet(teacher), schedule, 4, teacher_prediction="x0",
                                      prediction=prediction)
    student_grid, teacher_grid = distillation_grid(schedule, 4)
    x_t = torch.randn(5, 2, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for i in range(4):
        t, mid = student_grid[i], teacher_grid[2 * i + 1]
        nxt = student_grid[i + 1] if i < 3 else torch.tensor(-1.0)  # prev_timesteps < 0: clean data
        two_steps = sample_ddim(teacher, x_t, [t, mid], schedule, prev_timesteps=[mid, nxt])
        index = torch.full((5,), i)
        target = objective.targets(x_t, index, {})
        clean = index == 3
        one_step = ddim_step(x_t, target, _grid_coefs(schedule, t.expand(5), torch.zeros_like(clean), 4),
                             _grid_coefs(schedule, student_grid[min(i + 1, 3)].expand(5), clean, 4))
        torch.testing.assert_close(one_step, two_steps, atol=1e-10, rtol=1e-10)
        if i == 3:  # the last step lands on clean data: the target is the teacher's two-step result itself
            torch.testing.assert_close(target, two_steps, atol=1e-12, rtol=0)


def test_grids_are_nested_and_sampled_as_recorded():
    student, teacher = distillation_grid(ANCHOR, 4)
    assert student.tolist() == [999, 749, 499, 249] and teacher.tolist()[::2] == student.tolist()
    assert distillation_spacing(ANCHOR) == "trailing" and distillation_spacing(FlowSchedule()) == "linspace"
    for n in (1, 2, 3, 8, 32, 64, 250):  # every halving of these grids is nested
        distillation_grid(ANCHOR, n)
        distillation_grid(FlowSchedule(shift=3.0), n)
    linspace = ANCHOR.timesteps(8, "linspace")  # why not the default DDIM spacing: its halvings are not nested
    assert not torch.equal(linspace[::2].float(), ANCHOR.timesteps(4, "linspace").float())
    objective = DistillationObjective(DenoiserNet(exact_denoiser(ANCHOR)), ANCHOR, 4, teacher_prediction="x0")
    assert objective.sampling == {"sampler": "ddim", "steps": 4, "spacing": "trailing"}


def test_guidance_is_folded_in_and_dropped_samples_get_the_unconditional_teacher():
    """A teacher affine in its concatenated condition c: guided with w it is the unguided teacher at u + w (c - u)
    (u the null condition); a sample whose condition was dropped gets the unguided, unconditional teacher."""
    exact = GaussianDenoiser(0.0, 1.0, ANCHOR)

    def net(x, timesteps, **_):  # x = cat([x_t (2 ch), c (1 ch)])
        return exact(x[:, :2], timesteps) + 0.1 * x[:, 2:3]

    null = {"concat": torch.tensor([[-1.0]])}
    x_t = torch.randn(6, 2, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    index = torch.tensor([0, 1, 2, 3, 0, 3])
    c = torch.linspace(0, 1, 6, dtype=torch.float64)[:, None]

    def targets(scale, cond, dropout=0.0):
        objective = DistillationObjective(net, ANCHOR, 4, teacher_prediction="x0", guidance_scale=scale,
                                          cond_dropout=dropout, null_cond=null)
        cond = objective.base.conditioning({"image": x_t, "concat": cond}, x_t)
        return objective.targets(x_t, index, cond)

    torch.testing.assert_close(targets(3.0, c), targets(1.0, -1.0 + 3.0 * (c + 1.0)), atol=1e-9, rtol=0)
    assert not torch.allclose(targets(3.0, c), targets(1.0, c))
    dropped = targets(3.0, c, dropout=1.0)
    torch.testing.assert_close(dropped, targets(1.0, torch.full_like(c, -1.0)), atol=1e-9, rtol=0)


@pytest.mark.parametrize("kwargs, message", [
    ({"steps": 0}, "steps must be an integer >= 1, got 0"),
    ({"steps": 2.0}, "steps must be an integer >= 1, got 2.0"),
    ({"steps": 600}, "steps must be in \\[1, 1000\\]"),  # the teacher would need 1200 steps of a 1000-step schedule
    ({"teacher_prediction": "sample"}, "unknown teacher prediction type 'sample'"),
    ({"prediction": "velocity"}, "unknown prediction type 'velocity'"),
    ({"guidance_scale": -1.0}, "guidance_scale must be a finite number >= 0"),
    ({"guidance_scale": math.nan}, "guidance_scale must be a finite number >= 0"),
    ({"cond_dropout": 1.5}, "cond_dropout must be in \\[0, 1\\]"),
])
def test_objective_refuses_bad_inputs(kwargs, message):
    args = {"steps": 4, **kwargs}
    with pytest.raises(InputError, match=message) as err:
        DistillationObjective(DenoiserNet(exact_denoiser(ANCHOR)), ANCHOR, args.pop("steps"), **args)
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------------------------ the known answer
def _distil_round(teacher, teacher_prediction, student, steps, iterations, run_dir, seed):
    objective = DistillationObjective(teacher, ANCHOR, steps, teacher_prediction=teacher_prediction, prediction="v")
    result = train(student, objective, [{"image": x} for x in data(8192, seed=seed)], run_dir=run_dir,
                   batch_size=256, max_iterations=iterations, lr=2e-3, ema_decay=0.99, device="cpu", seed=seed,
                   lr_schedule=lambda step: 1.0 - step / iterations, checkpoint_every=10**6, log_every=10**6,
                   progress=False)
    return copy.deepcopy(result.ema.module).eval()


def test_distillation_halves_the_steps_on_the_mixture_without_losing_accuracy(tmp_path):
    """The exact denoiser sampled with 16 trailing DDIM steps is the round-0 teacher; two rounds (each a short
    engine run) give 8- and 4-step ToyNet students. The 4-step student's samples are as close to exact draws as the
    16-step exact sampler's (energy distance within 2x of it), far closer than the exact 4-step sampler's.

    Measured (2000 samples, seeds as here): exact DDIM 16 / 8 / 4 steps 0.0098 / 0.0158 / 0.0795 on the trailing
    grid (0.0087 / 0.0173 / 0.190 on linspace); students 8 steps ~0.011, 4 steps 0.012-0.013 over init seeds."""
    reference, noise = data(2000, seed=1), torch.randn((2000, 2, 1), generator=torch.Generator().manual_seed(7))

    def distance(denoiser, steps):
        x = sample(denoiser, noise, ANCHOR, sampler="ddim", steps=steps, spacing=distillation_spacing(ANCHOR))
        return energy_distance(x, reference)

    exact = exact_denoiser(ANCHOR)
    exact16, exact4 = distance(exact, 16), distance(exact, 4)
    torch.manual_seed(0)
    student8 = _distil_round(DenoiserNet(exact), "x0", ToyNet(), 8, 400, tmp_path / "round_8", seed=10)
    student4 = _distil_round(student8, "v", copy.deepcopy(student8).train().requires_grad_(True), 4, 400,
                             tmp_path / "round_4", seed=11)
    d8, d4 = distance(make_denoiser(student8, ANCHOR, "v"), 8), distance(make_denoiser(student4, ANCHOR, "v"), 4)
    print(f"energy distance: exact DDIM-16 {exact16:.4f}, exact DDIM-4 {exact4:.4f}, student-8 {d8:.4f}, "
          f"student-4 {d4:.4f}")
    assert exact4 > 5 * exact16  # the toy needs the steps: 4 plain DDIM steps are far off
    assert d8 < 2 * exact16 and d4 < 2 * exact16 and d4 < exact4 / 4


# ------------------------------------------------------------------------------------------------ the recipe
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A synthetic cohort (6 volumes, 32x48x32 at 5 mm), its codec, and two untrained 'test'-U-Net teachers with the
    same weights: "plain", an epsilon model trained without conditioning dropout (as the converted model-zoo anchor),
    and "teacher", a v-prediction model trained with dropout 0.15 (the demo's kind)."""
    from meddiff3d.pipelines.benchmark import untrained_pair
    from meddiff3d.pipelines.data import synthetic_datalist

    root = tmp_path_factory.mktemp("distil")
    datalist = synthetic_datalist(root / "data", n=6, shape=(32, 48, 32), progress=False)
    codec, untrained = untrained_pair(root / "pair")
    content = torch.load(untrained, weights_only=True)
    for name, prediction, dropout in (("plain", "epsilon", 0.0), ("teacher", "v", 0.15)):
        content["meta"].update(prediction=prediction, training={"cond_dropout": dropout})
        torch.save(content, root / "pair" / f"{name}.pt")
    return {"datalist": datalist, "codec": codec, "plain": root / "pair" / "plain.pt",
            "teacher": root / "pair" / "teacher.pt"}


class Interrupt(Exception):
    """Raised by :class:`StopAt` to stand for a kill."""


class StopAt:
    """A trainer handler raising :class:`Interrupt` after iteration ``n`` of the run in a folder named ``folder``."""

    def __init__(self, folder: str, n: int) -> None:
        self.folder, self.n = folder, n

    def attach(self, engine) -> None:
        from ignite.engine import Events

        if engine.run_dir.name == self.folder:
            engine.add_event_handler(Events.ITERATION_COMPLETED(once=self.n), self.stop)

    def stop(self, engine) -> None:
        raise Interrupt(f"stopped after iteration {self.n} of {engine.run_dir.name}")


SETTINGS = dict(start_steps=8, final_steps=2, iterations_per_round=3, batch_size=2, lr=1e-3, checkpoint_every=1,
                device="cpu", amp="none", progress=False)


def test_recipe_distils_in_rounds_and_resumes_an_interrupted_round(tiny, tmp_path):
    from meddiff3d.models.loading import load_model
    from meddiff3d.pipelines.distillation import distil_latent_diffusion
    from meddiff3d.pipelines.generation import generate

    args = (tiny["codec"], tiny["teacher"], tiny["datalist"])
    whole = distil_latent_diffusion(*args, tmp_path / "whole", out=tmp_path / "whole.pt", **SETTINGS)
    assert [r["steps"] for r in whole["rounds"]] == [4, 2] and whole["iteration"] == 3
    assert whole["sampling"] == {"sampler": "ddim", "steps": 2, "spacing": "trailing"}
    # killed in the second round after its second step (its checkpoint written), then run again
    with pytest.raises(Interrupt):
        distil_latent_diffusion(*args, tmp_path / "run", out=tmp_path / "student.pt", handlers=[StopAt("round_2", 2)],
                                **SETTINGS)
    assert not (tmp_path / "student.pt").exists()
    again = distil_latent_diffusion(*args, tmp_path / "run", out=tmp_path / "student.pt", **SETTINGS)
    assert again["rounds"][0] == {"steps": 4, "skipped": True} and again["rounds"][1]["resumed_from"] == 2
    assert again["latent_cache_reused"] and again["iteration"] == 3
    a, b = (torch.load(p, weights_only=True) for p in (tmp_path / "whole.pt", tmp_path / "student.pt"))
    assert a["ema"].keys() == b["ema"].keys() and all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])
    teacher = torch.load(tiny["teacher"], weights_only=True)
    assert any(not torch.equal(a["ema"][k], teacher["ema"][k]) for k in a["ema"])  # the students were trained
    meta = b["meta"]
    assert meta["kind"] == "meddiff3d.latent_diffusion/1" and meta["prediction"] == "v"
    assert meta["sampling"] == {"sampler": "ddim", "steps": 2, "spacing": "trailing"}
    dist = meta["distillation"]
    assert dist["teacher"]["sha256"] == load_model(tiny["teacher"], "latent_diffusion").sha256
    assert (dist["start_steps"], dist["final_steps"], dist["iterations_per_round"], dist["rounds"]) == (8, 2, 3, [4, 2])
    assert dist["guidance_scale"] == 1.0 and dist["cond_dropout"] == 0.15 and dist["steps"] == 2
    for key in ("network", "schedule", "conditioning", "latent", "image", "codec"):
        assert meta[key] == teacher["meta"][key], key
    round_4 = torch.load(tmp_path / "run" / "round_4" / "inference.pt", weights_only=True)["meta"]
    assert round_4["sampling"]["steps"] == 4
    json.dumps(meta)
    # a model file generation reads, sampled on its grid
    (nifti,) = generate(tiny["codec"], tmp_path / "student.pt", covariates=None, steps=2, spacing="trailing",
                        output_dir=tmp_path / "gen", amp="none", progress=False)
    assert nifti.is_file()
    # the same run_dir with other settings is refused before any compute
    with pytest.raises(InputError, match="holds a distillation with other settings .*iterations_per_round"):
        distil_latent_diffusion(*args, tmp_path / "run", out=tmp_path / "student.pt",
                                **{**SETTINGS, "iterations_per_round": 5})


@pytest.mark.parametrize("change, message", [
    ({"final_steps": 16}, "final_steps \\(16\\) must be smaller than start_steps \\(8\\)"),
    ({"start_steps": 12, "final_steps": 4}, "start_steps / final_steps must be a power of 2 .* got 12 / 4"),
    ({"start_steps": 1}, "start_steps must be an integer >= 2, got 1"),
    ({"iterations_per_round": 0}, "iterations_per_round must be an integer >= 1, got 0"),
    ({"max_iterations": 10}, "give iterations_per_round .* not max_iterations"),
    ({"batch_sise": 2}, "unknown setting 'batch_sise' \\(did you mean 'batch_size'\\?\\)"),
    ({"guidance_scale": -2.0}, "guidance_scale must be a finite number >= 0"),
    ({"prediction": "velocity"}, "unknown prediction type 'velocity'"),
    ({"teacher": "codec"}, "diffusion model file .*codec.pt is a codec file, not a latent diffusion model"),
    ({"teacher": "plain", "guidance_scale": 2.0}, "trained without conditioning dropout, so classifier-free guidance"),
    ({"teacher": "plain", "cond_dropout": 0.1}, "cond_dropout=0.1: the teacher .* without conditioning dropout"),
    ({"start_steps": 1024, "final_steps": 512}, "teacher .*: steps must be in \\[1, 1000\\] .* got 1024"),
])
def test_recipe_refuses_bad_inputs_before_any_compute(tiny, tmp_path, change, message):
    from meddiff3d.pipelines.distillation import distil_latent_diffusion

    change = dict(change)
    teacher = tiny[change.pop("teacher", "teacher")]
    with pytest.raises(InputError, match=message) as err:
        distil_latent_diffusion(tiny["codec"], teacher, tiny["datalist"], tmp_path / "run", out=tmp_path / "s.pt",
                                **{**SETTINGS, **change})
    assert "\n" not in str(err.value) and not (tmp_path / "run").exists()


def test_distilled_teacher_continues_from_its_own_steps(tiny, tmp_path):
    """A distilled file is a teacher only at its own steps (its grid); the bundle's train#inferer builds the same
    first-round objective as the recipe."""
    from meddiff3d.pipelines.distillation import distil_latent_diffusion
    from meddiff3d.pipelines.training_components import latent_distillation_objective

    settings = {**SETTINGS, "start_steps": 4, "final_steps": 2, "iterations_per_round": 1}
    distil_latent_diffusion(tiny["codec"], tiny["teacher"], tiny["datalist"], tmp_path / "a", out=tmp_path / "s2.pt",
                            **settings)
    with pytest.raises(InputError, match="is a distilled 2-step model: start_steps must be its steps \\(2\\), got 4"):
        distil_latent_diffusion(tiny["codec"], tmp_path / "s2.pt", tiny["datalist"], tmp_path / "b",
                                out=tmp_path / "s1.pt", **settings)
    summary = distil_latent_diffusion(tiny["codec"], tmp_path / "s2.pt", tiny["datalist"], tmp_path / "b",
                                      out=tmp_path / "s1.pt", **{**settings, "start_steps": 2, "final_steps": 1})
    assert summary["sampling"]["steps"] == 1
    meta = torch.load(tmp_path / "s1.pt", weights_only=True)["meta"]["distillation"]
    assert meta["previous"]["final_steps"] == 2 and meta["start_steps"] == 2
    content = torch.load(tmp_path / "s2.pt", weights_only=True)
    content["meta"]["distillation"]["guidance_scale"] = 2.0
    torch.save(content, tmp_path / "guided.pt")
    with pytest.raises(InputError, match="distilled with guidance 2 folded in: distil it further with guidance_scale 1"):
        latent_distillation_objective(teacher=tmp_path / "guided.pt", start_steps=2, guidance_scale=3.0)
    objective = latent_distillation_objective(teacher=tiny["teacher"], start_steps=8, cond_dropout=None)
    assert objective.steps == 4 and objective.prediction == "v" and objective.base.cond_dropout == 0.15
    assert objective.base.network_wrapper is None and objective.guidance_scale == 1.0
    # the guided objective through the real U-Net's plumbing (concat + cross-attention covariates, null condition)
    from meddiff3d.models.ldm import covariate_conditioning

    guided = latent_distillation_objective(teacher=tiny["teacher"], start_steps=8, guidance_scale=2.0)
    student = copy.deepcopy(guided.teacher).requires_grad_(True)
    batch = {"image": torch.randn(3, 3, 8, 12, 8), **covariate_conditioning(torch.rand(3, 4), "both")}
    loss = guided(student, batch)
    assert loss.shape == (3,) and bool(torch.isfinite(loss).all())
    loss.mean().backward()
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)
    assert all(p.grad is None for p in guided.teacher.parameters())
    with pytest.raises(InputError, match="start_steps must be even"):
        latent_distillation_objective(teacher=tiny["teacher"], start_steps=5)


# ------------------------------------------------------------------------------------------------ the bundle
DISTIL = ("python -m monai.bundle run --config_file \"['configs/common.yaml','configs/train_distillation.yaml']\"")
DEMO = ("python -m monai.bundle run --config_file \"['configs/common.yaml','configs/train_distillation.yaml',"
        "'configs/data/synthetic_healthy.yaml','configs/presets/demo.yaml','configs/presets/demo_distill.yaml']\"")


def test_train_distillation_is_a_monai_training_workflow(monkeypatch):
    """As tests/test_bundle_conventions.py checks the other training configs: MONAI's training properties, `run` the
    one recipe call with the trainer's budget (per round), the declared objective and network the first round's."""
    from monai.bundle import ConfigParser, ConfigWorkflow

    from meddiff3d.pipelines.commands import check_command_line
    from meddiff3d.pipelines.distillation import distillation_rounds

    path = ROOT / "bundles" / "brain_mri_ldm" / "configs"
    workflow = ConfigWorkflow(config_file=[str(path / f) for f in ("common.yaml", "train_distillation.yaml")],
                              workflow_type="train", meta_file=str(path / "metadata.json"), logging_file=False,
                              bundle_root=str(path.parent))
    workflow.initialize()
    assert workflow.check_properties() == []
    run = workflow.parser["run"]
    assert run["_target_"] == "meddiff3d.pipelines.commands.distil_latent_diffusion"
    assert run["iterations_per_round"].replace("::", "#") == "$@train#trainer.max_iterations"
    assert workflow.trainer.max_iterations == workflow.parser["distill_iterations_per_round"]
    objective = workflow.train_inferer
    assert isinstance(objective, DistillationObjective) and objective.steps == 32 and objective.prediction == "v"
    shipped = torch.load(path.parent / "models" / "model.pt", weights_only=True)["ema"]
    network = workflow.parser.get_parsed_content("network_def")
    assert {k: v.shape for k, v in network.state_dict().items()} == {k: v.shape for k, v in shipped.items()}
    own = ConfigParser.load_config_file(str(path / "train_distillation.yaml"))
    assert sum(str(v).startswith("$") for v in _strings(own)) <= 4  # model_distilled.pt, run_dir, budget, network
    # the demo preset: 64 -> 4 in 4 rounds of 250 steps, and a command line check_command_line accepts
    demo = Bundle("brain_mri_ldm").parse(*config_names(DEMO))
    assert distillation_rounds(demo["distill_start_steps"], demo["distill_final_steps"]) == [32, 16, 8, 4]
    assert demo["distill_iterations_per_round"] == 250 and demo["amp"] == "bf16"
    monkeypatch.chdir(path.parent)
    argv = [str(ROOT / ".venv/lib/monai/bundle/__main__.py"), "run", "--config_file", str(config_names(DEMO))]
    check_command_line([*argv, "--distill_iterations_per_round", "1"])
    with pytest.raises(InputError, match="did you mean 'distill_iterations_per_round'"):
        check_command_line([*argv, "--distill_iteration_per_round", "1"])


def test_bundle_run_distils_in_two_rounds_end_to_end(tiny, tmp_path):
    """`python -m monai.bundle run` of the training config with tiny settings: 4 -> 2 -> 1 steps, two iterations per
    round, on the tiny cohort and teacher; writes models/model_distilled.pt."""
    result = Bundle("brain_mri_ldm").run(
        DISTIL, tmp_path, "--codec_path", str(tiny["codec"]), "--teacher_path", str(tiny["teacher"]),
        "--datalist", str(tiny["datalist"]), "--distill_start_steps", "4", "--distill_final_steps", "1",
        "--distill_iterations_per_round", "2", "--distill_batch_size", "2", "--amp", "none", timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    meta = torch.load(tmp_path / "models" / "model_distilled.pt", weights_only=True)["meta"]
    assert meta["sampling"] == {"sampler": "ddim", "steps": 1, "spacing": "trailing"}
    assert meta["distillation"]["rounds"] == [2, 1] and meta["distillation"]["iterations_per_round"] == 2
    rounds = tmp_path / "outputs" / "runs" / "brain_mri_ldm" / "distillation"
    assert sorted(p.name for p in rounds.glob("round_*")) == ["round_1", "round_2"]


@pytest.mark.slow
def test_demo_preset_starts_on_the_shipped_teacher(tmp_path):
    """The demo recipe as printed in its preset, on a tiny cohort (6 subjects at 5 mm, resampled to the shipped
    codec's 1 mm grid and encoded), with the shipped weights: it runs until its first training iteration (then it is
    stopped as Ctrl-C stops it); the full run is the lead's to schedule (~45-60 min)."""
    from bundle_testing import run_until_first_step

    preset = (ROOT / "configs" / "presets" / "brain_ldm_demo_distill.yaml").read_text()
    assert DEMO.replace("python", "#   python", 1) in preset  # the command below is the one the preset prints
    root = Bundle("brain_mri_ldm").copy_to(tmp_path / "brain_mri_ldm", models=True)
    stopped = run_until_first_step(f"{DEMO} --image_shape '[32,48,32]' --spacing '[5.0,5.0,5.0]' --synthetic_n 6",
                                   root, timeout=900)
    assert stopped.stopped, stopped.output[-3000:]
    assert "distillation round 64 -> 32 steps (250 iterations)" in stopped.output


def test_the_shipped_student_is_the_demo_preset_distilled_from_the_shipped_teacher():
    """models/model_distilled.pt: distilled from the shipped models/model.pt (its sha256) with the demo preset's
    settings, its grid what inference will use, its network the teacher's."""
    from meddiff3d.engine.checkpoint import file_sha256
    from meddiff3d.pipelines.distillation import distillation_rounds

    models = ROOT / "bundles" / "brain_mri_ldm" / "models"
    student = torch.load(models / "model_distilled.pt", weights_only=True)
    teacher = torch.load(models / "model.pt", weights_only=True)
    meta, plan = student["meta"], student["meta"]["distillation"]
    demo = Bundle("brain_mri_ldm").parse(*config_names(DEMO))
    assert plan["teacher"] == {"file": "model.pt", "sha256": file_sha256(models / "model.pt")}
    assert plan["rounds"] == distillation_rounds(demo["distill_start_steps"], demo["distill_final_steps"])
    assert (plan["iterations_per_round"], plan["guidance_scale"], plan["batch_size"], plan["lr"]) == (
        demo["distill_iterations_per_round"], demo["distill_guidance_scale"], demo["distill_batch_size"],
        demo["distill_lr"])
    assert meta["sampling"] == {"sampler": "ddim", "steps": demo["distill_final_steps"], "spacing": "trailing"}
    for key in ("network", "schedule", "prediction", "conditioning", "codec", "image"):
        assert meta[key] == teacher["meta"][key], key
    assert student["ema"].keys() == teacher["ema"].keys()
    assert any(not torch.equal(student["ema"][k], teacher["ema"][k]) for k in teacher["ema"])  # trained
