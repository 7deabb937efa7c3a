"""Fast-path pieces for the encoder: load-time module transforms, batch buckets, copy/compute overlap.

Pure torch (+ the transformers CLIP modules it rewrites); never imports ray, PIL or pyarrow.

Transforms (applied once, in place, to a loaded :class:`~pipeline.model.tower.CLIPVisionTower`):

- :func:`fuse_qkv`: each layer's ``q_proj``/``k_proj``/``v_proj`` become one ``Linear(D, 3D)``
  (weights concatenated, so the numbers are those of the three GEMMs: one GEMM instead of three,
  and a direct ``scaled_dot_product_attention`` call on strided views instead of three
  ``transpose().contiguous()`` copies).
- :func:`fold_quick_gelu`: ``fc2(quick_gelu(fc1(x)))`` with ``quick_gelu(z) = z * sigmoid(1.702 z)``
  equals ``(fc2 / 1.702)(silu((1.702 fc1)(x)))``: the scale is folded into the weights, so the
  activation is one fused SiLU kernel in eager mode instead of three element-wise passes
  (``mul``, ``sigmoid``, ``mul``) over the largest activation of the layer.

Each checks the structure it replaces (module types, shapes, the activation's values) and runs
the first replacement against the original on a random input, failing loudly (naming the
transformers version) when the tower is not what it expects. Tested against the unfused tower in
float32 (max |Δ| ≤ 1e-5) in ``tests/test_fast.py``.

Static shapes for ``torch.compile``: :func:`default_buckets`, :func:`bucket_plan` (which padded
batch sizes cover ``n`` images with the least padded work) and :func:`pad_batch`.

Copy/compute overlap: :func:`overlapped_map` runs host→device copies on one CUDA stream, the
compute on the current stream and device→host copies into pinned memory on a third, chained by
events, so that batch *i+1*'s upload and batch *i−1*'s download overlap batch *i*'s compute. On a
CPU it is a plain loop.
"""

from __future__ import annotations

import copy
import logging
import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .constants import COMPILE_MODES, QUICK_GELU_ALPHA
from .errors import ConfigError, ModelStateError
from .tower import CLIPVisionTower

logger = logging.getLogger(__name__)

PROBE_TOLERANCE = 1e-4
"""Largest relative difference (float32 weights) between a transformed module and the one it replaces;
for half-precision weights, 8 epsilons of their dtype (the fold rounds its scaled weights once)."""


# -- transforms -------------------------------------------------------------------------------


def _transformers_version() -> str:
    import transformers

    return str(transformers.__version__)


def _structure_error(transform: str, what: str) -> ModelStateError:
    return ModelStateError(
        f"{transform}: {what} (transformers {_transformers_version()}); this transform does not know this "
        f"tower's structure: set model.{transform}: false"
    )


def _layers(tower: CLIPVisionTower) -> Sequence[nn.Module]:
    return list(tower.vision_core.encoder.layers)


def _linear(module: nn.Module, name: str, shape: tuple[int, int], transform: str) -> nn.Linear:
    linear = getattr(module, name, None)
    if not isinstance(linear, nn.Linear) or (linear.out_features, linear.in_features) != shape:
        found = (
            type(linear).__name__
            if linear is None or not isinstance(linear, nn.Linear)
            else (f"Linear({linear.in_features}, {linear.out_features})")
        )
        raise _structure_error(
            transform,
            f"expected {type(module).__name__}.{name} to be Linear({shape[1]}, {shape[0]}), found {found}",
        )
    return linear


