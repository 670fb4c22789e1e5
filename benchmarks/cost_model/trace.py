"""Run one training step on `meta` tensors and record every op it dispatches, as a CUDA GPU would run it.

Why meta tensors and not fake CUDA ones: on a CPU-only torch build, FakeTensorMode accepts device="cuda" tensors,
but autograd aborts the process on them as soon as a graph is recorded (its device guard for CUDA is missing), so
no backward could be traced. Meta tensors carry shapes and dtypes, hold no memory, and autograd runs on them, so
the real forward, the real backward (autograd.Function and custom-op backwards included), clipping and the optimizer
all run. Where the code would behave differently on CUDA, a stand-in tells it "CUDA" (`cuda_stand_ins`):

  autocast      torch.autocast("cuda", bf16) is disabled on a CPU build; `Autocast` casts at the same functions
                CUDA autocast casts (matmul-like -> bf16, its float32 list -> fp32, leaf weights cast once per forward
                unless the cache is off, as under CUDA-graph capture). It works at the Python function level, so a
                composite function counts as one (listed in LOWER / FP32).
  SDPA          F.scaled_dot_product_attention becomes one custom op `cost_model::sdpa` (and one backward), the
                flash kernel CUDA picks with no mask in half precision, else the memory-efficient one.
  backends      blip2fast's ops choose Triton / C++ backends by device type: `dispatch.triton_reasons` and the C++
                ops' checks see meta as CUDA (dtype and availability rules kept).
  dropout       F.dropout becomes aten::native_dropout, the fused kernel CUDA runs (meta would take the CPU route).
  host reads    `.item()` / bool() / int() (aten._local_scalar_dense) and `.tolist()` return zeros and are recorded
                as host syncs; a "cuda" device argument becomes "meta".
"""
from __future__ import annotations

import contextlib
import functools
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

from . import rules

aten = torch.ops.aten

# ------------------------------------------------------------------------------------------------ SDPA stand-in


def _sdpa_variant(q: torch.Tensor, has_mask: bool) -> str:
    """The kernel torch's SDPA dispatches to on sm_90: flash for fp16/bf16 without an explicit mask and a head dim
    that is a multiple of 8 up to 256, else the memory-efficient kernel."""
    half = q.dtype in (torch.float16, torch.bfloat16)
    if half and not has_mask and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256:
        return "flash"
    return "efficient"


# Both kernels apply dropout in-kernel (Philox), so dropout_p changes no byte count; it is kept in the signature
@torch.library.custom_op("cost_model::sdpa", mutates_args=())
def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor], is_causal: bool,
          scale: Optional[float], dropout_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    raise RuntimeError("cost_model::sdpa only runs on meta tensors (it stands for the CUDA kernel in a trace)")


@_sdpa.register_fake
def _sdpa_fake(q, k, v, mask, is_causal, scale, dropout_p):
    shape = q.shape[:-1] + (v.shape[-1],)
    lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
    if q.dim() != 4:
        return q.new_empty(shape), lse
    # torch's flash and memory-efficient kernels write (B, N, H, d) and return it transposed to (B, H, N, d), so
    # the usual `out.transpose(1, 2).reshape(B, N, H * d)` afterwards is a view, not a copy
    B, H, N, d = shape
    return torch.empty_strided(shape, (N * H * d, d, H * d, 1), dtype=q.dtype, device=q.device), lse


@torch.library.custom_op("cost_model::sdpa_backward", mutates_args=())
def _sdpa_backward(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                   lse: torch.Tensor, mask: Optional[torch.Tensor], is_causal: bool, scale: Optional[float],
                   dropout_p: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    raise RuntimeError("cost_model::sdpa_backward only runs on meta tensors")


@_sdpa_backward.register_fake
def _sdpa_backward_fake(grad, q, k, v, out, lse, mask, is_causal, scale, dropout_p):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _sdpa_setup(ctx, inputs, output):
    q, k, v, mask, is_causal, scale, dropout_p = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], mask)
    ctx.flags = (is_causal, scale, dropout_p)


