import Glibc
import Synchronization

/// Minimal thread spawning for the concurrency tests (real OS threads, so readers and the writer
/// truly run in parallel and block independently of the Swift concurrency pool).
final class ThreadBody: Sendable {
    let body: @Sendable () -> Void
    init(_ body: @escaping @Sendable () -> Void) { self.body = body }
}

struct TestThread {
    let handle: pthread_t

    init(_ body: @escaping @Sendable () -> Void) {
        var t = pthread_t()
        let box = Unmanaged.passRetained(ThreadBody(body)).toOpaque()
        let rc = pthread_create(&t, nil, { p in
            Unmanaged<ThreadBody>.fromOpaque(p!).takeRetainedValue().body()
            return nil
        }, box)
        precondition(rc == 0, "pthread_create failed: \(rc)")
        handle = t
    }

    func join() { pthread_join(handle, nil) }
}

/// Deterministic PRNG (SplitMix64) so failures reproduce from the printed seed.
struct SplitMix64: RandomNumberGenerator {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

func monotonicNanos() -> UInt64 {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
}

/// Sleeps for `ms` milliseconds.
func sleepMillis(_ ms: Int) { usleep(useconds_t(ms * 1000)) }
