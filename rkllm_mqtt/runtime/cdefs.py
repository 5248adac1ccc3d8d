"""cffi declarations of the RKLLM runtime, one text per ABI layout.

Written from ``rkllm.h`` of the vendor's releases: layout "1.2" is runtimes 1.2.1, 1.2.2 and 1.2.3 (one
identical layout), layout "1.3" is runtime 1.3.0. cffi in ABI mode never sees the real header, so these texts
ARE the ABI as far as Python knows: every struct is declared complete to the byte (reserved arrays, the
multimodal union members we never use, callbacks we never set), because a struct that is too short makes C
write past what we allocated. ``tests/test_abi_layout.py`` pins every size and offset that matters.

``rkllm_run_async`` is deliberately missing from both: in runtime 1.2.1 it never returns and never calls back
(rknn-llm issue 320). Leaving it out of the cdef means no code path can even look it up.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Final

__all__ = [
    "ABIS",
    "STATE_ERROR",
    "STATE_FINISH",
    "STATE_NORMAL",
    "STATE_WAITING",
    "cdef_for",
    "per_request_refusal",
]

ABIS: Final = ("1.2", "1.3")

# LLMCallState values (the same in every supported runtime).
STATE_NORMAL: Final = 0
STATE_WAITING: Final = 1  # text holds the first bytes of a UTF-8 character whose rest follows
STATE_FINISH: Final = 2
STATE_ERROR: Final = 3


def per_request_refusal(abi: str, *, sampling: Collection[str] = (), max_new_tokens: bool = False) -> str | None:
    """Why a run with per-request sampling settings (their names in ``sampling``), or a per-run token cap, cannot
    be expressed in layout ``abi``; None when it can.

    Only the 1.3 layout's RKLLMInferParam carries sampling settings and max_new_tokens; 1.2 has no field for
    them. (On 1.2 the worker enforces a request's max_new_tokens itself, so only the binding refuses it.)
    """
    if abi != "1.2":
        return None
    if sampling:
        names = ", ".join(sorted(sampling))
        return (
            f"per-request {names} need runtime 1.3; the loaded runtime uses the 1.2 layout "
            "(max_new_tokens works on both)"
        )
    if max_new_tokens:
        return "a per-run max_new_tokens needs runtime 1.3; the loaded runtime uses the 1.2 layout"
    return None


# Shared by both layouts. Enums are int-sized in both the vendor's C++ build and cffi.
_ENUMS = """
typedef void *LLMHandle;

typedef enum {
    RKLLM_RUN_NORMAL = 0,
    RKLLM_RUN_WAITING = 1,
    RKLLM_RUN_FINISH = 2,
    RKLLM_RUN_ERROR = 3
} LLMCallState;

typedef enum {
    RKLLM_INPUT_PROMPT = 0,
    RKLLM_INPUT_TOKEN = 1,
    RKLLM_INPUT_EMBED = 2,
    RKLLM_INPUT_MULTIMODAL = 3
} RKLLMInputType;

typedef enum {
    RKLLM_INFER_GENERATE = 0,
    RKLLM_INFER_GET_LAST_HIDDEN_LAYER = 1,
    RKLLM_INFER_GET_LOGITS = 2
} RKLLMInferMode;

typedef struct {
    int32_t base_domain_id;
    int8_t embed_flash;
    int8_t enabled_cpus_num;
    uint32_t enabled_cpus_mask;
    uint8_t n_batch;
    int8_t use_cross_attn;
    uint8_t reserved[104];
} RKLLMExtendParam;
"""

# The RKLLMParam fields before the ones that differ between layouts.
_PARAM_HEAD = """
    const char *model_path;
    int32_t max_context_len;
    int32_t max_new_tokens;
    int32_t top_k;
    int32_t n_keep;
    float top_p;
    float temperature;
    float repeat_penalty;
    float frequency_penalty;
    float presence_penalty;
    int32_t mirostat;
    float mirostat_tau;
    float mirostat_eta;
    bool skip_special_token;
"""

_PARAM_12 = (
    "typedef struct {"
    + _PARAM_HEAD
    + """
    bool is_async;
    const char *img_start;
    const char *img_end;
    const char *img_content;
    RKLLMExtendParam extend_param;
} RKLLMParam;
"""
)

# 1.3.0 added ignore_eos_token and dropped the img_* pointers: extend_param moves from 88 to 60.
_PARAM_13 = (
    "typedef struct {"
    + _PARAM_HEAD
    + """
    bool ignore_eos_token;
    bool is_async;
    RKLLMExtendParam extend_param;
} RKLLMParam;
"""
)

_INPUT_PARTS = """
typedef struct {
    const char *lora_adapter_path;
    const char *lora_adapter_name;
    float scale;
} RKLLMLoraAdapter;

