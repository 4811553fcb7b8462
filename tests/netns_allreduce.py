"""Run inside an emulated node: one timed all-reduce of a 4 MB fp32 tensor over gloo; prints the seconds."""

import sys
import time

import torch
import torch.distributed as dist

torch.set_num_threads(1)
rank, world, master = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
dist.init_process_group("gloo", init_method=f"tcp://{master}:29566", rank=rank, world_size=world)
x = torch.ones(1_000_000)
dist.all_reduce(torch.ones(10))  # connections up before timing
start = time.perf_counter()
dist.all_reduce(x)
print(f"{time.perf_counter() - start:.4f} {float(x[0])}")
dist.destroy_process_group()
