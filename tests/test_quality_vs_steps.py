"""scripts/quality_vs_steps.py: the equal-quality verdict, the table, and the sweep end to end with its caches."""

import json
import sys

import pytest
import torch

from bundle_testing import script_module


@pytest.fixture(scope="module")
def qvs():
    return script_module("quality_vs_steps")


def fake(fd: float, r: float, ms_ssim: float = 0.9, data_ms_ssim: float = 0.85) -> dict:
    """An evaluation.json with the metrics the sweep reads."""
    return {"realism": {"fd_random_cnn": {"generated_vs_held_out": {"fd": fd}},
                        "fd_handcrafted": {"generated_vs_held_out": {"fd": fd / 2}}},
            "conditioning": {"conditional": {"ventricular_volume": {"r": r, "mae": 0.1},
                                             "brain_volume": {"r": r, "mae": 0.1}}},
            "diversity_ms_ssim": {"generated_all_pairs": {"mean": ms_ssim}, "training_pairs": {"mean": data_ms_ssim}},
            "memorisation": {"n_flagged": 1}}


def test_equal_quality_means_no_metric_worse_than_two_reference_sds(qvs):
    ms = (0.900, 0.901, 0.899)  # reference MS-SSIM 0.900 +- 0.001; the training pairs' 0.85
    runs = {"ddim:50": [fake(100, 0.5, m) for m in ms[:1]] + [fake(110, 0.6, ms[1]), fake(90, 0.4, ms[2])],
            # fd mean 100, SD 10; r 0.5, SD 0.1
            "dpmpp_2m:10": [fake(115, 0.45), fake(118, 0.5), fake(112, 0.55)],  # fd 115: within 100 + 20
            "unipc:8": [fake(70, 0.9, 0.88), fake(72, 0.9, 0.88), fake(71, 0.9, 0.88)],  # better everywhere
            "dpmpp_2m:4": [fake(150, 0.5), fake(160, 0.5), fake(140, 0.5)],  # fd 150: worse
            "ddim:4": [fake(100, 0.5, 0.95), fake(100, 0.5, 0.95), fake(100, 0.5, 0.95)]}  # less diverse than data
    table = qvs.summarise(runs, "ddim:50")
    assert table["ddim:50"]["fd_cnn"]["mean"] == pytest.approx(100) and table["ddim:50"]["fd_cnn"]["std"] == \
        pytest.approx(10)
    assert table["dpmpp_2m:10"]["equal_quality"] and table["ddim:50"]["equal_quality"]
    assert table["unipc:8"]["equal_quality"] and table["unipc:8"]["worse_than_reference_spread"] == []
    assert set(table["unipc:8"]["differs_beyond_reference_spread"]) == {"fd_cnn", "fd_hand", "r_ventricles",
                                                                         "r_brain", "ms_ssim"}
    assert not table["dpmpp_2m:4"]["equal_quality"]
    assert table["dpmpp_2m:4"]["worse_than_reference_spread"] == ["fd_cnn", "fd_hand"]
    assert table["ddim:4"]["worse_than_reference_spread"] == ["ms_ssim"]
    text = qvs.markdown(table, list(runs), "ddim:50", 3, 16)
    assert "| dpmpp_2m:4 | 4 |" in text and "no (worse: fd_cnn, fd_hand)" in text and "| ddim:50 | 50 |" in text
    assert "yes (better: fd_cnn, fd_hand, r_ventricles, r_brain, ms_ssim)" in text
    assert qvs.evaluations("heun", 5) == 9 and qvs.evaluations("dpmpp_2m", 8) == 8
    assert qvs.parse_config("dpmpp_2m:8:time_quadratic") == ("dpmpp_2m", 8, "time_quadratic")
    with pytest.raises(ValueError, match="is not SAMPLER:STEPS"):
        qvs.parse_config("dpmpp_2m")