def _probe(original: nn.Module, replacement: nn.Module, width: int, transform: str) -> None:
    """Both modules on the same random input, in float32 on the CPU: the replacement must agree."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, width, generator=gen)
    with torch.no_grad():
        a = copy.deepcopy(original).float().cpu()(x)
        b = copy.deepcopy(replacement).float().cpu()(x)
    a = a[0] if isinstance(a, tuple) else a
    b = b[0] if isinstance(b, tuple) else b
    err = float((a - b).abs().max() / a.abs().max().clamp_min(1e-12))
    dtype = next(replacement.parameters()).dtype
    tolerance = (
        PROBE_TOLERANCE if dtype == torch.float32 else max(PROBE_TOLERANCE, 8 * torch.finfo(dtype).eps)
    )
    if not err <= tolerance:
        raise _structure_error(
            transform,
            f"the transformed {type(original).__name__} differs from the original (relative error {err:.2e})",
        )


class FusedQKVAttention(nn.Module):
    """CLIP self-attention with one ``Linear(D, 3D)`` for q, k and v, and SDPA.

    Same inputs and outputs as ``transformers``' ``CLIPAttention`` (returns ``(output, None)``).
    """

    def __init__(self, embed_dim: int, num_heads: int, scale: float, *, bias: bool = True) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ConfigError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.scale = scale
        self.qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)

    @classmethod
    def from_attention(cls, attn: nn.Module) -> FusedQKVAttention:
        """Build from a ``CLIPAttention`` (weights copied, on its device and dtype); its structure is checked."""
        embed_dim, num_heads, scale = (getattr(attn, k, None) for k in ("embed_dim", "num_heads", "scale"))
        if not isinstance(embed_dim, int) or not isinstance(num_heads, int) or not isinstance(scale, float):
            raise _structure_error(
                "fuse_qkv", f"{type(attn).__name__} has no integer embed_dim/num_heads and float scale"
            )
        shape = (embed_dim, embed_dim)
        q, k, v, o = (
            _linear(attn, name, shape, "fuse_qkv") for name in ("q_proj", "k_proj", "v_proj", "out_proj")
        )
        has_bias = q.bias is not None
        if any((m.bias is not None) != has_bias for m in (k, v)):
            raise _structure_error("fuse_qkv", "q_proj, k_proj and v_proj do not all have (or lack) a bias")
        fused = cls(embed_dim, num_heads, float(scale), bias=has_bias)
        fused.to(device=q.weight.device, dtype=q.weight.dtype)
        with torch.no_grad():
            fused.qkv.weight.copy_(torch.cat([q.weight, k.weight, v.weight], dim=0))
            if has_bias:
                fused.qkv.bias.copy_(torch.cat([q.bias, k.bias, v.bias], dim=0))
            fused.out_proj.weight.copy_(o.weight)
            if o.bias is not None:
                fused.out_proj.bias.copy_(o.bias)
            else:
                fused.out_proj.bias = None
        fused.requires_grad_(False)
        fused.train(attn.training)
        return fused

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any
    ) -> tuple[torch.Tensor, None]:
        if kwargs.get("causal_attention_mask") is not None:
            raise ConfigError("FusedQKVAttention is for the vision tower: no causal mask")
        batch, tokens, _ = hidden_states.shape
        qkv = self.qkv(hidden_states).view(batch, tokens, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, N, Dh), strided views
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, scale=self.scale)
        out = out.transpose(1, 2).reshape(batch, tokens, self.embed_dim)
        return self.out_proj(out), None


class SiLUFoldedMLP(nn.Module):
    """CLIP's MLP with quick_gelu folded into SiLU: ``fc2'(silu(fc1'(x)))``, fc1' = 1.702·fc1,
    fc2' = fc2 / 1.702 (weights only; the bias of fc2 is unchanged)."""

    def __init__(self, fc1: nn.Linear, fc2: nn.Linear) -> None:
        super().__init__()
        self.fc1 = fc1
        self.fc2 = fc2

    @classmethod
    def from_mlp(cls, mlp: nn.Module, alpha: float = QUICK_GELU_ALPHA) -> SiLUFoldedMLP:
        """Fold ``alpha`` into copies of ``mlp.fc1``/``mlp.fc2`` (computed in float32, one rounding)."""

        def scaled(linear: nn.Linear, w_scale: float, b_scale: float) -> nn.Linear:
            out = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None)
            out.to(device=linear.weight.device, dtype=linear.weight.dtype)
            with torch.no_grad():
                out.weight.copy_((linear.weight.float() * w_scale).to(linear.weight.dtype))
                if linear.bias is not None:
                    out.bias.copy_((linear.bias.float() * b_scale).to(linear.bias.dtype))
            return out.requires_grad_(False)

        fc1, fc2 = getattr(mlp, "fc1", None), getattr(mlp, "fc2", None)
        if not isinstance(fc1, nn.Linear) or not isinstance(fc2, nn.Linear):
            raise _structure_error("fold_quick_gelu", f"{type(mlp).__name__} has no fc1/fc2 Linear layers")
        _linear(mlp, "fc2", (fc1.in_features, fc1.out_features), "fold_quick_gelu")
        folded = cls(scaled(fc1, alpha, alpha), scaled(fc2, 1.0 / alpha, 1.0))
        folded.train(mlp.training)
        return folded

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.silu(self.fc1(hidden_states)))


