#if canImport(Glibc)
import Glibc
#endif

/// A value guarded by a `pthread_mutex_t`, with the `withLock` shape of `Synchronization.Mutex`.
///
/// For state that ThreadSanitizer checks: it understands pthread mutexes but not the
/// Synchronization module's futex-based `Mutex`, and reports every access made under one from
/// two threads as a data race (CI runs the concurrent tests under TSan).
public final class PThreadMutex<Value: Sendable>: @unchecked Sendable {
    // @unchecked: `value` is only touched with `mutex` held (and is Sendable itself, so what
    // `withLock` hands out may cross threads).
    private let mutex = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
    private var value: Value

    public init(_ value: Value) {
        self.value = value
        pthread_mutex_init(mutex, nil)
    }

    deinit {
        pthread_mutex_destroy(mutex)
        mutex.deallocate()
    }

    /// Runs `body` with the value, the mutex held (`pthread_mutex_lock`/`pthread_mutex_unlock`).
    public func withLock<R>(_ body: (inout Value) throws -> R) rethrows -> R {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return try body(&value)
    }
}
