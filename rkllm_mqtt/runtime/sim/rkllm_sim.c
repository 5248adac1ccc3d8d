/*
 * rkllm_sim.c - a simulated RKLLM runtime (librkllmrt.so) for machines without a Rockchip NPU.
 *
 * It exports every function of the vendor's rkllm.h with the same struct layouts, so the bridge's cffi
 * binding, its worker process and its result callback run exactly as they would on a board. It is compiled
 * twice: RKLLM_SIM_ABI=12 gives the layout of runtimes 1.2.1-1.2.3, RKLLM_SIM_ABI=13 that of runtime 1.3.0.
 * The structs below are written from those headers; _Static_asserts pin their sizes and offsets, so the sim
 * and the binding's cdefs (tests/test_abi_layout.py) are both checked against the same numbers.
 *
 * Version evidence: the library holds the string "rkllm-runtime version: 1.2.3" (12 build) or
 * "rkllm-runtime version: 1.3.0" (13 build), which rkllm_init logs like the real runtime does. ABI detection
 * (rkllm_mqtt/runtime/abi.py) reads it from the file.
 *
 * Choosing the "model" (RKLLMParam.model_path):
 *   "sim:<spec>"         the rest of the string is the spec;
 *   any other string     a file that must exist (else "E rkllm: failed to open model file <path>" and
 *                        rkllm_init returns -1); if its first line starts with "sim:", the rest of that line is
 *                        the spec, otherwise the default spec is used.
 *
 * Spec: comma-separated key=value pairs, all optional. An unknown key or a bad value fails rkllm_init.
 *   tokens=N       tokens in a reply (default 24), counting the fixed prefix below. The reply is cut earlier by
 *                  max_new_tokens (the init value, or on 1.3 a per-run RKLLMInferParam.max_new_tokens > 0).
 *   rate=R         tokens per second (default 20; 0 = as fast as possible).
 *   prefill_ms=M   prefill time before the first token (default 150). Like the real NPU, prefill cannot be
 *                  interrupted: an abort during prefill takes effect right after it.
 *   lang=L         filler corpus: en (default), zh, emoji, mixed.
 *   split_utf8=1   every multi-byte UTF-8 character reaches the callback split across two callbacks: the part
 *                  holding its first bytes comes with state RKLLM_RUN_NORMAL and RKLLM_RUN_WAITING alternately
 *                  (the partial bytes are the text in both cases), the rest with RKLLM_RUN_NORMAL. Joining the
 *                  text of all NORMAL and WAITING callbacks gives the reply; decoding one callback alone breaks.
 *   fail_init=1    rkllm_init logs an error and returns -1.
 *   error_at=K     token K (1-based) is replaced by a callback with state RKLLM_RUN_ERROR and text NULL;
 *                  rkllm_run then returns -1 (no FINISH).
 *   hang_at=K      at token K rkllm_run blocks forever; rkllm_abort does not help (a hung runtime).
 *   crash_at=K     at token K the process gets SIGSEGV.
 *   tool_call=json|xml  function calling: when rkllm_set_function_tools set tools, a user turn whose prompt
 *                  names one of the tools is answered with a call of that tool instead of the usual reply, in
 *                  Qwen's form (json: <tool_call>{"name": ..., "arguments": {...}}</tool_call>) or the XML-like
 *                  one (xml: <tool_call><function=NAME><parameter=KEY>VALUE</parameter></function></tool_call>).
 *                  Every key=value word of the prompt becomes a string argument. Off by default.
 *   stamp=1        each token's text is CLOCK_MONOTONIC in nanoseconds, in decimal, then a space (latency
 *                  benchmarks compare it with the time the text reaches a subscriber).
 *   claim_version=V  rkllm_init logs "rkllm-runtime version: V" instead of the build's own version (the string
 *                  in the file stays the build's): a runtime whose init log contradicts the layout in use.
 *
 * Reply text (deterministic): "[turn N] " where N counts the turns in the simulated KV cache including this
 * one, then "[system: <system prompt>] " if rkllm_set_chat_template set a non-empty system prompt, then
 * "You said: <prompt>. ", then filler from the corpus (starting at index strlen(prompt) modulo the corpus
 * size, cycling) until `tokens` tokens were produced. A token is a run of non-space bytes plus the spaces
 * after it ("You ", "said: "), so the chunks joined give the text exactly; in the zh and emoji corpora each
 * filler character is one token. Example, tokens=6, prompt "hi": "[turn 1] You said: hi. the "
 * (tokens "[turn ", "1] ", "You ", "said: ", "hi. ", "the ").
 *
 * Callbacks come on the thread that called rkllm_run: state NORMAL per token, then FINISH with text NULL and
 * perf filled (also after an abort, and rkllm_run then returns 0). A callback that returns non-zero pauses
 * generation as the header describes: rkllm_run returns 0 without FINISH. The text buffer is overwritten
 * after each callback, as the real one is only valid during the call: a binding that keeps the pointer
 * instead of copying sees garbage.
 *
 * History: keep_history=1 keeps the turn in the simulated KV cache (the turn counter grows); keep_history=0
 * clears it after the run; rkllm_clear_kv_cache clears it.
 *
 * Validation: whatever looks like a wrong binding layout (NULL handle or input, input_type other than
 * RKLLM_INPUT_PROMPT, keep_history other than 0/1, an insane sampling struct, n_batch outside 1..100, ...)
 * makes the call log "E rkllm: ..." to stderr and return -1. Only one rkllm_run may be in flight per handle.
 *
 * Trace: when the environment variable RKLLM_SIM_TRACE names a file, every exported call appends one line to
 * it: the function name and its key arguments (rkllm_run shows the effective per-run values). Tests use it to
 * see what crossed the ABI, and that rkllm_run_async is never called. rkllm_run also writes "sim_prefill begin"
 * once it has started (an abort from then on is no longer forgotten) and "sim_prefill end aborted=0|1
 * elapsed_ms=M" after the prefill, so a test can act during the prefill and check afterwards that it did.
 * Its last line is "sim_run end ret=R generated=N prefill_tokens=P": runs that never overlap show as
 * alternating "rkllm_run ..." and "sim_run end" lines.
 *
 * rkllm_run_async behaves like the real 1.2.1 one: it writes its trace line and never returns.
 */

#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#ifndef RKLLM_SIM_ABI
#error "define RKLLM_SIM_ABI to 12 (runtime 1.2.1-1.2.3 layout) or 13 (runtime 1.3.0 layout)"
#endif
#if RKLLM_SIM_ABI != 12 && RKLLM_SIM_ABI != 13
#error "RKLLM_SIM_ABI must be 12 or 13"
#endif

/* The extension is built with the host's default flags; make the exports explicit in case they hide symbols. */
#define SIM_API __attribute__((visibility("default")))

/* ------------------------------------------------------------------------------------------------------ */
/* Types, written from rkllm.h of each runtime. Field order and types decide the ABI: do not "tidy" them.  */
/* ------------------------------------------------------------------------------------------------------ */

typedef void *LLMHandle;

typedef enum {
    RKLLM_RUN_NORMAL = 0,
    RKLLM_RUN_WAITING = 1, /* an incomplete UTF-8 character is pending */
    RKLLM_RUN_FINISH = 2,
    RKLLM_RUN_ERROR = 3,
} LLMCallState;

typedef enum {
    RKLLM_INPUT_PROMPT = 0,
    RKLLM_INPUT_TOKEN = 1,
    RKLLM_INPUT_EMBED = 2,
    RKLLM_INPUT_MULTIMODAL = 3,
} RKLLMInputType;

