"""Adversarial inputs a recipe points at: evaluation and calibration files that are not text, model directories
and configs that are not models, crafted GGUF headers, and a model repository that ships code. `validate` answers
each with exit 2 naming the file (and the key at fault), without reading more than it needs, never blocking on a
FIFO, and never running the repository's code."""
import json
import os
import shutil
import struct
import subprocess
import sys

import pytest

from .harness import base_recipe, run_cli, write

pytestmark = pytest.mark.timeout(30)


def _pq(path, column="text"):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({column: ["some text here"] * 4}), path)


DATA = {  # name -> (file name, writer(path), what the message must say)
    "parquet-random-bytes": ("d.parquet", lambda p: p.write_bytes(os.urandom(4096)), r"is not a Parquet file"),
    "parquet-magic-only": ("d.parquet", lambda p: p.write_bytes(b"PAR1" + os.urandom(64) + b"PAR1"),
                           r"is not a readable Parquet file"),
    "parquet-without-column": ("d.parquet", lambda p: _pq(p, "body"), r"text_field: column 'text' not in"),
    "jsonl-invalid-line": ("d.jsonl", lambda p: p.write_text('{"text": "a"}\n{not json}\n'), r"line 2 is not valid JSON"),
    "jsonl-without-field": ("d.jsonl", lambda p: p.write_text('{"body": "a"}\n{"body": "b"}\n'),
                            r"text_field: no record .* has text in the field 'text'"),
    "jsonl-field-is-number": ("d.jsonl", lambda p: p.write_text('{"text": 5}\n'), r"has text in the field 'text'"),
    "jsonl-lists": ("d.jsonl", lambda p: p.write_text('[1, 2]\n[3]\n'), r"must be an object"),
    "json-array-of-numbers": ("d.json", lambda p: p.write_text("[1, 2, 3]"), r"must be an object"),
    "jsonl-deep": ("d.jsonl", lambda p: p.write_text("[" * 100000 + "]" * 100000 + "\n"), r"not valid JSON"),
    "text-nul-bytes": ("d.txt", lambda p: p.write_bytes(b"\0" * 100_000), r"NUL byte at offset 0"),
    "text-binary-after-64k": ("d.txt", lambda p: p.write_bytes(b"hello world " * 6000 + os.urandom(2048)),
                              r"not UTF-8 text|NUL byte"),
    "text-nul-after-1m": ("d.txt", lambda p: p.write_bytes(b"word " * 300_000 + b"\0tail"), r"NUL byte at offset 1500000"),
    "text-latin1": ("d.txt", lambda p: p.write_bytes("café olé".encode("latin-1")), r"not UTF-8 text"),
    "text-cut-character": ("d.txt", lambda p: p.write_bytes("word é".encode()[:-1]), r"ends inside a character"),
    "text-empty": ("d.txt", lambda p: p.write_bytes(b""), r"is empty"),
    "text-whitespace": ("d.txt", lambda p: p.write_text(" \n\t\n" * 100), r"holds only white space"),
    "markdown-binary": ("d.md", lambda p: p.write_bytes(os.urandom(512) + b"\0"), r"not UTF-8|NUL byte"),
    "unsupported-suffix": ("d.csv", lambda p: p.write_text("a,b\n"), r"unsupported file type"),
    "directory": ("d.txt", lambda p: p.mkdir(), r"is a directory, not a regular file"),
    "fifo": ("d.txt", lambda p: os.mkfifo(p), r"is a FIFO, not a regular file"),
    "symlink-to-fifo": ("d.txt", lambda p: (os.mkfifo(p.with_name("f")), p.symlink_to(p.with_name("f"))),
                        r"is a FIFO, not a regular file"),
    "missing": ("d.txt", lambda p: None, r"file .* not found"),
    "dangling-symlink": ("d.txt", lambda p: p.symlink_to(p.with_name("nowhere")), r"not found"),
}


