"""An EAGLE-3-style draft head: one decoder layer that reads the target's own hidden states.

Architecture (EAGLE-3, arXiv 2503.01840, as implemented by vLLM's `speculators`,
vllm-project/speculators @ c05b95b: `src/speculators/models/eagle3/core.py`, `model_definitions.py`,
`src/speculators/model.py` `DraftVocabMixin`; and loaded by vLLM's `llama_eagle3.py`):

    features g_i = cat(h_low_i, h_mid_i, h_high_i)           [3 H]   target hidden states at position i
    h        = fc(g_i)                                         [H]     (step 0: projected target features)
    x        = cat(input_layernorm(embed(t)), hidden_norm(h))  [2 H]   t = the token at position i + 1
    residual = hidden_norm(h) if norm_before_residual else h
    a        = residual + o_proj(attention(q_proj(x), k_proj(x), v_proj(x)))   q/k/v read 2 H
    h'       = a + mlp(post_attention_layernorm(a))            [H]     the head's own hidden state
    logits   = lm_head(norm(h'))                               [V_d]   scores for the token at i + 2

`h'` (before the final norm) is what the next draft step reads instead of `fc(g)`: at decode time the
head drafts token i + 3 from (h', embed(drafted token i + 2)), and so on. Layer ids follow vLLM's
`eagle_aux_hidden_state_layer_ids`: id k is the residual stream ENTERING decoder layer k, i.e.
transformers' `output_hidden_states[k]` (index 0 = the embeddings). Defaults: speculators'
`[2, L // 2, L - 3]` (SpecForge takes the same three) when those are distinct; shallow targets
(L < 7, e.g. the built-in 6-layer tiny-code, where L // 2 == L - 3) get `round(L * (1/6, 1/2, 5/6))`
((1, 3, 5) for tiny-code; (0, 1, 2) for L = 3).

Training ("training-time test", TTT; `unroll`): step 0 runs every position teacher-forced on the
target's features; step s > 0 feeds each position the head's OWN hidden state from step s - 1 and
the ground-truth token one further on (speculators and SpecForge both teacher-force the tokens and
self-feed the features). The attention of step s at position i sees the step-0 keys of positions
<= i and the keys that position i itself produced at steps 1..s: exactly the keys a decode-time
draft chain from position i has (speculators' `diagonal_draft_mask_mod`). So the decode-time API
(`start` / `step`), run position by position, reproduces `unroll`'s logits (tested).

Matches speculators / vLLM: parameter names and shapes (`fc`, `layers.0.{input_layernorm,
hidden_norm, post_attention_layernorm}`, `layers.0.self_attn.{q,k,v,o}_proj`,
`layers.0.mlp.{gate,up,down}_proj`, `norm`, `lm_head`, `embed_tokens`, `d2t`, `t2d`), the config
(`speculators_model_type: eagle3`, `speculators_config`, `transformer_layer_config` a LlamaConfig with
one layer), the d2t offset convention (`dspark.models.vocab_map`), the frozen target embedding.
Differs: dspark writes `norm_before_fc`, `fc_norm` and `norm_output` as false (the classic EAGLE-3
layer; speculators' newest training defaults turn them on as "EAGLE 3.1", which older vLLM
releases do not read); the head's hidden size must equal the target's (speculators requires it too);
only Llama-style layers (RMSNorm, RoPE, SwiGLU MLP) whatever the target's family; the LM head is
initialised from the target's rows and frozen unless `train_lm_head` (speculators freezes it).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from dspark.errors import DataError, DsparkError
from dspark.models.vocab_map import VocabMap, identity_map

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
ARCHITECTURE = "Eagle3Speculator"
# vLLM fills a missing norm_before_residual with True and speculators trains with it on by default
DEFAULT_NORM_BEFORE_RESIDUAL = True
DEFAULT_SPECULATIVE_TOKENS = 3  # speculators' --ttt-steps default, written as speculative_tokens


def default_aux_layers(num_layers: int) -> tuple[int, int, int]:
    """The three target layer ids a head reads (see the module docstring)."""
    if num_layers < 3:
        raise DsparkError(f"an EAGLE-3 head reads 3 distinct target layers; the target has {num_layers}")
    ids = (2, num_layers // 2, num_layers - 3)
    if not ids[0] < ids[1] < ids[2]:
        ids = tuple(round(num_layers * f) for f in (1 / 6, 1 / 2, 5 / 6))
    if not ids[0] < ids[1] < ids[2]:
        ids = (0, 1, 2)  # three layers: read them all
    return ids  # type: ignore[return-value]


def check_aux_layers(ids: Sequence[int], num_layers: int) -> tuple[int, ...]:
    ids = tuple(int(i) for i in ids)
    if len(ids) != 3 or len(set(ids)) != 3 or min(ids) < 0 or max(ids) >= num_layers:
        raise DsparkError(f"head layers must be 3 distinct ids in [0, {num_layers - 1}] (the target has "
                          f"{num_layers} layers), got {list(ids)}")
    return ids


def layer_config_for(target_config, vocab_size: int | None = None):
    """The LlamaConfig of the head's one decoder layer, from the target's config (any family: the
    sizes, norm eps, RoPE and context are taken over; the layer itself is always Llama-style)."""
    from transformers import LlamaConfig

    c = target_config.get_text_config() if hasattr(target_config, "get_text_config") else target_config
    heads = int(c.num_attention_heads)
    hidden = int(c.hidden_size)
    kw: dict[str, Any] = dict(
        vocab_size=int(vocab_size if vocab_size is not None else c.vocab_size), hidden_size=hidden,
        intermediate_size=int(getattr(c, "intermediate_size", None) or 3 * hidden), num_hidden_layers=1,
        num_attention_heads=heads, num_key_value_heads=int(getattr(c, "num_key_value_heads", None) or heads),
        head_dim=int(getattr(c, "head_dim", None) or hidden // heads), hidden_act="silu",
        rms_norm_eps=float(getattr(c, "rms_norm_eps", 1e-6)),
        max_position_embeddings=int(getattr(c, "max_position_embeddings", 2048)),
        attention_bias=False, mlp_bias=False, tie_word_embeddings=False)
    rope = getattr(c, "rope_parameters", None)
    if rope:
        kw["rope_parameters"] = dict(rope)
    return LlamaConfig(**kw)


@dataclass
class Eagle3Config:
    """Everything that shapes a head (and what config.json records)."""

    layer: Any  # transformers LlamaConfig: the decoder layer; its vocab_size is the TARGET's
    aux_layer_ids: tuple[int, int, int]
    draft_vocab_size: int
    norm_before_residual: bool = DEFAULT_NORM_BEFORE_RESIDUAL
    speculative_tokens: int = DEFAULT_SPECULATIVE_TOKENS
    verifier_name_or_path: str | None = None
    verifier_architectures: list[str] = field(default_factory=list)

    @property
    def hidden_size(self) -> int:
        return int(self.layer.hidden_size)

    @property
    def target_vocab_size(self) -> int:
        return int(self.layer.vocab_size)

    def to_speculators(self) -> dict[str, Any]:
        """config.json in vLLM's speculators format (see the module docstring)."""
        layer = self.layer.to_dict()
        for k in ("transformers_version", "_name_or_path", "dtype", "torch_dtype"):
            layer.pop(k, None)
        layer["architectures"] = ["LlamaForCausalLM"]
        return {
            "architectures": [ARCHITECTURE],
            "speculators_model_type": "eagle3",
            "speculators_config": {
                "algorithm": "eagle3",
                "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": self.speculative_tokens,
                                      "verifier_accept_k": 1, "accept_tolerance": 0.0}],
                "default_proposal_method": "greedy",
                "verifier": {"name_or_path": self.verifier_name_or_path,
                             "architectures": list(self.verifier_architectures)},
            },
            "transformer_layer_config": layer,
            "draft_vocab_size": self.draft_vocab_size,
            "target_hidden_size": self.hidden_size,
            "eagle_aux_hidden_state_layer_ids": list(self.aux_layer_ids),
            "norm_before_residual": self.norm_before_residual,
            "norm_before_fc": False,
            "fc_norm": False,
            "norm_output": False,
            "embed_requires_grad": False,
        }

    @classmethod
    def from_speculators(cls, d: dict[str, Any], where: str = CONFIG_FILE) -> "Eagle3Config":
        from transformers import LlamaConfig

        try:
            if d.get("speculators_model_type") != "eagle3":
                raise KeyError("speculators_model_type is not 'eagle3'")
            for flag in ("norm_before_fc", "fc_norm", "norm_output"):
                if d.get(flag):
                    raise KeyError(f"{flag} = true is not supported by dspark's head")
            spec = d["speculators_config"]
            layer = LlamaConfig(**{k: v for k, v in d["transformer_layer_config"].items() if k != "model_type"})
            th = d.get("target_hidden_size")
            if th is not None and int(th) != int(layer.hidden_size):
                raise KeyError(f"target_hidden_size {th} differs from the layer's hidden size")
            return cls(layer=layer, aux_layer_ids=tuple(d["eagle_aux_hidden_state_layer_ids"]),
                       draft_vocab_size=int(d["draft_vocab_size"]),
                       norm_before_residual=bool(d.get("norm_before_residual", DEFAULT_NORM_BEFORE_RESIDUAL)),
                       speculative_tokens=int(spec["proposal_methods"][0]["speculative_tokens"]),
                       verifier_name_or_path=spec["verifier"].get("name_or_path"),
                       verifier_architectures=list(spec["verifier"].get("architectures") or []))
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise DataError(f"{where}: not an EAGLE-3 head config dspark can load ({e})") from None