typedef enum {
    RKLLM_INFER_GENERATE = 0,
    RKLLM_INFER_GET_LAST_HIDDEN_LAYER = 1,
    RKLLM_INFER_GET_LOGITS = 2,
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

typedef struct {
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
#if RKLLM_SIM_ABI == 13
    bool ignore_eos_token; /* new in 1.3.0; the img_* pointers below went away, which moves extend_param */
#endif
    bool is_async;
#if RKLLM_SIM_ABI == 12
    const char *img_start;
    const char *img_end;
    const char *img_content;
#endif
    RKLLMExtendParam extend_param;
} RKLLMParam;

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

#if RKLLM_SIM_ABI == 12
typedef struct {
    char *prompt;
    float *image_embed;
    size_t n_image_tokens;
    size_t n_image;
    size_t image_width;
    size_t image_height;
} RKLLMMultiModalInput; /* spelled RKLLMMultiModelInput in the 1.2 header; the name does not reach the ABI */
#else
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
} RKLLMMultiModalInput; /* 1.3.0 grew it to 144 bytes, so RKLLMInput is 160 bytes instead of 64 */
#endif

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

#if RKLLM_SIM_ABI == 13
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
#endif

typedef struct {
    RKLLMInferMode mode;
    RKLLMLoraParam *lora_params;
    RKLLMPromptCacheParam *prompt_cache_params;
#if RKLLM_SIM_ABI == 13
    RKLLMSamplingParam *sampling_params; /* inserted before keep_history in 1.3.0: NULL = init values */
#endif
    int keep_history;
#if RKLLM_SIM_ABI == 13
    int32_t max_new_tokens; /* appended in 1.3.0: <= 0 = init value */
#endif
} RKLLMInferParam;

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

#if RKLLM_SIM_ABI == 13
typedef int (*LLMGetEmbedCallback)(void *userdata, int32_t *tokens, uint64_t num_tokens, void *embed, uint64_t len);
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
#endif

/* The numbers come from compiling each official header with g++ on LP64 (tests/test_abi_layout.py pins the same figures). */
#if defined(__LP64__)
_Static_assert(sizeof(RKLLMExtendParam) == 120, "RKLLMExtendParam size");
_Static_assert(sizeof(RKLLMPerfStat) == 20, "RKLLMPerfStat size");
_Static_assert(sizeof(RKLLMResult) == 72, "RKLLMResult size");
_Static_assert(offsetof(RKLLMResult, perf) == 48, "RKLLMResult.perf offset");
_Static_assert(offsetof(RKLLMInput, input_type) == 12, "RKLLMInput.input_type offset");
_Static_assert(offsetof(RKLLMInput, prompt_input) == 16, "RKLLMInput union offset");
_Static_assert(sizeof(RKLLMLoraAdapter) == 24, "RKLLMLoraAdapter size");
_Static_assert(sizeof(RKLLMPromptCacheParam) == 16, "RKLLMPromptCacheParam size");
_Static_assert(offsetof(RKLLMInferParam, lora_params) == 8, "RKLLMInferParam.lora_params offset");
#if RKLLM_SIM_ABI == 12
_Static_assert(sizeof(RKLLMParam) == 208, "1.2 RKLLMParam size");
_Static_assert(offsetof(RKLLMParam, extend_param) == 88, "1.2 RKLLMParam.extend_param offset");
_Static_assert(sizeof(RKLLMInput) == 64, "1.2 RKLLMInput size");
_Static_assert(sizeof(RKLLMInferParam) == 32, "1.2 RKLLMInferParam size");
_Static_assert(offsetof(RKLLMInferParam, keep_history) == 24, "1.2 RKLLMInferParam.keep_history offset");
#else
_Static_assert(sizeof(RKLLMParam) == 184, "1.3 RKLLMParam size");
_Static_assert(offsetof(RKLLMParam, extend_param) == 60, "1.3 RKLLMParam.extend_param offset");
_Static_assert(sizeof(RKLLMInput) == 160, "1.3 RKLLMInput size");
_Static_assert(sizeof(RKLLMInferParam) == 40, "1.3 RKLLMInferParam size");
_Static_assert(offsetof(RKLLMInferParam, sampling_params) == 24, "1.3 RKLLMInferParam.sampling_params offset");
_Static_assert(offsetof(RKLLMInferParam, keep_history) == 32, "1.3 RKLLMInferParam.keep_history offset");
_Static_assert(offsetof(RKLLMInferParam, max_new_tokens) == 36, "1.3 RKLLMInferParam.max_new_tokens offset");
_Static_assert(sizeof(RKLLMSamplingParam) == 36, "1.3 RKLLMSamplingParam size");
_Static_assert(sizeof(RKLLMCallback) == 48, "1.3 RKLLMCallback size");
#endif
#endif

/* ------------------------------------------------------------------------------------------------------ */
/* Version evidence and logging                                                                            */
/* ------------------------------------------------------------------------------------------------------ */

#if RKLLM_SIM_ABI == 12
#define SIM_RUNTIME_VERSION "1.2.3"
#else
#define SIM_RUNTIME_VERSION "1.3.0"
#endif

/* Kept as an object of its own (and used by rkllm_init's log line) so -O2 cannot drop or split it: ABI
 * detection finds exactly this byte string in the .so file. */
__attribute__((used)) static const char sim_version_evidence[] = "rkllm-runtime version: " SIM_RUNTIME_VERSION;

