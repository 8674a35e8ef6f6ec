"""`genai_config.json`: what onnxruntime-genai needs to run a cpu-onnx artifact as it is (its C++ decode loop).

The exported graph already follows the I/O names of onnxruntime-genai's own model builder (input_ids,
attention_mask over the total sequence, past_key_values.N.key/value in, present.N.key/value out, GroupQueryAttention
over one shared buffer when the cache is static), so the config only states names, shapes and the cache layout; the
tokenizer files sit beside model.onnx, where onnxruntime-genai looks for them."""
from __future__ import annotations

CONFIG_FILE = "genai_config.json"


def genai_config(meta: dict[str, str], model_file: str, tokenizer=None) -> dict:
    """The config for a graph whose optpipe metadata is `meta` (written by export / static-kv-cache). Threads are
    left to onnxruntime-genai's default (its session options take `intra_op_num_threads`)."""
    heads, kv_heads = int(meta["optpipe.num_heads"]), int(meta["optpipe.kv_num_heads"])
    static = meta.get("optpipe.kv_cache") == "static"
    context = int(meta["optpipe.max_length"])  # the static buffer, or the rotary table's length

    def token(name, default):
        value = getattr(tokenizer, name, None) if tokenizer is not None else None
        return value if isinstance(value, int) else default

    eos = token("eos_token_id", 2)  # genai's usual ids when none is known
    bos = token("bos_token_id", 1)
    pad = token("pad_token_id", eos)
    session = {"log_id": "onnxruntime-genai", "provider_options": []}
    model = {
        "type": meta.get("optpipe.model_type", "llama"), "vocab_size": int(meta["optpipe.vocab_size"]),
        "context_length": context, "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad,
        "decoder": {
            "session_options": session, "filename": model_file, "head_size": int(meta["optpipe.head_dim"]),
            # heads x head size: what onnxruntime-genai reads it as for decoder-only models (Gemma's differs from
            # the residual width; genai does not use it for them)
            "hidden_size": heads * int(meta["optpipe.head_dim"]), "num_attention_heads": heads, "num_key_value_heads": kv_heads,
            "num_hidden_layers": int(meta["optpipe.num_layers"]),
            "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                       "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
            "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                        "present_value_names": "present.%d.value"},
        },
    }
    search = {"do_sample": False, "max_length": context, "min_length": 0, "num_beams": 1, "num_return_sequences": 1,
              "past_present_share_buffer": static, "repetition_penalty": 1.0, "temperature": 1.0, "top_k": 1,
              "top_p": 1.0}
    return {"model": model, "search": search}
