// Build every kernel for AVX-512, AVX2+FMA and the baseline; the loader picks
// the widest the CPU has (GNU ifunc). Elsewhere (non-x86), one plain version.
// Under a sanitizer too: ifunc resolvers run before the sanitizer's runtime is
// up, and a ThreadSanitizer build crashes at load.
#pragma once
#if defined(__has_feature)
#if __has_feature(thread_sanitizer) || __has_feature(address_sanitizer)
#define CK_SANITIZED 1
#endif
#endif
#if defined(__x86_64__) && defined(__linux__) && !defined(CK_SANITIZED)
#define CK_DISPATCH __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CK_DISPATCH
#endif