static void log_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void log_error(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("E rkllm: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    fflush(stderr);
    va_end(ap);
}

static void log_info(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void log_info(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("I rkllm: ", stdout);
    vfprintf(stdout, fmt, ap);
    fputc('\n', stdout);
    /* The worker reads these lines through a pipe: flush so they arrive with the event they describe. */
    fflush(stdout);
    va_end(ap);
}

static pthread_mutex_t trace_lock = PTHREAD_MUTEX_INITIALIZER;

/* One line per call to the file named by RKLLM_SIM_TRACE. The variable is read at every call so a test can
 * set it after the library was loaded. */
static void trace(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void trace(const char *fmt, ...) {
    const char *path = getenv("RKLLM_SIM_TRACE");
    if (path == NULL || path[0] == '\0') {
        return;
    }
    pthread_mutex_lock(&trace_lock);
    FILE *f = fopen(path, "a");
    if (f != NULL) {
        va_list ap;
        va_start(ap, fmt);
        vfprintf(f, fmt, ap);
        va_end(ap);
        fputc('\n', f);
        fclose(f);
    }
    pthread_mutex_unlock(&trace_lock);
}

static const char *str_or_null(const char *s) { return s == NULL ? "(null)" : s; }

/* ------------------------------------------------------------------------------------------------------ */
/* Time                                                                                                    */
/* ------------------------------------------------------------------------------------------------------ */

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void sleep_ns(uint64_t ns) {
    struct timespec req = {.tv_sec = (time_t)(ns / 1000000000ull), .tv_nsec = (long)(ns % 1000000000ull)};
    struct timespec rem;
    while (nanosleep(&req, &rem) != 0 && errno == EINTR) {
        req = rem;
    }
}

/* ------------------------------------------------------------------------------------------------------ */
/* The simulated model                                                                                     */
/* ------------------------------------------------------------------------------------------------------ */

enum { LANG_EN, LANG_ZH, LANG_EMOJI, LANG_MIXED };

typedef struct {
    int tokens;
    double rate;
    int prefill_ms;
    int lang;
    bool split_utf8;
    bool fail_init;
    int error_at;
    int hang_at;
    int crash_at;
    bool stamp;
    char claim_version[24];
    int tool_call; /* TOOL_CALL_OFF, TOOL_CALL_JSON or TOOL_CALL_XML */
} SimSpec;

enum { TOOL_CALL_OFF, TOOL_CALL_JSON, TOOL_CALL_XML };

#define SIM_MAGIC 0x524b4c4cu /* "RKLL": tells a live handle from a stray pointer */
#define SIM_MAX_LORAS 16

typedef struct {
    uint32_t magic;
    SimSpec spec;
    char *model_path;
    /* init-time generation settings, the defaults for every run */
    int32_t max_context_len;
    int32_t max_new_tokens;
    int32_t top_k;
    float top_p;
    float temperature;
    float repeat_penalty;
    float frequency_penalty;
    float presence_penalty;
    LLMResultCallback callback;
    void *result_userdata;
    char *system_prompt;
    char *prompt_prefix;
    char *prompt_postfix;
    char *tools; /* the JSON of rkllm_set_function_tools, NULL when none are set */
    char *loras[SIM_MAX_LORAS];
    int n_loras;
    bool prompt_cache_loaded;
    int turns;     /* conversation turns held in the simulated KV cache */
    int kv_tokens; /* positions held, for rkllm_get_kv_cache_size */
    atomic_bool running;
    atomic_bool abort_requested;
    /* Wakes the wait between tokens when an abort arrives, so pacing needs no polling. */
    pthread_mutex_t wake_lock;
    pthread_cond_t wake;
} SimModel;

static const char *const corpus_en[] = {
    "the ",   "quick ", "brown ", "fox ",    "jumps ", "over ",  "a ",      "lazy ",   "dog ",   "while ",
    "small ", "robots ", "count ", "tokens ", "under ", "quiet ", "skies ", "and ",    "models ", "dream ",
    "of ",    "fast ",  "npus ",  "humming ",
};
static const char *const corpus_zh[] = {
    "你", "好", "世", "界", "这", "是", "一", "个", "模", "拟", "的", "回", "答", "，",
    "我", "们", "正", "在", "测", "试", "流", "式", "输", "出", "。",
};
static const char *const corpus_emoji[] = {
    "😀", "🚀", "🌍", "🎉", "🤖", "✨", "🔥", "💡", "🌸", "🍀", "⚡", "🧠",
};
static const char *const corpus_mixed[] = {
    "hello ", "你", "🚀", "café ", "世", "✨", "naïve ", "界", "🤖", "Grüße ", "模", "½ ",
};

#define COUNT_OF(a) (sizeof(a) / sizeof((a)[0]))

static const char *filler_token(int lang, size_t index) {
    switch (lang) {
    case LANG_ZH:
        return corpus_zh[index % COUNT_OF(corpus_zh)];
    case LANG_EMOJI:
        return corpus_emoji[index % COUNT_OF(corpus_emoji)];
    case LANG_MIXED:
        return corpus_mixed[index % COUNT_OF(corpus_mixed)];
    default:
        return corpus_en[index % COUNT_OF(corpus_en)];
    }
}

static bool parse_int(const char *text, int min, int *out) {
    char *end = NULL;
    errno = 0;
    long value = strtol(text, &end, 10);
    if (errno != 0 || end == text || *end != '\0' || value < min || value > 1000000000L) {
        return false;
    }
    *out = (int)value;
    return true;
}

static bool parse_flag(const char *text, bool *out) {
    if (strcmp(text, "0") == 0 || strcmp(text, "1") == 0) {
        *out = text[0] == '1';
        return true;
    }
    return false;
}

static bool parse_spec(const char *text, SimSpec *spec) {
    *spec = (SimSpec){.tokens = 24, .rate = 20.0, .prefill_ms = 150, .lang = LANG_EN};
    char *copy = strdup(text);
    if (copy == NULL) {
        log_error("out of memory");
        return false;
    }
    bool ok = true;
    char *save = NULL;
    for (char *item = strtok_r(copy, ",", &save); item != NULL && ok; item = strtok_r(NULL, ",", &save)) {
        while (*item == ' ') {
            item++;
        }
        if (*item == '\0') {
            continue;
        }
        char *eq = strchr(item, '=');
        if (eq == NULL) {
            log_error("sim model spec: \"%s\" is not key=value", item);
            ok = false;
            break;
        }
        *eq = '\0';
        const char *key = item;
        const char *value = eq + 1;
        bool good;
        if (strcmp(key, "tokens") == 0) {
            good = parse_int(value, 1, &spec->tokens);
        } else if (strcmp(key, "rate") == 0) {
            char *end = NULL;
            spec->rate = strtod(value, &end);
            good = end != value && *end == '\0' && spec->rate >= 0.0 && spec->rate <= 1e6;
        } else if (strcmp(key, "prefill_ms") == 0) {
            good = parse_int(value, 0, &spec->prefill_ms);
        } else if (strcmp(key, "lang") == 0) {
            good = true;
            if (strcmp(value, "en") == 0) {
                spec->lang = LANG_EN;
            } else if (strcmp(value, "zh") == 0) {
                spec->lang = LANG_ZH;
            } else if (strcmp(value, "emoji") == 0) {
                spec->lang = LANG_EMOJI;
            } else if (strcmp(value, "mixed") == 0) {
                spec->lang = LANG_MIXED;
            } else {
                good = false;
            }
        } else if (strcmp(key, "split_utf8") == 0) {
            good = parse_flag(value, &spec->split_utf8);
        } else if (strcmp(key, "fail_init") == 0) {
            good = parse_flag(value, &spec->fail_init);
        } else if (strcmp(key, "error_at") == 0) {
            good = parse_int(value, 1, &spec->error_at);
        } else if (strcmp(key, "hang_at") == 0) {
            good = parse_int(value, 1, &spec->hang_at);
        } else if (strcmp(key, "crash_at") == 0) {
            good = parse_int(value, 1, &spec->crash_at);
        } else if (strcmp(key, "tool_call") == 0) {
            good = true;
            if (strcmp(value, "json") == 0) {
                spec->tool_call = TOOL_CALL_JSON;
            } else if (strcmp(value, "xml") == 0) {
                spec->tool_call = TOOL_CALL_XML;
            } else {
                good = false;
            }
        } else if (strcmp(key, "stamp") == 0) {
            good = parse_flag(value, &spec->stamp);
        } else if (strcmp(key, "claim_version") == 0) {
            size_t len = strlen(value);
            good = len > 0 && len < sizeof spec->claim_version && strspn(value, "0123456789.") == len;
            if (good) {
                memcpy(spec->claim_version, value, len + 1);
            }
        } else {
            log_error("sim model spec: unknown key \"%s\" (known: tokens, rate, prefill_ms, lang, split_utf8, "
                      "fail_init, error_at, hang_at, crash_at, stamp, claim_version, tool_call)",
                      key);
            ok = false;
            break;
        }
        if (!good) {
            log_error("sim model spec: bad value \"%s\" for %s", value, key);
            ok = false;
        }
    }
    free(copy);
    return ok;
}

/* Reads the spec for a model path; returns a malloc'ed string, or NULL after logging why. */
static char *spec_for_model(const char *model_path) {
    if (strncmp(model_path, "sim:", 4) == 0) {
        return strdup(model_path + 4);
    }
    FILE *f = fopen(model_path, "rb");
    if (f == NULL) {
        log_error("failed to open model file %s", model_path);
        return NULL;
    }
    char line[1024];
    char *spec;
    if (fgets(line, sizeof line, f) != NULL && strncmp(line, "sim:", 4) == 0) {
        line[strcspn(line, "\r\n")] = '\0';
        spec = strdup(line + 4);
    } else {
        spec = strdup("");
    }
    fclose(f);
    return spec;
}

static SimModel *model_from_handle(LLMHandle handle, const char *function) {
    SimModel *model = (SimModel *)handle;
    if (model == NULL) {
        log_error("%s: handle is NULL", function);
        return NULL;
    }
    if (model->magic != SIM_MAGIC) {
        log_error("%s: invalid handle %p", function, handle);
        return NULL;
    }
    return model;
}

static char *dup_or_empty(const char *s) { return strdup(s == NULL ? "" : s); }

/* VmHWM is what the real runtime reports as memory_usage_mb. */
static float peak_rss_mb(void) {
    FILE *f = fopen("/proc/self/status", "r");
    if (f == NULL) {
        return 0.0f;
    }
    char line[256];
    float mb = 0.0f;
    while (fgets(line, sizeof line, f) != NULL) {
        long kb;
        if (sscanf(line, "VmHWM: %ld kB", &kb) == 1) {
            mb = (float)kb / 1024.0f;
            break;
        }
    }
    fclose(f);
    return mb;
}

/* ------------------------------------------------------------------------------------------------------ */
/* Tokens of one reply                                                                                     */
/* ------------------------------------------------------------------------------------------------------ */

typedef struct {
    char **items;
    int count;
    int capacity;
} TokenList;

static bool tokens_push(TokenList *list, const char *start, size_t len) {
    if (list->count == list->capacity) {
        int capacity = list->capacity == 0 ? 64 : list->capacity * 2;
        char **items = realloc(list->items, (size_t)capacity * sizeof *items);
        if (items == NULL) {
            return false;
        }
        list->items = items;
        list->capacity = capacity;
    }
    char *token = malloc(len + 1);
    if (token == NULL) {
        return false;
    }
    memcpy(token, start, len);
    token[len] = '\0';
    list->items[list->count++] = token;
    return true;
}

static void tokens_free(TokenList *list) {
    for (int i = 0; i < list->count; i++) {
        free(list->items[i]);
    }
    free(list->items);
    *list = (TokenList){0};
}

/* Cuts text into tokens, each a run of non-space bytes plus the spaces after it, stopping at `limit`. */
static bool tokenize_words(TokenList *list, const char *text, int limit) {
    const char *p = text;
    while (*p != '\0' && list->count < limit) {
        const char *start = p;
        while (*p != '\0' && *p != ' ') {
            p++;
        }
        while (*p == ' ') {
            p++;
        }
        if (!tokens_push(list, start, (size_t)(p - start))) {
            return false;
        }
    }
    return true;
}

static int count_words(const char *text) {
    int words = 0;
    bool in_word = false;
    for (const char *p = text; *p != '\0'; p++) {
        bool space = *p == ' ' || *p == '\n' || *p == '\t' || *p == '\r';
        if (!space && !in_word) {
            words++;
        }
        in_word = !space;
    }
    return words;
}

static bool build_reply(const SimModel *model, const char *prompt, int turn, int limit, TokenList *out) {
    const char *system = model->system_prompt != NULL ? model->system_prompt : "";
    size_t size = strlen(prompt) + strlen(system) + 64;
    char *prefix = malloc(size);
    if (prefix == NULL) {
        return false;
    }
    int n = snprintf(prefix, size, "[turn %d] ", turn);
    if (system[0] != '\0') {
        n += snprintf(prefix + n, size - (size_t)n, "[system: %s] ", system);
    }
    snprintf(prefix + n, size - (size_t)n, "You said: %s. ", prompt);
    bool ok = tokenize_words(out, prefix, limit);
    free(prefix);
    size_t index = strlen(prompt);
    while (ok && out->count < limit) {
        const char *word = filler_token(model->spec.lang, index++);
        ok = tokens_push(out, word, strlen(word));
    }
    return ok;
}

/* ------------------------------------------------------------------------------------------------------ */
/* Function calling                                                                                        */
/* ------------------------------------------------------------------------------------------------------ */

/* A growing string; every append reports failure (out of memory) so callers can give up cleanly. */
typedef struct {
    char *data;
    size_t len;
    size_t cap;
} Text;

static bool text_append(Text *t, const char *s, size_t n) {
    if (t->len + n + 1 > t->cap) {
        size_t cap = t->cap == 0 ? 256 : t->cap;
        while (t->len + n + 1 > cap) {
            cap *= 2;
        }
        char *data = realloc(t->data, cap);
        if (data == NULL) {
            return false;
        }
        t->data = data;
        t->cap = cap;
    }
    memcpy(t->data + t->len, s, n);
    t->len += n;
    t->data[t->len] = '\0';
    return true;
}

static bool text_add(Text *t, const char *s) { return text_append(t, s, strlen(s)); }

/* The first tool of the tools JSON whose name the prompt mentions: every "name": "<value>" in the JSON is a
 * candidate (a crude scan, enough for a simulated model). Returns a malloc'ed name or NULL. */
static char *tool_named_in(const char *tools, const char *prompt) {
    const char *p = tools;
    while ((p = strstr(p, "\"name\"")) != NULL) {
        p += 6;
        while (*p == ' ' || *p == '\n' || *p == '\t') {
            p++;
        }
        if (*p != ':') {
            continue;
        }
        p++;
        while (*p == ' ' || *p == '\n' || *p == '\t') {
            p++;
        }
        if (*p != '"') {
            continue;
        }
        const char *start = ++p;
        while (*p != '\0' && *p != '"' && *p != '\\') {
            p++;
        }
        size_t len = (size_t)(p - start);
        if (len == 0 || *p != '"') {
            continue;
        }
        char *name = strndup(start, len);
        if (name != NULL && strstr(prompt, name) != NULL) {
            return name;
        }
        free(name);
    }
    return NULL;
}

/* Appends the call's arguments: every key=value word of the prompt (trailing punctuation dropped). */
static bool add_arguments(Text *t, const char *prompt, int format) {
    bool ok = true;
    bool first = true;
    const char *p = prompt;
    while (ok && *p != '\0') {
        while (*p == ' ' || *p == '\n' || *p == '\t') {
            p++;
        }
        const char *start = p;
        while (*p != '\0' && *p != ' ' && *p != '\n' && *p != '\t') {
            p++;
        }
        const char *end = p;
        while (end > start && (end[-1] == '.' || end[-1] == ',' || end[-1] == '?' || end[-1] == '!')) {
            end--;
        }
        const char *eq = memchr(start, '=', (size_t)(end - start));
        if (eq == NULL || eq == start || eq + 1 >= end || memchr(start, '"', (size_t)(end - start)) != NULL ||
            memchr(start, '\\', (size_t)(end - start)) != NULL || memchr(start, '<', (size_t)(end - start)) != NULL) {
            continue;
        }
        size_t key_len = (size_t)(eq - start);
        size_t value_len = (size_t)(end - eq - 1);
        if (format == TOOL_CALL_JSON) {
            ok = text_add(t, first ? "\"" : ", \"") && text_append(t, start, key_len) && text_add(t, "\": \"") &&
                 text_append(t, eq + 1, value_len) && text_add(t, "\"");
        } else {
            ok = text_add(t, "<parameter=") && text_append(t, start, key_len) && text_add(t, ">\n") &&
                 text_append(t, eq + 1, value_len) && text_add(t, "\n</parameter>\n");
        }
        first = false;
    }
    return ok;
}

/* The reply of a user turn that names a tool: the call, as the configured format writes it. */
static bool build_tool_call(const SimModel *model, const char *name, const char *prompt, int limit, TokenList *out) {
    Text t = {0};
    bool ok;
    if (model->spec.tool_call == TOOL_CALL_JSON) {
        ok = text_add(&t, "<tool_call>\n{\"name\": \"") && text_add(&t, name) && text_add(&t, "\", \"arguments\": {") &&
             add_arguments(&t, prompt, TOOL_CALL_JSON) && text_add(&t, "}}\n</tool_call>");
    } else {
        ok = text_add(&t, "<tool_call>\n<function=") && text_add(&t, name) && text_add(&t, ">\n") &&
             add_arguments(&t, prompt, TOOL_CALL_XML) && text_add(&t, "</function>\n</tool_call>");
    }
    ok = ok && tokenize_words(out, t.data, limit);
    free(t.data);
    return ok;
}

static const char *const thinking_tokens[] = {"<think>\n", "thinking ", "it ", "over\n", "</think>\n\n"};

/* The reply of one run: thinking first when asked for, then a tool call or the usual reply. */
static bool build_run_reply(const SimModel *model, const RKLLMInput *input, int turn, int limit, TokenList *out) {
    const char *prompt = input->prompt_input;
    if (input->enable_thinking) {
        for (size_t i = 0; i < COUNT_OF(thinking_tokens) && out->count < limit; i++) {
            if (!tokens_push(out, thinking_tokens[i], strlen(thinking_tokens[i]))) {
                return false;
            }
        }
    }
    if (model->spec.tool_call != TOOL_CALL_OFF && model->tools != NULL && strcmp(input->role, "user") == 0) {
        char *name = tool_named_in(model->tools, prompt);
        if (name != NULL) {
            bool ok = build_tool_call(model, name, prompt, limit, out);
            free(name);
            return ok;
        }
    }
    TokenList reply = {0};
    bool ok = build_reply(model, prompt, turn, limit - out->count, &reply);
    for (int i = 0; ok && i < reply.count; i++) {
        ok = tokens_push(out, reply.items[i], strlen(reply.items[i]));
    }
    tokens_free(&reply);
    return ok;
}

/* ------------------------------------------------------------------------------------------------------ */
/* Delivering tokens                                                                                       */
/* ------------------------------------------------------------------------------------------------------ */

typedef struct {
    SimModel *model;
    void *userdata;
    int split_count; /* alternates NORMAL / WAITING for the first half of split characters */
    int32_t token_id;
} RunContext;

static int call_back(RunContext *ctx, const char *text, size_t len, LLMCallState state) {
    /* A private buffer, scribbled over afterwards: the pointer is only valid during the callback. */
    char buffer[96];
    char *heap = NULL;
    char *data = buffer;
    if (len + 1 > sizeof buffer) {
        heap = malloc(len + 1);
        if (heap == NULL) {
            return 0;
        }
        data = heap;
    }
    memcpy(data, text, len);
    data[len] = '\0';
    RKLLMResult result;
    memset(&result, 0, sizeof result);
    result.text = data;
    result.token_id = ctx->token_id;
    int ret = ctx->model->callback(&result, ctx->userdata, state);
    memset(data, '?', len);
    free(heap);
    return ret;
}

static size_t utf8_length(unsigned char lead) {
    if (lead >= 0xf0) {
        return 4;
    }
    if (lead >= 0xe0) {
        return 3;
    }
    if (lead >= 0xc0) {
        return 2;
    }
    return 1;
}

static int deliver_token(RunContext *ctx, const char *text) {
    size_t len = strlen(text);
    if (!ctx->model->spec.split_utf8) {
        return call_back(ctx, text, len, RKLLM_RUN_NORMAL);
    }
    /* Cut inside every multi-byte character: the first piece ends halfway through it. */
    size_t piece_start = 0;
    size_t i = 0;
    while (i < len) {
        size_t char_len = utf8_length((unsigned char)text[i]);
        if (char_len > 1 && i + char_len <= len) {
            size_t cut = i + char_len / 2;
            LLMCallState state = (ctx->split_count++ % 2 == 0) ? RKLLM_RUN_NORMAL : RKLLM_RUN_WAITING;
            int ret = call_back(ctx, text + piece_start, cut - piece_start, state);
            if (ret != 0) {
                return ret;
            }
            piece_start = cut;
        }
        i += char_len;
    }
    return call_back(ctx, text + piece_start, len - piece_start, RKLLM_RUN_NORMAL);
}

/* Waits between tokens; an abort ends the wait early (generation is interruptible, prefill is not).
 * A condition variable on CLOCK_MONOTONIC: the wait costs one wake-up, not a poll every few milliseconds. */
static bool wait_or_abort(SimModel *model, uint64_t ns) {
    uint64_t deadline = now_ns() + ns;
    struct timespec until = {.tv_sec = (time_t)(deadline / 1000000000ull),
                             .tv_nsec = (long)(deadline % 1000000000ull)};
    bool aborted = false;
    pthread_mutex_lock(&model->wake_lock);
    for (;;) {
        aborted = atomic_load(&model->abort_requested);
        if (aborted || now_ns() >= deadline) {
            break;
        }
        int rc = pthread_cond_timedwait(&model->wake, &model->wake_lock, &until);
        if (rc == ETIMEDOUT) {
            aborted = atomic_load(&model->abort_requested);
            break;
        }
    }
    pthread_mutex_unlock(&model->wake_lock);
    return !aborted;
}

/* ------------------------------------------------------------------------------------------------------ */
/* Exported API                                                                                            */
/* ------------------------------------------------------------------------------------------------------ */

SIM_API RKLLMParam rkllm_createDefaultParam(void) {
    trace("rkllm_createDefaultParam");
    RKLLMParam param;
    memset(&param, 0, sizeof param);
    param.model_path = NULL;
    param.max_context_len = 512;
    param.max_new_tokens = -1;
    param.top_k = 40;
    param.n_keep = -1;
    param.top_p = 0.9f;
    param.temperature = 0.8f;
    param.repeat_penalty = 1.1f;
    param.frequency_penalty = 0.0f;
    param.presence_penalty = 0.0f;
    param.mirostat = 0;
    param.mirostat_tau = 5.0f;
    param.mirostat_eta = 0.1f;
    param.skip_special_token = false;
    param.is_async = false;
    param.extend_param.base_domain_id = 0;
    param.extend_param.embed_flash = 0;
    param.extend_param.enabled_cpus_num = 0;
    param.extend_param.enabled_cpus_mask = 0;
    param.extend_param.n_batch = 1;
    param.extend_param.use_cross_attn = 0;
    return param;
}

#if RKLLM_SIM_ABI == 12
SIM_API int rkllm_init(LLMHandle *handle, RKLLMParam *param, LLMResultCallback callback) {
    LLMResultCallback result_callback = callback;
    void *result_userdata = NULL;
#else
SIM_API int rkllm_init(LLMHandle *handle, RKLLMParam *param, RKLLMCallback *callback) {
    LLMResultCallback result_callback = callback != NULL ? callback->result_callback : NULL;
    void *result_userdata = callback != NULL ? callback->result_userdata : NULL;
#endif
    if (param == NULL) {
        trace("rkllm_init param=NULL");
        log_error("rkllm_init: param is NULL");
        return -1;
    }
    trace("rkllm_init model_path=%s max_context_len=%d max_new_tokens=%d top_k=%d top_p=%.2f temperature=%.2f "
          "repeat_penalty=%.2f frequency_penalty=%.2f presence_penalty=%.2f skip_special_token=%d "
          "enabled_cpus_num=%d enabled_cpus_mask=0x%x embed_flash=%d n_batch=%d",
          str_or_null(param->model_path), param->max_context_len, param->max_new_tokens, param->top_k,
          (double)param->top_p, (double)param->temperature, (double)param->repeat_penalty,
          (double)param->frequency_penalty, (double)param->presence_penalty, (int)param->skip_special_token,
          (int)param->extend_param.enabled_cpus_num, (unsigned)param->extend_param.enabled_cpus_mask,
          (int)param->extend_param.embed_flash, (int)param->extend_param.n_batch);
    /* The spec is read first because it may change the version this init claims. */
    char *spec_text = param->model_path != NULL ? spec_for_model(param->model_path) : NULL;
    SimSpec spec = {0};
    bool spec_ok = spec_text != NULL && parse_spec(spec_text, &spec);
    free(spec_text);
    if (spec_ok && spec.claim_version[0] != '\0') {
        log_info("rkllm-runtime version: %s, rknpu driver version: sim, platform: SIM", spec.claim_version);
    } else {
        log_info("%s, rknpu driver version: sim, platform: SIM", sim_version_evidence);
    }
    if (handle == NULL) {
        log_error("rkllm_init: handle pointer is NULL");
        return -1;
    }
    *handle = NULL;
    if (result_callback == NULL) {
        log_error("rkllm_init: result callback is NULL");
        return -1;
    }
    if (param->model_path == NULL) {
        log_error("rkllm_init: model_path is NULL");
        return -1;
    }
    if (param->extend_param.n_batch < 1 || param->extend_param.n_batch > 100) {
        log_error("The n_batch must be between 1 and 100, but got %d", (int)param->extend_param.n_batch);
        return -1;
    }
    if (param->max_context_len <= 0) {
        log_error("rkllm_init: max_context_len must be positive, got %d", param->max_context_len);
        return -1;
    }
    if (param->is_async) {
        log_error("rkllm_init: is_async is not supported by the simulated runtime");
        return -1;
    }
    if (!spec_ok) {
        log_error("failed to load model %s", param->model_path);
        return -1;
    }
    if (spec.fail_init) {
        log_error("simulated init failure (fail_init=1) for model %s", param->model_path);
        return -1;
    }
    SimModel *model = calloc(1, sizeof *model);
    if (model == NULL) {
        log_error("out of memory");
        return -1;
    }
    model->magic = SIM_MAGIC;
    model->spec = spec;
    model->model_path = strdup(param->model_path);
    model->max_context_len = param->max_context_len;
    model->max_new_tokens = param->max_new_tokens;
    model->top_k = param->top_k;
    model->top_p = param->top_p;
    model->temperature = param->temperature;
    model->repeat_penalty = param->repeat_penalty;
    model->frequency_penalty = param->frequency_penalty;
    model->presence_penalty = param->presence_penalty;
    model->callback = result_callback;
    model->result_userdata = result_userdata;
    atomic_init(&model->running, false);
    atomic_init(&model->abort_requested, false);
    pthread_condattr_t wake_attr;
    pthread_condattr_init(&wake_attr);
    pthread_condattr_setclock(&wake_attr, CLOCK_MONOTONIC);
    pthread_mutex_init(&model->wake_lock, NULL);
    pthread_cond_init(&model->wake, &wake_attr);
    pthread_condattr_destroy(&wake_attr);
    *handle = model;
    log_info("sim model loaded: %s (tokens=%d rate=%.1f prefill_ms=%d)", param->model_path, spec.tokens, spec.rate,
             spec.prefill_ms);
    return 0;
}

SIM_API int rkllm_load_lora(LLMHandle handle, RKLLMLoraAdapter *lora_adapter) {
    if (lora_adapter == NULL) {
        trace("rkllm_load_lora lora_adapter=NULL");
        log_error("rkllm_load_lora: lora_adapter is NULL");
        return -1;
    }
    trace("rkllm_load_lora path=%s name=%s scale=%.2f", str_or_null(lora_adapter->lora_adapter_path),
          str_or_null(lora_adapter->lora_adapter_name), (double)lora_adapter->scale);
    SimModel *model = model_from_handle(handle, "rkllm_load_lora");
    if (model == NULL) {
        return -1;
    }
    if (lora_adapter->lora_adapter_path == NULL || lora_adapter->lora_adapter_name == NULL) {
        log_error("rkllm_load_lora: lora_adapter_path and lora_adapter_name are required");
        return -1;
    }
    if (strncmp(lora_adapter->lora_adapter_path, "sim:", 4) != 0) {
        FILE *f = fopen(lora_adapter->lora_adapter_path, "rb");
        if (f == NULL) {
            log_error("failed to open lora file %s", lora_adapter->lora_adapter_path);
            return -1;
        }
        fclose(f);
    }
    if (model->n_loras == SIM_MAX_LORAS) {
        log_error("rkllm_load_lora: too many lora adapters (max %d)", SIM_MAX_LORAS);
        return -1;
    }
    model->loras[model->n_loras++] = strdup(lora_adapter->lora_adapter_name);
    return 0;
}

SIM_API int rkllm_load_prompt_cache(LLMHandle handle, const char *prompt_cache_path) {
    trace("rkllm_load_prompt_cache path=%s", str_or_null(prompt_cache_path));
    SimModel *model = model_from_handle(handle, "rkllm_load_prompt_cache");
    if (model == NULL) {
        return -1;
    }
    if (prompt_cache_path == NULL) {
        log_error("rkllm_load_prompt_cache: path is NULL");
        return -1;
    }
    FILE *f = fopen(prompt_cache_path, "rb");
    if (f == NULL) {
        log_error("failed to open prompt cache file %s", prompt_cache_path);
        return -1;
    }
    fclose(f);
    model->prompt_cache_loaded = true;
    return 0;
}

SIM_API int rkllm_release_prompt_cache(LLMHandle handle) {
    trace("rkllm_release_prompt_cache");
    SimModel *model = model_from_handle(handle, "rkllm_release_prompt_cache");
    if (model == NULL) {
        return -1;
    }
    model->prompt_cache_loaded = false;
    return 0;
}

SIM_API int rkllm_destroy(LLMHandle handle) {
    trace("rkllm_destroy");
    SimModel *model = model_from_handle(handle, "rkllm_destroy");
    if (model == NULL) {
        return -1;
    }
    if (atomic_load(&model->running)) {
        log_error("rkllm_destroy: rkllm_run is still running on this handle");
        return -1;
    }
    model->magic = 0;
    for (int i = 0; i < model->n_loras; i++) {
        free(model->loras[i]);
    }
    free(model->model_path);
    free(model->system_prompt);
    free(model->prompt_prefix);
    free(model->prompt_postfix);
    free(model->tools);
    pthread_cond_destroy(&model->wake);
    pthread_mutex_destroy(&model->wake_lock);
    free(model);
    return 0;
}

static bool validate_run(SimModel *model, const RKLLMInput *input, const RKLLMInferParam *infer) {
    if (input == NULL) {
        log_error("rkllm_run: rkllm_input is NULL");
        return false;
    }
    if (infer == NULL) {
        log_error("rkllm_run: rkllm_infer_params is NULL");
        return false;
    }
    if (input->input_type != RKLLM_INPUT_PROMPT) {
        log_error("rkllm_run: the simulated runtime supports input_type RKLLM_INPUT_PROMPT (0) only, got %d",
                  (int)input->input_type);
        return false;
    }
    if (input->prompt_input == NULL) {
        log_error("rkllm_run: prompt_input is NULL");
        return false;
    }
    if (input->role == NULL || (strcmp(input->role, "user") != 0 && strcmp(input->role, "tool") != 0)) {
        log_error("rkllm_run: role must be \"user\" or \"tool\", got %s", str_or_null(input->role));
        return false;
    }
    if (infer->mode != RKLLM_INFER_GENERATE) {
        log_error("rkllm_run: the simulated runtime supports mode RKLLM_INFER_GENERATE (0) only, got %d",
                  (int)infer->mode);
        return false;
    }
    if (infer->keep_history != 0 && infer->keep_history != 1) {
        log_error("rkllm_run: keep_history must be 0 or 1, got %d", infer->keep_history);
        return false;
    }
    if (infer->lora_params != NULL) {
        const char *name = infer->lora_params->lora_adapter_name;
        bool found = false;
        for (int i = 0; name != NULL && i < model->n_loras; i++) {
            found = found || strcmp(model->loras[i], name) == 0;
        }
        if (!found) {
            log_error("rkllm_run: lora adapter %s is not loaded", str_or_null(name));
            return false;
        }
    }
    if (infer->prompt_cache_params != NULL) {
        const RKLLMPromptCacheParam *cache = infer->prompt_cache_params;
        if (cache->save_prompt_cache != 0 && cache->save_prompt_cache != 1) {
            log_error("rkllm_run: save_prompt_cache must be 0 or 1, got %d", cache->save_prompt_cache);
            return false;
        }
        if (cache->save_prompt_cache == 1 && cache->prompt_cache_path == NULL) {
            log_error("rkllm_run: save_prompt_cache is set but prompt_cache_path is NULL");
            return false;
        }
    }
#if RKLLM_SIM_ABI == 13
    const RKLLMSamplingParam *sp = infer->sampling_params;
    if (sp != NULL &&
        (sp->top_k < 0 || sp->top_k > 100000 || !(sp->top_p > 0.0f && sp->top_p <= 1.0f) ||
         !(sp->temperature >= 0.0f && sp->temperature <= 100.0f) ||
         !(sp->repeat_penalty > 0.0f && sp->repeat_penalty <= 100.0f) || sp->mirostat < 0 || sp->mirostat > 2)) {
        log_error("rkllm_run: invalid sampling_params (top_k=%d top_p=%f temperature=%f repeat_penalty=%f "
                  "mirostat=%d)",
                  sp->top_k, (double)sp->top_p, (double)sp->temperature, (double)sp->repeat_penalty, sp->mirostat);
        return false;
    }
#endif
    return true;
}

SIM_API int rkllm_run(LLMHandle handle, RKLLMInput *rkllm_input, RKLLMInferParam *rkllm_infer_params,
                      void *userdata) {
    SimModel *model = model_from_handle(handle, "rkllm_run");
    if (model == NULL || rkllm_input == NULL || rkllm_infer_params == NULL) {
        trace("rkllm_run handle=%p input=%p infer_params=%p", handle, (void *)rkllm_input,
              (void *)rkllm_infer_params);
        if (model != NULL) {
            validate_run(model, rkllm_input, rkllm_infer_params);
        }
        return -1;
    }
    /* The values this run will use: init-time settings, replaced on 1.3 by the per-run ones. */
    int32_t max_new_tokens = model->max_new_tokens;
    int32_t top_k = model->top_k;
    float top_p = model->top_p;
    float temperature = model->temperature;
    float repeat_penalty = model->repeat_penalty;
#if RKLLM_SIM_ABI == 13
    if (rkllm_infer_params->max_new_tokens > 0) {
        max_new_tokens = rkllm_infer_params->max_new_tokens;
    }
    if (rkllm_infer_params->sampling_params != NULL) {
        top_k = rkllm_infer_params->sampling_params->top_k;
        top_p = rkllm_infer_params->sampling_params->top_p;
        temperature = rkllm_infer_params->sampling_params->temperature;
        repeat_penalty = rkllm_infer_params->sampling_params->repeat_penalty;
    }
    const char *sampling_source = rkllm_infer_params->sampling_params != NULL ? "run" : "init";
#else
    const char *sampling_source = "init";
#endif
    trace("rkllm_run keep_history=%d max_new_tokens=%d top_k=%d top_p=%.2f temperature=%.2f repeat_penalty=%.2f "
          "sampling=%s role=%s enable_thinking=%d input_type=%d lora=%s prompt_cache=%s",
          rkllm_infer_params->keep_history, max_new_tokens, top_k, (double)top_p, (double)temperature,
          (double)repeat_penalty, sampling_source, str_or_null(rkllm_input->role), (int)rkllm_input->enable_thinking,
          (int)rkllm_input->input_type,
          rkllm_infer_params->lora_params != NULL ? str_or_null(rkllm_infer_params->lora_params->lora_adapter_name)
                                                  : "(none)",
          rkllm_infer_params->prompt_cache_params != NULL
              ? str_or_null(rkllm_infer_params->prompt_cache_params->prompt_cache_path)
              : "(none)");
    if (!validate_run(model, rkllm_input, rkllm_infer_params)) {
        return -1;
    }
    bool expected = false;
    if (!atomic_compare_exchange_strong(&model->running, &expected, true)) {
        log_error("rkllm_run: another rkllm_run is in progress on this handle");
        return -1;
    }
    /* An abort only concerns the run in flight: one sent while idle is forgotten here. */
    atomic_store(&model->abort_requested, false);

    const char *prompt = rkllm_input->prompt_input;
    int keep_history = rkllm_infer_params->keep_history;
    int turn = model->turns + 1;
    int limit = model->spec.tokens;
    if (max_new_tokens > 0 && max_new_tokens < limit) {
        limit = max_new_tokens;
    }
    RunContext ctx = {.model = model, .userdata = userdata != NULL ? userdata : model->result_userdata};
    TokenList reply = {0};
    if (!model->spec.stamp && !build_run_reply(model, rkllm_input, turn, limit, &reply)) {
        tokens_free(&reply);
        atomic_store(&model->running, false);
        log_error("rkllm_run: out of memory");
        return -1;
    }
    if (!model->spec.stamp && reply.count < limit) {
        limit = reply.count; /* a tool call is shorter than a reply and ends the turn */
    }

    uint64_t prefill_start = now_ns();
    trace("sim_prefill begin");
    sleep_ns((uint64_t)model->spec.prefill_ms * 1000000ull); /* not interruptible, like the NPU's prefill */
    uint64_t generate_start = now_ns();
    trace("sim_prefill end aborted=%d elapsed_ms=%llu", atomic_load(&model->abort_requested) ? 1 : 0,
          (unsigned long long)((generate_start - prefill_start) / 1000000ull));
    uint64_t interval = model->spec.rate > 0.0 ? (uint64_t)(1e9 / model->spec.rate) : 0;

    int ret = 0;
    bool paused = false;
    bool failed = false;
    int generated = 0;
    for (int i = 1; i <= limit; i++) {
        if (i > 1 && interval > 0 && !wait_or_abort(model, interval)) {
            break;
        }
        if (atomic_load(&model->abort_requested)) {
            break;
        }
        if (i == model->spec.hang_at) {
            log_error("simulated hang at token %d (hang_at)", i);
            for (;;) {
                sleep_ns(1000000000ull);
            }
        }
        if (i == model->spec.crash_at) {
            log_error("simulated crash at token %d (crash_at)", i);
            raise(SIGSEGV);
        }
        if (i == model->spec.error_at) {
            log_error("simulated inference error at token %d (error_at)", i);
            RKLLMResult result;
            memset(&result, 0, sizeof result);
            model->callback(&result, ctx.userdata, RKLLM_RUN_ERROR);
            failed = true;
            ret = -1;
            break;
        }
        ctx.token_id = 1000 + i;
        int cb;
        if (model->spec.stamp) {
            char stamp[32];
            snprintf(stamp, sizeof stamp, "%llu ", (unsigned long long)now_ns());
            cb = deliver_token(&ctx, stamp);
        } else {
            cb = deliver_token(&ctx, reply.items[i - 1]);
        }
        generated++;
        if (cb != 0) {
            paused = true; /* 1 = pause, as the header documents: no FINISH */
            break;
        }
    }
    tokens_free(&reply);

    if (!failed && !paused) {
        uint64_t end = now_ns();
        RKLLMResult result;
        memset(&result, 0, sizeof result);
        result.text = NULL;
        result.token_id = -1;
        result.perf.prefill_time_ms = (float)(generate_start - prefill_start) / 1e6f;
        result.perf.prefill_tokens = count_words(prompt);
        result.perf.generate_time_ms = (float)(end - generate_start) / 1e6f;
        result.perf.generate_tokens = generated;
        result.perf.memory_usage_mb = peak_rss_mb();
        model->callback(&result, ctx.userdata, RKLLM_RUN_FINISH);
    }

    if (keep_history == 1 && !failed) {
        model->turns = turn;
        model->kv_tokens += count_words(prompt) + generated;
    } else if (keep_history == 0) {
        model->turns = 0;
        model->kv_tokens = 0;
    }
    if (rkllm_infer_params->prompt_cache_params != NULL &&
        rkllm_infer_params->prompt_cache_params->save_prompt_cache == 1) {
        FILE *f = fopen(rkllm_infer_params->prompt_cache_params->prompt_cache_path, "wb");
        if (f != NULL) {
            fputs("rkllm-sim prompt cache\n", f);
            fclose(f);
        } else {
            log_error("failed to save prompt cache to %s", rkllm_infer_params->prompt_cache_params->prompt_cache_path);
        }
    }
    /* Written while the run still holds the handle: a "sim_run end" always comes before the next run's line. */
    trace("sim_run end ret=%d generated=%d prefill_tokens=%d", ret, generated, count_words(prompt));
    atomic_store(&model->running, false);
    return ret;
}

/* The real 1.2.1 never returns from this and never calls back (rknn-llm issue 320); neither does the sim. */
SIM_API int rkllm_run_async(LLMHandle handle, RKLLMInput *rkllm_input, RKLLMInferParam *rkllm_infer_params,
                            void *userdata) {
    (void)handle;
    (void)rkllm_input;
    (void)rkllm_infer_params;
    (void)userdata;
    trace("rkllm_run_async");
    log_error("rkllm_run_async called: it never returns, as in runtime 1.2.1");
    for (;;) {
        sleep_ns(1000000000ull);
    }
}

SIM_API int rkllm_abort(LLMHandle handle) {
    trace("rkllm_abort");
    SimModel *model = model_from_handle(handle, "rkllm_abort");
    if (model == NULL) {
        return -1;
    }
    pthread_mutex_lock(&model->wake_lock);
    atomic_store(&model->abort_requested, true);
    pthread_cond_broadcast(&model->wake);
    pthread_mutex_unlock(&model->wake_lock);
    return 0;
}

SIM_API int rkllm_is_running(LLMHandle handle) {
    trace("rkllm_is_running");
    SimModel *model = model_from_handle(handle, "rkllm_is_running");
    if (model == NULL) {
        return -1;
    }
    bool running = atomic_load(&model->running);
#if RKLLM_SIM_ABI == 12
    return running ? 0 : 1; /* the 1.2.1 header: 0 means a task is running */
#else
    return running ? 1 : 0; /* the 1.3.0 header: 1 means a task is running */
#endif
}

SIM_API int rkllm_clear_kv_cache(LLMHandle handle, int keep_system_prompt, int *start_pos, int *end_pos) {
    trace("rkllm_clear_kv_cache keep_system_prompt=%d start_pos=%s end_pos=%s", keep_system_prompt,
          start_pos == NULL ? "NULL" : "set", end_pos == NULL ? "NULL" : "set");
    SimModel *model = model_from_handle(handle, "rkllm_clear_kv_cache");
    if (model == NULL) {
        return -1;
    }
    if (keep_system_prompt != 0 && keep_system_prompt != 1) {
        log_error("rkllm_clear_kv_cache: keep_system_prompt must be 0 or 1, got %d", keep_system_prompt);
        return -1;
    }
    /* Ranges are only valid for a paused generation; a binding passing them (or garbage from the old
     * two-argument signature) is wrong for this bridge. */
    if (start_pos != NULL || end_pos != NULL) {
        log_error("rkllm_clear_kv_cache: start_pos/end_pos ranges are not supported by the simulated runtime");
        return -1;
    }
    if (atomic_load(&model->running)) {
        log_error("rkllm_clear_kv_cache: rkllm_run is running");
        return -1;
    }
    model->turns = 0;
    model->kv_tokens = 0;
    return 0;
}

SIM_API int rkllm_get_kv_cache_size(LLMHandle handle, int *cache_sizes) {
    trace("rkllm_get_kv_cache_size");
    SimModel *model = model_from_handle(handle, "rkllm_get_kv_cache_size");
    if (model == NULL) {
        return -1;
    }
    if (cache_sizes == NULL) {
        log_error("rkllm_get_kv_cache_size: cache_sizes is NULL");
        return -1;
    }
    cache_sizes[0] = model->kv_tokens;
    return 0;
}

SIM_API int rkllm_set_chat_template(LLMHandle handle, const char *system_prompt, const char *prompt_prefix,
                                    const char *prompt_postfix) {
    trace("rkllm_set_chat_template system_prompt=%s prompt_prefix=%s prompt_postfix=%s", str_or_null(system_prompt),
          str_or_null(prompt_prefix), str_or_null(prompt_postfix));
    SimModel *model = model_from_handle(handle, "rkllm_set_chat_template");
    if (model == NULL) {
        return -1;
    }
    if (system_prompt == NULL || prompt_prefix == NULL || prompt_postfix == NULL) {
        log_error("rkllm_set_chat_template: system_prompt, prompt_prefix and prompt_postfix must not be NULL");
        return -1;
    }
    if (atomic_load(&model->running)) {
        log_error("rkllm_set_chat_template: rkllm_run is running");
        return -1;
    }
    /* Copied, as the real runtime keeps its own std::string copies. */
    free(model->system_prompt);
    free(model->prompt_prefix);
    free(model->prompt_postfix);
    model->system_prompt = dup_or_empty(system_prompt);
    model->prompt_prefix = dup_or_empty(prompt_prefix);
    model->prompt_postfix = dup_or_empty(prompt_postfix);
    /* A chat template set after function calling replaces it (the bridge sets one to leave function calling). */
    free(model->tools);
    model->tools = NULL;
    return 0;
}

SIM_API int rkllm_set_function_tools(LLMHandle handle, const char *system_prompt, const char *tools,
                                     const char *tool_response_str) {
    trace("rkllm_set_function_tools system_prompt=%s tools_bytes=%zu tool_response_str=%s", str_or_null(system_prompt),
          tools != NULL ? strlen(tools) : (size_t)0,
          str_or_null(tool_response_str));
    SimModel *model = model_from_handle(handle, "rkllm_set_function_tools");
    if (model == NULL) {
        return -1;
    }
    if (system_prompt == NULL || tools == NULL || tool_response_str == NULL) {
        log_error("rkllm_set_function_tools: arguments must not be NULL");
        return -1;
    }
    if (atomic_load(&model->running)) {
        log_error("rkllm_set_function_tools: rkllm_run is running");
        return -1;
    }
    /* Like the real runtime, the system prompt given here becomes the conversation's system prompt. */
    free(model->system_prompt);
    free(model->tools);
    model->system_prompt = dup_or_empty(system_prompt);
    model->tools = tools[0] != '\0' ? strdup(tools) : NULL;
    return 0;
}

SIM_API int rkllm_set_cross_attn_params(LLMHandle handle, RKLLMCrossAttnParam *cross_attn_params) {
    trace("rkllm_set_cross_attn_params num_tokens=%d",
          cross_attn_params != NULL ? cross_attn_params->num_tokens : -1);
    SimModel *model = model_from_handle(handle, "rkllm_set_cross_attn_params");
    if (model == NULL) {
        return -1;
    }
    if (cross_attn_params == NULL) {
        log_error("rkllm_set_cross_attn_params: cross_attn_params is NULL");
        return -1;
    }
    return 0;
}
