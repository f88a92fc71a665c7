// The CUDA emulator's runtime: runs a kernel's blocks one at a time on the calling thread, the
// block's threads as fibers, and checks barriers and warp intrinsics as emu.h describes.
//
// The entry point is `emu_launch` (called from kernels/src/cuda/emu.rs). Launches on different
// OS threads are independent (all state is thread-local), so parallel tests may launch at once.
#include "emu.h"

#include <sys/mman.h>
#include <ucontext.h>

#include <cstdio>
#include <cstdlib>
#include <string>
#include <unordered_map>
#include <vector>

namespace emu {
namespace {

constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kMaxDynamicShared = 227 * 1024;  // sm_90's opt-in limit per block
constexpr unsigned kFullMask = 0xffffffffu;

enum class State { Runnable, AtBarrier, AtWarp, Done };

struct Fiber {
    ucontext_t ctx;
    void* stack = nullptr;
    dim3 tid;
    State state = State::Runnable;
    // Where the fiber waits (barrier or warp intrinsic), for the checks and messages.
    const char* file = nullptr;
    int line = 0;
    // Warp intrinsic: this lane's request, then its result.
    WarpOp op = WarpOp::Sync;
    uint64_t value = 0;
    int arg = 0;
    int width = 32;
    unsigned mask = kFullMask;
    uint64_t result = 0;
};

// Splitmix64: the seeded random schedule.
struct Rng {
    uint64_t s;
    uint64_t next() {
        uint64_t z = (s += 0x9e3779b97f4a7c15ull);
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
        return z ^ (z >> 31);
    }
};

struct Launch {
    void (*entry)(void**) = nullptr;
    void** params = nullptr;
    dim3 grid, block, bid;
    int schedule = 0;  // 0 forward, 1 reverse, 2 random
    Rng rng{0};
    std::vector<Fiber> fibers;
    std::vector<unsigned> order;
    Fiber* current = nullptr;
    ucontext_t scheduler;
    std::vector<unsigned char> dyn_shared;
    size_t dyn_bytes = 0;
    std::unordered_map<const void*, std::vector<unsigned char>> static_shared;
    std::string error;
};

thread_local Launch* g_launch = nullptr;
// Fiber stacks are kept between launches on the same OS thread.
thread_local std::vector<void*> g_stacks;

const dim3 kZero{0, 0, 0};

void fiber_main() {
    Launch* l = g_launch;
    l->entry(l->params);
    l->current->state = State::Done;
    swapcontext(&l->current->ctx, &l->scheduler);
}

void* stack_for(size_t i) {
    while (g_stacks.size() <= i) {
        void* p = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (p == MAP_FAILED) return nullptr;
        // A guard page below the stack turns an overflow into a crash, not silent corruption.
        mprotect(p, 4096, PROT_NONE);
        g_stacks.push_back(p);
    }
    return g_stacks[i];
}

// Back to the scheduler; returns when this fiber is resumed.
void yield_to_scheduler() {
    Launch* l = g_launch;
    swapcontext(&l->current->ctx, &l->scheduler);
}

std::string where(const Fiber& f) {
    char buf[512];
    std::snprintf(buf, sizeof buf, "thread (%u,%u,%u) at %s:%d", f.tid.x, f.tid.y, f.tid.z,
                  f.file ? f.file : "?", f.line);
    return buf;
}

std::string block_name(const Launch& l) {
    char buf[96];
    std::snprintf(buf, sizeof buf, "block (%u,%u,%u)", l.bid.x, l.bid.y, l.bid.z);
    return buf;
}

void shuffle_order(Launch& l) {
    for (size_t i = l.order.size(); i > 1; --i) {
        size_t j = l.rng.next() % i;
        std::swap(l.order[i - 1], l.order[j]);
    }
}

// Completes the warp intrinsic that all live lanes of warp `w` wait at; false (with l.error set)
// when the lanes disagree.
bool release_warp(Launch& l, size_t w) {
    Fiber* lanes = &l.fibers[w * 32];
    const Fiber& first = lanes[0];
    for (int i = 0; i < 32; ++i) {
        const Fiber& f = lanes[i];
        if (f.state != State::AtWarp) {
            l.error = block_name(l) + ": warp intrinsic at " + where(first) +
                      " reached by only some lanes of warp " + std::to_string(w) + " (" +
                      where(f) + (f.state == State::Done ? " has returned)" : " waits elsewhere)");
            return false;
        }
        if (f.op != first.op || f.line != first.line || f.file != first.file) {
            l.error = block_name(l) + ": lanes of warp " + std::to_string(w) +
                      " wait at different warp intrinsics: " + where(first) + " and " + where(f);
            return false;
        }
    }
    uint32_t ballot = 0;
    for (int i = 0; i < 32; ++i) ballot |= (lanes[i].value & 1 ? 1u : 0u) << i;
    for (int i = 0; i < 32; ++i) {
        Fiber& f = lanes[i];
        int width = f.width;
        if (width <= 0 || width > 32 || (width & (width - 1)) != 0) {
            l.error = block_name(l) + ": shuffle width " + std::to_string(width) +
                      " is not a power of two ≤ 32 at " + where(f);
            return false;
        }
        int base = i & ~(width - 1);
        int src = i;
        switch (f.op) {
            case WarpOp::ShflIdx: src = base + (f.arg & (width - 1)); break;
            case WarpOp::ShflXor: {
                // CUDA: a lane may read an earlier group of `width` lanes; reading a later
                // group gives the lane its own value.
                int s = i ^ f.arg;
                src = s >= base + width ? i : s;
                break;
            }
            case WarpOp::ShflUp: src = (i - base) >= f.arg ? i - f.arg : i; break;
            case WarpOp::ShflDown: src = (i - base) + f.arg < width ? i + f.arg : i; break;
            default: break;
        }
        switch (f.op) {
            case WarpOp::Ballot: f.result = ballot; break;
            case WarpOp::Any: f.result = ballot != 0; break;
            case WarpOp::All: f.result = ballot == kFullMask; break;
            case WarpOp::Sync: f.result = 0; break;
            default: f.result = lanes[src].value; break;
        }
    }
    for (int i = 0; i < 32; ++i) lanes[i].state = State::Runnable;
    return true;
}

// Runs one block to completion; false (with l.error set) on a synchronisation error.
bool run_block(Launch& l) {
    size_t n = size_t(l.block.x) * l.block.y * l.block.z;
    for (auto& kv : l.static_shared) std::memset(kv.second.data(), 0xFF, kv.second.size());
    std::memset(l.dyn_shared.data(), 0xFF, l.dyn_shared.size());
    for (size_t i = 0; i < n; ++i) {
        Fiber& f = l.fibers[i];
        f = Fiber{};
        f.tid = dim3{unsigned(i % l.block.x), unsigned((i / l.block.x) % l.block.y),
                     unsigned(i / (size_t(l.block.x) * l.block.y))};
        f.stack = stack_for(i);
        if (!f.stack) {
            l.error = "out of memory for fiber stacks";
            return false;
        }
        getcontext(&f.ctx);
        f.ctx.uc_stack.ss_sp = static_cast<char*>(f.stack) + 4096;
        f.ctx.uc_stack.ss_size = kStackBytes - 4096;
        f.ctx.uc_link = nullptr;
        makecontext(&f.ctx, fiber_main, 0);
    }
    for (;;) {
        if (l.schedule == 2) shuffle_order(l);
        // A warp whose last lane reaches its intrinsic is released at once, and the pass starts
        // over, so that warp runs on before the threads after it in the order have run: warps
        // progress independently, and a read of another warp's writes without a barrier between
        // sees them missing.
        bool restart = false;
        for (unsigned i : l.order) {
            Fiber& f = l.fibers[i];
            if (f.state != State::Runnable) continue;
            l.current = &f;
            swapcontext(&l.scheduler, &f.ctx);
            l.current = nullptr;
            if (!l.error.empty()) return false;
            if (f.state == State::AtWarp) {
                const size_t w = i / 32;
                bool all_warp = true;
                for (size_t j = w * 32; j < std::min(n, w * 32 + 32); ++j)
                    all_warp &= l.fibers[j].state == State::AtWarp;
                if (all_warp) {
                    if (!release_warp(l, w)) return false;
                    restart = true;
                    break;
                }
            }
        }
        if (restart) continue;
        // Everyone is blocked or done: release complete warps first, then the block barrier.
        bool any_warp = false, released = false;
        for (size_t w = 0; w * 32 < n; ++w) {
            bool waits = false;
            for (size_t i = w * 32; i < std::min(n, w * 32 + 32); ++i)
                waits |= l.fibers[i].state == State::AtWarp;
            if (!waits) continue;
            any_warp = true;
            bool all_warp = true;
            for (size_t i = w * 32; i < std::min(n, w * 32 + 32); ++i)
                all_warp &= l.fibers[i].state == State::AtWarp;
            if (all_warp) {
                if (!release_warp(l, w)) return false;
                released = true;
            }
        }
        if (released) continue;
        if (any_warp) {
            // Some warp waits at an intrinsic that not all of its lanes reached.
            for (size_t w = 0; w * 32 < n; ++w)
                for (size_t i = w * 32; i < std::min(n, w * 32 + 32); ++i)
                    if (l.fibers[i].state == State::AtWarp) return release_warp(l, w), false;
        }
        const Fiber* waiting = nullptr;
        const Fiber* done = nullptr;
        for (size_t i = 0; i < n; ++i) {
            const Fiber& f = l.fibers[i];
            if (f.state == State::AtBarrier) {
                if (waiting && (f.line != waiting->line || f.file != waiting->file)) {
                    l.error = block_name(l) + ": threads wait at different barriers: " +
                              where(*waiting) + " and " + where(f);
                    return false;
                }
                if (!waiting) waiting = &f;
            } else if (f.state == State::Done && !done) {
                done = &f;
            }
        }
        if (!waiting) return true;  // every thread returned
        if (done) {
            char buf[96];
            std::snprintf(buf, sizeof buf, "thread (%u,%u,%u) returned", done->tid.x,
                          done->tid.y, done->tid.z);
            l.error = block_name(l) + ": " + buf + " while others wait at __syncthreads (" +
                      where(*waiting) + ")";
            return false;
        }
        for (size_t i = 0; i < n; ++i) l.fibers[i].state = State::Runnable;
    }
}

}  // namespace

const dim3& thread_idx() { return g_launch->current->tid; }
const dim3& block_idx() { return g_launch->bid; }
const dim3& block_dim() { return g_launch->block; }
const dim3& grid_dim() { return g_launch->grid; }

void syncthreads(const char* file, int line) {
    Fiber* f = g_launch->current;
    f->state = State::AtBarrier;
    f->file = file;
    f->line = line;
    yield_to_scheduler();
}

uint64_t warp_exchange(WarpOp op, uint64_t value, int arg, int width, unsigned mask,
                       const char* file, int line) {
    Launch* l = g_launch;
    Fiber* f = l->current;
    f->file = file;
    f->line = line;
    if (mask != kFullMask) {
        l->error = "warp intrinsic with mask other than 0xffffffff at " + where(*f) +
                   " (the emulator supports full masks only)";
        yield_to_scheduler();  // never resumed
    }
    size_t n = size_t(l->block.x) * l->block.y * l->block.z;
    if (n % 32 != 0) {
        l->error = "warp intrinsic in a block of " + std::to_string(n) +
                   " threads (not a multiple of 32) at " + where(*f);
        yield_to_scheduler();
    }
    f->state = State::AtWarp;
    f->op = op;
    f->value = value;
    f->arg = arg;
    f->width = width;
    f->mask = mask;
    yield_to_scheduler();
    return f->result;
}

// 128-byte aligned, like the GPU's shared window (WMMA needs 32-byte aligned tiles): the vector
// holds 128 bytes more than asked for.
void* dynamic_shared() {
    auto base = reinterpret_cast<uintptr_t>(g_launch->dyn_shared.data());
    return reinterpret_cast<void*>((base + 127) & ~uintptr_t(127));
}

void* static_shared(const void* key, size_t bytes) {
    auto& buf = g_launch->static_shared[key];
    if (buf.size() < bytes) {
        // First use in this launch: poisoned like the rest of shared memory.
        buf.assign(bytes, 0xFF);
    }
    return buf.data();
}

void fail_launch(const char* what, const char* file, int line) {
    Launch* l = g_launch;
    Fiber* f = l->current;
    f->file = file;
    f->line = line;
    l->error = std::string(what) + " at " + where(*f);
    yield_to_scheduler();  // never resumed: the launch ends with the error
    std::abort();
}

void fail(const char* what, const char* file, int line) {
    std::fprintf(stderr, "emulated kernel failed: %s at %s:%d\n", what, file, line);
    std::abort();
}

}  // namespace emu