@pytest.mark.parametrize("field", ["evaluation", "calibration"])
@pytest.mark.parametrize("name", sorted(DATA))
def test_a_data_file_that_is_not_text_is_refused(name, field, tiny_llama, tmp_path, capsys):
    filename, make, said = DATA[name]
    path = tmp_path / filename
    make(path)
    recipe = base_recipe(tiny_llama)
    recipe[field]["source"] = str(path)
    if field == "calibration":  # a pass that reads calibration data, so the file is checked
        recipe["passes"][3]["algorithm"] = "gptq"
    run_cli(capsys, ["validate", str(write(tmp_path / "r.yaml", recipe))], 2, rf"{field}(\.text_field|\.source).*{said}"
            if "text_field" not in said else said)


def test_a_large_data_file_is_checked_in_chunks_not_read_whole(tiny_llama, tmp_path, capsys):
    """64 MiB of text with a NUL at the end: found, at a memory cost far below the file's size."""
    import resource

    path = tmp_path / "big.txt"
    with open(path, "wb") as f:
        for _ in range(64):
            f.write(b"plain words, " * 80_000 + b"\n")
        f.write(b"\0")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    recipe = base_recipe(tiny_llama)
    recipe["evaluation"]["source"] = str(path)
    run_cli(capsys, ["validate", str(write(tmp_path / "r.yaml", recipe))], 2, r"NUL byte at offset", json_too=False)
    grew_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grew_mib < 32, grew_mib