def _sdpa_bwd(ctx, grad, _grad_lse):
    q, k, v, out, lse, mask = ctx.saved_tensors
    dq, dk, dv = _sdpa_backward(grad, q, k, v, out, lse, mask, *ctx.flags)
    return dq, dk, dv, None, None, None, None


_sdpa.register_autograd(_sdpa_bwd, setup_context=_sdpa_setup)


def sdpa_stand_in(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        rep = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(rep, -3), value.repeat_interleave(rep, -3)
    return _sdpa(query, key, value, attn_mask, bool(is_causal), scale, float(dropout_p))[0]


# ------------------------------------------------------------------------------------------------ autocast stand-in
# CUDA autocast's lists (torch.amp docs), at the Python functions the traced code calls
LOWER = {F.linear, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.Tensor.__rmatmul__, torch.mm,
         torch.Tensor.mm, torch.bmm, torch.Tensor.bmm, torch.addmm, torch.Tensor.addmm, torch.baddbmm,
         torch.Tensor.baddbmm, torch.einsum, F.conv2d, F.conv1d, F.scaled_dot_product_attention, torch.addbmm}
FP32 = {F.layer_norm, F.group_norm, F.softmax, torch.softmax, torch.Tensor.softmax, F.log_softmax, torch.log_softmax,
        torch.Tensor.log_softmax, F.cross_entropy, F.nll_loss, F.normalize, torch.logsumexp, torch.Tensor.logsumexp,
        torch.norm, torch.Tensor.norm, torch.exp, torch.Tensor.exp, torch.log, torch.Tensor.log, torch.sum,
        torch.Tensor.sum, torch.cumsum, torch.Tensor.cumsum, torch.pow, torch.Tensor.pow, torch.rsqrt,
        torch.Tensor.rsqrt, F.mse_loss, F.binary_cross_entropy_with_logits}


@dataclass
class AutocastState:
    enabled: bool = False
    dtype: torch.dtype = torch.bfloat16
    cache_enabled: bool = True


class Autocast:
    """What `torch.autocast("cuda", ...)` does, for the trace (a context manager with its arguments)."""

    state = AutocastState()
    cache: dict = {}

    def __init__(self, device_type: str = "cuda", dtype: Optional[torch.dtype] = None, enabled: bool = True,
                 cache_enabled: Optional[bool] = None):
        self.new = AutocastState(enabled=bool(enabled) and device_type in ("cuda", "meta"),
                                 dtype=dtype or torch.bfloat16,
                                 cache_enabled=True if cache_enabled is None else bool(cache_enabled))

    def __enter__(self):
        self.old = Autocast.state
        Autocast.state = self.new
        return self

    def __exit__(self, *exc):
        Autocast.state = self.old
        if not Autocast.state.enabled:
            Autocast.cache.clear()  # the weight-cast cache lives as long as the outermost autocast region
        return False

    def __call__(self, fn):  # used as a decorator
        @functools.wraps(fn)
        def inner(*a, **k):
            with Autocast(enabled=self.new.enabled, dtype=self.new.dtype, cache_enabled=self.new.cache_enabled):
                return fn(*a, **k)
        return inner


def _cast(x: Any, want: torch.dtype, source: tuple) -> Any:
    if isinstance(x, (list, tuple)):
        return type(x)(_cast(y, want, source) for y in x)
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dtype not in source:
        return x
    st = Autocast.state
    if st.cache_enabled and x.is_leaf and x.requires_grad:
        hit = Autocast.cache.get(id(x))
        if hit is not None and hit[0] is x:
            return hit[1]
        y = x.to(want)
        Autocast.cache[id(x)] = (x, y)
        return y
    return x.to(want)


# ------------------------------------------------------------------------------------------------ recording


@dataclass
class Event:
    """One op the step dispatched, with its cost inputs (rules.cost_of)."""

    op: str
    phase: str  # "forward" | "backward" | "optimizer"
    region: str
    kind: str  # rules.KINDS
    flops: float = 0.0  # FlopCounterMode-comparable FLOPs
    extra_flops: float = 0.0
    bytes_read: float = 0.0
    bytes_written: float = 0.0
    launches: int = 0  # kernels launched (0 for views / metadata)
    host_syncs: int = 0
    dtype: str = ""
    gemm: Optional[tuple] = None  # (batch, M, N, K) of a matmul (wave quantisation)


OUTSIDE = "loss glue (outside the passes)"


class Regions:
    """Which part of the step is running: a stack of names in the forward (innermost wins), and for the backward
    the region whose forward created the autograd node being run."""

    def __init__(self):
        self.stack: list[str] = [OUTSIDE]
        self.node_region: dict = {}
        self.phase = "forward"

    @property
    def current(self) -> str:
        return self.stack[-1]

    @contextlib.contextmanager
    def region(self, name: str):
        self.stack.append(name)
        try:
            yield
        finally:
            self.stack.pop()

    @contextlib.contextmanager
    def phase_as(self, phase: str):
        old, self.phase = self.phase, phase
        try:
            yield
        finally:
            self.phase = old

    def wrap(self, obj: Any, attr: str, name: str, patches: list) -> None:
        """obj.attr runs inside region `name` (undone by `undo(patches)`)."""
        fn = getattr(obj, attr)

        @functools.wraps(fn)
        def inner(*a, **k):
            with self.region(name):
                return fn(*a, **k)

        patches.append((obj, attr, obj.__dict__.get(attr, _MISSING) if hasattr(obj, "__dict__") else _MISSING))
        setattr(obj, attr, inner)

    def label(self, out: Any) -> None:
        """Remember the current region for the autograd nodes of `out` (forward only)."""
        if self.phase != "forward":
            return
        for t in _tensors(out):
            try:
                fn = t.grad_fn
            except RuntimeError:  # a no_grad view modified in place: no node to label
                continue
            if fn is not None and fn not in self.node_region:
                self.node_region[fn] = self.current

    def fill_from(self, roots: list) -> None:
        """Nodes created inside composite functions (never labelled) take the region of the node that consumes
        them, walking the graph from the loss."""
        seen = set()
        todo = deque((r, self.node_region.get(r, OUTSIDE)) for r in roots if r is not None)
        while todo:
            node, parent = todo.popleft()
            if node in seen:
                continue
            seen.add(node)
            region = self.node_region.setdefault(node, parent)
            for nxt, _ in node.next_functions:
                if nxt is not None and nxt not in seen:
                    todo.append((nxt, region))

    def backward_region(self) -> str:
        node = torch._C._current_autograd_node()
        return self.node_region.get(node, "backward (unattributed)") if node is not None else self.current


_MISSING = object()


def undo(patches: list) -> None:
    for obj, attr, old in reversed(patches):
        if old is _MISSING:
            try:
                delattr(obj, attr)
            except AttributeError:
                pass
        else:
            setattr(obj, attr, old)
    patches.clear()


def _tensors(x: Any) -> list:
    out = []
    tree_map(lambda t: out.append(t) if isinstance(t, torch.Tensor) else None, x)
    return out


def _meta_device(d: Any) -> Any:
    if isinstance(d, (str, torch.device)) and torch.device(d).type == "cuda":
        return torch.device("meta")
    return d


def _zeros_like_list(t: torch.Tensor):
    if t.dim() == 0:
        return 0.0 if t.is_floating_point() else 0
    return [_zeros_like_list(t[0]) for _ in range(t.shape[0])] if t.shape[0] else []


def _dropout_runs(args, kwargs) -> bool:
    p = kwargs.get("p", args[1] if len(args) > 1 else 0.5)
    training = kwargs.get("training", args[2] if len(args) > 2 else True)
    return bool(training) and 0.0 < p < 1.0


def _cuda_dropout(input, p=0.5, training=True, inplace=False):
    """On CUDA F.dropout is one fused kernel (aten::native_dropout: output and mask in one pass; its backward one
    more); on meta tensors torch would take the CPU route (bernoulli_, div_, mul: three kernels)."""
    out = torch.ops.aten.native_dropout(input, p, True)[0]
    return input.copy_(out) if inplace else out


class FunctionStandIns(TorchFunctionMode):
    """Python-level stand-ins: autocast casts, SDPA, .tolist(), "cuda" -> "meta", region labels."""

    def __init__(self, recorder: "Recorder"):
        super().__init__()
        self.rec = recorder

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if "device" in kwargs:
            kwargs["device"] = _meta_device(kwargs["device"])
        if func in (torch.Tensor.to, torch.Tensor.new_empty, torch.Tensor.new_zeros, torch.Tensor.new_ones,
                    torch.Tensor.new_full, torch.Tensor.new_tensor):
            args = tuple(_meta_device(a) for a in args)
        if func is torch.Tensor.cuda:
            return args[0].to("meta")
        if func is torch.Tensor.tolist:
            self.rec.host_sync("aten::tolist (device-to-host read)", args[0])
            return _zeros_like_list(args[0])
        st = Autocast.state
        if st.enabled:
            if func in LOWER:  # like autocast's cached_cast: every floating dtype but float64, fp16 under bf16 too
                lower = tuple(d for d in (torch.float32, torch.float16, torch.bfloat16) if d != st.dtype)
                args, kwargs = _cast(args, st.dtype, lower), {k: _cast(v, st.dtype, lower) for k, v in kwargs.items()}
            elif func in FP32:
                args, kwargs = _cast(args, torch.float32, (torch.float16, torch.bfloat16)), {
                    k: _cast(v, torch.float32, (torch.float16, torch.bfloat16)) for k, v in kwargs.items()}
        if func is F.scaled_dot_product_attention:
            out = sdpa_stand_in(*args, **kwargs)
        elif func is F.dropout and _dropout_runs(args, kwargs):
            out = _cuda_dropout(*args, **kwargs)
        else:
            out = func(*args, **kwargs)
        self.rec.regions.label(out)
        return out


DATA_DEPENDENT = {
    aten.nonzero.default: lambda x: torch.empty((x.numel(), x.dim()), dtype=torch.long, device=x.device),
    aten.masked_select.default: lambda x, mask: torch.empty(
        (torch.broadcast_shapes(x.shape, mask.shape).numel(),), dtype=x.dtype, device=x.device),
}


class Recorder(TorchDispatchMode):
    """Records every aten / custom op dispatched (below autograd: the backward's ops too) as an Event."""

    def __init__(self, regions: Regions):
        super().__init__()
        self.regions = regions
        self.events: list[Event] = []

    def _where(self) -> tuple[str, str]:
        ph = self.regions.phase
        return ph, (self.regions.backward_region() if ph == "backward" else self.regions.current)

    def host_sync(self, what: str, t: Optional[torch.Tensor]) -> None:
        phase, region = self._where()
        nbytes = 0.0 if t is None else float(t.numel() * t.element_size())
        self.events.append(Event(what, phase, region, "host_sync", bytes_read=nbytes, launches=0, host_syncs=1,
                                 dtype=str(t.dtype).removeprefix("torch.") if t is not None else ""))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is aten._local_scalar_dense.default:
            self.host_sync("aten::_local_scalar_dense (.item())", args[0])
            t = args[0]
            return False if t.dtype == torch.bool else (0.0 if t.is_floating_point() else 0)
        if func in DATA_DEPENDENT:
            # the output's size is a device value: one kernel, then the host reads the count before it can
            # allocate (a sync); the trace goes on with the largest possible output
            out = DATA_DEPENDENT[func](*args, **kwargs)
            phase, region = self._where()
            self.events.append(rules.cost_of(func, args, kwargs, out, phase, region))
            self.host_sync(f"{rules.op_name(func)} (output size read by the host)", None)
            return out
        try:
            out = func(*args, **kwargs)
        except NotImplementedError:
            # an in-place op with no meta kernel (e.g. aten::_fused_adamw_): nothing to compute on meta tensors
            if func._schema.returns and not all(r.alias_info is not None for r in func._schema.returns):
                raise
            out = None
        phase, region = self._where()
        self.events.append(rules.cost_of(func, args, kwargs, out, phase, region))
        return out


def stand_in_patches() -> list:
    """Monkeypatches that make blip2fast's device-type decisions see meta tensors as CUDA tensors."""
    from blip2fast.ops import dispatch, itc_loss, itm_sampling, linear_ce
    from blip2fast.ops import _extension
    import blip2fast.models.blip2 as blip2_module

    patches: list = []

    def setattr_(obj, name, value):
        patches.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    def triton_reasons(kernels: str, *tensors, dtypes):
        available, _, why = dispatch._triton_status(kernels)
        if not available:
            return [why]
        bad = [t.dtype for t in tensors if t.dtype not in dtypes]
        return [f"dtype {bad[0]} is not one of {dtypes}"] if bad else []

    def cpp_reasons(x, *rest):
        if not _extension.load_extension():
            return [_extension.load_extension().reason]
        return [] if x.dtype in (torch.float32, torch.float16, torch.bfloat16) else [f"dtype {x.dtype}"]

    def itc_cpp_reasons(x):
        available, _, why = itc_loss.cpp_status()  # loads the extension and registers its fake kernels
        return cpp_reasons(x) if available else [why]

    setattr_(dispatch, "triton_reasons", triton_reasons)
    setattr_(itm_sampling, "_cpp_unsupported", cpp_reasons)
    setattr_(itc_loss, "_cpp_unsupported", itc_cpp_reasons)

    lce = linear_ce.linear_cross_entropy

    @functools.wraps(lce)
    def lce_autocast(hidden, weight, bias, targets, *a, **k):
        # linear_cross_entropy casts to the autocast dtype when CUDA autocast is on (it checks the device type)
        st = Autocast.state
        if st.enabled:
            hidden, weight = hidden.to(st.dtype), weight.to(st.dtype)
            bias = None if bias is None else bias.to(st.dtype)
        return lce(hidden, weight, bias, targets, *a, **k)

    setattr_(blip2_module, "linear_cross_entropy", lce_autocast)
    setattr_(torch, "autocast", Autocast)
    setattr_(torch.amp, "autocast", Autocast)
    setattr_(torch, "is_autocast_enabled", lambda *a: Autocast.state.enabled)
    setattr_(torch, "get_autocast_dtype", lambda *a: Autocast.state.dtype)
    return patches


@contextlib.contextmanager
def cuda_stand_ins(regions: Regions):
    """The recorder and every stand-in, for the duration of a trace. Yields the Recorder."""
    patches = stand_in_patches()
    rec = Recorder(regions)
    try:
        with FunctionStandIns(rec), rec:
            yield rec
    finally:
        undo(patches)
        Autocast.cache.clear()
        Autocast.state = AutocastState()


def trace_step(build: Callable[[Regions, list], Callable[[], Any]]) -> tuple[list, Regions]:
    """`build(regions, patches)` prepares a step (inside the stand-ins, so "cuda" tensors become meta) and returns
    a callable running it; the step marks its own phases with `regions.phase_as`. Returns (events, regions)."""
    regions = Regions()
    patches: list = []
    with cuda_stand_ins(regions) as rec:
        try:
            step = build(regions, patches)
            rec.events.clear()  # building the model and the optimizer state is not part of the step
            step()
        finally:
            undo(patches)  # before the stand-ins' own patches, which some of these wrap
    return rec.events, regions
