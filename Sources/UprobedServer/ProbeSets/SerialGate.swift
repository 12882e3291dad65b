import Synchronization

/// Runs async operations one after another, in the order they arrive: a set's reconcile awaits
/// the engine twice (register, then unregister), and a reload and an `apply` of the same set
/// must not interleave between those (an actor would let them: it is re-entered at every await).
final class SerialGate: Sendable {
    private let tail = Mutex<Task<Void, Never>?>(nil)

    func run<T: Sendable>(_ operation: @escaping @Sendable () async -> T) async -> T {
        let task: Task<T, Never> = tail.withLock { last in
            let previous = last
            let t = Task {
                await previous?.value
                return await operation()
            }
            last = Task { _ = await t.value }
            return t
        }
        return await task.value
    }
}
