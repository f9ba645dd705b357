"""`maisi evaluate`: FID plane sampling and batching, VAE figures by hand, fidelity, diversity, FRD,
the report and `evaluate compare`, on crops of the real example CT (small, so the whole file runs in
seconds). The ResNet-50 side-by-side FID against NVIDIA's script is `benchmarks/fid_reference.py`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from maisicore.evaluation import fid as fidlib
from maisicore.evaluation import measures
from maisicore.io.geometry import Volume
from maisicore.io.volumes import read_volume, write_volume
from maisicore.models.weights import demo_weights_dir

CROP = (slice(40, 88), slice(30, 78), slice(4, 20))  # 48×48×16 voxels of the 3 mm example CT


def _tiny_network() -> torch.nn.Module:
    """A deterministic stand-in for the RadImageNet network: (N, 3, H, W) → (N, 6, H/4, W/4)."""
    torch.manual_seed(3)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, stride=2, padding=1), torch.nn.ReLU(),
                               torch.nn.Conv2d(6, 6, 3, stride=2, padding=1)).eval()


@pytest.fixture(scope="module")
def cases(real_data, converted_labels, tmp_path_factory) -> dict[str, Path]:
    """real/: two crops of the example CT with labels; synthetic/: three noisy copies of one crop
    (one request, three "seeds": same grid and labels) with their labels."""
    ct = read_volume(real_data / "example_ct_sm.nii.gz")
    labels = read_volume(converted_labels[0])
    root = tmp_path_factory.mktemp("evaluate")
    (root / "real").mkdir()
    (root / "synthetic").mkdir()
    for index, shift in enumerate((0, 6)):
        crop = (slice(CROP[0].start + shift, CROP[0].stop + shift), CROP[1], CROP[2])
        affine = ct.affine.copy()
        affine[:3, 3] += ct.affine[:3, :3] @ np.array([c.start for c in crop])
        write_volume(root / "real" / f"r{index}.nii.gz", Volume(ct.array[crop].astype(np.int16), affine))
        write_volume(root / "real" / f"r{index}_labels.nii.gz", Volume(labels.array[crop].astype(np.int16), affine))
    affine = ct.affine.copy()
    affine[:3, 3] += ct.affine[:3, :3] @ np.array([c.start for c in CROP])
    rng = np.random.default_rng(0)
    for seed in range(3):
        noisy = np.clip(ct.array[CROP] + rng.normal(0, 40, ct.array[CROP].shape), -1024, 3000).astype(np.int16)
        write_volume(root / "synthetic" / f"ct_seed{seed}.nii.gz", Volume(noisy, affine))
        write_volume(root / "synthetic" / f"ct_seed{seed}_labels.nii.gz", Volume(labels.array[CROP].astype(np.int16), affine))
    return {"root": root, "real": root / "real", "synthetic": root / "synthetic"}


def test_plane_sampling_follows_the_reference_rule():
    assert fidlib.central_range(512, 0.4) == (153, 358)  # int(0.3 · 512), int(0.7 · 512)
    assert fidlib.slices_per_image((512, 512, 512), 0.4) == 3 * 205
    image = torch.arange(4 * 5 * 10, dtype=torch.float32).reshape(1, 1, 4, 5, 10)
    xy = fidlib.plane_stack(image, "xy", 0.4)  # z from 3 to 7
    assert xy.shape == (4, 1, 4, 5) and torch.equal(xy[1, 0], image[0, 0, :, :, 4])
    yz = fidlib.plane_stack(image, "yz", 0.5)  # x from 1 to 3
    assert yz.shape == (2, 1, 5, 10) and torch.equal(yz[0, 0], image[0, 0, 1])
    zx = fidlib.plane_stack(image, "zx", 1.0)
    assert zx.shape == (5, 1, 4, 10) and torch.equal(zx[2, 0], image[0, 0, :, 2, :])


def test_fid_batches_equal_one_batch_and_match_a_hand_frechet_distance(cases):
    from scipy import linalg

    network = _tiny_network()
    real = fidlib.preprocess(read_volume(cases["real"] / "r0.nii.gz"), (3.0, 3.0, 3.0), (64, 64, 32))
    synthetic = fidlib.preprocess(read_volume(cases["synthetic"] / "ct_seed0.nii.gz"), (3.0, 3.0, 3.0), (64, 64, 32))
    assert real.shape == (1, 1, 64, 64, 32) and real.min() >= -1000 and real.max() <= 1000
    assert float(real[0, 0, :, :, -1].max()) == -1000.0  # 24 slices padded with air to 32
    one = fidlib.plane_features(real, network, 0.4, batch=1000)
    several = fidlib.plane_features(real, network, 0.4, batch=3)
    for plane in fidlib.PLANES:
        assert torch.allclose(one[plane], several[plane], rtol=1e-5, atol=1e-6)
    # by hand: the xy stack of the reference, min-max scaled over the stack, channel means off
    stack = real[0, 0, :, :, 9:22]  # int(0.3 · 32), int(0.7 · 32)
    stack = stack.permute(2, 0, 1)[:, None].repeat(1, 3, 1, 1)
    scaled = (stack - stack.min()) / (stack.max() - stack.min() + 1e-10) - torch.tensor([0.406, 0.456, 0.485]).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = network(scaled).mean([2, 3])
    assert torch.allclose(one["xy"], expected, rtol=1e-5, atol=1e-6)
    fake = fidlib.plane_features(synthetic, network, 0.4)
    values = fidlib.fid_per_plane(fake, one)
    a, b = fake["yz"].double().numpy(), one["yz"].double().numpy()
    covmean = linalg.sqrtm(np.cov(a, rowvar=False) @ np.cov(b, rowvar=False)).real
    hand = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(np.cov(a, rowvar=False) + np.cov(b, rowvar=False) - 2 * covmean)
    assert values["yz"] == pytest.approx(hand, rel=1e-4)
    assert values["average"] == pytest.approx((values["xy"] + values["yz"] + values["zx"]) / 3)


def test_radimagenet_network_shape_and_weight_file(tmp_path):
    network = fidlib.RadImageNetResNet50()
    names = network.state_dict()
    assert "layer1.0.conv1.bias" in names and "layer4.2.bn3.running_var" in names and "fc.weight" not in names
    assert sum(p.numel() for p in network.parameters()) == 23_508_032 + 26_560  # torchvision's without fc, + conv biases
    path = tmp_path / "resnet.pt"
    torch.save(names, path)
    loaded = fidlib.load_feature_network(path, torch.device("cpu"))
    with torch.no_grad():
        assert loaded(torch.zeros(1, 3, 64, 64)).shape == (1, 2048, 2, 2)


def test_vae_figures_by_hand(real_data, converted_labels):
    from maisicore.pipelines.vae import load_autoencoder

    middle = (slice(8, 40), slice(8, 40), slice(None))  # 32×32×16 voxels: liver, kidney, spine
    ct = read_volume(real_data / "example_ct_sm.nii.gz").array[CROP][middle].astype(np.float32)
    labels = read_volume(converted_labels[0]).array[CROP][middle].astype(np.int32)
    autoencoder = load_autoencoder(demo_weights_dir() / "models" / "autoencoder_v1.pt", torch.device("cpu"))
    recon = measures.reconstruct(autoencoder, ct, torch.device("cpu"))
    figures = measures.reconstruction_figures(ct, recon, labels)
    # by hand: MONAI's whole-volume encode/decode, numpy figures
    real01 = (np.clip(ct, -1000, 1000) + 1000) / 2000
    with torch.no_grad():
        mu, _ = autoencoder.encode(torch.from_numpy(real01.astype(np.float32))[None, None])
        plain = np.clip(autoencoder.decode(mu)[0, 0].numpy(), 0, 1)
    error = np.abs(plain * 2000 - 1000 - np.clip(ct, -1000, 1000))
    assert figures["mae_hu"] == pytest.approx(error.mean(), abs=0.01)
    bone = np.clip(ct, -1000, 1000) >= 200
    assert figures["mae_hu_by_tissue"]["bone"] == pytest.approx(error[bone].mean(), abs=0.01)
    liver = labels == 1
    assert figures["mae_hu_by_organ"]["liver"] == pytest.approx(error[liver].mean(), abs=0.01)
    assert figures["psnr_db"] == pytest.approx(10 * np.log10(1 / ((plain - real01) ** 2).mean()), abs=1e-3)
    assert 0 < figures["ssim"] < 1 and 20 < figures["mae_hu"] < 400  # a 32-voxel crop: edges weigh much


def test_fidelity_and_diversity_values():
    rng = np.random.default_rng(1)
    labels = np.zeros((40, 40, 40), np.int32)
    labels[5:20, 5:20, 5:20] = 1  # liver
    labels[25:35, 25:35, 25:35] = 3  # spleen
    ct = np.full(labels.shape, -800.0, np.float32)
    ct[labels == 1] = 60.0
    ct[labels == 3] = 500.0  # far above any real spleen
    result = measures.fidelity(ct, labels)
    rows = {r["organ"]: r for r in result["organs"]}
    assert set(rows) == {"liver", "spleen"} and rows["liver"]["passed"] and not rows["spleen"]["passed"]
    assert rows["liver"]["median_hu"] == 60.0 and result["pass_fraction"] == 0.5
    same = measures.diversity([ct, ct.copy()])
    assert same["pairs"] == 1 and same["ms_ssim_mean"] == pytest.approx(1.0, abs=1e-6)
    noisy = measures.diversity([ct, ct + rng.normal(0, 300, ct.shape).astype(np.float32), ct])
    assert noisy["pairs"] == 3 and noisy["ms_ssim_mean"] < 0.99
    assert measures.ms_ssim_settings((122, 101, 30)) == (7, pytest.approx((0.0448 / 0.6305, 0.2856 / 0.6305, 0.3001 / 0.6305)))


def test_evaluate_command_writes_the_report_and_compare_reads_it(maisi, cases, tmp_path):
    demo_ae = demo_weights_dir() / "models" / "autoencoder_v1.pt"
    out = tmp_path / "report"
    datalist = tmp_path / "real.json"  # one real CT, as a datalist
    datalist.write_text(json.dumps({"training": [{"image": str(cases["real"] / "r0.nii.gz"),
                                                  "label": str(cases["real"] / "r0_labels.nii.gz")}]}))
    result = maisi("evaluate", "--real", datalist, "--synthetic", cases["synthetic"], "--out", out,
                   "--metrics", "vae,fidelity,diversity", "--vae-weights", demo_ae, "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["hu_histograms.png", "metrics.json", "montage.png", "report.md"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert [c["case"] for c in metrics["vae"]["cases"]] == ["r0"]
    assert metrics["diversity"]["groups"][0]["cases"] == ["ct_seed0", "ct_seed1", "ct_seed2"]
    assert metrics["diversity"]["pairs"] == 3 and 0 < metrics["diversity"]["ms_ssim_mean"] < 1
    assert metrics["fidelity"]["synthetic"]["checked"] == 3 * metrics["fidelity"]["synthetic"]["cases"][0]["checked"]
    ct = read_volume(cases["synthetic"] / "ct_seed1.nii.gz").array
    labels = read_volume(cases["synthetic"] / "ct_seed1_labels.nii.gz").array
    liver = next(r for r in metrics["fidelity"]["synthetic"]["cases"][1]["organs"] if r["organ"] == "liver")
    assert liver["median_hu"] == float(np.median(ct[labels == 1]))
    assert metrics["summary"]["vae.mae_hu"] == pytest.approx(np.mean([c["mae_hu"] for c in metrics["vae"]["cases"]]))
    assert "## Diversity" in (out / "report.md").read_text()

    # B: a second report whose synthetic set is the real crops (fidelity of real CTs)
    out_b = tmp_path / "report_b"
    result = maisi("evaluate", "--synthetic", cases["real"], "--out", out_b, "--metrics", "fidelity")
    assert result.returncode == 0, result.stderr
    compared = maisi("evaluate", "compare", out, out_b)
    assert compared.returncode == 0, compared.stderr
    row = next(line for line in compared.stdout.splitlines() if line.startswith("| fidelity.synthetic_pass_fraction"))
    a = metrics["summary"]["fidelity.synthetic_pass_fraction"]
    b = json.loads((out_b / "metrics.json").read_text())["summary"]["fidelity.synthetic_pass_fraction"]
    assert f"{a:.4f}" in row and f"{b:.4f}" in row


def test_fid_through_the_python_api(cases, tmp_path):
    from maisicore.evaluation import evaluate

    result = evaluate(cases["real"], cases["synthetic"], tmp_path / "fid", ("fid-2.5d",),
                      feature_network=_tiny_network(), fid_shape=(64, 64, 32), fid_spacing=(3.0, 3.0, 3.0))
    fid = result["fid_2_5d"]
    assert fid["slices"]["real"] == {"xy": 2 * 13, "yz": 2 * 25, "zx": 2 * 25}
    assert fid["average"] == pytest.approx((fid["xy"] + fid["yz"] + fid["zx"]) / 3) and fid["average"] > 0
    assert (tmp_path / "fid" / "fid_planes.png").is_file()


@pytest.mark.parametrize("args, message", [
    (("--metrics", "vae,psnr"), "unknown psnr"),
    (("--metrics", "fid-2.5d"), "needs --feature-weights"),
    (("--metrics", "vae"), "needs --vae-weights"),
])
def test_bad_requests_write_nothing(maisi, cases, tmp_path, args, message):
    out = tmp_path / "never"
    result = maisi("evaluate", "--real", cases["real"], "--synthetic", cases["synthetic"], "--out", out, *args)
    assert result.returncode == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_report_folder_must_be_new_or_empty(maisi, cases, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    result = maisi("evaluate", "--synthetic", cases["synthetic"], "--out", tmp_path / "full", "--metrics", "fidelity")
    assert result.returncode == 2 and "new or empty folder" in result.stderr
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"]


def test_frd_equals_frd_score_called_directly(cases, tmp_path):
    pytest.importorskip("radiomics", reason="FRD needs pyradiomics (see docs/evaluation.md)")
    from frd_score import compute_frd
    from maisicore.evaluation.frd import frd

    files = []  # 24×24×8 corners of the crops: radiomics time grows with the voxels
    for source in ["real/r0", "real/r1", "synthetic/ct_seed0", "synthetic/ct_seed1"]:
        volume = read_volume(cases["root"] / f"{source}.nii.gz")
        files.append(str(tmp_path / f"{source.replace('/', '_')}.nii.gz"))
        write_volume(files[-1], Volume(volume.array[12:36, 12:36, 4:12], volume.affine))
    real, synthetic = files[:2], files[2:]
    assert frd(real, synthetic) == float(compute_frd([real, synthetic], image_types=["Original"]))


def test_plane_features_equal_the_reference_functions(tmp_path):
    """NVIDIA's own ``get_features_2p5d`` (from the shared copy or a mirror, see ``nvidia_reference``;
    ``fire``, its command-line wrapper, stubbed when missing) and our batched features on one image,
    tiny network."""
    import importlib.util
    import sys
    import types

    from nvidia_reference import reference_file

    script = tmp_path / "reference_fid.py"
    script.write_bytes(reference_file("scripts/compute_fid_2-5d_ct.py"))
    if importlib.util.find_spec("fire") is None:
        sys.modules.setdefault("fire", types.ModuleType("fire"))
    spec = importlib.util.spec_from_file_location("reference_fid", script)
    reference = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reference)
    image = torch.from_numpy(np.random.default_rng(2).uniform(-1000, 1000, (1, 1, 40, 36, 30)).astype(np.float32))
    network = _tiny_network()
    theirs = reference.get_features_2p5d(image.clone(), network, center_slices=True, center_slices_ratio=0.4, xy_only=False)
    ours = fidlib.plane_features(image, network, 0.4, batch=5)
    for plane, values in zip(fidlib.PLANES, theirs):
        assert torch.allclose(ours[plane], values, rtol=1e-5, atol=1e-7)
