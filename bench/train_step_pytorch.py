"""One FS-CT training step in PyTorch eager, written like the official code, for a side-by-side
timing with fsct-dist (bench/train_step.rs runs this script and compares).

Model: FSCT_cosine (one pre-LN block, shared LN+Linear for Q/K/V, cosine attention, GELU FFN,
CosineDistLinear head over the way axis) on Conv4 or the FETI-style ResNet34; AdamW lr 1e-3
wd 1e-5; random normalised input. Prints one JSON object: per-step seconds.

usage: python train_step_pytorch.py BACKBONE IMAGE_SIZE N_WAY K_SHOT N_QUERY STEPS THREADS [DEVICE [AMP]]
BACKBONE: Conv4, ResNet34 (FETI layout) or TvResNet34 (torchvision layout, the official FETI=0).
DEVICE: cpu (default) or cuda; AMP: off (default) or fp16 (autocast + GradScaler, as the seed's
fork trains) or bf16 (autocast). On CUDA each step ends with a synchronize before it is timed.
"""

import json
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


def conv_block(cin, cout):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2))


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.down is None else self.down(x)))


def feti_resnet(layers):
    mods = [nn.Conv2d(3, 64, 5, 2, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU()]
    cin = 64
    for cout, n, stride in zip((64, 128, 256, 512), layers, (1, 2, 2, 2)):
        for i in range(n):
            mods.append(BasicBlock(cin, cout, stride if i == 0 else 1))
            cin = cout
    mods += [nn.AdaptiveAvgPool2d(7), nn.Flatten()]
    return nn.Sequential(*mods)


def tv_resnet(layers):
    """torchvision's ResNet layout (7x7 stem + max-pool), feature map flattened as the official
    FETI=0 backbone gives it (512 x 7 x 7 at 224 px)."""
    mods = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1)]
    cin = 64
    for cout, n, stride in zip((64, 128, 256, 512), layers, (1, 2, 2, 2)):
        for i in range(n):
            mods.append(BasicBlock(cin, cout, stride if i == 0 else 1))
            cin = cout
    mods += [nn.Flatten()]
    return nn.Sequential(*mods)


class CosineDistLinear(nn.Module):
    def __init__(self, indim, outdim):
        super().__init__()
        self.L = torch.nn.utils.parametrizations.weight_norm(nn.Linear(indim, outdim, bias=False), dim=0)

    def forward(self, x):
        norm = torch.norm(x, p=2, dim=1).unsqueeze(1).expand_as(x)  # the official way-axis quirk
        return 2.0 * self.L(x / (norm + 1e-5))


class FSCT(nn.Module):
    def __init__(self, backbone, d, n_way, k_shot, heads=8, dim_head=64, mlp_dim=512):
        super().__init__()
        self.feature, self.d, self.n, self.k, self.h = backbone, d, n_way, k_shot, heads
        inner = heads * dim_head
        self.proto_weight = nn.Parameter(torch.ones(n_way, k_shot, 1))
        self.input_linear = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, inner, bias=False))
        self.output_linear = nn.Linear(inner, d)
        self.ffn = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, d))
        self.linear = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, dim_head), CosineDistLinear(dim_head, 1))

    def attention(self, q, kv):
        h = self.h
        fq = self.input_linear(q)  # (1, n, inner)
        fk = self.input_linear(kv)  # (nq, 1, inner)
        fq = fq.reshape(fq.shape[0], fq.shape[1], h, -1).permute(2, 0, 1, 3)  # (h, 1, n, dh)
        fk = fk.reshape(fk.shape[0], fk.shape[1], h, -1).permute(2, 0, 1, 3)  # (h, nq, 1, dh)
        dots = torch.matmul(fq, fk.transpose(-1, -2))  # (h, nq, n, 1)
        scale = torch.einsum("bhi,bhj->bhij", torch.norm(fq, dim=-1), torch.norm(fk, dim=-1))  # (h, nq, n, 1)
        out = torch.matmul(dots / scale, fk)  # (h, nq, n, dh)
        out = out.permute(1, 2, 0, 3).reshape(out.shape[1], out.shape[2], -1)
        return self.output_linear(out)

    def forward(self, x):
        n, kq = x.shape[:2]
        z = self.feature(x.reshape(-1, *x.shape[2:])).reshape(n, kq, -1)
        zs, zq = z[:, : self.k], z[:, self.k :]
        proto = (zs * F.softmax(self.proto_weight, dim=-2)).sum(1).unsqueeze(0)
        zq = zq.reshape(-1, 1, self.d)
        h = self.attention(proto, zq) + proto
        h = self.ffn(h) + h
        return self.linear(h).squeeze()


def main():
    backbone, size, n_way, k_shot, n_query, steps, threads = sys.argv[1:8]
    device = sys.argv[8] if len(sys.argv) > 8 else "cpu"
    amp = sys.argv[9] if len(sys.argv) > 9 else "off"
    size, n_way, k_shot, n_query, steps, threads = map(int, (size, n_way, k_shot, n_query, steps, threads))
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    if backbone == "Conv4":
        feat = nn.Sequential(*[conv_block(3 if i == 0 else 64, 64) for i in range(4)], nn.Flatten())
        d = 64 * (size // 16) ** 2
    elif backbone == "ResNet34":
        feat, d = feti_resnet((3, 4, 6, 3)), 512 * 7 * 7
    elif backbone == "TvResNet34":
        feat, d = tv_resnet((3, 4, 6, 3)), 512 * ((size + 31) // 32) ** 2
    else:
        raise SystemExit(f"unknown backbone {backbone}")
    model = FSCT(feat, d, n_way, k_shot).to(device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-5)
    x = torch.randn(n_way, k_shot + n_query, 3, size, size, device=device)
    y = torch.arange(n_way, device=device).repeat_interleave(n_query)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(amp)
    scaler = torch.amp.GradScaler(device, enabled=amp == "fp16")
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    times = []
    for _ in range(steps + 1):  # one warm-up step
        t0 = time.perf_counter()
        opt.zero_grad()
        with torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        loss.item()
        sync()
        times.append(time.perf_counter() - t0)
    print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(), "device": device,
                      "amp": amp, "step_s": times[1:]}))


if __name__ == "__main__":
    main()
