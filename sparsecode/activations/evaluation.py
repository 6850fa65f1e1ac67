"""Evaluation on the model: reconstructions spliced back at the hookpoint, scored by next-token
cross-entropy."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from .corpus import shuffled_rows
from .hooks import absolute_layer, splice
from .model import LoadedModel, is_embedded


@dataclass(frozen=True)
class Evaluation:
    """What `evaluate` measured. Cross-entropies are in nats per scored token."""

    tokens: int
    """Tokens whose reconstructions were spliced in."""
    ce_clean: float
    """Cross-entropy of the model as it is."""
    ce_spliced: float
    """Cross-entropy with the reconstructions in place of the hookpoint's output."""
    ce_zero: float
    """Cross-entropy with the hookpoint's output zeroed (zero-ablation)."""
    ce_increase: float
    """ce_spliced - ce_clean."""
    ce_recovered: float
    """(ce_zero - ce_spliced) / (ce_zero - ce_clean); NaN when zero-ablation changes nothing."""
    fvu: float
    """Fraction of variance unexplained by the spliced reconstructions."""
    l0: float
    """Mean active latents per token."""
    dead: float
    """Fraction of latents that never fired."""
    dense_50: float
    """Fraction of latents firing on more than 50% of tokens."""
    dense_10: float
    """Fraction of latents firing on more than 10% of tokens."""
    firing_rates: list[float]
    """Per-latent fraction of tokens on which it fired."""

    def metrics(self) -> dict:
        """Every scalar field, by name (the firing rates left out): a table row."""
        return {k: v for k, v in asdict(self).items() if k != "firing_rates"}

    def to_dict(self) -> dict:
        """Every field, by name: what a saved evaluation holds."""
        return asdict(self)


def _ce(model, rows: torch.Tensor, batch_size: int, skip_first: bool) -> float:
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, rows.shape[0], batch_size):
            ids = rows[s:s + batch_size].to(device)
            logits = model(input_ids=ids, use_cache=False).logits.float()
            lp = torch.log_softmax(logits[:, :-1], dim=-1)
            nll = -lp.gather(-1, ids[:, 1:, None]).squeeze(-1)
            if skip_first:
                nll = nll[:, 1:]          # the BOS position predicts the first real token from nothing
            total += float(nll.sum())
            count += nll.numel()
    return total / count


def evaluate(loaded: LoadedModel, encoder, dictionary, docs: list[str], *, layer: int, site: str = "resid",
             context_length: int = 128, n_tokens: int = 4096, batch_size: int = 8, scale: float = 1.0,
             skip_bos: bool = True, seed: int = 1) -> Evaluation:
    """Cross-entropy of the model with the reconstruction spliced in at the hookpoint: the dictionary's
    decode of the codes, plus the encoder's `skip_term` of its input where it has one (a skip-transcoder).

    With `skip_bos` the BOS position keeps its own activation (the store, and so the dictionary,
    never saw it) and is not scored. `scale` is the store's normalisation: signals are multiplied
    by it before encoding and reconstructions divided by it after decoding. See `Evaluation`.
    """
    model = loaded.model
    layer = absolute_layer(model, layer)
    rows = shuffled_rows(loaded.tokenizer, docs, context_length, skip_bos, seed)
    rows = rows[: max(1, math.ceil(n_tokens / context_length))]
    codes_seen: list[torch.Tensor] = []
    err = {"se": 0.0, "var": 0.0}

    direct = getattr(encoder, "skip_term", None)

    def reconstruct(x, y):
        target = y if site == "mlp" else x
        x_in = x.float() * scale
        codes = encoder.encode(x_in)
        codes_seen.append((codes != 0).cpu())
        x_hat = dictionary.decode(codes)
        part = direct(x_in) if direct is not None else None
        if part is not None:                       # a skip-transcoder's linear map of its input
            x_hat = x_hat + part.to(x_hat)
        x_hat = x_hat / scale
        err["se"] += float(((target.float() - x_hat) ** 2).sum())
        err["var"] += float(((target.float() - target.float().mean(0)) ** 2).sum())
        return x_hat

    clean = _ce(model, rows, batch_size, skip_bos)
    with splice(model, layer, site, reconstruct, keep_first=skip_bos):
        spliced = _ce(model, rows, batch_size, skip_bos)
    with splice(model, layer, site, lambda x, y: torch.zeros_like(y if site == "mlp" else x), keep_first=skip_bos):
        zero = _ce(model, rows, batch_size, skip_bos)
    fired = torch.cat(codes_seen).float()
    rates = fired.mean(0)
    return Evaluation(
        tokens=int(fired.shape[0]), ce_clean=clean, ce_spliced=spliced, ce_zero=zero, ce_increase=spliced - clean,
        ce_recovered=(zero - spliced) / (zero - clean) if zero != clean else float("nan"),
        fvu=err["se"] / err["var"] if err["var"] else float("nan"), l0=float(fired.sum(1).mean()),
        dead=float((rates == 0).float().mean()), dense_50=float((rates > 0.5).float().mean()),
        dense_10=float((rates > 0.1).float().mean()), firing_rates=rates.tolist())


@dataclass(frozen=True)
class Hookpoint:
    """Where `evaluate` splices and how its signals are scaled: taken from the activation store a
    dictionary was learned on, each part overridable."""

    model: str | None
    """Hub id or local folder; None: the embedded SmolLM2."""
    layer: int
    site: str
    scale: float
    """The dictionary's input scale (see `Dictionary.input_scale`)."""
    seed: int
    """Seed of the order of the evaluation's sequences."""

    @classmethod
    def of(cls, dictionary, store=None, *, model: str | None = None, layer: int | None = None,
           site: str | None = None) -> "Hookpoint":
        meta = store.manifest if store is not None else {}
        recorded = meta.get("model")
        # the dictionary's own record of its input scale wins; the store's normalisation otherwise
        scale = dictionary.metadata.get("input_scale") or (store.scale if store is not None else 1.0)
        return cls(model if model is not None else (None if is_embedded(recorded) else recorded),
                   layer if layer is not None else meta.get("layer", 15), site or meta.get("site", "resid"),
                   float(scale),
                   # another order than the extraction's, so the first sequences are not the training ones
                   meta.get("seed", 0) + 1)
