"""The fused, chunked LM head: run a causal LM's body once for its final hidden states, then
its output layer and the target NLL a few hundred positions at a time, so that scoring a
window needs the forward pass's memory plus one chunk of logits, never `[window, vocab]`.

Used where it is exact: `fused_head(model)` probes each model once, comparing the fused
logits with the model's own on a short input, and returns None (the caller then takes the
model's own logits) for heads that do more than one linear layer: logit soft-capping
(Gemma 2), logit scaling (Cohere, Granite), hidden-state scaling before the head, custom heads.
"""

import os
import weakref

import torch

if __package__:
    from .ppl_core import target_nll
else:
    from ppl_core import target_nll

HEAD_CHUNK_BYTES = 32 * 2**20  # logits per chunk: 170 positions of a 49k vocabulary in float32
_PROBE_TOKENS = 12
# Attributes that change the logits after the output layer; the probe would also see them, but
# on a small random model their effect can hide under float32 rounding.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier")
_decisions = weakref.WeakKeyDictionary()  # model -> FusedHead or None, probed once per process


class FusedHead:
    """A causal LM split into its body (input ids -> final hidden states) and its output layer."""

    def __init__(self, body, output_layer):
        self.body, self.output_layer = body, output_layer

    def hidden_states(self, **inputs):
        """The body's final hidden states `(batch, seq_len, hidden)` for the model's own inputs."""
        out = self.body(**inputs, use_cache=False, return_dict=True)
        return out.last_hidden_state

    def logit_chunks(self, hidden, rows=None):
        """Logits of `hidden (positions, hidden)` in chunks of `rows` positions (default: about
        HEAD_CHUNK_BYTES of logits): yields `(start, logits (rows, vocab))`."""
        layer_device = _device_of(self.output_layer, hidden.device)
        rows = rows or chunk_rows(self.vocab_size, hidden.element_size())
        for start in range(0, hidden.shape[0], rows):
            yield start, self.output_layer(hidden[start : start + rows].to(layer_device))

    @property
    def vocab_size(self):
        return self.output_layer.weight.shape[0]

    def target_logprobs(self, hidden, labels):
        """Float64 log-probabilities of `labels (positions,)` after `hidden (positions, hidden)`."""
        out = torch.empty(len(labels), dtype=torch.float64)
        for start, logits in self.logit_chunks(hidden):
            chunk = labels[start : start + len(logits)].to(logits.device)
            out[start : start + len(logits)] = -target_nll(logits[None], chunk[None])[0].cpu()
        return out


