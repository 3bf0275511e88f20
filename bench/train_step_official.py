"""One FS-CT training step timed on the official code itself, for a side-by-side timing with
fsct-dist (bench/train_step.rs runs this script when FSCT_OFFICIAL_REPO is set).

Unlike train_step_pytorch.py (a re-implementation), this builds the official classes from a
checkout of vinuni-vishc/Few-Shot-Cosine-Transformer: `methods.transformer.FewShotTransformer`
(variant cosine) on `backbone.Conv4` or `backbone.ResNet34(FETI=0)`, and times the body of the
official `MetaTemplate.train_loop`: zero_grad, set_forward_loss, backward, AdamW step, loss.item().

Three things are changed so the official code runs offline and does the same work as ours:
- `wandb` and `IPython` are stubbed (imported by the official modules, unused in a step);
- torchvision's resnet34 is built with random weights (the official code downloads ImageNet ones;
  the step's cost does not depend on the values);
- the official `ResNetModel` is a plain object, not an `nn.Module`, so `model.parameters()` leaves
  its 21 M backbone parameters out of AdamW (their gradients are still computed). fsct-dist steps
  them, so here they are added to the optimizer too: the same work on both sides.
At 112 px the official ResNet34 needs `dataset='CIFAR'` for its 512x4x4 feature size.

usage: python train_step_official.py OFFICIAL_REPO BACKBONE IMAGE_SIZE N_WAY K_SHOT N_QUERY STEPS THREADS
BACKBONE: Conv4 or TvResNet34. Prints one JSON object: per-step seconds, and per step the
seconds of the backbone forward, the rest of the forward (head, loss; zero_grad), the backward
and the AdamW step.
"""

import json
import sys
import time
import types


def main():
    repo, backbone_name, size, n_way, k_shot, n_query, steps, threads = sys.argv[1:9]
    size, n_way, k_shot, n_query, steps, threads = map(int, (size, n_way, k_shot, n_query, steps, threads))
    sys.path.insert(0, repo)
    for unused in ("wandb", "IPython"):  # imported by the official modules, never called in a step
        sys.modules.setdefault(unused, types.ModuleType(unused))

    import torch
    import torchvision

    torch.set_num_threads(threads)
    real_resnet34 = torchvision.models.resnet34
    torchvision.models.resnet34 = lambda pretrained=False, **kw: real_resnet34(weights=None, **kw)

    import backbone
    from methods.transformer import FewShotTransformer

    if backbone_name == "Conv4":
        dataset = "CIFAR" if size == 64 else "miniImagenet"
        feature_model = lambda: backbone.Conv4(dataset, flatten=True)  # noqa: E731
    elif backbone_name == "TvResNet34":
        dataset = "CIFAR" if size == 112 else "miniImagenet"
        feature_model = lambda: backbone.ResNet34(0, dataset, flatten=True)  # noqa: E731
    else:
        raise SystemExit(f"unknown backbone {backbone_name} (Conv4 or TvResNet34)")

    torch.manual_seed(0)
    model = FewShotTransformer(feature_model, n_way=n_way, k_shot=k_shot, n_query=n_query, variant="cosine")
    model.train()
    params = list(model.parameters())
    if not isinstance(model.feature, torch.nn.Module):  # the official ResNetModel: see above
        model.feature.model.train()
        params += list(model.feature.model.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-5)
    x = torch.randn(n_way, k_shot + n_query, 3, size, size)

    # The backbone's forward, timed where the official head calls it (CPU ops are synchronous).
    backbone_s = []
    feature_forward = model.feature.forward

    def timed_forward(*args, **kw):
        t = time.perf_counter()
        out = feature_forward(*args, **kw)
        backbone_s.append(time.perf_counter() - t)
        return out

    model.feature.forward = timed_forward

    times, phases = [], []
    for _ in range(steps + 1):  # one warm-up step
        backbone_s.clear()
        t0 = time.perf_counter()
        optimizer.zero_grad()
        _acc, loss = model.set_forward_loss(x=x)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        optimizer.step()
        loss.item()
        t3 = time.perf_counter()
        times.append(t3 - t0)
        b = sum(backbone_s)
        phases.append({"backbone_forward": b, "head_forward": t1 - t0 - b, "backward": t2 - t1,
                       "optimizer": t3 - t2})
    print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(), "code": "official",
                      "backbone": backbone_name, "step_s": times[1:], "phases": phases[1:]}))


if __name__ == "__main__":
    main()
