"""Why graph replay kernels stay unmapped: `python3 benchmarks/gpu/diagnose_replays.py PROFILE.json.gz`."""

import sys
from collections import Counter

from recorder import kineto

trace = kineto.load(sys.argv[1])
ev = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
marks = [e for e in ev if e.get("cat") == "user_annotation" and e["name"].startswith("revati::graph")]
print("markers", Counter(e["name"].split("#")[0] for e in marks), "tids", Counter(e["tid"] for e in marks))
launches = [e for e in ev if e.get("cat") in ("cuda_runtime", "cuda_driver") and "GraphLaunch" in e["name"]]
print("graph launches", len(launches), "tids", Counter(e["tid"] for e in launches))
print("launch args sample", [e["args"] for e in launches[:3]])
reps = sorted((e for e in marks if "replay" in e["name"]), key=lambda e: e["ts"])
for la in launches[:5] + launches[-3:]:
    near = min(reps, key=lambda r: abs(r["ts"] - la["ts"]), default=None)
    print(
        "launch",
        la["ts"],
        la["tid"],
        "nearest replay marker",
        near and (near["name"], near["ts"], near["dur"], near["tid"]),
    )
parsed = kineto.parse(trace)
print("replays", parsed.replays, "unmapped", parsed.unmapped_replay_kernels)
caps = [e for e in marks if "capture" in e["name"]]
print("captures", len(caps), [(c["name"], round(c["dur"])) for c in caps[:8]])
