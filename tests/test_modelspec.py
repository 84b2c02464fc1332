"""The model spec written once (``helexa.modelspec``): its checks name the field on both sides,
its proto conversion round-trips, and cortex's catalogue entry and a neuron's default model
built from the same keys send the same proto."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from cortex.config import CatalogueModel, load_catalogue
from helexa.configfile import ConfigError
from helexa.modelspec import ModelSpec, SpecError
from helexa.neuron.v1 import neuron_pb2 as pb
from neuron.config import load as load_neuron_config

ROOT = Path(__file__).resolve().parent.parent

# (spec keys in TOML, the field the error names)
BAD_SPECS = [
    ("id = ' '\npath = '/x'", "id"),
    ("id = 'm'", "source"),
    ("id = 'm'\npath = '/x'\nhf_repo = 'org/repo'", "source"),
    ("id = 'm'\npath = '/x'\ndtype = 'int3'", "dtype"),
    ("id = 'm'\npath = '/x'\ndevice = 'tpu'", "device"),
    ("id = 'm'\npath = '/x'\ndevice = 'cuda:x'", "device"),
    ("id = 'm'\npath = '/x'\nmax_batch_size = -1", "max_batch_size"),
    ("id = 'm'\npath = '/x'\nmax_context = -1", "max_context"),
    ("id = 'm'\npath = '/x'\nmax_waiting = -1", "max_waiting"),
    ("id = 'm'\npath = '/x'\nspeculative_tokens = 17", "speculative_tokens"),
]


@pytest.mark.parametrize(("keys", "field"), BAD_SPECS)
def test_a_bad_spec_names_its_field_in_models_toml_and_neuron_toml(
    tmp_path: Path, keys: str, field: str
) -> None:
    models = tmp_path / "models.toml"
    models.write_text(f"[[models]]\n{keys}\nmemory = '1GiB'\n")
    with pytest.raises(ConfigError, match=rf"models\[0\]\.{field}: "):
        load_catalogue(models)
    neuron = tmp_path / "neuron.toml"
    neuron.write_text(f"[[default_models]]\n{keys}\n")
    with pytest.raises(ConfigError, match=rf"default_models\[0\]\.{field}: "):
        load_neuron_config(neuron)


def test_check_raises_spec_error_with_field_and_message() -> None:
    with pytest.raises(SpecError) as error:
        ModelSpec("m", path="/x", dtype="int3").check()
    assert error.value.field == "spec.dtype"
    assert error.value.message == "must be one of auto, float32, bfloat16, float16"
    assert str(error.value) == "spec.dtype: must be one of auto, float32, bfloat16, float16"
    with pytest.raises(SpecError) as error:
        ModelSpec("m", hf_repo="o/r", max_context=-1).check("default_models[2]")
    assert error.value.field == "default_models[2].max_context"


@pytest.mark.parametrize(
    "spec",
    [
        ModelSpec("hub", hf_repo="org/repo", revision="v1", gguf_file="m.gguf", dtype="float16"),
        ModelSpec("local", path="/srv/m", device="cuda:1", max_batch_size=4, max_context=2048),
        ModelSpec("gguf", path="/srv/m.gguf", max_waiting=7),
    ],
    ids=lambda s: s.id,
)
def test_proto_round_trip_keeps_every_field(spec: ModelSpec) -> None:
    message = spec.to_proto()
    assert message.WhichOneof("source") == ("huggingface" if spec.hf_repo else "local")
    assert ModelSpec.from_proto(message) == spec
    assert ModelSpec.from_proto(pb.ModelSpec.FromString(message.SerializeToString())) == spec


def test_from_proto_fills_defaults_for_empty_dtype_and_device() -> None:
    spec = ModelSpec.from_proto(pb.ModelSpec(id="m", local=pb.LocalSource(path="/x")))
    assert (spec.dtype, spec.device) == ("auto", "auto")


@pytest.mark.parametrize(
    ("message", "field"),
    [
        (pb.ModelSpec(id="m"), "spec.source"),
        (pb.ModelSpec(id="m", huggingface=pb.HuggingFaceSource()), "spec.huggingface.repo"),
        (pb.ModelSpec(id="m", local=pb.LocalSource(gguf_file="f.gguf")), "spec.local.path"),
        (pb.ModelSpec(local=pb.LocalSource(path="/x")), "spec.id"),
        (pb.ModelSpec(id="m", local=pb.LocalSource(path="/x"), dtype="int3"), "spec.dtype"),
        (pb.ModelSpec(id="m", local=pb.LocalSource(path="/x"), device="tpu"), "spec.device"),
    ],
)
def test_from_proto_checks_and_names_the_spec_field(message: pb.ModelSpec, field: str) -> None:
    with pytest.raises(SpecError) as error:
        ModelSpec.from_proto(message)
    assert error.value.field == field


def test_catalogue_entry_and_neuron_default_model_from_the_same_keys_send_the_same_proto(
    tmp_path: Path,
) -> None:
    keys = (
        "id = 'smol'\nhf_repo = 'org/smol'\nrevision = 'v2'\ngguf_file = 'smol.Q4.gguf'\n"
        "dtype = 'bfloat16'\ndevice = 'cuda:0'\nmax_batch_size = 8\nmax_context = 4096\n"
        "max_waiting = 32\nspeculative = 'prompt_lookup'\nspeculative_tokens = 6\n"
    )
    (tmp_path / "models.toml").write_text(
        f"[[models]]\n{keys}memory = '2GiB'\naliases = ['s']\npinned = true\n"
    )
    (tmp_path / "neuron.toml").write_text(f"[[default_models]]\n{keys}")
    (entry,) = load_catalogue(tmp_path / "models.toml").models
    (spec,) = load_neuron_config(tmp_path / "neuron.toml").default_models
    assert isinstance(entry, CatalogueModel) and type(spec) is ModelSpec
    assert entry.to_proto() == spec.to_proto()
    assert entry.same_source(spec) and entry.describe() == spec.describe()
    assert ModelSpec.from_proto(entry.to_proto()) == spec


def test_helexa_imports_neither_cortex_nor_neuron() -> None:
    # helexa/ is what both sides share (ARCHITECTURE.md); the generated helexa.neuron.v1 is ours.
    for path in (ROOT / "helexa").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            assert not any(n.split(".")[0] in ("cortex", "neuron") for n in names), (path, names)
