// Graceful stop on SIGINT/SIGTERM: the handler only stores the signal number
// (async-signal-safe); the training loop polls it between steps.
#include <signal.h>
#include <string.h>
#include "ckernels.h"

static volatile sig_atomic_t received;

static void onStop(int sig) {
    if (received) {
        // A second Ctrl-C (or TERM) while stopping: do not wait any longer.
        signal(sig, SIG_DFL);
        raise(sig);
        return;
    }
    received = sig;
}

void ck_install_stop_handlers(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = onStop;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
}

int32_t ck_stop_signal(void) { return (int32_t)received; }
