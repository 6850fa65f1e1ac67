"""Forward hooks at a hookpoint: read its tensors (extraction) or replace its output (splicing)."""
from __future__ import annotations

import contextlib
from typing import Callable

import torch

SITES = ("resid", "mlp")


def decoder_layers(model) -> torch.nn.ModuleList:
    """The transformer blocks of a causal LM (Llama/Mistral/Qwen, GPT-2, GPT-NeoX layouts)."""
    for path in ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers"):
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, torch.nn.ModuleList):
            return obj
    raise ValueError(f"cannot find the transformer blocks of {type(model).__name__}")


def absolute_layer(model, layer: int) -> int:
    """`layer` counted from the start (a negative one counts from the end)."""
    return layer if layer >= 0 else len(decoder_layers(model)) + layer


def hook_modules(model, layer: int, site: str) -> torch.nn.Module:
    if site not in SITES:
        raise ValueError(f"site must be one of {SITES}, got {site!r}")
    layers = decoder_layers(model)
    if not -len(layers) <= layer < len(layers):
        raise ValueError(f"layer {layer} is out of range: the model has {len(layers)} layers (0..{len(layers) - 1})")
    block = layers[layer]
    if site == "mlp":
        mlp = getattr(block, "mlp", None)
        if mlp is None:
            raise ValueError(f"{type(block).__name__} has no 'mlp' submodule")
        return mlp
    return block


def _output(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


class _Stop(Exception):
    """Raised by a capture hook once it has what it needs: the later layers need not run."""


@contextlib.contextmanager
def capture(model, layer: int, site: str, stop: bool = True):
    """Record the hookpoint's tensors on each forward: out["x"] (and out["y"] for the MLP site)."""
    module = hook_modules(model, layer, site)
    out: dict = {}

    def hook(mod, args, output):
        if site == "mlp":
            out["x"] = args[0].detach()
            out["y"] = _output(output).detach()
        else:
            out["x"] = _output(output).detach()
        if stop:
            raise _Stop

    handle = module.register_forward_hook(hook)
    try:
        yield out
    finally:
        handle.remove()


def run_to_hook(model, ids: torch.Tensor, cap: dict) -> None:
    try:
        model(input_ids=ids, use_cache=False)
    except _Stop:
        pass


@contextlib.contextmanager
def splice(model, layer: int, site: str, replace: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor],
           keep_first: bool = False):
    """Replace the hookpoint's output by ``replace(x, y)`` during forwards (x: resid or MLP input).

    With `keep_first` the first position of every sequence (BOS, which the store leaves out and
    whose activations are atypical) keeps its own value.
    """
    module = hook_modules(model, layer, site)
    first = 1 if keep_first else 0

    def hook(mod, args, output):
        out = _output(output)
        x = (args[0] if site == "mlp" else out)[:, first:]
        tail = out[:, first:]
        new = out.clone()
        new[:, first:] = replace(x.reshape(-1, x.shape[-1]), tail.reshape(-1, tail.shape[-1])).reshape(
            tail.shape).to(out.dtype)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
