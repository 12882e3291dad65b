import Synchronization
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// One uprobe_multi link (a BPF link fd). Closing it detaches all its uprobes; `close()`
/// returns after the kernel's uprobe grace period, so no program of this link runs afterwards.
/// Also closed on deinit.
public final class UprobeMultiLink: Sendable {
    /// The generation in this link's cookies (cookie = generation << 32 | slot).
    public let generation: UInt32
    /// Number of probes (offsets) of the link.
    public let offsetCount: Int
    private let fd: Mutex<FileDescriptor?>

    init(fd: FileDescriptor, generation: UInt32, offsetCount: Int) {
        self.fd = Mutex(fd)
        self.generation = generation
        self.offsetCount = offsetCount
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
        if let taken { try? taken.close() }
    }

    deinit { close() }
}

/// Closes many links so that their detach work shares grace periods.
public enum LinkCloser {
    /// Upper bound on closer threads; each thread mostly sleeps in a grace-period wait.
    public static let maxThreads = 32

    /// Close many links so that they share grace periods: issue the closes concurrently on a
    /// few threads (up to `maxThreads`, each taking the next link) and wait for all of them.
    public static func closeAll(_ links: [UprobeMultiLink]) {
        if links.count <= 1 {
            links.first?.close()
            return
        }
        let next = Mutex(0)
        let work: @Sendable () -> Void = {
            while true {
                let i = next.withLock { n -> Int in defer { n += 1 }; return n }
                if i >= links.count { return }
                links[i].close()
            }
        }
        ThreadRunner.run(threads: min(links.count, maxThreads), work)
    }
}

/// Runs a closure on N plain pthreads and joins them (Dispatch would cap the width at the core
/// count, but these threads block in the kernel and should overlap).
enum ThreadRunner {
    private final class Box: Sendable {
        let body: @Sendable () -> Void
        init(_ body: @escaping @Sendable () -> Void) { self.body = body }
    }

    static func run(threads count: Int, _ body: @escaping @Sendable () -> Void) {
        var started: [pthread_t] = []
        for _ in 0..<count {
            let box = Unmanaged.passRetained(Box(body)).toOpaque()
            var thread = pthread_t()
            let rc = pthread_create(&thread, nil, { arg in
                guard let arg else { return nil }
                Unmanaged<Box>.fromOpaque(arg).takeRetainedValue().body()
                return nil
            }, box)
            if rc == 0 {
                started.append(thread)
            } else {
                Unmanaged<Box>.fromOpaque(box).release()
                if started.isEmpty { body() }   // no thread at all: do the work here
                break
            }
        }
        for thread in started { pthread_join(thread, nil) }
    }
}
