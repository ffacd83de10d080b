"""The main job on a built-in example: rewrite a timm ResNet-18 with bn_to_gn, report, check.

Run it with `make demo`. It builds the model with random weights (no download),
gives its BatchNorms realistic state, swaps them for GroupNorm, prints the
report, checks forward and backward, and takes a training step at batch size 2.
"""
import sys

import timm
import torch
import normswap
from normswap.testing import randomize_bn


def main() -> int:
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False)
    randomize_bn(model, (4, 3, 96, 96))

    gn_model, report = normswap.apply(model, "bn_to_gn", return_report=True)
    print(report)  # the CLI's text: 80 columns, one entry per layer

    result = normswap.check(model, gn_model, mode="interface", input_size=(2, 3, 96, 96))
    print(f"interface check: {result.summary}")
    print(f"state dict: {result.state_dict['kept']} keys kept, {len(result.state_dict['dropped'])} dropped "
          "(BN running statistics),")
    print(f"  parameters {result.state_dict['params_before']:,} -> {result.state_dict['params_after']:,}")

    # One SGD step at batch size 2, where BatchNorm's batch statistics would be noisy.
    opt = torch.optim.SGD(gn_model.parameters(), lr=0.01)
    gn_model.train()
    x, target = torch.randn(2, 3, 96, 96), torch.tensor([1, 7])
    loss = torch.nn.functional.cross_entropy(gn_model(x), target)
    loss.backward()
    opt.step()
    print(f"training step at batch size 2: loss {loss.item():.3f}, type kept: {type(gn_model).__name__},")
    print(f"  forward_features: {tuple(gn_model.forward_features(x).shape)}")
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