typedef struct {
    float *embed;
    size_t n_tokens;
} RKLLMEmbedInput;

typedef struct {
    int32_t *input_ids;
    size_t n_tokens;
} RKLLMTokenInput;
"""

# The multimodal member is never used by the bridge, but it is the largest member of RKLLMInput's union and so
# decides how many bytes ffi.new("RKLLMInput *") allocates.
_MULTIMODAL_12 = """
typedef struct {
    char *prompt;
    float *image_embed;
    size_t n_image_tokens;
    size_t n_image;
    size_t image_width;
    size_t image_height;
} RKLLMMultiModalInput;
"""

_MULTIMODAL_13 = """
typedef struct {
    char *prompt;
    struct {
        float *image_embed;
        size_t n_image_tokens;
        size_t n_image;
        const char *image_start;
        const char *image_end;
        const char *image_content;
        size_t image_width;
        size_t image_height;
    } image;
    struct {
        float *video_embed;
        size_t n_frame_tokens;
        size_t n_frame_per_video;
        size_t n_video;
        const char *video_start;
        const char *video_end;
        const char *video_content;
        size_t frame_width;
        size_t frame_height;
    } video;
} RKLLMMultiModalInput;
"""

_INPUT_AND_RESULT = """
typedef struct {
    const char *role;
    bool enable_thinking;
    RKLLMInputType input_type;
    union {
        const char *prompt_input;
        RKLLMEmbedInput embed_input;
        RKLLMTokenInput token_input;
        RKLLMMultiModalInput multimodal_input;
    };
} RKLLMInput;

typedef struct {
    const char *lora_adapter_name;
} RKLLMLoraParam;

typedef struct {
    int save_prompt_cache;
    const char *prompt_cache_path;
} RKLLMPromptCacheParam;

typedef struct {
    float *encoder_k_cache;
    float *encoder_v_cache;
    float *encoder_mask;
    int32_t *encoder_pos;
    int num_tokens;
} RKLLMCrossAttnParam;

typedef struct {
    const float *hidden_states;
    int embd_size;
    int num_tokens;
} RKLLMResultLastHiddenLayer;

typedef struct {
    const float *logits;
    int vocab_size;
    int num_tokens;
} RKLLMResultLogits;

typedef struct {
    float prefill_time_ms;
    int prefill_tokens;
    float generate_time_ms;
    int generate_tokens;
    float memory_usage_mb;
} RKLLMPerfStat;

typedef struct {
    const char *text;
    int32_t token_id;
    RKLLMResultLastHiddenLayer last_hidden_layer;
    RKLLMResultLogits logits;
    RKLLMPerfStat perf;
} RKLLMResult;

