"""A tensor-parallel decoder stack in plain torch.distributed, for benchmarks/distributed.py.

Each of `layers` layers runs an attention-output and an MLP shard, each ending in an all-reduce (as
Megatron-style TP does), for `steps` decode steps of `batch` tokens; the shards shrink with the world.

    python benchmarks/tp_workload.py [layers] [steps] [batch]
"""

import sys

import torch
import torch.distributed as dist

layers, steps, batch = (int(a) for a in (sys.argv[1:] + ["16", "8", "8"][len(sys.argv) - 1 :]))
dist.init_process_group("nccl")
world = dist.get_world_size()
hidden, inter = 4096, 14336
wo = torch.empty(hidden // world, hidden, device="cuda", dtype=torch.bfloat16)
w1 = torch.empty(hidden, max(1, inter // world), device="cuda", dtype=torch.bfloat16)
w2 = torch.empty(max(1, inter // world), hidden, device="cuda", dtype=torch.bfloat16)
for _ in range(steps):
    x = torch.empty(batch, hidden, device="cuda", dtype=torch.bfloat16)
    for _ in range(layers):
        a = torch.nn.functional.rms_norm(x, (hidden,))
        a = a[:, : hidden // world] @ wo
        dist.all_reduce(a)
        x = x + a
        m = torch.nn.functional.silu(torch.nn.functional.rms_norm(x, (hidden,)) @ w1) @ w2
        dist.all_reduce(m)
        x = x + m
    torch.cuda.synchronize()
dist.destroy_process_group()
