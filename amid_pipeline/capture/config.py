"""Settings of ``amid-pipeline cache-teacher`` (stage one). See stages/cache_teacher_*.toml."""

from __future__ import annotations

import dataclasses
from typing import Optional

from amid_pipeline.config import setting
from amid_pipeline.dataset.settings import DatasetSettings
from amid_pipeline.shards.schema import SAMPLED_LAYOUTS, TARGET_KINDS, VALUE_ENCODINGS
from amid_pipeline.shards.targets import Sampling, sampling_for

# Settings that may differ between the run that started a directory and the one resuming it.
SAMPLED_ONLY_SETTINGS = ("draws", "exact_top", "layout", "sample_top", "proposal_temperature")  # meaningless for top-k
RESUME_FREE_SETTINGS = ("overwrite", "worker_index", "batch_tokens", "progress", "verbose", "gpu_memory_utilization",
                        "cuda_graphs")  # how the engine runs, not what it writes


DEFAULT_MAX_LENGTH = 2048


@dataclasses.dataclass
class CaptureConfig(DatasetSettings):
    """Settings of ``cache-teacher``: the dataset settings, then the teacher, the shards and the engine."""

    teacher: Optional[str] = setting(None, "Teacher model: an HF-format folder (or a hub id where the hub is reachable).", required=True)
    output: Optional[str] = setting(None, "Shard directory to write (created; resumed if it holds a run with the same settings).", required=True)
    dataset_license: Optional[str] = setting(None, "Licence of the source data, recorded in the header and the dataset card (e.g. cc-by-sa-3.0).")
    max_length: Optional[int] = setting(None, f"Longest token sequence given to the teacher (longer ones: see overflow); default: the teacher's context, at most {DEFAULT_MAX_LENGTH} (on vLLM one token less: it generates one after each sequence). A larger value is refused.", minimum=2)
    target_kind: str = setting("topk", "What is stored per position: topk (the k most probable ids) or sampled (ids drawn with replacement from the teacher's full distribution, kept as the distinct ids with their counts and exact log-probabilities: unbiased sparse targets; on vLLM from its top sample_top).", choices=TARGET_KINDS)
    k: int = setting(64, "Top-k teacher log-probabilities stored per position (topk kind).", minimum=1)
    draws: int = setting(24, "sampled kind: draws per position (each drawn id is stored once with its count).", minimum=1, maximum=65535)
    exact_top: int = setting(0, "sampled kind: also keep the teacher's this many most probable ids exactly (weighted by their probabilities in training) and draw from the rest of its distribution only: still unbiased, with the variance of the draws confined to the rest's mass. 0 = draw from the whole distribution.", minimum=0)
    layout: str = setting("compact", "sampled kind: how the draws are stored. compact (format 1.3): only the distinct drawn ids, in columns of their own, the top-k columns holding the exact top (any Parquet reader sees a top-exact_top shard); padded (1.2): exact_top + draws slots per position in the top-k columns, unused ones padded, readable by amid-pipeline releases before 1.3 and about 30 % larger. Both train identically.", choices=SAMPLED_LAYOUTS)
    sample_top: int = setting(256, "sampled kind on vLLM: the engine returns this many top log-probabilities per position and the draws come from them renormalised (the teacher mass beyond is never drawn: 7.9 percent on average at 256 for SmolLM2-135M). The teacher's vocabulary size draws exactly, as the hf backend does, at about a sixth of the throughput (measured on a CPU).", minimum=1)
    proposal_temperature: float = setting(1.0, "sampled kind: draw from softmax(logits / T); T = 1 draws from the teacher itself (unbiased), T > 1 spreads the draws over more ids (importance-weighted in training).", minimum=0.05)
    value_encoding: str = setting("q64-delta", "How log-probabilities are stored (q64-delta: 1/128 max error, smallest; float32: exact).", choices=VALUE_ENCODINGS)
    positions: str = setting("supervised", "Store the teacher distribution at supervised positions only, or at all positions.", choices=("supervised", "all"))
    backend: str = setting("auto", "Teacher engine: vllm, hf (transformers) or auto (vLLM when installed and runnable).", choices=("auto", "vllm", "hf"))
    dtype: str = setting("auto", "Teacher weights dtype (compare backends in float32).", choices=("auto", "float32", "bfloat16", "float16"))
    device: str = setting("auto", "hf backend device: cpu, cuda or auto.", choices=("auto", "cpu", "cuda"))
    batch_tokens: int = setting(8192, "Tokens per teacher batch (hf: padded batch size; vLLM: max_num_batched_tokens).", minimum=16)
    tensor_parallel_size: int = setting(1, "vLLM tensor parallelism (GPUs per teacher replica).", minimum=1)
    gpu_memory_utilization: float = setting(0.8, "vLLM on GPU: the fraction of each GPU's memory the engine may take (weights, activations, KV cache). Prompt log-probabilities need memory that vLLM's start-up sizing does not count (vLLM issue 5907), so this leaves more room than vLLM's own 0.9; lower it on an out-of-memory error, then --resume.", minimum=0.05, maximum=0.99)
    cuda_graphs: bool = setting(True, "vLLM on GPU: capture CUDA graphs (faster decoding for --generate; start-up takes longer and some memory). Off = vLLM's enforce_eager. Never used on a CPU.")
    rows_per_file: int = setting(2048, "Source rows per Parquet file (the unit of resume).", minimum=1)
    num_workers: int = setting(1, "Number of independent worker processes writing this directory.", minimum=1)
    worker_index: int = setting(0, "This worker's index in [0, num_workers).", minimum=0)
    generate: bool = setting(False, "Sample the teacher's own responses to the prompts (instead of teacher-forcing the dataset's) and store those, response positions supervised.")
    num_generations: int = setting(1, "Responses sampled per prompt with --generate.", minimum=1)
    max_new_tokens: int = setting(256, "Longest generated response.", minimum=1)
    temperature: float = setting(1.0, "Sampling temperature for --generate (0 = greedy).", minimum=0.0)
    top_p: float = setting(1.0, "Nucleus sampling mass for --generate.", minimum=0.0, maximum=1.0)
    seed: int = setting(0, "Sampling seed for --generate (row i uses seed + i) and for the sampled kind's draws (per sample id).")
    overwrite: bool = setting(False, "Delete an existing output directory written with other settings instead of refusing.")
    progress: bool = setting(True, "Show a progress bar.")
    verbose: bool = setting(False, "Show the engine's own log (vLLM's start-up lines and warnings); by default only its errors.")

    @property
    def sampling(self) -> Sampling | None:
        """What a sampled capture keeps per position, as its header records it (None for top-k)."""
        return sampling_for(self.target_kind, draws=self.draws, temperature=self.proposal_temperature,
                            exact_top=self.exact_top, layout=self.layout, seed=self.seed)

    def check(self) -> list[str]:
        errors = []
        if self.worker_index >= self.num_workers:
            errors.append(f"worker_index: {self.worker_index} must be < num_workers ({self.num_workers})")
        defaults = {field.name: field.default for field in dataclasses.fields(self)}
        unused = ("k",) if self.sampling else SAMPLED_ONLY_SETTINGS
        errors += [f"{name}: set to {getattr(self, name)!r}, but a {self.target_kind} capture does not use it "
                   f"(--target-kind {TARGET_KINDS[name != 'k']} does)"
                   for name in unused if getattr(self, name) != defaults[name]]

        return errors