def chunk_rows(vocab_size, element_size=4):
    """Positions per chunk of logits: about HEAD_CHUNK_BYTES of them (at least float32)."""
    return max(1, HEAD_CHUNK_BYTES // (vocab_size * max(4, element_size)))


def scored_logits(model, head, inputs, mask, *, keeps_logits=False, rows=None):
    """Logits at the scored positions (`mask (batch, width)`, row-major order) of one batch, in
    chunks of `rows` positions: yields `(start, logits (rows, vocab))`.

    With a `FusedHead` the body runs once and the output layer per chunk (never the whole
    `[batch, width, vocab]`); otherwise the model's own logits, trimmed with `logits_to_keep`
    where the model takes it. `inputs` may be on any device: they go to the model's.
    """
    device = model.get_input_embeddings().weight.device
    inputs = {name: value.to(device) for name, value in inputs.items()}
    if head is not None:
        hidden = head.hidden_states(**inputs)
        yield from head.logit_chunks(hidden[mask.to(hidden.device)], rows)
        return
    kwargs, first = {}, 0
    if keeps_logits:  # only the trailing positions that hold a scored label need logits
        first = int(mask.int().argmax(-1).min())
        kwargs["logits_to_keep"] = mask.shape[1] - first
    logits = model(**inputs, **kwargs).logits  # (batch, kept, vocab)
    mask = mask[:, first:].to(logits.device)
    rows = rows or chunk_rows(logits.shape[-1], logits.element_size())
    start = 0
    for b in range(len(logits)):  # row by row: a copy of one row's scored logits at most
        scored = logits[b][mask[b]]
        for i in range(0, len(scored), rows):
            yield start + i, scored[i : i + rows]
        start += len(scored)


def fused_head(model):
    """The model's `FusedHead` where its logits are exactly a linear layer over the body's final
    hidden states (checked once per model on a short input, in float64), else None."""
    if model not in _decisions:
        _decisions[model] = _probe(model)
    return _decisions[model]


def _device_of(module, default):
    weight = getattr(module, "weight", None)
    return weight.device if isinstance(weight, torch.Tensor) and weight.device.type != "meta" else default


def _probe(model):
    config = getattr(model, "config", None)
    if any(getattr(config, name, None) not in (None, 1, 1.0) for name in _LOGIT_TRANSFORMS):
        return None
    body = getattr(model, "base_model", None)
    output_layer = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(output_layer, "weight", None)
    if body is None or body is model or not isinstance(output_layer, torch.nn.Module) or not isinstance(weight, torch.Tensor):
        return None
    head = FusedHead(body, output_layer)
    vocab = getattr(config, "vocab_size", None) or weight.shape[0]
    ids = torch.arange(1, _PROBE_TOKENS + 1)[None] * 7919 % vocab  # a fixed, varied input
    device = model.get_input_embeddings().weight.device
    inputs = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
              "position_ids": torch.arange(_PROBE_TOKENS)[None].to(device)}
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            own = model(**inputs).logits[0].double().cpu()  # (tokens, vocab)
            hidden = head.hidden_states(**inputs)[0]
            fused = torch.cat([logits for _, logits in head.logit_chunks(hidden)]).double().cpu()
    except Exception:  # noqa: BLE001 - any body that cannot run alone keeps the model's own path
        return None
    finally:
        model.train(was_training)
    if own.shape != fused.shape:
        return None
    scale = own.abs().max().clamp(min=1e-6)
    # the same layer on the same hidden states: equal up to a different matmul blocking at most
    tolerance = 1e-6 if weight.dtype in (torch.float32, torch.float64) else 1e-2
    return head if float((own - fused).abs().max() / scale) <= tolerance else None


# ---------------------------------------------------------------------------------------
# Batch budgets from bytes
# ---------------------------------------------------------------------------------------

CPU_BUDGET_FRACTION = 0.25  # of the RAM available when scoring starts
CUDA_BUDGET_FRACTION = 0.7  # of the free device memory (the model is loaded already)


def bytes_per_token(model, fused, max_length=None):
    """Memory one input token of a batch needs while scoring, estimated from the config.

    Activations of one layer at a time: ~16 hidden-sized and ~8 intermediate-sized values per
    token (calibrated on SmolLM2-135M in float32: ~86 KB per token, where NOTES.md measured
    75-100 KB), plus, without the fused head, the token's row of float32 logits, plus, with
    eager attention (which keeps each head's scores and their softmax), 2 x heads x
    `max_length` values.
    """
    config = model.config
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None) or 1024
    inner = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden
    element = next(model.parameters()).element_size()
    per_token = element * (16 * hidden + 8 * inner)
    if not fused:
        per_token += 4 * (getattr(config, "vocab_size", None) or model.get_output_embeddings().weight.shape[0])
    if max_length and getattr(config, "_attn_implementation", None) == "eager":
        heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None) or 1
        per_token += 2 * element * heads * max_length
    return per_token


def memory_budget(device):
    """Bytes a batch may use on `device`: a share of free CUDA memory, else of available RAM,
    which the processes of one machine share (LOCAL_WORLD_SIZE, set by torchrun and accelerate)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)  # torch's, free to reuse
        return int((free + cached) * CUDA_BUDGET_FRACTION)
    import psutil

    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE") or 1)
    return int(psutil.virtual_memory().available * CPU_BUDGET_FRACTION / max(1, local_processes))