# ---------------------------------------------------------------------------------------------
# The layer
# ---------------------------------------------------------------------------------------------

def _rms_norm(size: int, eps: float) -> nn.Module:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    return LlamaRMSNorm(size, eps=eps)


class Eagle3Attention(nn.Module):
    """Multi-head (grouped-query) attention whose q/k/v read 2 H inputs; RoPE as the target's."""

    def __init__(self, c):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = nn.Linear(2 * c.hidden_size, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(2 * c.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(2 * c.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, c.hidden_size, bias=False)

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x [B, T, 2H] -> q [B, h, T, d], k [B, h_kv, T, d], v [B, h_kv, T, d] (RoPE applied)."""
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        return q, k, v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """q [B, h, T, d], k/v [B, h_kv, N, d], allowed [B, T, N] bool -> [B, T, H]."""
        rep = self.heads // self.kv_heads
        if rep > 1:
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        out = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None])
        b, _, t, _ = q.shape
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))


class Eagle3Layer(nn.Module):
    """The head's decoder layer (see the module docstring for the formula)."""

    def __init__(self, c, norm_before_residual: bool):
        super().__init__()
        from transformers.models.llama.modeling_llama import LlamaMLP

        self.norm_before_residual = norm_before_residual
        self.input_layernorm = _rms_norm(c.hidden_size, c.rms_norm_eps)
        self.hidden_norm = _rms_norm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = _rms_norm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Eagle3Attention(c)
        self.mlp = LlamaMLP(c)

    def forward(self, embeds: torch.Tensor, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                past_k: torch.Tensor | None, past_v: torch.Tensor | None, allowed: torch.Tensor):
        """embeds, hidden [B, T, H]; past_k/v [B, h_kv, N, d] or None; allowed [B, T, N + T] bool
        (the new keys come last) -> (hidden' [B, T, H], new k, new v [B, h_kv, T, d])."""
        normed = self.hidden_norm(hidden)
        residual = normed if self.norm_before_residual else hidden
        x = torch.cat([self.input_layernorm(embeds), normed], dim=-1)
        q, k, v = self.self_attn.project(x, cos, sin)
        keys = k if past_k is None else torch.cat([past_k, k], dim=2)
        values = v if past_v is None else torch.cat([past_v, v], dim=2)
        h = residual + self.self_attn.attend(q, keys, values, allowed)
        return h + self.mlp(self.post_attention_layernorm(h)), k, v


# ---------------------------------------------------------------------------------------------
# The head
# ---------------------------------------------------------------------------------------------

@dataclass
class HeadCache:
    """The head's own KV cache at decode time: keys / values [B, h_kv, N, d] (None while empty) and
    `valid` [B, N] bool (an entry a row must not attend to, e.g. a rejected draft of another row in a
    shared batch, is set False by the caller)."""

    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None
    valid: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.keys is None else int(self.keys.shape[2])

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        new_valid = torch.ones(k.shape[0], k.shape[2], dtype=torch.bool, device=k.device)
        if self.keys is None:
            self.keys, self.values, self.valid = k, v, new_valid
        else:
            self.keys = torch.cat([self.keys, k], dim=2)
            self.values = torch.cat([self.values, v], dim=2)
            self.valid = torch.cat([self.valid, new_valid], dim=1)

    def crop(self, length: int) -> None:
        """Keep the first `length` entries (drop rejected drafts)."""
        if not 0 <= length <= self.length:
            raise DsparkError(f"cannot crop a head cache of {self.length} entries to {length}")
        if self.keys is not None:
            self.keys, self.values = self.keys[:, :, :length], self.values[:, :, :length]
            self.valid = self.valid[:, :length]


class Eagle3Head(nn.Module):
    """An EAGLE-3 head (see the module docstring). Build it with `init_head` (from a target) or
    `load_head` (from a saved folder)."""

    def __init__(self, config: Eagle3Config, vocab_map: VocabMap | None = None):
        super().__init__()
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        c = config.layer
        self.config = config
        h = config.hidden_size
        vmap = vocab_map if vocab_map is not None else identity_map(config.target_vocab_size)
        if vmap.target_vocab_size != config.target_vocab_size or vmap.draft_vocab_size != config.draft_vocab_size:
            raise DataError(f"vocabulary map ({vmap.draft_vocab_size} of {vmap.target_vocab_size} ids) does not fit "
                            f"the head ({config.draft_vocab_size} of {config.target_vocab_size})")
        self.vocab_map = vmap
        self.embed_tokens = nn.Embedding(config.target_vocab_size, h)
        self.embed_tokens.weight.requires_grad_(False)
        self.fc = nn.Linear(3 * h, h, bias=False)
        self.layers = nn.ModuleList([Eagle3Layer(c, config.norm_before_residual)])
        self.norm = _rms_norm(h, c.rms_norm_eps)
        self.lm_head = nn.Linear(h, config.draft_vocab_size, bias=False)
        self.rotary_emb = LlamaRotaryEmbedding(config=c)
        if not vmap.is_identity:  # speculators / vLLM: the maps exist only for a reduced vocabulary
            self.register_buffer("d2t", vmap.d2t.clone())
            self.register_buffer("t2d", vmap.t2d.clone())

    # -- pieces -------------------------------------------------------------------------------
    @staticmethod
    def fuse(low: torch.Tensor, mid: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        """Three [B, T, H] target hidden states -> features [B, T, 3H] (in the head's layer order)."""
        return torch.cat([low, mid, high], dim=-1)

    def trainable(self) -> nn.ModuleDict:
        """The trained parameters as one module (checkpoints and optimizers use it; it shares the
        head's tensors): fc, the layer, the final norm, and lm_head when it trains."""
        parts = {"fc": self.fc, "layers": self.layers, "norm": self.norm}
        if self.lm_head.weight.requires_grad:
            parts["lm_head"] = self.lm_head
        return nn.ModuleDict(parts)

    def _inputs(self, inputs: torch.Tensor) -> torch.Tensor:
        """Target features [.., 3H] -> fc(features); the head's own hidden state [.., H] as is."""
        h = self.config.hidden_size
        if inputs.shape[-1] == 3 * h:
            return self.fc(inputs)
        if inputs.shape[-1] == h:
            return inputs
        raise DsparkError(f"head inputs must be target features [.., {3 * h}] or the head's hidden state "
                          f"[.., {h}], got last dimension {inputs.shape[-1]}")

    def _run(self, hidden: torch.Tensor, token_ids: torch.Tensor, positions: torch.Tensor,
             past_k, past_v, allowed: torch.Tensor):
        cos, sin = self.rotary_emb(hidden, positions)
        embeds = self.embed_tokens(token_ids).to(hidden.dtype)
        return self.layers[0](embeds, hidden, cos, sin, past_k, past_v, allowed)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The head's hidden state [..., H] -> draft logits [..., V_d]."""
        return self.lm_head(self.norm(hidden))

    # -- decode-time API ----------------------------------------------------------------------
    def start(self) -> HeadCache:
        """An empty cache for a new batch."""
        return HeadCache()

    def step(self, inputs: torch.Tensor, token_ids: torch.Tensor, positions: torch.Tensor,
             cache: HeadCache) -> tuple[torch.Tensor, torch.Tensor]:
        """Run T new positions and append their keys to `cache`.

        Args:
            inputs: [B, T, 3H] the target's fused features of positions p (after the target saw the
                token at p), or [B, T, H] the head's own hidden state returned by the previous step.
            token_ids: [B, T] target ids of the tokens at p + 1 (the head's input token).
            positions: [B, T] positions of those tokens (p + 1), as the target numbers them.
            cache: the head's cache; the new positions attend to all its valid entries and causally
                to each other.
        Returns:
            (logits [B, T, V_d] over the draft vocabulary (`vocab_map.to_target` maps ids; for
            the token at p + 2), hidden [B, T, H] to feed back as `inputs` for the next draft step).
        """
        b, t = token_ids.shape
        hidden = self._inputs(inputs)
        causal = torch.ones(t, t, dtype=torch.bool, device=hidden.device).tril()
        allowed = causal.expand(b, t, t)
        if cache.length:
            allowed = torch.cat([cache.valid[:, None, :].expand(b, t, cache.length), allowed], dim=-1)
        out, k, v = self._run(hidden, token_ids, positions, cache.keys, cache.values, allowed)
        cache.append(k, v)
        return self.logits(out), out

    # -- training forward ---------------------------------------------------------------------
    def unroll(self, features: torch.Tensor, token_ids: torch.Tensor, positions: torch.Tensor,
               valid: torch.Tensor, steps: int, anchors: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Training-time test over whole sequences (see the module docstring).

        Args:
            features: [B, T, 3H] target features of positions p_i (index i).
            token_ids: [B, T] the token at p_i + 1 (index i's step-0 input); step s reads
                token_ids[:, i + s].
            positions: [B, T] positions of token_ids; step s adds s.
            valid: [B, T] bool, True on real entries (right padding is False).
            steps: number of unrolled steps S >= 1.
            anchors: [B, A] long, the indices whose draft chains are unrolled (None: all T). Step 0
                runs on every index (its keys are every chain's context); steps >= 1 only on the
                anchors, which saves the work of chains nobody scores (e.g. inside the prompt).
        Returns:
            S hidden states [B, A, H] (`logits` turns them into draft logits): step s at anchor j
            (index i = anchors[b, j]) scores the token at p_i + 2 + s. Entries whose i + s runs past
            the row's end are garbage: mask them.
        """
        b, t = token_ids.shape
        dev = features.device
        eye = torch.eye(t, dtype=torch.bool, device=dev)
        causal = torch.ones(t, t, dtype=torch.bool, device=dev).tril()
        allowed0 = (causal[None] & valid[:, None, :]) | eye[None]  # no query may see nothing
        h0, past_k, past_v = self._run(self.fc(features), token_ids, positions, None, None, allowed0)
        if anchors is None:
            anchors = torch.arange(t, device=dev)[None].expand(b, t)
        a = anchors.shape[1]
        hidden = h0.gather(1, anchors[..., None].expand(b, a, h0.shape[-1]))
        out = [hidden]
        diag = torch.eye(a, dtype=torch.bool, device=dev).expand(b, a, a)
        allowed = torch.cat([allowed0.gather(1, anchors[..., None].expand(b, a, t)), diag], dim=-1)
        base_pos = positions.gather(1, anchors)
        for s in range(1, steps):
            tokens = token_ids.gather(1, (anchors + s).clamp(max=t - 1))
            hidden, k, v = self._run(hidden, tokens, base_pos + s, past_k, past_v, allowed)
            out.append(hidden)
            past_k, past_v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
            allowed = torch.cat([allowed, diag], dim=-1)  # the next step also sees this step's own key
        return out

    def extra_repr(self) -> str:
        c = self.config
        return (f"layers={list(c.aux_layer_ids)}, hidden={c.hidden_size}, draft_vocab={c.draft_vocab_size} of "
                f"{c.target_vocab_size}")


# ---------------------------------------------------------------------------------------------
# Building from a target, capturing its features
# ---------------------------------------------------------------------------------------------

def target_parts(target_model) -> tuple[Any, dict[str, torch.Tensor]]:
    """What a head takes over from its target: (config, {"embed_tokens": [V, H], "lm_head": [V, H],
    "norm": [H] or absent}), float32 on CPU. Saved beside an offline hidden-state cache so a head
    can be built there without loading the target again."""
    parts = {"embed_tokens": target_model.get_input_embeddings().weight,
             "lm_head": target_model.get_output_embeddings().weight}
    final_norm = getattr(target_model.get_decoder(), "norm", None)
    if final_norm is not None and getattr(final_norm, "weight", None) is not None:
        parts["norm"] = final_norm.weight
    # clone: tied embeddings would otherwise be one tensor under two names (safetensors refuses that)
    return target_model.config, {k: v.detach().to("cpu", torch.float32).clone() for k, v in parts.items()}


def init_head(target_config, parts: dict[str, torch.Tensor], *, aux_layer_ids: Sequence[int] | None = None,
              vocab_map: VocabMap | None = None, norm_before_residual: bool = DEFAULT_NORM_BEFORE_RESIDUAL,
              speculative_tokens: int = DEFAULT_SPECULATIVE_TOKENS, train_lm_head: bool = False,
              verifier_name_or_path: str | None = None, seed: int = 0) -> Eagle3Head:
    """A fresh head for a target given by its config and `target_parts` (use `init_head_for` with a
    loaded model): random fc and layer (seeded), the target's embedding (frozen), the target's
    LM-head rows of the draft vocabulary (frozen unless `train_lm_head`), the target's final norm."""
    c = target_config.get_text_config() if hasattr(target_config, "get_text_config") else target_config
    n = int(c.num_hidden_layers)
    ids = check_aux_layers(aux_layer_ids if aux_layer_ids is not None else default_aux_layers(n), n)
    vocab = int(parts["embed_tokens"].shape[0])
    vmap = vocab_map if vocab_map is not None else identity_map(vocab)
    cfg = Eagle3Config(layer=layer_config_for(target_config, vocab_size=vocab), aux_layer_ids=ids,
                       draft_vocab_size=vmap.draft_vocab_size, norm_before_residual=norm_before_residual,
                       speculative_tokens=speculative_tokens, verifier_name_or_path=verifier_name_or_path,
                       verifier_architectures=list(getattr(target_config, "architectures", None) or []))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = Eagle3Head(cfg, vmap)
    with torch.no_grad():
        head.embed_tokens.weight.copy_(parts["embed_tokens"])
        head.lm_head.weight.copy_(parts["lm_head"][vmap.target_ids])
        if "norm" in parts:
            head.norm.weight.copy_(parts["norm"])
    head.lm_head.weight.requires_grad_(train_lm_head)
    return head


def init_head_for(target_model, **kwargs) -> Eagle3Head:
    """`init_head` for a loaded HF causal LM."""
    config, parts = target_parts(target_model)
    return init_head(config, parts, **kwargs)


def capture_features(target_model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                     layer_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward of a HF causal LM -> (features [B, L, 3H]: `output_hidden_states[k]` for k in
    `layer_ids`, concatenated; logits [B, L, V]). Positions come from the attention mask
    (right padding: 0, 1, 2, ... on every row)."""
    out = target_model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True,
                       use_cache=False)
    states = out.hidden_states
    return torch.cat([states[k] for k in layer_ids], dim=-1), out.logits


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------

def head_state_dict(head: Eagle3Head) -> dict[str, torch.Tensor]:
    """The tensors of the saved head, under speculators' names (d2t / t2d only when reduced)."""
    return {k: v.detach().to("cpu").contiguous() for k, v in head.state_dict().items()}


def save_head(head: Eagle3Head, folder: str | os.PathLike, dtype: torch.dtype = torch.float32,
              meta: dict[str, Any] | None = None) -> Path:
    """Write `folder` (config.json + model.safetensors [+ dspark_head.json]) atomically: built
    aside, then renamed into place."""
    import shutil

    from safetensors.torch import save

    from dspark.io import atomic_write_bytes, atomic_write_json, replace_dir

    out = Path(folder)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    tensors = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in head_state_dict(head).items()}
    atomic_write_bytes(tmp / WEIGHTS_FILE, save(tensors, metadata={"format": "pt"}))
    atomic_write_json(tmp / CONFIG_FILE, head.config.to_speculators())
    if meta is not None:
        atomic_write_json(tmp / "dspark_head.json", meta)
    return replace_dir(tmp, out)


def load_head(folder: str | os.PathLike, device: str = "cpu") -> Eagle3Head:
    """A head saved by `save_head` (or by speculators with the same options), in float32."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg_path, w_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not cfg_path.is_file() or not w_path.is_file():
        raise DataError(f"{str(folder)!r} is not an EAGLE-3 head folder (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        cfg = Eagle3Config.from_speculators(json.loads(cfg_path.read_text(encoding="utf-8")), where=str(cfg_path))
        tensors = load_file(str(w_path))
    except (ValueError, UnicodeDecodeError, SafetensorError, OSError) as e:
        raise DataError(f"{str(folder)!r}: unreadable head ({e})") from None
    vmap = VocabMap(tensors["d2t"].long(), tensors["t2d"].bool()) if "d2t" in tensors else None
    head = Eagle3Head(cfg, vmap)
    missing = sorted(set(head.state_dict()) - set(tensors))
    extra = sorted(set(tensors) - set(head.state_dict()))
    if missing or extra:
        raise DataError(f"{str(w_path)!r} does not match its config (missing {missing[:3]}, unexpected {extra[:3]})")
    head.load_state_dict({k: (v.float() if v.is_floating_point() else v) for k, v in tensors.items()})
    head.embed_tokens.weight.requires_grad_(False)
    head.lm_head.weight.requires_grad_(False)
    return head.to(device).eval()


def vllm_speculative_config(folder: str | os.PathLike, num_speculative_tokens: int) -> dict[str, Any]:
    """vLLM's `speculative_config` for a saved head: method "eagle3" (what speculators' format maps to)."""
    return {"method": "eagle3", "model": str(folder), "num_speculative_tokens": int(num_speculative_tokens)}


__all__ = ["Eagle3Config", "Eagle3Head", "HeadCache", "capture_features", "check_aux_layers", "default_aux_layers",
           "head_state_dict", "init_head", "init_head_for", "layer_config_for", "load_head", "save_head",
           "target_parts",
           "vllm_speculative_config"]
