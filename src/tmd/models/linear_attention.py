"""Linear attention for Wan's self-attention and the selective transfer between it and softmax (LinVideo).

LinVideo (Huang et al. 2025, arXiv 2510.08318) replaces a chosen number of a video DiT's self-attention
layers by linear attention. Here that is an attention *processor* installed on each block's ``attn1`` (a
diffusers ``WanAttention``): diffusers registers a processor that is an ``nn.Module`` as a submodule, so
the teacher's own parameter names stay as they are and a teacher checkpoint loads into the linearised
model unchanged; the processor adds ``attn1.processor.{feature_q, feature_k, ratio_logit}`` and the buffers
``mode``, ``feature_gain``, ``logit_gain``.

Each processor runs softmax attention, linear attention, or the selective-transfer mix
``r softmax + (1 - r) linear`` (``mode``), from the same q/k/v projections, q/k RMSNorm and rotary
embedding as diffusers' ``WanAttnProcessor`` and one output projection (it is affine, so projecting the
mix equals mixing the projections).

Choices where the paper leaves room:
- Feature map (Hedgehog): ``phi(x) = softmax(x W) (+) softmax(-x W)`` per head over ``feature_dim``
  features, separate learnable ``W`` for queries and keys (Hedgehog's split), computed in float32.
- Initialisation: ``W_q = W_k = G / d^(1/4)`` with ``G ~ N(0, 1)`` (seeded per layer). With that ``W``
  the map is FAVOR+'s positive random features with antithetic pairs (``w`` and ``-w``):
  ``E[exp(w.q') exp(w.k')] = exp(|q'|^2/2) exp(|k'|^2/2) exp(q.k / sqrt d)`` for ``q' = q / d^(1/4)``,
  and the softmax normalisers estimate the ``exp(|.|^2/2)`` factors (the query's cancels in the
  attention normalisation), so the layer starts as an estimate of the softmax layer it replaces. The
  estimate is rough at ``d`` features (its variance grows with ``|q|^2``; RMS-normed Wan queries have
  ``|q|^2 ~ d``): what makes the layer close is attention transfer, the relative squared error of
  linear against softmax attention on an evenly strided subset of ``transfer_tokens`` tokens, with q/k/v
  detached so that it trains the feature maps alone. Each mixed layer records it in its forward; the
  method adds it to its loss while selecting (:func:`take_transfer_loss`). Measured on the world teacher
  (docs/methods.md): 0.35 at init, 0.05 after 125 steps.
- Selective transfer: ``r = sigmoid(logit_gain * ratio_logit)`` per layer and ``W = feature_gain *
  feature_{q,k}``. AdamW moves a parameter by about ``lr`` a step whatever its gradient's scale, so the
  gains are what give the r's and the feature maps a faster rate than the network's weights without a
  second optimizer group (the trainer keeps one EMA'd module in one group). ``constraint = (sum r -
  target)^2`` drives the number of softmax layers to the target; ``binarise = sum (1 - |2r - 1|^beta)``
  (AdaRound's rounding regulariser) pushes each r to 0 or 1, weakly while ``beta`` is large and firmly
  as it is annealed down. :func:`round_selection` then keeps exactly ``target`` layers softmax: those
  with the largest r.
- Under FSDP the ratio logits are sharded with their block and read outside its forward by
  :func:`selection_losses`, so selective transfer runs single-process or data-parallel without sharding;
  a rounded model has no such reads.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import torch
from diffusers import WanTransformer3DModel
from diffusers.models.attention_dispatch import dispatch_attention_fn
from torch import Tensor, nn

from tmd.models.wan import WanModule

MIXED, LINEAR, SOFTMAX = 0, 1, 2
MODE_NAMES = {MIXED: "mixed", LINEAR: "linear", SOFTMAX: "softmax"}


def hedgehog_features(x: Tensor, weight: Tensor) -> Tensor:
    """``softmax(x W) (+) softmax(-x W)`` per head: x (B, N, H, d), weight (H, d, F) -> (B, N, H, 2F) in float32."""
    projected = torch.einsum("bnhd,hdf->bnhf", x.float(), weight.float())
    return torch.cat([projected.softmax(-1), (-projected).softmax(-1)], dim=-1)


def linear_attention(q: Tensor, k: Tensor, v: Tensor, feature_q: Tensor, feature_k: Tensor) -> Tensor:
    """Non-causal linear attention on (B, N, H, d) tensors, linear in N.

    ``phi(K)^T V`` (H x 2F x d) and ``sum_n phi(k_n)`` are reduced over the tokens first, so no N x N
    tensor is ever formed; features are positive, so the normaliser is too.
    """
    # float32 even under bf16 autocast: the sums run over every token of a video
    with torch.autocast(q.device.type, enabled=False):
        phi_q, phi_k = hedgehog_features(q, feature_q), hedgehog_features(k, feature_k)
        kv = torch.einsum("bnhf,bnhd->bhfd", phi_k, v.float())
        normaliser = torch.einsum("bnhf,bhf->bnh", phi_q, phi_k.sum(dim=1))
        return (torch.einsum("bnhf,bhfd->bnhd", phi_q, kv) / normaliser.unsqueeze(-1)).to(v.dtype)


def softmax_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Softmax attention on (B, N, H, d) tensors through diffusers' dispatcher, as Wan's own processor
    calls it, so that an ``attention_backend`` kernel choice (``tmd.models.fastpath``) applies here too."""
    return dispatch_attention_fn(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False)


