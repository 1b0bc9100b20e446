"""What the benches share: the model architectures bench_grpo.py and memory.py build, how a phase's peak memory is
read (CUDA's allocator, or the process's resident memory on a CPU), and how seeds.py and variants.py take train.py
flags after `--`."""
import resource
from pathlib import Path

import torch

# Architectures. qwen2.5-1.5b: Qwen/Qwen2.5-1.5B-Instruct's config.json (1.544B parameters).
ARCHITECTURES = {
    "qwen2.5-0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         intermediate_size=4864, vocab_size=151936, rope_theta=1e6, max_position_embeddings=32768),
    "qwen2.5-1.5b": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                         intermediate_size=8960, vocab_size=151936, rope_theta=1e6, max_position_embeddings=32768),
    "qwen2-small": dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                        intermediate_size=2048, vocab_size=151936, rope_theta=1e6, max_position_embeddings=32768),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=256, vocab_size=2048, rope_theta=1e6, max_position_embeddings=4096),
}


class PeakMemory:
    """Peak memory of a phase: CUDA max_memory_allocated, or on CPU the peak RSS (VmHWM, reset through
    /proc/self/clear_refs; where that is not allowed, the process's peak RSS so far)."""

    def __init__(self, device: str):
        self.device = device

    def reset(self) -> None:
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                pass

    def read_gb(self) -> float:
        if self.device == "cuda":
            return torch.cuda.max_memory_allocated() / 1e9
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e9
        return process_peak_gb(self.device)


def process_peak_gb(device: str) -> float:
    """The whole process: CUDA max_memory_allocated since start, or peak RSS (getrusage, KiB on Linux)."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def split_train_flags(argv: list[str]) -> tuple[list[str], list[str]]:
    """A bench's own arguments, and the train.py flags after `--` (none without it)."""
    if "--" not in argv:
        return argv, []
    i = argv.index("--")
    return argv[:i], argv[i + 1:]