def _check_quick_gelu(act: Any) -> None:
    """The activation the fold replaces must compute ``z * sigmoid(1.702 z)``."""
    z = torch.linspace(-6, 6, 97)
    try:
        with torch.no_grad():
            got = act(z)
    except Exception as exc:
        raise _structure_error(
            "fold_quick_gelu", f"the MLP's activation_fn cannot be evaluated ({exc})"
        ) from exc
    want = z * torch.sigmoid(QUICK_GELU_ALPHA * z)
    if not isinstance(got, torch.Tensor) or not torch.allclose(got, want, rtol=1e-5, atol=1e-6):
        raise _structure_error(
            "fold_quick_gelu", f"the MLP's activation_fn {type(act).__name__} is not quick_gelu"
        )


def fuse_qkv(tower: CLIPVisionTower) -> int:
    """Replace every layer's ``self_attn`` by a :class:`FusedQKVAttention`; returns how many.

    Only towers using SDPA are transformed (an ``eager`` tower keeps its explicit softmax path).
    The first replacement is checked numerically against the module it replaces.
    """
    attn_impl = getattr(tower.config, "_attn_implementation", "sdpa")
    if attn_impl != "sdpa":
        logger.info("fuse_qkv: tower uses %r attention, left unchanged", attn_impl)
        return 0
    count = 0
    for layer in _layers(tower):
        attn = getattr(layer, "self_attn", None)
        if isinstance(attn, FusedQKVAttention):
            continue
        if attn is None:
            raise _structure_error("fuse_qkv", f"{type(layer).__name__} has no self_attn")
        fused = FusedQKVAttention.from_attention(attn)
        if count == 0:
            _probe(attn, fused, fused.embed_dim, "fuse_qkv")
        layer.self_attn = fused
        count += 1
    return count


def fold_quick_gelu(tower: CLIPVisionTower) -> int:
    """Replace every quick_gelu MLP by a :class:`SiLUFoldedMLP`; returns how many (0 when the tower's
    ``hidden_act`` is not ``quick_gelu``). The activation and the first fold are checked numerically."""
    act_name = getattr(tower.config, "hidden_act", None)
    if act_name != "quick_gelu":
        logger.info("fold_quick_gelu: the tower's activation is %r, left unchanged", act_name)
        return 0
    count = 0
    for layer in _layers(tower):
        mlp = getattr(layer, "mlp", None)
        if isinstance(mlp, SiLUFoldedMLP):
            continue
        if mlp is None:
            raise _structure_error("fold_quick_gelu", f"{type(layer).__name__} has no mlp")
        _check_quick_gelu(getattr(mlp, "activation_fn", None))
        folded = SiLUFoldedMLP.from_mlp(mlp)
        if count == 0:
            _probe(mlp, folded, folded.fc1.in_features, "fold_quick_gelu")
        layer.mlp = folded
        count += 1
    return count