def apply_rotary(x: Tensor, rotary: tuple[Tensor, Tensor]) -> Tensor:
    """Wan's rotary embedding on interleaved pairs, as in diffusers' ``WanAttnProcessor``."""
    cos, sin = rotary
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2).type_as(x)


class SelectiveAttention(nn.Module):
    """Processor for a Wan self-attention: softmax, linear or ``r softmax + (1 - r) linear`` by ``mode``.

    ``mode`` is a buffer so that a checkpoint or an exported generator carries which layers are linear.
    """

    def __init__(
        self,
        heads: int,
        head_dim: int,
        feature_dim: int,
        init_ratio: float,
        logit_gain: float,
        generator: torch.Generator,
        feature_gain: float = 1.0,
        transfer_tokens: int = 1024,
    ):
        super().__init__()
        if feature_dim < 1:
            raise ValueError(f"feature_dim must be >= 1, got {feature_dim}")
        if not 0 < init_ratio < 1:
            raise ValueError(f"init_ratio must lie in (0, 1) (a sigmoid never reaches 0 or 1), got {init_ratio}")
        if transfer_tokens < 1:
            raise ValueError(f"transfer_tokens must be >= 1, got {transfer_tokens}")
        if logit_gain <= 0 or feature_gain <= 0:
            raise ValueError(f"logit_gain and feature_gain must be > 0, got {logit_gain}, {feature_gain}")
        weight = torch.randn(heads, head_dim, feature_dim, generator=generator) * head_dim**-0.25 / feature_gain
        self.feature_q = nn.Parameter(weight.clone())
        self.feature_k = nn.Parameter(weight)
        # buffers, so that a state dict says how to read its raw parameters whatever linearise() was given
        self.register_buffer("feature_gain", torch.tensor(float(feature_gain)))
        self.register_buffer("logit_gain", torch.tensor(float(logit_gain)))
        # 1-D, not a scalar: FSDP2 cannot shard 0-d parameters (a linearised teacher is sharded under torchrun)
        self.ratio_logit = nn.Parameter(torch.full((1,), math.log(init_ratio / (1 - init_ratio)) / logit_gain))
        self.register_buffer("mode", torch.tensor(MIXED))
        self.transfer_tokens = transfer_tokens
        self.transfer_loss: Tensor | None = None

    @property
    def feature_maps(self) -> tuple[Tensor, Tensor]:
        return self.feature_gain * self.feature_q, self.feature_gain * self.feature_k

    @property
    def kind(self) -> int:
        return int(self.mode)

    @property
    def ratio(self) -> Tensor:
        """r, the softmax share of the output: exactly 1 or 0 once rounded."""
        if self.kind == MIXED:
            return torch.sigmoid(self.logit_gain * self.ratio_logit[0])
        return torch.tensor(float(self.kind == SOFTMAX), device=self.ratio_logit.device)

    def set_mode(self, kind: int) -> None:
        if kind not in MODE_NAMES:
            raise ValueError(f"mode must be one of {MODE_NAMES}, got {kind}")
        self.mode.fill_(kind)

    def _transfer_loss(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Relative squared error of linear against softmax attention on an evenly strided subset of at most
        ``transfer_tokens`` tokens: what it holds until the backward stays small at any video length."""
        n = q.shape[1]
        index = torch.linspace(0, n - 1, min(n, self.transfer_tokens), device=q.device).round().long()
        # inputs detached: this term trains the feature maps alone, towards the softmax output they replace
        q, k, v = (x.detach()[:, index] for x in (q, k, v))
        soft = softmax_attention(q, k, v).float()
        error = linear_attention(q, k, v, *self.feature_maps).float() - soft
        return error.pow(2).mean() / soft.pow(2).mean().clamp_min(1e-12)

    def forward(
        self,
        attn: nn.Module,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        rotary_emb: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("SelectiveAttention replaces self-attention only (no encoder states, no mask)")
        if getattr(attn, "fused_projections", False):
            q, k, v = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        q = attn.norm_q(q).unflatten(2, (attn.heads, -1))
        k = attn.norm_k(k).unflatten(2, (attn.heads, -1))
        v = v.unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            q, k = apply_rotary(q, rotary_emb), apply_rotary(k, rotary_emb)
        kind = self.kind
        if kind == SOFTMAX:
            out = softmax_attention(q, k, v)
        elif kind == LINEAR:
            out = linear_attention(q, k, v, *self.feature_maps)
        else:
            r = self.ratio.to(v.dtype)
            out = r * softmax_attention(q, k, v) + (1 - r) * linear_attention(q, k, v, *self.feature_maps)
            if torch.is_grad_enabled():
                self.transfer_loss = self._transfer_loss(q, k, v)
        out = out.flatten(2, 3).type_as(q)
        return attn.to_out[1](attn.to_out[0](out))


def _transformer(model: WanModule | WanTransformer3DModel) -> WanTransformer3DModel:
    transformer = model.transformer if isinstance(model, WanModule) else model
    if not isinstance(transformer, WanTransformer3DModel):
        raise TypeError(f"expected a WanModule or a WanTransformer3DModel, got {type(model).__name__}")
    return transformer


def linearise(
    model: WanModule | WanTransformer3DModel,
    feature_dim: int | None = None,
    init_ratio: float = 0.5,
    logit_gain: float = 1.0,
    feature_gain: float = 1.0,
    transfer_tokens: int = 1024,
    seed: int = 0,
    copy_model: bool = False,
) -> WanModule | WanTransformer3DModel:
    """Install a :class:`SelectiveAttention` on every block's self-attention (in place, or on a copy).

    Every layer starts mixed with softmax share ``init_ratio``; ``feature_dim`` defaults to the head
    dimension. The output equals the original model's for ``init_ratio -> 1``.
    """
    if copy_model:
        model = copy.deepcopy(model)
    transformer = _transformer(model)
    heads, head_dim = transformer.config.num_attention_heads, transformer.config.attention_head_dim
    feature_dim = head_dim if feature_dim is None else feature_dim
    for index, block in enumerate(transformer.blocks):
        attn = block.attn1
        if attn.is_cross_attention or attn.add_k_proj is not None:
            raise ValueError(f"block {index}: attn1 is not a plain self-attention; cannot linearise it")
        if isinstance(attn.processor, SelectiveAttention):
            raise ValueError(f"block {index} is already linearised")
        weight = attn.to_q.weight
        processor = SelectiveAttention(
            heads,
            head_dim,
            feature_dim,
            init_ratio,
            logit_gain,
            torch.Generator().manual_seed(seed + index),
            feature_gain,
            transfer_tokens,
        )
        attn.set_processor(processor.to(device=weight.device, dtype=weight.dtype))
    return model


def selective_layers(model: WanModule | WanTransformer3DModel) -> list[SelectiveAttention]:
    """The processors of every block, in block order; an error if the model is not linearised."""
    processors = [block.attn1.processor for block in _transformer(model).blocks]
    plain = [i for i, p in enumerate(processors) if not isinstance(p, SelectiveAttention)]
    if plain:
        raise ValueError(f"blocks {plain} are not linearised; call tmd.models.linear_attention.linearise first")
    return processors


def softmax_ratios(model: WanModule | WanTransformer3DModel) -> Tensor:
    """r per layer (differentiable while mixed): their sum is the soft count of softmax layers."""
    return torch.stack([p.ratio for p in selective_layers(model)])


def is_rounded(model: WanModule | WanTransformer3DModel) -> bool:
    return all(p.kind != MIXED for p in selective_layers(model))


def check_target(model: WanModule | WanTransformer3DModel, target: int) -> None:
    layers = len(selective_layers(model))
    if not isinstance(target, int) or not 0 <= target < layers:
        raise ValueError(
            f"the target number of softmax layers must be an integer in [0, {layers - 1}] for a model with "
            f"{layers} layers (at {layers} nothing would be linear), got {target!r}"
        )


def selection_losses(model: WanModule | WanTransformer3DModel, target: int, beta: float) -> tuple[Tensor, Tensor]:
    """``(sum round(r) - target)^2`` and ``sum (1 - |2r - 1|^beta)``: the count constraint on the rounded
    count (its gradient passed straight through the rounding, so it pushes every r alike while the rounded
    count misses the target, and not at all once it is met) and the 0/1 regulariser."""
    check_target(model, target)
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    r = softmax_ratios(model)
    rounded = r + (r.round() - r).detach()
    return (rounded.sum() - target) ** 2, (1 - (2 * r - 1).abs() ** beta).sum()


@torch.no_grad()
def round_selection(model: WanModule | WanTransformer3DModel, target: int) -> list[int]:
    """Make the ``target`` layers with the largest r pure softmax and the rest pure linear.

    Ties go to the earlier layer. Returns the indices of the linear layers.
    """
    check_target(model, target)
    layers = selective_layers(model)
    ratios = softmax_ratios(model).float().cpu()
    order = sorted(range(len(layers)), key=lambda i: (-float(ratios[i]), i))
    keep = set(order[:target])
    for index, layer in enumerate(layers):
        layer.set_mode(SOFTMAX if index in keep else LINEAR)
    return linear_layers(model)


def take_transfer_loss(model: WanModule | WanTransformer3DModel) -> Tensor | None:
    """Mean attention-transfer loss of the mixed layers' last forward with gradients, cleared once read
    (None when no layer recorded one)."""
    losses = []
    for layer in selective_layers(model):
        if layer.transfer_loss is not None:
            losses.append(layer.transfer_loss)
            layer.transfer_loss = None
    return torch.stack(losses).mean() if losses else None


def linear_layers(model: WanModule | WanTransformer3DModel) -> list[int]:
    """Indices of the blocks whose self-attention is pure linear attention."""
    return [i for i, p in enumerate(selective_layers(model)) if p.kind == LINEAR]


def describe_layers(model: WanModule | WanTransformer3DModel) -> str:
    """One word per block, e.g. ``softmax linear mixed(r=0.42)``: what a log or report shows."""
    words = []
    for layer in selective_layers(model):
        word = MODE_NAMES[layer.kind]
        words.append(f"{word}(r={float(layer.ratio.detach()):.2f})" if layer.kind == MIXED else word)
    return " ".join(words)


# ----------------------------------------------------------------------------------------------
# A LinVideo run's export, read and checked (data configs check ``linearised_teacher`` with it).

MODE_KEY = "attn1.processor.mode"
"""The end of the state-dict key that holds each layer's mode (softmax, linear or mixed) in an export."""


def export_config(weights: str | Path) -> dict:
    """The method config of a LinVideo run's export (``student.safetensors``), checked to come from one."""
    from safetensors import SafetensorError, safe_open

    weights = Path(weights)
    if not weights.is_file():
        raise FileNotFoundError(f"no LinVideo weights at {weights}")
    try:
        with safe_open(str(weights), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except SafetensorError as e:
        raise ValueError(f"{weights} is not a safetensors file: {e}") from None
    if metadata.get("method") != "linvideo":
        raise ValueError(f"{weights} was written by method {metadata.get('method')!r}, not by a linvideo run")
    return json.loads(metadata.get("method_config", "{}"))


def check_teacher_export(weights: str | Path) -> None:
    """Raise unless ``weights`` is a LinVideo export whose selection was rounded, fit to be distilled from.

    A run stopped before ``selection_steps`` still computes softmax attention in every (mixed) layer:
    as a teacher it would cost more than the one it was made from, and it would train its r's without
    the count constraint.
    """
    from safetensors import safe_open

    export_config(weights)
    with safe_open(str(weights), framework="pt") as handle:
        modes = {key: int(handle.get_tensor(key)) for key in handle.keys() if key.endswith(MODE_KEY)}
    if not modes:
        raise ValueError(f"{weights} holds no attention modes ('*.{MODE_KEY}'): it is not a linearised model")
    mixed = [key for key, mode in modes.items() if mode == MIXED]
    if mixed:
        raise ValueError(
            f"{weights} was exported before selective transfer was rounded ({len(mixed)} of {len(modes)} layers "
            "still mixed): train the linvideo run for more than method.selection_steps steps"
        )


def check_linearised_teacher(weights: str | None) -> None:
    """Validation of ``data.linearised_teacher`` (every data kind has it); None means the plain teacher."""
    if weights is None:
        return
    try:
        check_teacher_export(weights)
    except (OSError, ValueError) as e:
        raise ValueError(f"data.linearised_teacher: {e}") from None