extern "C" {

// Runs `entry` (a kernel's trampoline: it unpacks `params` as cuLaunchKernel's argument array) over
// the grid. `schedule`: 0 forward, 1 reverse, 2 random from `seed`; it orders both the blocks and
// the threads within a block. Returns 0, or 1 with a message in `err` (NUL-terminated, cut to
// `err_len`).
int emu_launch(void (*entry)(void**), void** params, const unsigned grid[3],
               const unsigned block[3], size_t dyn_shared_bytes, int schedule, uint64_t seed,
               char* err, size_t err_len) {
    using namespace emu;
    auto fail_with = [&](const std::string& msg) {
        if (err_len) {
            std::snprintf(err, err_len, "%s", msg.c_str());
        }
        return 1;
    };
    if (g_launch) return fail_with("emu_launch called from inside an emulated kernel");
    size_t threads = size_t(block[0]) * block[1] * block[2];
    if (threads == 0 || threads > 1024) {
        return fail_with("block of " + std::to_string(threads) + " threads (1..=1024 allowed)");
    }
    if (dyn_shared_bytes > kMaxDynamicShared) {
        return fail_with("dynamic shared memory of " + std::to_string(dyn_shared_bytes) +
                         " bytes (at most " + std::to_string(kMaxDynamicShared) + ")");
    }
    Launch l;
    l.entry = entry;
    l.params = params;
    l.grid = dim3{grid[0], grid[1], grid[2]};
    l.block = dim3{block[0], block[1], block[2]};
    l.schedule = schedule;
    l.rng.s = seed;
    l.fibers.resize(threads);
    l.order.resize(threads);
    for (size_t i = 0; i < threads; ++i)
        l.order[i] = unsigned(schedule == 1 ? threads - 1 - i : i);
    l.dyn_shared.assign(dyn_shared_bytes + 128, 0xFF);
    size_t blocks = size_t(grid[0]) * grid[1] * grid[2];
    std::vector<size_t> block_order(blocks);
    for (size_t i = 0; i < blocks; ++i) block_order[i] = schedule == 1 ? blocks - 1 - i : i;
    if (schedule == 2) {
        for (size_t i = blocks; i > 1; --i) std::swap(block_order[i - 1], block_order[l.rng.next() % i]);
    }
    g_launch = &l;
    int rc = 0;
    for (size_t b : block_order) {
        l.bid = dim3{unsigned(b % grid[0]), unsigned((b / grid[0]) % grid[1]),
                     unsigned(b / (size_t(grid[0]) * grid[1]))};
        if (!run_block(l)) {
            rc = fail_with(l.error);
            break;
        }
    }
    g_launch = nullptr;
    return rc;
}

}  // extern "C"
