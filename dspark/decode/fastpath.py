"""A lean forward for Llama-family models (llama, mistral without sliding window, qwen2), used by the
decoder's hot loop instead of the Hugging Face `forward`.

Why: for small models every forward is dominated by per-call overhead (decorators, output capture,
mask construction, KV concatenation), and a speculative step runs K + 1 forwards. This path uses the
model's own weights and modules with:
- no copy of any weight: each projection is one `F.linear` on the model's own parameters (the LM head
  too, so tied embeddings stay tied). Weight updates made in place (an optimizer step,
  `load_state_dict`) are seen at once; after moving the model to another dtype or device, build a new
  decoder. (An earlier version kept transposed, concatenated copies of every projection and the LM
  head on CPU: twice the weights in memory. Measured against it, decoding in one process: the
  built-in pair -2% (float32, batch 1 and 8); a 135M model +13% at batch 1 in bf16, the same at
  batch 1 and -9% at batch 8 in float32, where MKL multiplies few rows by a transposed operand
  slower. Transposing the model's own parameters in place would change the layout every other user
  of the model sees: HF generate, training, saving.)
- a preallocated KV buffer per layer ([B, kv_heads, capacity, head_dim], grown by doubling) written
  in place: no per-step re-allocation, rollback is just a shorter length;
- the model's own rotary embedding and RMSNorm modules (so rope scaling variants and norm dtype
  handling are exactly Hugging Face's), and SDPA with the decoder's explicit mask (or none for a
  one-token step without holes).
It computes the same function as the HF forward (checked against it in tests to float rounding).
Models it does not recognise go through the generic HF path (`engine._Runner`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SUPPORTED_TYPES = {"llama", "mistral", "qwen2"}


def supports(model) -> bool:
    """True when `model` is a causal LM whose layers have exactly the Llama structure."""
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "model_type", None) not in SUPPORTED_TYPES:
        return False
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True) and \
            cfg.sliding_window < getattr(cfg, "max_position_embeddings", 0):
        return False
    base = getattr(model, "model", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if base is None or head is None:
        return False
    # The lean forward multiplies by `.weight` as a dense matrix: a quantized layer (quanto, bitsandbytes,
    # torchao tensor subclasses) would crash or be silently dequantized into a full-precision copy.
    from dspark.quantize.loading import has_quantized_linears

    if has_quantized_linears(model):
        return False
    if not all(hasattr(base, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return False
    for layer in base.layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attn is None or mlp is None or not all(hasattr(attn, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj")):
            return False
        if hasattr(attn, "q_norm") or hasattr(attn, "k_norm") or hasattr(attn, "sinks"):
            return False
        if not all(hasattr(mlp, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            return False
        if not all(hasattr(layer, a) for a in ("input_layernorm", "post_attention_layernorm")):
            return False
    return True


def _linear(module) -> tuple:
    """(weight [out, in], bias [out] or None) of a Linear: its own Parameters, for `F.linear`, which
    skips the module call's overhead. Holding the Parameter objects (not their data) keeps this a view
    of the model: nothing is copied, and in-place updates are seen."""
    return module.weight, module.bias


KV_CAPACITY = 256  # slots a new KVBuffer holds per row before it first doubles


class KVBuffer:
    """Preallocated keys/values for every layer: [B, kv_heads, capacity, head_dim] each."""

    def __init__(self, layers: int, batch: int, kv_heads: int, head_dim: int, dtype, device,
                 capacity: int = KV_CAPACITY):
        shape = (batch, kv_heads, capacity, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2]

    def reserve(self, slots: int) -> None:
        if slots <= self.capacity:
            return
        new_cap = max(slots, 2 * self.capacity)
        for buf in (self.k, self.v):
            for i, t in enumerate(buf):
                grown = t.new_zeros(t.shape[0], t.shape[1], new_cap, t.shape[3])
                grown[:, :, : self.length] = t[:, :, : self.length]
                buf[i] = grown

    def crop(self, new_length: int) -> None:
        self.length = new_length

    def select(self, idx: torch.Tensor) -> None:
        self.k = [t.index_select(0, idx) for t in self.k]
        self.v = [t.index_select(0, idx) for t in self.v]

    def get_seq_length(self) -> int:
        return self.length


STATIC_ROPE_TYPES = {"default", "linear", "llama3", "yarn"}


class LeanLlama:
    """The lean forward of one Llama-family causal LM (see the module docstring)."""

    def __init__(self, model):
        self.model = model
        cfg = model.config
        base = model.model
        self.embed = base.embed_tokens
        self.norm = base.norm
        self.rotary = base.rotary_emb
        p = next(model.parameters())
        self.dtype, self.device = p.dtype, p.device
        self.head = _linear(model.get_output_embeddings())
        self.layers = []
        for layer in base.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.layers.append((layer.input_layernorm, _linear(attn.q_proj), _linear(attn.k_proj),
                                _linear(attn.v_proj), _linear(attn.o_proj), layer.post_attention_layernorm,
                                _linear(mlp.gate_proj), _linear(mlp.up_proj), _linear(mlp.down_proj), mlp.act_fn))
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.q_size = self.n_heads * self.head_dim
        self.scaling = getattr(base.layers[0].self_attn, "scaling", self.head_dim ** -0.5)
        # float32 RMSNorm as one fused op (bit-identical to HF's module in float32); other dtypes keep
        # HF's module, which normalises in float32 and casts back
        self.fused_norm = self.dtype == torch.float32 and all(
            hasattr(m, "variance_epsilon") and type(m).__name__.endswith("RMSNorm") for m in self._norms())
        # cos/sin of every position, computed once by the model's own rotary module (static rope types
        # only: dynamic scaling depends on the sequence length)
        self.rope_table = getattr(self.rotary, "rope_type", "default") in STATIC_ROPE_TYPES
        self._cos = self._sin = None

    def _norms(self):
        yield self.norm
        for layer in self.layers:
            yield layer[0]
            yield layer[5]

    def _rms(self, module, x):
        if self.fused_norm:
            return F.rms_norm(x, (x.shape[-1],), module.weight, module.variance_epsilon)
        return module(x)

    def _rope(self, x: torch.Tensor, pos: torch.Tensor):
        """cos, sin: [B, T, 1, head_dim] for the positions `pos` [B, T]."""
        if not self.rope_table:
            cos, sin = self.rotary(x, pos)
            return cos.unsqueeze(2), sin.unsqueeze(2)
        need = int(pos.max()) + 1
        if self._cos is None or self._cos.shape[0] < need:
            n = max(need, 2 * (0 if self._cos is None else self._cos.shape[0]), 256)
            cos, sin = self.rotary(x, torch.arange(n, device=x.device)[None])
            self._cos, self._sin = cos[0], sin[0]
        return self._cos[pos].unsqueeze(2), self._sin[pos].unsqueeze(2)

    def new_cache(self, batch: int, capacity: int = KV_CAPACITY) -> KVBuffer:
        return KVBuffer(len(self.layers), batch, self.n_kv, self.head_dim, self.dtype, self.device, capacity)

    def __call__(self, ids: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor | None, cache: KVBuffer,
                 n_logits: int, want_hidden: bool):
        """ids, pos: [B, T]; mask: bool [B, 1, T, S] (S = cache length + T) or None for plain attention
        to every cached slot; -> (logits [B, n_logits, V] or None, final hidden [B, H] or None)."""
        b, t = ids.shape
        n0 = cache.length
        s = n0 + t
        cache.reserve(s)
        x = self.embed(ids)
        cos, sin = self._rope(x, pos)
        half = self.head_dim // 2
        nqk = self.n_heads + self.n_kv
        for i, (ln1, q_proj, k_proj, v_proj, o_proj, ln2, gate, up, down, act) in enumerate(self.layers):
            h = self._rms(ln1, x)
            qk = torch.cat((F.linear(h, *q_proj), F.linear(h, *k_proj)), dim=-1).view(b, t, nqk, self.head_dim)
            # rotary on q and k together: x * cos + rotate_half(x) * sin
            qk = qk * cos + torch.cat((-qk[..., half:], qk[..., :half]), dim=-1) * sin
            q = qk[:, :, : self.n_heads].transpose(1, 2)
            kb, vb = cache.k[i], cache.v[i]
            kb[:, :, n0:s] = qk[:, :, self.n_heads:].transpose(1, 2)
            vb[:, :, n0:s] = F.linear(h, *v_proj).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
            a = F.scaled_dot_product_attention(q, kb[:, :, :s], vb[:, :, :s], attn_mask=mask, scale=self.scaling,
                                               enable_gqa=self.n_kv != self.n_heads)
            x = x + F.linear(a.transpose(1, 2).reshape(b, t, self.q_size), *o_proj)
            h = self._rms(ln2, x)
            x = x + F.linear(act(F.linear(h, *gate)) * F.linear(h, *up), *down)
        cache.length = s
        if not n_logits and not want_hidden:
            return None, None
        x = self._rms(self.norm, x[:, -max(n_logits, 1):])
        logits = F.linear(x[:, -n_logits:], *self.head) if n_logits else None
        return logits, (x[:, -1] if want_hidden else None)
