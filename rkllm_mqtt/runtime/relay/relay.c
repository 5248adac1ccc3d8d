/*
 * relay.c - the worker's result callback for token text, in C.
 *
 * The runtime calls its result callback once per token on its own thread. Entering Python there costs the
 * worker a GIL acquisition and a few Python frames per token; this callback writes the token's bytes to the
 * event pipe as one frame itself (the same frames as rkllm_mqtt/runtime/protocol.py: 1-byte kind, 4-byte
 * big-endian length, payload) and hands only the rare states (FINISH with its perf numbers, ERROR) to the
 * Python callback it was given. It also counts tokens and enforces a per-run token cap for the 1.2 layout,
 * which has no max_new_tokens of its own: past the cap it drops the text and sends CAP_REACHED once.
 *
 * RKLLMResult starts with `const char *text` in every supported layout (1.2.1 to 1.3.0), so this file needs
 * no layout of its own. It is built by the package's install next to the simulated runtime and loaded with
 * cffi in ABI mode; nothing imports it as a Python module.
 *
 * One worker, one model, one run at a time: the state below is set by relay_setup and relay_begin_run
 * before rkllm_run starts, and read by the callbacks of that run.
 */

#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

#define RELAY_API __attribute__((visibility("default")))

enum { STATE_NORMAL = 0, STATE_WAITING = 1 };
enum { EVENT_CHUNK = 3, EVENT_CAP_REACHED = 6 };

typedef int (*result_callback_t)(void *result, void *userdata, int state);

static int relay_fd = -1;
static result_callback_t other_states = NULL;
static int run_cap = 0;
static int run_tokens = 0;
static int cap_sent = 0;
static int write_error = 0;

/* Writes one frame. A frame below PIPE_BUF bytes goes in one atomic write, so it never interleaves with the
 * frames the worker's Python threads write; a longer one is completed after a partial write. */
static void write_frame(unsigned char kind, const char *data, size_t len) {
    unsigned char header[5] = {kind, (unsigned char)(len >> 24), (unsigned char)(len >> 16),
                               (unsigned char)(len >> 8), (unsigned char)len};
    struct iovec parts[2] = {{header, sizeof header}, {(void *)data, len}};
    int count = len > 0 ? 2 : 1;
    struct iovec *at = parts;
    while (count > 0) {
        ssize_t written = writev(relay_fd, at, count);
        if (written < 0) {
            if (errno == EINTR) {
                continue;
            }
            write_error = errno; /* the parent is gone: nothing to tell anyone */
            return;
        }
        while (count > 0 && (size_t)written >= at->iov_len) {
            written -= (ssize_t)at->iov_len;
            at++;
            count--;
        }
        if (count > 0) {
            at->iov_base = (char *)at->iov_base + written;
            at->iov_len -= (size_t)written;
        }
    }
}

RELAY_API void relay_setup(int fd, result_callback_t other) {
    relay_fd = fd;
    other_states = other;
}

RELAY_API void relay_begin_run(int token_cap) {
    run_cap = token_cap > 0 ? token_cap : 0;
    run_tokens = 0;
    cap_sent = 0;
}

RELAY_API int relay_tokens(void) { return run_tokens; }

RELAY_API int relay_write_error(void) { return write_error; }

RELAY_API int relay_callback(void *result, void *userdata, int state) {
    if (state == STATE_NORMAL || state == STATE_WAITING) {
        const char *text = result != NULL ? *(const char *const *)result : NULL;
        if (text == NULL || text[0] == '\0') {
            return 0;
        }
        if (run_cap > 0 && run_tokens >= run_cap) {
            if (!cap_sent) {
                cap_sent = 1;
                write_frame(EVENT_CAP_REACHED, NULL, 0);
            }
            return 0;
        }
        if (state == STATE_NORMAL) {
            run_tokens++; /* WAITING carries the first bytes of a character whose rest follows */
        }
        write_frame(EVENT_CHUNK, text, strlen(text));
        return 0;
    }
    return other_states != NULL ? other_states(result, userdata, state) : 0;
}
