import CUprobeSys
import Synchronization
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// One uprobe_multi link (a BPF link fd). Closing it detaches all its uprobes; `close()`
/// returns after the kernel's uprobe grace period, so no program of this link runs afterwards.
/// Also closed on deinit.
///
/// A pinned link (`pinPath`) has two references, the pin and the fd. `close()` removes the pin
/// first and closes the fd second, so the fd is the last reference and its close still detaches
/// in this thread and waits for the grace period (the pin's reference, dropped by the unlink,
/// is put from a workqueue without waiting). `release()` closes only the fd: the link stays
/// attached, held by its pin, for the next daemon to adopt.
public final class UprobeMultiLink: Sendable {
    /// The generation in this link's cookies (cookie = generation << 32 | slot).
    public let generation: UInt32
    /// Number of probes (offsets) of the link.
    public let offsetCount: Int
    /// Where the link is pinned in bpffs, if it is.
    public let pinPath: String?
    private let fd: Mutex<FileDescriptor?>

    init(fd: FileDescriptor, generation: UInt32, offsetCount: Int, pinPath: String? = nil) {
        self.fd = Mutex(fd)
        self.generation = generation
        self.offsetCount = offsetCount
        self.pinPath = pinPath
    }

    /// The link's fd while it is open (for debugging/bpftool-style introspection).
    public var rawDescriptor: Int32? { fd.withLock { $0?.rawValue } }

    /// Closes the link fd (close(2); the last reference releases the link, which unregisters
    /// the uprobes and waits for the grace period in this thread). Idempotent.
    public func close() {
        // Take the fd out under the lock, close outside it: the close blocks for a grace period.
        let taken = fd.withLock { slot -> FileDescriptor? in
            defer { slot = nil }
            return slot
        }
        guard let taken else { return }
        if let pinPath { PinDirectory.unpin(pinPath) }
        try? taken.close()
    }

    /// Closes the fd and leaves the pin: the link keeps counting after this process exits.
    /// An unpinned link is closed (detached) as by `close()`. Idempotent.
    public func release() {
        let taken = fd.withLock { slot -> FileDescriptor? in
            defer { slot = nil }
            return slot
        }
        try? taken?.close()
    }

    /// Whether the link is still held open by this process.
    public var isOpen: Bool { fd.withLock { $0 != nil } }

    deinit { release() }
}

/// Closes many links so that their detach work shares grace periods.
public enum LinkCloser {
    /// Upper bound on closer threads; each thread mostly sleeps in a grace-period wait.
    public static let maxThreads = 32

    /// The daemon's closer threads, kept between rounds: starting fresh threads for every round
    /// cost ~80 thread creations a second under churn (clone3, stack mmap/mprotect/munmap,
    /// exit and join each time).
    static let pool = BlockingPool(name: "uprobed-close", maxThreads: maxThreads, idleSeconds: 30)

    /// Close many links so that they share grace periods: issue the closes concurrently on
    /// up to `maxThreads` threads, each taking the next link, and wait for all of them.
    public static func closeAll(_ links: [UprobeMultiLink]) {
        if links.count <= 1 {
            links.first?.close()
            return
        }
        pool.runAll(links.map { link in { link.close() } })
    }
}

/// Plain pthreads for work that blocks in the kernel and should overlap (Dispatch would cap
/// the width at the core count). Threads start on demand up to `maxThreads`, wait for the next
/// round when done, and end after `idleSeconds` without work.
///
/// `mutex` guards every mutable field; `work` wakes idle threads, `done` the callers of `runAll`.
final class BlockingPool: @unchecked Sendable {
    // @unchecked: every mutable field is guarded by `mutex`.
    private let mutex = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
    private let work = UnsafeMutablePointer<pthread_cond_t>.allocate(capacity: 1)
    private let done = UnsafeMutablePointer<pthread_cond_t>.allocate(capacity: 1)
    /// Jobs not taken yet, each with the round it belongs to.
    private var queue: [(job: @Sendable () -> Void, round: Round)] = []
    private var head = 0
    private var threads = 0
    private var idle = 0
    private var started = 0
    let name: String
    let maxThreads: Int
    let idleSeconds: Int

