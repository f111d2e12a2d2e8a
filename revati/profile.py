"""Profiles: per-op duration models fitted by `revati fit`, stored as Parquet, used by the emulator.

A profile is data, never pickle: one Parquet table with a row per model and the device's facts in the
file's metadata. Each row is one of:
- a device model of an op key and dtype ('aten::mm', 'float32'), or of a family pooled over its keys
  ('family:matmul'), or of every op ('family:*'): seconds of device time from the op's features;
- a host model of an op key (target 'host'): seconds of host time from the op to the next one, less its
  device time on a synchronous device; target 'host_own' is the op's own call alone (for `wall` mode,
  which measures the code between ops itself). Per serving engine (`engine`) where that engine was
  recorded, and over all engines (''), since the serving code between two ops is the engine's.

Forms, each a formula over named features (`revati.op_features`):
- 'linear':  y = sum(c_i * x_i), the feature '1' being the intercept (fitted by WLS for relative error);
- 'power':   y = exp(c_0) * prod(max(x_i, 1) ** c_i) (OLS on logs), features after the intercept '1';
- 'scaled':  y = c_0 * (the family model of the op's dtype), for keys with too few signatures to fit;
- 'const':   y = c_0 (host models);
- 'table':   measured points of one key along one feature (`features[0]`: m for matmuls, flops for
  attention, bytes otherwise) among signatures that agree on the others (`features[1:]` = `where`, e.g.
  a matmul's n, k): y is interpolated linearly between the knots, and beyond them (or for a shape with
  one knot) it is the key's regression anchored at the nearest knot. Real kernels change algorithm with
  shape (a CPU GEMM with 160 rows runs faster than with 130); measured points keep that.
A prediction is never below the `floor` of its model (its shortest mean duration seen).

Lookup for an op: its (key, dtype), else (key, 'unknown') (list arguments whose dtype the recorder did
not see), else its family's model for the dtype, else 'family:*', else the roofline of the profile's GPU.
Anything but an exact (key, dtype) model, or a feature outside the range that model saw, is flagged
`extrapolated`; so is every prediction of a profile scaled to another GPU (`Profile.on`).
"""

from __future__ import annotations

import bisect
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from revati.cost import GRAPH_INSTANTIATE, Roofline, kernel_floor, peak_flops
from revati.hardware import GpuSpec, gpu
from revati.op_features import Features, op_family

PROFILE_VERSION = 2
_META_KEY = b"revati.profile"


class ProfileError(ValueError):
    """A profile file that is missing, unreadable, of another schema or of a newer version."""


PROFILE = pa.schema(
    [
        pa.field("target", pa.string(), nullable=False),  # 'device' | 'host'
        pa.field("key", pa.string(), nullable=False),
        pa.field("dtype", pa.string(), nullable=False),  # '' where it does not apply
        pa.field("form", pa.string(), nullable=False),
        pa.field("features", pa.list_(pa.string()), nullable=False),
        pa.field("coefficients", pa.list_(pa.float64()), nullable=False),
        pa.field("floor", pa.float64(), nullable=False),
        pa.field("samples", pa.int64(), nullable=False),  # op rows fitted on
        pa.field("signatures", pa.int64(), nullable=False),  # distinct (shapes, dtypes, scalars) among them
        pa.field("cv_error", pa.float64(), nullable=True),  # time-weighted, over signatures held out
        pa.field("holdout_median", pa.float64(), nullable=True),  # relative error per held-out op row
        pa.field("holdout_p90", pa.float64(), nullable=True),
        pa.field("time_share", pa.float64(), nullable=False),  # of all device (or host) time fitted on
        pa.field("range_min", pa.list_(pa.float64()), nullable=False),  # per feature, as seen in fitting
        pa.field("range_max", pa.list_(pa.float64()), nullable=False),
        pa.field("where", pa.list_(pa.float64()), nullable=False),  # 'table': values of features[1:]
        pa.field("knots_x", pa.list_(pa.float64()), nullable=False),  # 'table': features[0], ascending
        pa.field("knots_y", pa.list_(pa.float64()), nullable=False),  # 'table': mean seconds at each knot
        pa.field("engine", pa.string(), nullable=False),  # host models: the serving engine ('' = any)
    ]
)


