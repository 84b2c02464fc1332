"""The model spec: what to load and how, written once for cortex and neuron.

Its fields, their checks and its conversion to and from the proto's ``ModelSpec`` live here.
A wrong field is a ``SpecError`` naming it; each side turns that into its own error at one
edge (neuron's ``InvalidArgument`` → gRPC INVALID_ARGUMENT; a config file's ``ConfigError``).
Cortex's catalogue entry extends ``ModelSpec``, so ``models.toml`` and a neuron's
``[[default_models]]`` take the same keys and send the same proto.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Self

from helexa.configfile import ConfigError
from helexa.neuron.v1 import neuron_pb2 as pb

DTYPES = ("auto", "float32", "bfloat16", "float16")
# Speculative decoding methods ("": the neuron's engine.speculative).
SPECULATIVE = ("off", "prompt_lookup")
# Most draft tokens a row may verify in one step.
MAX_SPECULATIVE_TOKENS = 16


class SpecError(ValueError):
    """A spec field is wrong: ``field`` names it (``spec.dtype``), ``message`` says how."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class ModelSpec:
    """What to load and how: the in-process twin of the proto's ``ModelSpec``.

    Exactly one of ``hf_repo`` and ``path`` names the source. ``gguf_file`` picks a GGUF file
    inside the repo or directory (or ``path`` is the GGUF file itself).
    """

    id: str
    hf_repo: str = ""
    revision: str = ""
    path: str = ""
    gguf_file: str = ""
    dtype: str = "auto"
    device: str = "auto"
    max_batch_size: int = 0
    max_context: int = 0
    # Requests that may wait for a batch slot; 0: the neuron's engine.max_waiting (a spec may
    # lower it, never raise it).
    max_waiting: int = 0
    # Speculative decoding: "off" or "prompt_lookup"; "": the neuron's engine.speculative.
    speculative: str = ""
    # Draft tokens a row may verify per step; 0: the neuron's engine.speculative_tokens.
    speculative_tokens: int = 0

    def check(self, key: str = "spec") -> None:
        """Raise ``SpecError`` naming the first wrong field, under ``key``."""
        prefix = f"{key}." if key else ""
        if not self.id.strip():
            raise SpecError(f"{prefix}id", "must not be empty")
        if bool(self.hf_repo) == bool(self.path):
            raise SpecError(
                f"{prefix}source", "give exactly one of hf_repo (Hugging Face) or path (local)"
            )
        if self.dtype not in DTYPES:
            raise SpecError(f"{prefix}dtype", f"must be one of {', '.join(DTYPES)}")
        if not (
            self.device in ("auto", "cpu", "cuda")
            or (self.device.startswith("cuda:") and self.device[5:].isdigit())
        ):
            raise SpecError(f"{prefix}device", "must be auto, cpu, cuda or cuda:N")
        for name in ("max_batch_size", "max_context", "max_waiting"):
            if getattr(self, name) < 0:
                raise SpecError(f"{prefix}{name}", "must not be negative")
        if self.speculative not in ("", *SPECULATIVE):
            raise SpecError(f"{prefix}speculative", f"must be one of {', '.join(SPECULATIVE)}")
        if not 0 <= self.speculative_tokens <= MAX_SPECULATIVE_TOKENS:
            raise SpecError(
                f"{prefix}speculative_tokens", f"must be between 0 and {MAX_SPECULATIVE_TOKENS}"
            )

    def check_config(self, key: str) -> None:
        """Called by the strict config loader for each spec table it builds."""
        try:
            self.check(key)
        except SpecError as e:
            raise ConfigError(str(e)) from None

    def same_source(self, other: ModelSpec) -> bool:
        """Whether two specs load the same weights in the same dtype."""
        keys = ("hf_repo", "revision", "path", "gguf_file", "dtype")
        return all(getattr(self, k) == getattr(other, k) for k in keys)

    def describe(self) -> str:
        where = f"hf:{self.hf_repo}@{self.revision or 'main'}" if self.hf_repo else self.path
        return f"{where}/{self.gguf_file}" if self.gguf_file else where

    def to_proto(self) -> pb.ModelSpec:
        """The proto ``ModelSpec`` sent to (or reported by) a neuron."""
        message = pb.ModelSpec(
            id=self.id,
            dtype=self.dtype,
            device=self.device,
            max_batch_size=self.max_batch_size,
            max_context=self.max_context,
            max_waiting=self.max_waiting,
            speculative=self.speculative,
            speculative_tokens=self.speculative_tokens,
        )
        if self.hf_repo:
            message.huggingface.CopyFrom(
                pb.HuggingFaceSource(
                    repo=self.hf_repo, revision=self.revision, gguf_file=self.gguf_file
                )
            )
        else:
            message.local.CopyFrom(pb.LocalSource(path=self.path, gguf_file=self.gguf_file))
        return message

    @classmethod
    def from_proto(cls, message: pb.ModelSpec) -> Self:
        """The spec a proto ``ModelSpec`` carries, checked; ``SpecError`` names ``spec.*``."""
        kind = message.WhichOneof("source")
        if kind is None:
            raise SpecError("spec.source", "give a huggingface or a local source")
        hub = kind == "huggingface"
        spec = cls(
            id=message.id,
            hf_repo=message.huggingface.repo if hub else "",
            revision=message.huggingface.revision if hub else "",
            path=message.local.path if not hub else "",
            gguf_file=message.huggingface.gguf_file if hub else message.local.gguf_file,
            dtype=message.dtype or "auto",
            device=message.device or "auto",
            max_batch_size=message.max_batch_size,
            max_context=message.max_context,
            max_waiting=message.max_waiting,
            speculative=message.speculative,
            speculative_tokens=message.speculative_tokens,
        )
        if hub and not spec.hf_repo:
            raise SpecError("spec.huggingface.repo", "must not be empty")
        if not hub and not spec.path:
            raise SpecError("spec.local.path", "must not be empty")
        spec.check("spec")
        return spec
