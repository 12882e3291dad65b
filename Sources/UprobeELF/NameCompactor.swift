import CUprobeSys
import Dispatch
import UprobeSystem
#if canImport(Glibc)
import Glibc
#endif

/// Compresses large `SymbolNames` buffers some time after the resolver made them, on a thread
/// of its own at the lowest CPU priority.
///
/// Compressing a whole binary's 26 MB of names takes ~0.5 s of CPU, about what the whole
/// register's reply takes: the register keeps its names plain and this compresses them
/// `delay` later, if they are still alive: a resolution dropped before (a `resolve` request,
/// a register undone at once, a restore's working copies) is never compressed, and its
/// names are freed when it goes, not at the delay (`NameStore.release`). Buffers below
/// `minimumBytes` stay plain (their bytes are not worth a dictionary and an index). The nice
/// value keeps it from taking CPU a request wants.
public final class NameCompactor: Sendable {
    public let delay: Duration
    public let minimumBytes: Int

    private struct State {
        /// Buffers due for compaction, oldest first (released ones are skipped).
        var due: [NameStore] = []
        /// The compacting thread runs (it ends when `due` is empty).
        var running = false
        var totals = Totals()
    }
    /// A pthread mutex, which ThreadSanitizer understands (`PThreadMutex`).
    private let state = PThreadMutex(State())

    /// What has been compressed since the start (for `status` and tests).
    public struct Totals: Sendable, Equatable {
        /// Buffers compressed.
        public var buffers = 0
        /// Their bytes before, and after.
        public var plainBytes = 0
        public var storedBytes = 0
        /// CPU time spent compressing them (the compacting thread's).
        public var cpuMicros = 0
    }

    /// Default `delay`: past the register's own burst of work (its reply, its state write, the
    /// trim of its transient memory), and long enough that a register undone at once is never
    /// compressed.
    public static let defaultDelay: Duration = .seconds(5)
    /// Default `minimumBytes`: ~600 names.
    public static let defaultMinimumBytes = 64 << 10

    public init(delay: Duration = defaultDelay, minimumBytes: Int = defaultMinimumBytes) {
        self.delay = delay
        self.minimumBytes = minimumBytes
    }

    public var totals: Totals { state.withLock { $0.totals } }

    /// Compresses `names` after `delay` if it is big enough and still alive then (held until
    /// then, but released with its `SymbolNames`).
    func schedule(_ names: NameStore) {
        guard names.byteCount >= minimumBytes else { return }
        let (seconds, attoseconds) = delay.components
        let nanos = Int(min(max(seconds, 0), 86_400)) * 1_000_000_000 + Int(max(attoseconds, 0) / 1_000_000_000)
        // `self` held strongly, for the delay: a weak reference would give this object a side
        // table, and every copy of the `Resolver` that holds it a slow retain.
        DispatchQueue.global(qos: .utility).asyncAfter(deadline: .now() + .nanoseconds(nanos)) {
            let start = self.state.withLock { s -> Bool in
                s.due.append(names)
                if s.running { return false }
                s.running = true
                return true
            }
            if start, !self.startThread() {
                // No thread to be had: compact here rather than never.
                self.drain()
            }
        }
    }

    private func startThread() -> Bool {
        let box = Unmanaged.passRetained(self).toOpaque()
        var thread = pthread_t()
        let rc = pthread_create(&thread, nil, { arg in
            guard let arg else { return nil }
            let me = Unmanaged<NameCompactor>.fromOpaque(arg).takeRetainedValue()
            // Linux keeps a nice value per thread: this one's work waits for any other.
            _ = setpriority(__priority_which_t(PRIO_PROCESS.rawValue), 0, 19)
            me.drain()
            return nil
        }, box)
        guard rc == 0 else {
            Unmanaged<NameCompactor>.fromOpaque(box).release()
            return false
        }
        pthread_detach(thread)
        return true
    }

    /// Compacts the due buffers until there are none; then the thread may end.
    private func drain() {
        while true {
            let next = state.withLock { s -> NameStore? in
                if s.due.isEmpty {
                    s.running = false
                    return nil
                }
                return s.due.removeFirst()
            }
            guard let names = next else { return }
            let large = names.byteCount >= Self.trimThreshold
            let cpuBefore = Self.threadCPUMicros()
            let sizes = names.compact { free in
                guard large else { return free() }
                // Freed in a heap-release window and trimmed: the plain bytes were one large
                // block, maybe at the top of an arena, which malloc_trim alone does not hand
                // back (see `CUprobeSys_heap_release_begin`). A reader still holding them frees
                // them when it is done, and the daemon's next trim returns that.
                CUprobeSys_heap_release_begin()
                free()
                _ = malloc_trim(0)
                CUprobeSys_heap_release_end()
            }
            guard let sizes else { continue }
            state.withLock {
                $0.totals.buffers += 1
                $0.totals.plainBytes += sizes.plainBytes
                $0.totals.storedBytes += sizes.storedBytes
                $0.totals.cpuMicros += Self.threadCPUMicros() - cpuBefore
            }
        }
    }

    static let trimThreshold = 4 << 20

    private static func threadCPUMicros() -> Int {
        var t = timespec()
        guard clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t) == 0 else { return 0 }
        return t.tv_sec * 1_000_000 + t.tv_nsec / 1_000
    }
}