typedef int (*LLMResultCallback)(RKLLMResult *result, void *userdata, LLMCallState state);
"""

_INFER_12 = """
typedef struct {
    RKLLMInferMode mode;
    RKLLMLoraParam *lora_params;
    RKLLMPromptCacheParam *prompt_cache_params;
    int keep_history;
} RKLLMInferParam;
"""

# 1.3.0 inserted sampling_params before keep_history and appended max_new_tokens.
_INFER_13 = """
typedef struct {
    int32_t top_k;
    float top_p;
    float temperature;
    float repeat_penalty;
    float frequency_penalty;
    float presence_penalty;
    int32_t mirostat;
    float mirostat_tau;
    float mirostat_eta;
} RKLLMSamplingParam;

typedef struct {
    RKLLMInferMode mode;
    RKLLMLoraParam *lora_params;
    RKLLMPromptCacheParam *prompt_cache_params;
    RKLLMSamplingParam *sampling_params;
    int keep_history;
    int32_t max_new_tokens;
} RKLLMInferParam;

typedef int (*LLMGetEmbedCallback)(void *userdata, int32_t *tokens, uint64_t num_tokens, void *embed,
                                   uint64_t len);
typedef int (*LLMTokenizerCallback)(void *userdata, const char *text, int32_t text_len, int32_t *tokens,
                                    int32_t n_tokens_max);

typedef struct {
    LLMResultCallback result_callback;
    void *result_userdata;
    LLMTokenizerCallback tokenizer_callback;
    void *tokenizer_userdata;
    LLMGetEmbedCallback embed_callback;
    void *embed_userdata;
} RKLLMCallback;
"""

# Functions common to both layouts, rkllm_init excepted. No rkllm_run_async: see the module docstring.
_FUNCTIONS = """
RKLLMParam rkllm_createDefaultParam(void);
int rkllm_load_lora(LLMHandle handle, RKLLMLoraAdapter *lora_adapter);
int rkllm_load_prompt_cache(LLMHandle handle, const char *prompt_cache_path);
int rkllm_release_prompt_cache(LLMHandle handle);
int rkllm_destroy(LLMHandle handle);
int rkllm_run(LLMHandle handle, RKLLMInput *rkllm_input, RKLLMInferParam *rkllm_infer_params, void *userdata);
int rkllm_abort(LLMHandle handle);
int rkllm_is_running(LLMHandle handle);
int rkllm_clear_kv_cache(LLMHandle handle, int keep_system_prompt, int *start_pos, int *end_pos);
int rkllm_get_kv_cache_size(LLMHandle handle, int *cache_sizes);
int rkllm_set_chat_template(LLMHandle handle, const char *system_prompt, const char *prompt_prefix,
                            const char *prompt_postfix);
int rkllm_set_function_tools(LLMHandle handle, const char *system_prompt, const char *tools,
                             const char *tool_response_str);
int rkllm_set_cross_attn_params(LLMHandle handle, RKLLMCrossAttnParam *cross_attn_params);
"""

# The third argument of rkllm_init is the function pointer itself on 1.2 and a struct of callbacks on 1.3.
_INIT_12 = "int rkllm_init(LLMHandle *handle, RKLLMParam *param, LLMResultCallback callback);\n"
_INIT_13 = "int rkllm_init(LLMHandle *handle, RKLLMParam *param, RKLLMCallback *callback);\n"

_CDEFS: Final[dict[str, str]] = {
    "1.2": _ENUMS + _PARAM_12 + _INPUT_PARTS + _MULTIMODAL_12 + _INPUT_AND_RESULT + _INFER_12 + _FUNCTIONS + _INIT_12,
    "1.3": _ENUMS + _PARAM_13 + _INPUT_PARTS + _MULTIMODAL_13 + _INPUT_AND_RESULT + _INFER_13 + _FUNCTIONS + _INIT_13,
}


def cdef_for(abi: str) -> str:
    """The cdef text for ABI layout ``abi`` ("1.2" or "1.3")."""
    try:
        return _CDEFS[abi]
    except KeyError:
        raise ValueError(f"unknown RKLLM ABI layout {abi!r}; expected one of {', '.join(ABIS)}") from None
