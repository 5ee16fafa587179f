"""The acceptance-prediction head a draft checkpoint may carry (used by the `learned` draft-length policy).

What it predicts: given the draft's final hidden state h [H] at the position whose logits produced a
drafted token (the output of the draft's last norm, i.e. what its lm_head sees), the probability that
the target accepts that drafted token (greedy: it equals the target's argmax; sampling: it passes the
min(1, p/q) test). The distillation stage trains it (binary cross-entropy on `logits(h)`) and saves it
next to the draft's weights; the decoder only loads and calls it.

Files in the draft folder (both required; weights via safetensors only):
- `acceptance_head.json`:
    {"format": "dspark-acceptance-head", "version": 1,
     "hidden_size": H,            # the draft's hidden size (must match the draft config)
     "mlp_hidden_size": M}        # 0: a single Linear(H, 1); M > 0: Linear(H, M) -> SiLU -> Linear(M, 1)
- `acceptance_head.safetensors`: float tensors
     M == 0: "out.weight" [1, H], "out.bias" [1]
     M > 0:  "hidden.weight" [M, H], "hidden.bias" [M], "out.weight" [1, M], "out.bias" [1]
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from dspark.errors import DsparkError

HEAD_CONFIG_FILE = "acceptance_head.json"
HEAD_WEIGHTS_FILE = "acceptance_head.safetensors"
HEAD_FILES = (HEAD_CONFIG_FILE, HEAD_WEIGHTS_FILE)
HEAD_FORMAT = "dspark-acceptance-head"
HEAD_VERSION = 1


class AcceptanceHead(nn.Module):
    """h [..., H] -> P(accept) [...]: a logistic layer, or a one-hidden-layer MLP."""

    def __init__(self, hidden_size: int, mlp_hidden_size: int = 0):
        super().__init__()
        if hidden_size < 1 or mlp_hidden_size < 0:
            raise DsparkError(f"acceptance head needs hidden_size >= 1 and mlp_hidden_size >= 0, "
                              f"got {hidden_size} and {mlp_hidden_size}")
        self.hidden_size = hidden_size
        self.mlp_hidden_size = mlp_hidden_size
        if mlp_hidden_size:
            self.hidden = nn.Linear(hidden_size, mlp_hidden_size)
        self.out = nn.Linear(mlp_hidden_size or hidden_size, 1)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """h: [..., H] -> acceptance logits [...] (train with BCE-with-logits on these)."""
        x = h.to(self.out.weight.dtype)
        if self.mlp_hidden_size:
            x = nn.functional.silu(self.hidden(x))
        return self.out(x).squeeze(-1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h: [..., H] -> probabilities [...] in (0, 1)."""
        return torch.sigmoid(self.logits(h))

    def config_dict(self) -> dict:
        return {"format": HEAD_FORMAT, "version": HEAD_VERSION, "hidden_size": self.hidden_size,
                "mlp_hidden_size": self.mlp_hidden_size}


def has_acceptance_head(folder: str | Path | None) -> bool:
    if folder is None:
        return False
    folder = Path(folder)
    return (folder / HEAD_CONFIG_FILE).is_file() and (folder / HEAD_WEIGHTS_FILE).is_file()


def save_acceptance_head(head: AcceptanceHead, folder: str | Path) -> Path:
    """Write `acceptance_head.json` and `acceptance_head.safetensors` into `folder` atomically."""
    from safetensors.torch import save

    from dspark.io import atomic_write_bytes, atomic_write_json

    folder = Path(folder)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in head.state_dict().items()}
    atomic_write_bytes(folder / HEAD_WEIGHTS_FILE, save(tensors))
    atomic_write_json(folder / HEAD_CONFIG_FILE, head.config_dict())
    return folder


def load_acceptance_head(folder: str | Path, hidden_size: int | None = None) -> AcceptanceHead:
    """Load the head saved in a draft folder. Raises DsparkError if it is missing or malformed, or if
    `hidden_size` (the draft's) differs from the head's."""
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg_path, w_path = folder / HEAD_CONFIG_FILE, folder / HEAD_WEIGHTS_FILE
    if not has_acceptance_head(folder):
        raise DsparkError(f"no acceptance head in {folder}: expected {HEAD_CONFIG_FILE} and {HEAD_WEIGHTS_FILE} "
                          "(the distillation stage writes them)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DsparkError(f"unreadable {cfg_path}: {e}") from None
    if not isinstance(cfg, dict) or cfg.get("format") != HEAD_FORMAT or cfg.get("version") != HEAD_VERSION:
        raise DsparkError(f"{cfg_path} is not a {HEAD_FORMAT} v{HEAD_VERSION} config: {cfg!r}")
    extra = set(cfg) - {"format", "version", "hidden_size", "mlp_hidden_size"}
    if extra:
        raise DsparkError(f"{cfg_path}: unknown keys {sorted(extra)}")
    try:
        head = AcceptanceHead(int(cfg["hidden_size"]), int(cfg.get("mlp_hidden_size", 0)))
    except (KeyError, TypeError, ValueError) as e:
        raise DsparkError(f"{cfg_path}: bad or missing hidden_size / mlp_hidden_size ({e})") from None
    if hidden_size is not None and head.hidden_size != hidden_size:
        raise DsparkError(f"acceptance head in {folder} expects hidden size {head.hidden_size}, "
                          f"the draft has {hidden_size}")
    state = load_file(str(w_path))
    try:
        head.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0] if str(e) else "shape or key mismatch"
        raise DsparkError(f"{w_path} does not match {cfg_path}: {first}") from None
    return head.eval()
