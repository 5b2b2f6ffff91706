"""Parameter names across the transformers 5.x releases raptor supports.

transformers 5.0 keeps the 4.x-style DINOv2 names (``attention.attention.query|key|value``,
``attention.output.dense``, SwiGLU ``mlp.weights_in`` / ``mlp.weights_out``); later 5.x releases name them
``attention.{q,k,v,o}_proj`` and ``mlp.{gate,up,down}_proj``. raptor's converters write the later names; these two
functions translate at the boundary, so the bundled teacher, official ``.pth`` checkpoints and
``--init-from-teacher`` work on every supported release (``make test-floor`` runs them on 5.0).
"""

from __future__ import annotations

import torch

_ATTN_OLD = {"attention.q_proj": "attention.attention.query", "attention.k_proj": "attention.attention.key",
             "attention.v_proj": "attention.attention.value", "attention.o_proj": "attention.output.dense"}


def uses_old_names(model: torch.nn.Module) -> bool:
    keys = model.state_dict().keys()
    return any(".attention.attention.query." in k for k in keys) and not any(".attention.q_proj." in k
                                                                            for k in keys)


def to_model_names(sd: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``sd`` (later-5.x names) renamed for ``model``'s transformers release (identity where they agree)."""
    if not uses_old_names(model):
        return sd
    out: dict[str, torch.Tensor] = {}
    gates: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        for new, old in _ATTN_OLD.items():
            if f".{new}." in k:
                k = k.replace(f".{new}.", f".{old}.")
                break
        if ".mlp.gate_proj." in k or ".mlp.up_proj." in k:
            gates[k] = v
            continue
        out[k.replace(".mlp.down_proj.", ".mlp.weights_out.")] = v
    for k, v in gates.items():  # SwiGLU: weights_in = [gate; up] (the gate half goes through SiLU)
        if ".mlp.gate_proj." in k:
            out[k.replace(".mlp.gate_proj.", ".mlp.weights_in.")] = torch.cat(
                [v, gates[k.replace(".mlp.gate_proj.", ".mlp.up_proj.")]], dim=0)
    return out


def current_names(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A block's ``named_parameters()`` under the later-5.x attention names (for readers of teacher weights)."""
    inv = {old: new for new, old in _ATTN_OLD.items()}
    out = {}
    for k, v in params.items():
        for old, new in inv.items():
            if k.startswith(old + ".") or f".{old}." in k:
                k = k.replace(old, new, 1)
                break
        out[k] = v
    return out