def _model(tmp_path, tiny_llama, **config_changes):
    d = tmp_path / "m"
    shutil.copytree(tiny_llama, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(config_changes)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


CONFIGS = {
    "hidden_size-string": ({"hidden_size": "64"}, r"hidden_size must be a whole number >= 1, not '64'"),
    "hidden_size-float": ({"hidden_size": 64.0}, r"hidden_size must be a whole number"),
    "hidden_size-bool": ({"hidden_size": True}, r"hidden_size must be a whole number"),
    "heads-zero": ({"num_attention_heads": 0}, r"num_attention_heads must be a whole number >= 1, not 0"),
    "heads-negative": ({"num_attention_heads": -4}, r"num_attention_heads must be"),
    "kv-heads-zero": ({"num_key_value_heads": 0}, r"num_key_value_heads must be"),
    "kv-heads-not-a-divisor": ({"num_key_value_heads": 3}, r"not a multiple of num_key_value_heads"),
    "layers-list": ({"num_hidden_layers": [2]}, r"num_hidden_layers must be"),
    "vocab-null-string": ({"vocab_size": "null"}, r"vocab_size must be"),
    "context-string": ({"max_position_embeddings": "4k"}, r"max_position_embeddings must be"),
    "intermediate-mapping": ({"intermediate_size": {"a": 1}}, r"intermediate_size must be"),
    "intermediate-list-bad": ({"intermediate_size": [128, "x"]}, r"intermediate_size\[1\] must be"),
    "head-dim-zero": ({"head_dim": 0}, r"head_dim must be"),
    "model-type-number": ({"model_type": 5}, r"has no model_type"),
    "architectures-string": ({"architectures": "LlamaForCausalLM"}, r"architectures must be a list"),
    "encoder-decoder": ({"is_encoder_decoder": True}, r"an encoder-decoder model"),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_a_config_field_of_the_wrong_type_is_refused_at_validate(name, tiny_llama, tmp_path, capsys):
    changes, said = CONFIGS[name]
    d = _model(tmp_path, tiny_llama, **changes)
    recipe = write(tmp_path / "r.yaml", {**base_recipe(tiny_llama), "model": str(d)})
    run_cli(capsys, ["validate", str(recipe)], 2, rf"model\.source: .*config\.json.*{said}|{said}")


def _config_file(d, text: bytes | None = None, fifo=False):
    (d / "config.json").unlink()
    if fifo:
        os.mkfifo(d / "config.json")
    else:
        (d / "config.json").write_bytes(text)


MODEL_DIRS = {
    "config-nested-200k": (lambda d: _config_file(d, b'{"a": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"),
                           r"nested too deeply"),
    "config-a-list": (lambda d: _config_file(d, b"[1, 2]"), r"has no model_type"),
    "config-not-utf8": (lambda d: _config_file(d, b'{"model_type": "\xff"}'), r"not UTF-8"),
    "config-huge": (lambda d: _config_file(d, b'{"model_type": "llama", "x": "' + b"a" * (17 << 20) + b'"}'),
                    r"larger than"),
    "config-fifo": (lambda d: _config_file(d, fifo=True), r"is a FIFO, not a regular file"),
    "config-empty": (lambda d: _config_file(d, b""), r"not valid JSON"),
    "no-weights": (lambda d: (d / "model.safetensors").unlink(), r"has a config.json but no weights"),
    "safetensors-0-bytes": (lambda d: (d / "model.safetensors").write_bytes(b""), r"is not a safetensors file"),
    "safetensors-header-past-end": (lambda d: (d / "model.safetensors").write_bytes(struct.pack("<Q", 10 ** 9) + b"{}"),
                                    r"is not a safetensors file"),
    "safetensors-header-not-json": (lambda d: (d / "model.safetensors").write_bytes(struct.pack("<Q", 4) + b"abcd"),
                                    r"header is not a JSON object"),
    "safetensors-random": (lambda d: (d / "model.safetensors").write_bytes(os.urandom(3000)), r"safetensors"),
}


@pytest.mark.parametrize("name", sorted(MODEL_DIRS))
def test_a_model_directory_that_is_not_a_model_is_refused(name, tiny_llama, tmp_path, capsys):
    make, said = MODEL_DIRS[name]
    d = _model(tmp_path, tiny_llama)
    make(d)
    recipe = write(tmp_path / "r.yaml", {**base_recipe(tiny_llama), "model": str(d)})
    run_cli(capsys, ["validate", str(recipe)], 2, rf"model\.source.*{said}")


@pytest.mark.parametrize("kind", ["file", "fifo", "etc-passwd"])
def test_a_model_source_that_is_a_file_says_so(kind, tiny_llama, tmp_path, capsys):
    recipe = write(tmp_path / "r.yaml", base_recipe(tiny_llama))
    target = {"file": tmp_path / "notes.txt", "fifo": tmp_path / "pipe", "etc-passwd": "/etc/passwd"}[kind]
    if kind == "file":
        target.write_text("notes")
    elif kind == "fifo":
        os.mkfifo(target)
    run_cli(capsys, ["validate", str(recipe), "--model", str(target)], 2, r"is a file, not a model directory")


def _s(text: str) -> bytes:
    return struct.pack("<Q", len(text)) + text.encode()


def _kv(key, vtype, payload):
    return _s(key) + struct.pack("<I", vtype) + payload


def _gguf(*kvs, tensors=1, kv_count=None):
    return (b"GGUF" + struct.pack("<IQQ", 3, tensors, len(kvs) if kv_count is None else kv_count) + b"".join(kvs)
            + bytes(32 * min(tensors, 4)))


ARCH = _kv("general.architecture", 8, _s("llama"))
GGUF = {
    "string-length-2^62": (_gguf(struct.pack("<Q", 2 ** 62) + b"key"), r"GGUF header string of 4611686018427387904"),
    "string-length-2^64-1": (_gguf(ARCH, struct.pack("<Q", 2 ** 64 - 1)), r"GGUF header string of"),
    "value-string-2^62": (_gguf(_kv("general.name", 8, struct.pack("<Q", 2 ** 62))), r"GGUF header string of"),
    "nested-arrays-20000": (_gguf(_kv("x", 9, struct.pack("<IQ", 9, 1) * 20000)), r"nested more than"),
    "array-count-2^63": (_gguf(_kv("x", 9, struct.pack("<IQ", 8, 2 ** 63))), r"claims 9223372036854775808 array values"),
    "scalar-array-count-2^60": (_gguf(_kv("x", 9, struct.pack("<IQ", 0, 2 ** 60))), r"claims .* array values"),
    "kv-count-2^64-1": (_gguf(ARCH, kv_count=2 ** 64 - 1), r"claims 18446744073709551615 key/value pairs"),
    "tensor-count-2^60": (_gguf(ARCH, tensors=2 ** 60), r"claims .* tensors"),
    "no-tensors": (_gguf(ARCH, tensors=0), r"holds no tensors"),
    "context-length-string": (_gguf(ARCH, _kv("llama.context_length", 8, _s("abc"))),
                              r"llama\.context_length must be a whole number >= 1, not 'abc'"),
    "context-length-nan": (_gguf(ARCH, _kv("llama.context_length", 6, struct.pack("<f", float("nan")))),
                           r"llama\.context_length must be a whole number >= 1, not nan"),
    "context-length-zero": (_gguf(ARCH, _kv("llama.context_length", 4, struct.pack("<I", 0))),
                            r"context_length must be a whole number >= 1, not 0"),
    "head-count-array": (_gguf(ARCH, _kv("llama.attention.head_count", 9, struct.pack("<IQ", 4, 2) + bytes(8))),
                         r"head_count must be a whole number >= 1, not an array"),
    "block-count-negative": (_gguf(ARCH, _kv("llama.block_count", 5, struct.pack("<i", -3))), r"block_count must be"),
    "architecture-number": (_gguf(_kv("general.architecture", 4, struct.pack("<I", 7))), r"general.architecture must be text"),
    "unknown-value-type": (_gguf(_kv("x", 77, b"")), r"unknown GGUF value type 77"),
    "unknown-array-type": (_gguf(_kv("x", 9, struct.pack("<IQ", 55, 1))), r"unknown GGUF value type 55"),
    "truncated-after-magic": (b"GGUF\x03\x00", r"truncated GGUF header"),
    "magic-only": (b"GGUF", r"truncated GGUF header"),
    "not-gguf": (b"GGML" + bytes(64), r"not a GGUF file"),
    "empty-file": (b"", r"not a GGUF file"),
    "version-1": (b"GGUF" + struct.pack("<IQQ", 1, 1, 0), r"too old"),
}


@pytest.mark.parametrize("name", sorted(GGUF))
def test_a_crafted_gguf_header_is_refused_in_milliseconds(name, tiny_llama, tmp_path, capsys):
    data, said = GGUF[name]
    path = tmp_path / "m.gguf"
    path.write_bytes(data)
    recipe = write(tmp_path / "r.yaml", {**base_recipe(tiny_llama), "model": str(path)})
    run_cli(capsys, ["validate", str(recipe)], 2, rf"model\.source: .*m\.gguf.*{said}")


def test_a_gguf_fifo_is_refused_without_blocking(tiny_llama, tmp_path, capsys):
    os.mkfifo(tmp_path / "m.gguf")
    recipe = write(tmp_path / "r.yaml", {**base_recipe(tiny_llama), "model": str(tmp_path / "m.gguf")})
    run_cli(capsys, ["validate", str(recipe)], 2, r"is not a regular file")


def _remote_code_model(tmp_path, tiny_llama):
    """A model repository whose config names its own Python (auto_map), which leaves a marker when imported."""
    d = _model(tmp_path, tiny_llama, auto_map={"AutoConfig": "configuration_evil.EvilConfig",
                                               "AutoModelForCausalLM": "modeling_evil.EvilModel"})
    marker = tmp_path / "remote-code-ran"
    # subclasses, so transformers' registration of remote classes touches them and not Llama's own classes
    code = f"open({str(marker)!r}, 'w').write('x')\nfrom transformers import LlamaConfig, LlamaForCausalLM\n"
    (d / "configuration_evil.py").write_text(code + "class EvilConfig(LlamaConfig):\n    pass\n")
    (d / "modeling_evil.py").write_text(code + "from .configuration_evil import EvilConfig\n\n\n"
                                        "class EvilModel(LlamaForCausalLM):\n    config_class = EvilConfig\n")
    return d, marker


@pytest.mark.parametrize("command", ["validate", "build"])
@pytest.mark.parametrize("env", [None, "0", "false", "off"])
def test_trust_remote_code_needs_the_plugins_opt_in(command, env, tiny_llama, tmp_path, capsys, monkeypatch):
    d, marker = _remote_code_model(tmp_path, tiny_llama)
    if env is None:
        monkeypatch.delenv("OPTPIPE_ALLOW_PLUGINS", raising=False)
    else:
        monkeypatch.setenv("OPTPIPE_ALLOW_PLUGINS", env)
    recipe = base_recipe(tiny_llama)
    recipe["model"] = {"source": str(d), "trust_remote_code": True}
    file = write(tmp_path / "r.yaml", recipe)
    argv = ["validate", str(file)] if command == "validate" else ["build", str(file), "-o", str(tmp_path / "out")]
    run_cli(capsys, argv, 2, r"model\.trust_remote_code: true runs the model repository's own Python code")
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_with_the_opt_in_the_repository_code_is_what_runs(tiny_llama, tmp_path, capsys):
    """The control: the same repository, opted in, does import its code (so the refusal above is what stopped it)."""
    d, marker = _remote_code_model(tmp_path, tiny_llama)
    recipe = base_recipe(tiny_llama)
    recipe["model"] = {"source": str(d), "trust_remote_code": True}
    run_cli(capsys, ["validate", str(write(tmp_path / "r.yaml", recipe)), "--allow-plugins"], 0, json_too=False)
    # in a process of its own: transformers registers remote classes globally, which must not leak into other tests
    load = (f"from optpipe import models\nfrom optpipe.recipe import ModelSpec\n"
            f"models.load(ModelSpec(source={str(d)!r}, trust_remote_code=True))\n")
    run = subprocess.run([sys.executable, "-c", load], capture_output=True, text=True, timeout=25,
                         env={**os.environ, "HF_MODULES_CACHE": str(tmp_path / "hf-modules")})
    assert run.returncode == 0, run.stderr[-2000:]
    assert marker.exists()


def test_lm_eval_task_code_needs_the_opt_in(tiny_llama, tmp_path, capsys, monkeypatch):
    pytest.importorskip("lm_eval")
    monkeypatch.delenv("OPTPIPE_ALLOW_PLUGINS", raising=False)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "t.yaml").write_text("task: evil\ndataset_path: json\nprocess_docs: !function utils.process\n")
    recipe = base_recipe(tiny_llama)
    recipe["gates"]["accuracy"]["tasks"] = [{"name": "evil", "max_drop": 0.1}]
    recipe["gates"]["accuracy"]["task_paths"] = [str(tasks)]
    run_cli(capsys, ["validate", str(write(tmp_path / "r.yaml", recipe))], 2,
            r"task_paths\[0\]: .*t\.yaml names Python code \(`!function`\)")


@pytest.mark.parametrize("gguf_file", ["../../etc/passwd", "/etc/passwd", "sub/m.gguf", "m.bin", ""])
def test_gguf_file_must_name_a_gguf_file_inside_the_model_directory(gguf_file, tiny_llama, tmp_path, capsys):
    recipe = base_recipe(tiny_llama)
    recipe["model"] = {"source": str(tmp_path), "gguf_file": gguf_file}
    run_cli(capsys, ["validate", str(write(tmp_path / "r.yaml", recipe))], 2, r"model\.gguf_file")