@dataclass(frozen=True)
class OpModel:
    """One fitted formula (module doc): what it predicts, from which features, and how well it did."""

    target: str
    key: str
    dtype: str
    form: str
    features: tuple[str, ...]
    coefficients: tuple[float, ...]
    floor: float = 0.0
    samples: int = 0
    signatures: int = 0
    cv_error: float | None = None
    holdout_median: float | None = None
    holdout_p90: float | None = None
    time_share: float = 0.0
    range_min: tuple[float, ...] = ()
    range_max: tuple[float, ...] = ()
    where: tuple[float, ...] = ()
    knots_x: tuple[float, ...] = ()
    knots_y: tuple[float, ...] = ()
    engine: str = ""

    def predict(self, features: Features, family: OpModel | None = None) -> float:
        """Seconds for an op with these features; `family` is the model a 'scaled' form multiplies."""
        c = self.coefficients
        if self.form == "linear":
            y = sum(ci * _value(features, name) for ci, name in zip(c, self.features, strict=True))
        elif self.form == "power":
            log_y = c[0] + sum(
                ci * math.log(max(_value(features, name), 1.0))
                for ci, name in zip(c[1:], self.features[1:], strict=True)
            )
            y = math.exp(min(log_y, 50.0))
        elif self.form == "scaled":
            y = c[0] * family.predict(features) if family is not None else self.floor
        elif self.form == "const":
            y = c[0]
        else:
            raise ProfileError(f"model {self.key} ({self.dtype}): unknown form {self.form!r}")
        return max(y, self.floor)

    def interpolate(
        self,
        x: float,
        regression: Callable[[Features], float] | None,
        features: Features,
        growth: Callable[[Features], float] | None = None,
    ) -> float:
        """A 'table' model's value at x: linear between knots; beyond them, the edge knot's value carried
        by how the op grows from there: past the last knot by `growth` (the device's roofline) where given,
        else by the regression; below the first by the regression."""
        xs, ys = self.knots_x, self.knots_y
        if xs[0] <= x <= xs[-1] and len(xs) > 1:
            i = bisect.bisect_left(xs, x)
            if xs[i] == x:
                return ys[i]
            x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
        if x == xs[0]:
            return ys[0]
        edge = 0 if x < xs[0] else -1
        at_edge = self._at_edge(xs[edge], x, features)
        if edge == -1 and growth is not None:
            # Past the largest shape measured the roofline says how the work grows, from a floor-bound
            # kernel to a throughput-bound one. A regression over all shapes grows too little there: an
            # H100 attention power law in the lengths priced a prefill of 2.9x the largest one's flops at
            # the largest one's 1.0 ms (the H200 measured 2.8 ms).
            base = growth(at_edge)
            if base > 0:
                return ys[edge] * growth(features) / base
        if regression is None:
            return ys[edge]
        anchor, value = regression(at_edge), regression(features)
        if edge == -1 and value == anchor and xs[edge] > 0:  # a regression blind to the axis: work grows
            return ys[edge] * x / xs[edge]
        return value * (ys[edge] / anchor if anchor > 0 else 1.0)

    def _at_edge(self, edge: float, x: float, features: Features) -> Features:
        """The op as if at the edge knot: features that grow with the axis (a matmul's flops with m, an
        elementwise op's numel with bytes) shrink or grow with it."""
        ratio = edge / x if x > 0 else 1.0
        at_edge = {name: v * ratio if name in _EXTENSIVE else v for name, v in features.items()}
        at_edge[self.features[0]] = edge
        return at_edge

    def in_range(self, features: Features) -> bool:
        """Whether every feature of the op lies within the range this model was fitted on (1 % slack)."""
        for name, low, high in zip(self.features, self.range_min, self.range_max, strict=False):
            x = _value(features, name)
            if x < low * 0.99 or x > high * 1.01:
                return False
        return True


_EXTENSIVE = {"flops", "bytes", "numel", "tokens", "rows"}
# A model fitted on rows without a dtype: a factory's recorded row has no tensor argument (aten::full)
_UNTYPED = ("unknown", "")


def _value(features: Features, name: str) -> float:
    return 1.0 if name == "1" else features.get(name, 0.0)


