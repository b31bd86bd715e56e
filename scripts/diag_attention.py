"""Diagnostic (GPU): SSA / SDSA modules against the dense ones per forced dispatch path, TF32 on/off."""
import copy
import sys

import torch
from spikingjelly.activation_based import functional
from spikingjelly.activation_based.layer.attention import SpikeDrivenSelfAttention, SpikingSelfAttention
from torch import nn

import sparseflow_kernels.dispatch as kd
from sparseflow_ops import SparseSpikeDrivenSelfAttention, SparseSpikingSelfAttention

path = sys.argv[1]
torch.backends.cudnn.allow_tf32 = sys.argv[2] == '1'
orig = kd.choose
kd.choose = lambda key, cands, fallback, device=None: path if path in cands else fallback
import sparseflow_ops.conv as c
import sparseflow_ops.linear as l

c.kdispatch.choose = kd.choose; l.kdispatch.choose = kd.choose
torch.manual_seed(0)
for dense_mod, cls, x in ((SpikingSelfAttention(256, 8), SparseSpikingSelfAttention, (torch.rand(4, 8, 256, 196) < 0.2).float()),
                          (SpikeDrivenSelfAttention(384, 8), SparseSpikeDrivenSelfAttention, (torch.rand(4, 8, 384, 14, 14) < 0.3) * 3.0)):
    for m in dense_mod.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_var.uniform_(0.01, 0.05); m.bias.data.uniform_(-0.3, 0.6)
    functional.set_step_mode(dense_mod, "m")
    dense_mod = dense_mod.cuda().eval(); x = x.cuda()
    ref = copy.deepcopy(dense_mod)
    sp = cls.from_dense(dense_mod)
    with torch.no_grad():
        y, r = sp(x), ref(x)
    paths = {n: getattr(m, "last_path", None) for n, m in sp.named_modules() if getattr(m, "last_path", None)}
    print(cls.__name__, path, 'tf32', sys.argv[2], float((y - r).norm() / r.norm().clamp_min(1e-9)), paths)