def apply_fast_path(tower: CLIPVisionTower, *, qkv: bool = True, quick_gelu: bool = False) -> dict[str, int]:
    """Apply the selected transforms in place; returns ``{transform: layers changed}``."""
    done: dict[str, int] = {}
    if qkv:
        done["fuse_qkv"] = fuse_qkv(tower)
    if quick_gelu:
        done["fold_quick_gelu"] = fold_quick_gelu(tower)
    return done


# -- static shapes ----------------------------------------------------------------------------


def default_buckets(batch_sizes: Iterable[int], overlap_chunks: int = 1) -> tuple[int, ...]:
    """Batch sizes to compile for: each ``b`` of ``batch_sizes``, ``ceil(b / overlap_chunks)`` (the
    sub-batches of :func:`overlapped_map`) and ``b // 8`` (small tails and single requests)."""
    out: set[int] = set()
    for b in batch_sizes:
        b = int(b)
        if b < 1:
            continue
        out.update({b, max(1, math.ceil(b / max(1, overlap_chunks))), max(1, b // 8)})
    return tuple(sorted(out))


def validate_buckets(buckets: Iterable[int]) -> tuple[int, ...]:
    """Sorted unique positive bucket sizes; ValueError for anything else."""
    values = tuple(buckets)
    if any(not isinstance(b, int) or isinstance(b, bool) or b < 1 for b in values):
        raise ConfigError(f"batch buckets must be positive integers, got {list(values)}")
    return tuple(sorted(set(values)))


def bucket_plan(n: int, buckets: Sequence[int]) -> list[int]:
    """Bucket sizes whose sum covers ``n`` images with the least padded work (then the fewest calls).

    The pieces are filled in order: piece *i* takes ``min(bucket_i, remaining)`` images and is
    padded up to ``bucket_i``. ``bucket_plan(300, (32, 128, 256)) == [256, 32, 32]``.
    """
    if n <= 0:
        return []
    sizes = validate_buckets(buckets)
    if not sizes:
        raise ValueError("bucket_plan needs at least one bucket")
    largest = sizes[-1]
    full, rest = divmod(n, largest)
    plan = [largest] * full
    if rest == 0:
        return plan
    # Cover `rest` (< largest) exactly-or-over with a minimal (work, calls) multiset: a small DP.
    inf = (math.inf, math.inf)
    best: list[tuple[float, float]] = [inf] * (rest + 1)
    choice = [0] * (rest + 1)
    best[0] = (0, 0)
    for m in range(1, rest + 1):
        for b in sizes:
            prev = best[max(0, m - b)]
            cand = (prev[0] + b, prev[1] + 1)
            if cand < best[m]:
                best[m], choice[m] = cand, b
    tail = []
    m = rest
    while m > 0:
        tail.append(choice[m])
        m = max(0, m - choice[m])
    return plan + sorted(tail, reverse=True)


def pad_batch(x: torch.Tensor, size: int) -> torch.Tensor:
    """``x`` padded with zeros along dim 0 up to ``size`` rows (``x`` itself when already that big)."""
    n = x.shape[0]
    if n == size:
        return x
    if n > size:
        raise ValueError(f"cannot pad a batch of {n} down to {size}")
    return torch.cat([x, x.new_zeros((size - n, *x.shape[1:]))], dim=0)


def run_bucketed(
    fn: Callable[[torch.Tensor], dict[str, torch.Tensor]], x: torch.Tensor, buckets: Sequence[int]
) -> dict[str, torch.Tensor]:
    """``fn`` on ``x`` in pieces of bucket sizes (each padded up, each result sliced back),
    concatenated in order. ``fn`` maps a batch to a dict of batch-first tensors."""
    n = x.shape[0]
    if n == 0:
        raise ValueError("run_bucketed needs a non-empty batch")
    parts: list[dict[str, torch.Tensor]] = []
    start = 0
    for size in bucket_plan(n, buckets):
        take = min(size, n - start)
        out = fn(pad_batch(x[start : start + take], size))
        parts.append({k: v[:take] for k, v in out.items()})
        start += take
    if len(parts) == 1:
        return parts[0]
    return {k: torch.cat([p[k] for p in parts], dim=0) for k in parts[0]}


def ensure_recompile_limit(graphs: int) -> None:
    """Let dynamo keep at least ``graphs`` compiled variants of one function (one per bucket)."""
    import torch._dynamo.config as dynamo_config

    for name in ("recompile_limit", "cache_size_limit"):
        current = getattr(dynamo_config, name, None)
        if isinstance(current, int) and current < graphs:
            setattr(dynamo_config, name, graphs)


def compile_static(fn: Callable[..., Any], mode: str | None = None) -> Callable[..., Any]:
    """``torch.compile(fn, dynamic=False)``: one graph per input shape (per batch bucket)."""
    if mode is not None and mode not in COMPILE_MODES:
        raise ConfigError(f"Unknown compile mode {mode!r}; valid: {list(COMPILE_MODES)}")
    return torch.compile(fn, dynamic=False, mode=None if mode == "default" else mode)


# -- copy / compute overlap -------------------------------------------------------------------


def _pinned_copy(t: torch.Tensor) -> torch.Tensor:
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    out.copy_(t)
    return out


def overlapped_map(
    chunks: Iterable[torch.Tensor],
    compute: Callable[[torch.Tensor], dict[str, torch.Tensor]],
    device: torch.device,
    *,
    depth: int = 2,
) -> Iterator[dict[str, torch.Tensor]]:
    """``compute`` on each host chunk, moved to ``device``; yields the results on the host, in order.

    On CUDA: the chunk is staged in pinned memory and uploaded on a copy stream (a chunk already
    on the device, e.g. nvJPEG-decoded pixels, is used where it is); the compute
    stream waits for that upload only (an event), runs ``compute`` (which must only enqueue work:
    no host synchronisation), and the results are downloaded into pinned host tensors on a
    third stream. Up to ``depth`` chunks are in flight, so the upload of the next chunk and the
    download of the previous one overlap the current compute; the host waits only for the
    download of the oldest chunk. Elsewhere it is a plain loop (results moved to the CPU).
    """
    if device.type != "cuda":
        for chunk in chunks:
            out = compute(chunk.to(device))
            yield {k: v.cpu() for k, v in out.items()}
        return

    compute_stream = torch.cuda.current_stream(device)
    upload = torch.cuda.Stream(device)
    download = torch.cuda.Stream(device)
    inflight: deque[tuple[torch.cuda.Event, dict[str, torch.Tensor], torch.Tensor]] = deque()
    for chunk in chunks:
        if chunk.device.type == "cuda":  # already on the device (nvJPEG-decoded pixels): no host round trip
            host = dev_in = chunk.to(device)
        else:
            host = chunk if chunk.is_pinned() else _pinned_copy(chunk)
            with torch.cuda.stream(upload):
                dev_in = host.to(device, non_blocking=True)
            uploaded = torch.cuda.Event()
            uploaded.record(upload)
            compute_stream.wait_event(uploaded)
            dev_in.record_stream(compute_stream)
        out = compute(dev_in)
        computed = torch.cuda.Event()
        computed.record(compute_stream)
        download.wait_event(computed)
        host_out: dict[str, torch.Tensor] = {}
        with torch.cuda.stream(download):
            for key, value in out.items():
                dst = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
                dst.copy_(value, non_blocking=True)
                value.record_stream(download)
                host_out[key] = dst
        downloaded = torch.cuda.Event()
        downloaded.record(download)
        inflight.append((downloaded, host_out, host))
        del out, dev_in
        while len(inflight) >= max(1, depth):
            event, result, _ = inflight.popleft()
            event.synchronize()
            yield result
    while inflight:
        event, result, _ = inflight.popleft()
        event.synchronize()
        yield result