@dataclass
class Profile:
    """Fitted models of one device; a `CostModel` for the emulator (see `revati.cost`).

    >>> p = Profile.read("traces/cpu/profile.parquet")
    >>> p.device_time("aten::mm", {"m": 8, "n": 64, "k": 64, "flops": 65536, "bytes": 18432}, torch.float32)
    """

    models: list[OpModel]
    device: dict[str, Any]  # the device's facts: kind, name, sm_count, memory_bytes, versions, ...
    synchronous: bool = False  # the host waits for each op (a CPU): host time includes device time
    launch_latency: float = 5e-6
    sync_latency: float = 4e-6
    wake_factor: float = 1.0  # the first engine step after the device sat idle runs this much slower
    graph_instantiate: float = GRAPH_INSTANTIATE  # host seconds per kernel node to end a graph capture
    info: dict[str, Any] = field(default_factory=dict)  # traces fitted, headline errors, version of revati
    path: str | None = None
    target_gpu: GpuSpec | None = None  # set by `on`: predictions scaled to this GPU
    engine: str | None = None  # set by `serving`: host costs of this engine's recordings first

    def __post_init__(self) -> None:
        self._device_models = {
            (m.key, m.dtype): m for m in self.models if m.target == "device" and m.form != "table"
        }
        self._host_models = {(m.engine, m.key): m for m in self.models if m.target == "host"}
        self._own_models = {(m.engine, m.key): m for m in self.models if m.target == "host_own"}
        self._tables: dict[tuple[str, str], dict[tuple[float, ...], OpModel]] = {}
        self._table_features: dict[tuple[str, str], tuple[str, ...]] = {}
        for m in self.models:
            if m.form == "table":
                self._tables.setdefault((m.key, m.dtype), {})[m.where] = m
                self._table_features[(m.key, m.dtype)] = m.features
        self._roofline = Roofline(self.source_gpu) if self.source_gpu is not None else None

    # -- CostModel -----------------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return f"profile:{Path(self.path).name if self.path else self.device.get('kind', '?')}"

    @property
    def source_gpu(self) -> GpuSpec | None:
        """The hardware-table entry of the device this profile was recorded on (None for a CPU)."""
        try:
            return gpu(self.device.get("kind", ""))
        except ValueError:
            return None

    def device_time(self, key: str, features: Features, dtype: torch.dtype | None) -> float:
        """Seconds the op keeps its stream busy, as fitted (and scaled to `target_gpu`, if set)."""
        model, family = self._model(key, _dtype_name(dtype))
        if model is None:
            if self._roofline is None:
                return 0.0
            seconds = self._roofline.device_time(key, features, dtype)
        elif features.get("kernel") == 0.0 and not self.synchronous:
            return 0.0
        else:
            seconds = self._measured(key, _dtype_name(dtype), features, model, family)
            if seconds is None:
                seconds = model.predict(features, family)
        if self.target_gpu is not None and seconds > 0:
            fixed = min(seconds, kernel_floor(key))  # a kernel's floor is no shorter on a faster GPU
            seconds = fixed + (seconds - fixed) * self._scale(key, features, dtype)
        return seconds

    def fits(self, key: str, dtype: torch.dtype | str | None) -> bool:
        """Whether the op's device time comes from a model fitted for the op itself (not its family's model,
        not the roofline)."""
        models = self._device_models
        return any((key, d) in models for d in (_dtype_name(dtype), *_UNTYPED))

    def host_time(self, key: str, engine: str | None = None) -> float:
        """Seconds of host time to issue the op (less its device time on a synchronous device): as fitted
        for the serving engine (`serving`), else for any engine, else the median op."""
        model = self._host_model(self._host_models, key, engine)
        return model.coefficients[0] if model is not None else 0.0

    def host_slope(self, key: str, engine: str | None = None) -> float:
        """On a synchronous device: host seconds after the op per second of its device time (bigger ops
        leave more to free and touch); 0 where the host model has no such term."""
        return self._host_term(key, engine, "device")

    def host_per_request(self, key: str, engine: str | None = None) -> float:
        """Host seconds after the op per request in the engine step (serving code that loops over the
        batch); 0 where the host model has no such term."""
        return self._host_term(key, engine, "batch")

    def _host_term(self, key: str, engine: str | None, feature: str) -> float:
        model = self._host_model(self._host_models, key, engine)
        if model is None or feature not in model.features:
            return 0.0
        return model.coefficients[model.features.index(feature)]

    def own_host_time(self, key: str, engine: str | None = None) -> float:
        """Seconds of host time in the op's own call, for `wall` mode, which measures the serving code
        between ops itself (0 on a synchronous device: there the op's time is all device time)."""
        model = self._host_model(self._own_models, key, engine)
        return model.coefficients[0] if model is not None else self.host_time(key, engine)

    def _host_model(self, models: dict, key: str, engine: str | None) -> OpModel | None:
        engine = engine or self.engine or ""
        return models.get((engine, key)) or models.get(("", key)) or models.get(("", "*"))

    def serving(self, engine: str) -> Profile:
        """This profile with host costs as fitted for one serving engine (where it was recorded)."""
        return replace(self, engine=engine)

    def extrapolated(self, key: str, features: Features, dtype: torch.dtype | None = None) -> bool:
        """True when the prediction leaves what was measured: another GPU, a fallback model, or a feature
        outside the range fitted."""
        if self.target_gpu is not None:
            return True
        if features.get("kernel") == 0.0 and not self.synchronous:
            return False
        model = self._device_models.get((key, _dtype_name(dtype)))
        return model is None or not model.in_range(features)

    def describe(self) -> str:
        """One line for the CLI."""
        where = f"{self.device.get('name', '?')}"
        text = f"profile {self.path or ''} fitted on {where}".replace("  ", " ")
        if self.target_gpu is not None:
            text += f", scaled to {self.target_gpu.name} by the hardware table (extrapolated)"
        return text

    def device_spec(self) -> GpuSpec:
        """The virtual device an emulation with this profile presents: the recorded GPU's table entry, or
        for a CPU recording a device with the CPU's name and memory (its speed is the profile's)."""
        if self.source_gpu is not None:
            return self.source_gpu
        memory = int(self.device.get("memory_bytes") or 16 * 2**30)
        return GpuSpec(
            key="cpu", name=str(self.device.get("name", "CPU")),
            sm_count=int(self.device.get("sm_count") or 1),
            memory_bytes=memory, hbm_bandwidth=20e9, bf16_flops=1e11, fp16_flops=1e11, fp8_flops=None,
            fp32_flops=1e11, nvlink_bandwidth=None, pcie_bandwidth=20e9, compute_capability=(0, 0),
            l2_bytes=32 * 2**20, clock_mhz=0,
        )  # fmt: skip

    # -- cross-hardware ------------------------------------------------------------------------------

    def on(self, target: GpuSpec) -> Profile:
        """This profile scaled to another GPU kind: compute-bound ops by the ratio of peak FLOP/s,
        memory-bound ones by the ratio of memory bandwidth, decided per op from its arithmetic
        intensity against the recorded GPU's ridge point; collectives by NVLink bandwidth. A kernel's
        floor (`revati.cost.kernel_floor`: launch and tail, a few µs) is not scaled."""
        source = self.source_gpu
        if source is None:
            raise ProfileError(
                f"{self.path}: recorded on {self.device.get('name', 'a CPU')}, which the hardware table does "
                f"not describe, so it cannot be scaled to {target.name}; "
                "leave out --gpu to emulate that device"
            )
        if source.key == target.key:
            return self
        return replace(self, target_gpu=target)

    def _scale(self, key: str, features: Features, dtype: torch.dtype | None) -> float:
        source, target = self.source_gpu, self.target_gpu
        family = op_family(key)
        if family == "collective":
            return (source.nvlink_bandwidth or source.pcie_bandwidth) / (
                target.nvlink_bandwidth or target.pcie_bandwidth
            )
        if features.get("cross_device"):
            return source.pcie_bandwidth / target.pcie_bandwidth
        flops, nbytes = features.get("flops", 0.0), features.get("bytes", 0.0)
        try:
            peak_source, peak_target = peak_flops(source, dtype), peak_flops(target, dtype)
        except ValueError:  # a dtype the target has no tensor cores for: compute at its bf16 rate
            peak_source, peak_target = source.bf16_flops, target.bf16_flops
        ridge = peak_source / source.hbm_bandwidth  # FLOP per byte where compute takes over
        if flops and (not nbytes or flops / nbytes >= ridge):
            return peak_source / peak_target
        return source.hbm_bandwidth / target.hbm_bandwidth

    # -- lookup --------------------------------------------------------------------------------------

    def _model(self, key: str, dtype: str) -> tuple[OpModel | None, OpModel | None]:
        models = self._device_models
        model = models.get((key, dtype))
        for untyped in _UNTYPED if model is None else ():
            model = model or models.get((key, untyped))
        if op_family(key) == "collective":
            # a collective's time is links, not kernels: its own fitted model, else the family's fitted over
            # recorded collectives, else the roofline's ring / tree (never the pooled compute model)
            family = models.get(("family:collective", dtype))
            return model or family, family
        family = models.get((f"family:{op_family(key)}", dtype)) or models.get(("family:*", dtype))
        if model is None:
            model = family or models.get(("family:*", "*"))
        if family is None:
            family = models.get(("family:*", "*"))
        return model, family

    def _measured(
        self, key: str, dtype: str, features: Features, regression: OpModel, family: OpModel | None
    ) -> float | None:
        """The 'table' model's value for an op of a shape measured along its feature, else None."""
        names = self._table_features.get((key, dtype))
        if names is None:
            return None
        where = tuple(features.get(n, 0.0) for n in names[1:])
        table = self._tables[(key, dtype)].get(where)
        if table is None:
            return None
        own = (lambda f: regression.predict(f, family)) if regression.key == key else None
        roofline, torch_dtype = self._roofline, getattr(torch, dtype, None)
        growth = (lambda f: roofline.device_time(key, f, torch_dtype)) if roofline is not None else None
        return max(table.interpolate(features.get(names[0], 0.0), own, features, growth), 0.0)

    def device_model(self, key: str, dtype: str) -> OpModel | None:
        """The device model fitted for (key, dtype) itself, without fallbacks."""
        return self._device_models.get((key, dtype))

    # -- IO ------------------------------------------------------------------------------------------

    def write(self, path: str | Path) -> Path:
        """Write the profile as one Parquet file (via a temporary name, then renamed)."""
        path = Path(path)
        columns: dict[str, list] = {f.name: [] for f in PROFILE}
        for m in self.models:
            for name in columns:
                value = getattr(m, name)
                columns[name].append(list(value) if isinstance(value, tuple) else value)
        table = pa.table(columns, schema=PROFILE)
        meta = {
            "version": PROFILE_VERSION,
            "device": self.device,
            "synchronous": self.synchronous,
            "launch_latency": self.launch_latency,
            "sync_latency": self.sync_latency,
            "wake_factor": self.wake_factor,
            "graph_instantiate": self.graph_instantiate,
            "info": self.info,
        }
        table = table.replace_schema_metadata({_META_KEY: json.dumps(meta).encode()})
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        pq.write_table(table, tmp, compression="zstd")
        tmp.replace(path)
        return path

    @classmethod
    def read(cls, path: str | Path) -> Profile:
        """Read and validate a profile written by `write`; ProfileError names what is wrong."""
        path = Path(path)
        if not path.is_file():
            raise ProfileError(f"{path}: no such file")
        try:
            table = pq.read_table(path)
        except (OSError, pa.ArrowInvalid) as e:
            raise ProfileError(f"{path}: not a readable Parquet file ({e})") from None
        raw = (table.schema.metadata or {}).get(_META_KEY)
        if raw is None:
            raise ProfileError(f"{path}: not a Revati profile (no '{_META_KEY.decode()}' metadata)")
        meta = json.loads(raw)
        version = meta.get("version")
        if not isinstance(version, int) or version > PROFILE_VERSION:
            raise ProfileError(
                f"{path}: profile version {version} is newer than this Revati reads ({PROFILE_VERSION}); "
                "upgrade revati"
            )
        for f in PROFILE:
            if f.name not in table.column_names:
                raise ProfileError(f"{path}: not a Revati profile (missing column '{f.name}')")
            if not table.schema.field(f.name).type.equals(f.type):
                raise ProfileError(
                    f"{path}: column '{f.name}' is {table.schema.field(f.name).type}, expected {f.type}"
                )
        models = []
        for row in table.select(PROFILE.names).to_pylist():
            row = {k: tuple(v) if isinstance(v, list) else v for k, v in row.items()}
            model = OpModel(**row)
            if len(model.coefficients) != len(model.features) and model.form not in ("scaled", "table"):
                raise ProfileError(
                    f"{path}: model {model.key} ({model.dtype}) has {len(model.coefficients)} coefficients "
                    f"for {len(model.features)} features"
                )
            models.append(model)
        return cls(
            models=models,
            device=meta.get("device", {}),
            synchronous=bool(meta.get("synchronous")),
            launch_latency=float(meta.get("launch_latency", 5e-6)),
            sync_latency=float(meta.get("sync_latency", 4e-6)),
            wake_factor=float(meta.get("wake_factor", 1.0)),
            graph_instantiate=float(meta.get("graph_instantiate", GRAPH_INSTANTIATE)),
            info=meta.get("info", {}),
            path=str(path),
        )


def shipped_profile(gpu_key: str) -> Path | None:
    """The profile shipped for a GPU kind (`traces/<kind>/profile.parquet` in a source checkout), if any."""
    path = Path(__file__).resolve().parent.parent / "traces" / gpu_key / "profile.parquet"
    return path if path.is_file() else None


def _dtype_name(dtype: torch.dtype | str | None) -> str:
    if dtype is None:
        return ""
    return str(dtype).removeprefix("torch.")
