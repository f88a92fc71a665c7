// Per-kernel entry points for the emulator (included by the files kernels/build.rs generates):
// `TS_EMU_ENTRY(name)` defines `emu_entry_<name>(void** params)`, which unpacks `params` as
// cuLaunchKernel's argument array (params[i] points at argument i) and calls the kernel.
#pragma once

#include <utility>

namespace emu {
template <typename... A, size_t... I>
void invoke_with(void (*kernel)(A...), void** params, std::index_sequence<I...>) {
    kernel(*static_cast<std::remove_reference_t<A>*>(params[I])...);
}
template <typename... A>
void invoke(void (*kernel)(A...), void** params) {
    invoke_with(kernel, params, std::index_sequence_for<A...>{});
}
}  // namespace emu

#define TS_EMU_ENTRY(name) \
    extern "C" void emu_entry_##name(void** params) { ::emu::invoke(name, params); }