    /// One `runAll` call's jobs still running or queued (guarded by the pool's `mutex`).
    private final class Round {
        var remaining: Int
        init(_ n: Int) { remaining = n }
    }

    init(name: String, maxThreads: Int, idleSeconds: Int) {
        self.name = name
        self.maxThreads = max(1, maxThreads)
        self.idleSeconds = max(1, idleSeconds)
        pthread_mutex_init(mutex, nil)
        // Idle timeouts measured on the monotonic clock: a wall-clock step must not end them early.
        var attr = pthread_condattr_t()
        pthread_condattr_init(&attr)
        pthread_condattr_setclock(&attr, CLOCK_MONOTONIC)
        pthread_cond_init(work, &attr)
        pthread_condattr_destroy(&attr)
        pthread_cond_init(done, nil)
    }

    // Never deinitialized while a thread runs: each thread holds the pool strongly.
    deinit {
        pthread_cond_destroy(work); pthread_cond_destroy(done); pthread_mutex_destroy(mutex)
        work.deallocate(); done.deallocate(); mutex.deallocate()
    }

    /// Runs every job, up to `maxThreads` at a time, and returns when all have returned. If no
    /// thread can be started at all, the caller runs the jobs itself, one after another.
    func runAll(_ jobs: [@Sendable () -> Void]) {
        guard !jobs.isEmpty else { return }
        let round = Round(jobs.count)
        pthread_mutex_lock(mutex)
        for job in jobs { queue.append((job, round)) }
        let wanted = min(queue.count - head, maxThreads)
        if idle >= wanted { for _ in 0..<wanted { pthread_cond_signal(work) } } else { pthread_cond_broadcast(work) }
        var toStart = min(wanted - min(idle, wanted), maxThreads - threads)
        pthread_mutex_unlock(mutex)
        while toStart > 0, startThread() { toStart -= 1 }
        pthread_mutex_lock(mutex)
        if threads == 0 {
            // No thread could start: take this round's jobs back and run them here.
            let waiting = queue[head...]
            let mine = waiting.filter { $0.round === round }.map(\.job)
            queue = waiting.filter { $0.round !== round }
            head = 0
            pthread_mutex_unlock(mutex)
            for job in mine { job() }
            return
        }
        while round.remaining > 0 { pthread_cond_wait(done, mutex) }
        pthread_mutex_unlock(mutex)
    }

    /// Threads alive now, and threads started over the pool's life (tests).
    var threadCounts: (live: Int, started: Int) {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return (threads, started)
    }

    private func startThread() -> Bool {
        pthread_mutex_lock(mutex)
        threads += 1
        started += 1
        pthread_mutex_unlock(mutex)
        let box = Unmanaged.passRetained(self).toOpaque()
        var thread = pthread_t()
        let rc = pthread_create(&thread, nil, { arg in
            guard let arg else { return nil }
            Unmanaged<BlockingPool>.fromOpaque(arg).takeRetainedValue().serve()
            return nil
        }, box)
        if rc != 0 {
            Unmanaged<BlockingPool>.fromOpaque(box).release()
            pthread_mutex_lock(mutex)
            threads -= 1
            started -= 1
            pthread_mutex_unlock(mutex)
            return false
        }
        pthread_detach(thread)
        return true
    }

    /// A thread's life: take the next job, run it, count it done; end after `idleSeconds` idle.
    private func serve() {
        _ = CUprobeSys_set_thread_name(name)
        pthread_mutex_lock(mutex)
        while true {
            if head < queue.count {
                let (job, round) = queue[head]
                head += 1
                if head == queue.count { queue.removeAll(keepingCapacity: true); head = 0 }
                pthread_mutex_unlock(mutex)
                job()
                pthread_mutex_lock(mutex)
                round.remaining -= 1
                if round.remaining == 0 { pthread_cond_broadcast(done) }
                continue
            }
            var deadline = timespec()
            clock_gettime(CLOCK_MONOTONIC, &deadline)
            deadline.tv_sec += idleSeconds
            idle += 1
            var timedOut = false
            while head == queue.count && !timedOut {
                timedOut = pthread_cond_timedwait(work, mutex, &deadline) == ETIMEDOUT
            }
            idle -= 1
            if head == queue.count {
                threads -= 1
                pthread_mutex_unlock(mutex)
                return
            }
        }
    }
}
