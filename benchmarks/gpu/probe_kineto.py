"""Probe what torch.profiler (Kineto / CUPTI) exposes on a CUDA machine; dumps raw event records as JSON.

Run on a GPU box: python benchmarks/gpu/probe_kineto.py OUT_DIR. Used once to learn the record format the
recorder parses and to capture fixture data for its CPU-side tests.
"""

import json
import os
import sys

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile, record_function

out = sys.argv[1]
os.makedirs(out, exist_ok=True)
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())
ATTRS = [
    "name",
    "overload_name",
    "device_type",
    "device_index",
    "device_resource_id",
    "start_ns",
    "end_ns",
    "duration_ns",
    "start_thread_id",
    "end_thread_id",
    "fwd_thread_id",
    "correlation_id",
    "linked_correlation_id",
    "external_id",
    "is_async",
    "activity_type",
    "is_user_annotation",
    "is_python_function",
    "metadata_json",
    "shapes",
    "dtypes",
    "concrete_inputs",
    "kwinputs",
    "sequence_nr",
    "flow_id",
    "flow_type",
    "flow_start",
    "nbytes",
    "scope",
]


def dump(events, limit=None):
    rows = []
    for e in events[:limit]:
        row = {}
        for a in ATTRS:
            try:
                v = getattr(e, a)()
                if not isinstance(v, (int, float, str, bool, list, dict, type(None))):
                    v = str(v)
                row[a] = v
            except Exception as ex:  # noqa: BLE001
                row[a] = f"<error {type(ex).__name__}: {ex}>"
        rows.append(row)
    return rows


a = torch.randn(512, 1024, device="cuda", dtype=torch.bfloat16)
w = torch.randn(1024, 1024, device="cuda", dtype=torch.bfloat16)


def step(x):
    y = torch.nn.functional.linear(x, w)
    y = torch.nn.functional.silu(y) * y
    return y.sum(dim=-1)


step(a)
g = torch.cuda.CUDAGraph()
static = a.clone()
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as p:
    with record_function("revati::iteration#0"):
        step(a)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step(static)
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(g):
        out_g = step(static)
    for _ in range(2):
        g.replay()
    q = torch.randn(2, 8, 256, 64, device="cuda", dtype=torch.bfloat16)
    torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    try:
        dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda:0"))
        t = torch.ones(1 << 20, device="cuda")
        dist.all_reduce(t)
        torch.cuda.synchronize()
    except Exception as ex:  # noqa: BLE001
        print("nccl failed", ex)
    torch.cuda.synchronize()
events = p.profiler.kineto_results.events()
print("events", len(events))
with open(os.path.join(out, "kineto_events.json"), "w") as f:
    json.dump(dump(events), f)
p.export_chrome_trace(os.path.join(out, "chrome.json"))
try:
    from cuda.bindings import driver, runtime

    print("cuda-bindings ok", driver.cuDriverGetVersion(), runtime.cudaRuntimeGetVersion())
    print(driver.cuInit(0))
    err, dev = driver.cuDeviceGet(0)
    for attr in (
        "CU_DEVICE_ATTRIBUTE_CLOCK_RATE",
        "CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE",
        "CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT",
        "CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE",
    ):
        print(attr, driver.cuDeviceGetAttribute(getattr(driver.CUdevice_attribute, attr), dev))
except Exception as ex:  # noqa: BLE001
    print("cuda-bindings failed", type(ex).__name__, ex)
try:
    import pynvml

    pynvml.nvmlInit()
    h = pynvml.nvmlDeviceGetHandleByIndex(0)
    print(
        "nvml",
        pynvml.nvmlSystemGetDriverVersion(),
        pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_SM),
        pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM),
    )
except Exception as ex:  # noqa: BLE001
    print("nvml failed", ex)
print(torch.cuda.get_device_properties(0))
if dist.is_initialized():
    dist.destroy_process_group()