@pytest.mark.slow
def test_sweep_end_to_end_resumes_and_measures_the_real_volumes_once(qvs, tmp_path, monkeypatch):
    """Two configurations x two seeds on an untrained tiny pair and a 10-subject procedural cohort (~1.5 min on 2
    busy cores); a second call reads every evaluation and the stored real-volume measurements back, computing none."""
    from meddiff3d.data.synthetic import write_cohort
    from meddiff3d.evaluation import generative
    from meddiff3d.pipelines.benchmark import untrained_pair

    torch.set_num_threads(1)
    codec, diffusion = untrained_pair(tmp_path / "models")
    datalist = write_cohort("healthy", tmp_path / "data", 10, shape=(32, 48, 32), source="procedural",
                            progress=False).datalist
    out = tmp_path / "q"
    other = tmp_path / "models" / "other.pt"  # a second model (perturbed weights), named on the command line
    saved = torch.load(diffusion, weights_only=True)
    torch.manual_seed(0)
    saved["ema"] = {k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v for k, v in saved["ema"].items()}
    torch.save(saved, other)
    argv = ["--codec", str(codec), "--diffusion", str(diffusion), "--datalist", str(datalist), "--out", str(out),
            "--configs", "ddim:3", "dpmpp_2m:2", "other/ddim:3", "--model", f"other={other}", "--reference", "ddim:3",
            "--seeds", "2", "--conditions", "1", "--n-per-condition", "2", "--device", "cpu", "--amp", "none"]
    measured = []
    original = generative.measure_reference
    monkeypatch.setattr(generative, "measure_reference", lambda *a, **k: measured.append(1) or original(*a, **k))
    assert qvs.main(argv) == 0
    assert len(measured) == 1  # once for all configurations, models and seeds
    report = json.loads((out / "quality_vs_steps.json").read_text(encoding="utf-8"))
    assert set(report["table"]) == {"ddim:3", "dpmpp_2m:2", "other/ddim:3"} and report["seeds"] == 2
    assert report["models"]["other"] == str(other)
    assert (out / "other" / "ddim-3" / "seed1" / "evaluation.json").is_file()
    assert report["table"]["other/ddim:3"]["paired_rmse_to_reference"]["rmse"] > 0  # not the --diffusion model's
    assert report["samples_per_run"] == 4 and report["fastest_equal_quality"] in report["table"]
    same, other = (report["table"][n]["paired_rmse_to_reference"] for n in ("ddim:3", "dpmpp_2m:2"))
    assert same["rmse"] == 0 and same["n"] == 8  # the reference against itself, every sample (2 seeds x 4)
    assert other["rmse"] > 0 and other["relative_to_between_seeds"] > 0 and other["n"] == 8
    seeds = [json.loads((out / "ddim-3" / f"seed{j}" / "evaluation.json").read_text())["settings"]["seed"]
             for j in range(2)]
    assert seeds == [0, qvs.SEED_STRIDE]  # disjoint seeds
    assert (out / "quality_vs_steps.md").read_text(encoding="utf-8").startswith("| configuration |")
    stamp = (out / "ddim-3" / "seed0" / "evaluation.json").stat().st_mtime_ns
    monkeypatch.setattr(generative, "evaluate", None)  # nothing may be evaluated again
    monkeypatch.setattr(sys.modules["meddiff3d.evaluation"], "evaluate", None)
    assert qvs.main(argv) == 0 and len(measured) == 1
    assert (out / "ddim-3" / "seed0" / "evaluation.json").stat().st_mtime_ns == stamp
    cache = qvs.load_reference(out / "reference")
    (reference,) = cache.values()
    assert len(reference.real["training"]) == 8 and reference.real["training"][0].cnn.ndim == 1
    assert [qvs.main(argv[:-2] + ["--seeds", "1"])] == [2]  # a spread needs two seeds: one error line, exit 2
    assert qvs.main([*argv, "--configs", "student/ddim:4"]) == 2  # a model not given with --model
    assert not (out / "student").exists()
