#pragma once
#include <stdint.h>

/// Installs SIGINT and SIGTERM handlers that only record the signal, so a
/// training loop can finish its step, write a checkpoint and exit cleanly. A
/// second signal of either kind ends the process at once (the default action).
void ck_install_stop_handlers(void);

/// The first stop signal received since the handlers were installed, or 0.
int32_t ck_stop_signal(void);
