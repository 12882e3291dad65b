import CUprobeSys
import Dispatch
import Synchronization

/// Hands freed heap memory back to the kernel after bulk work (malloc_trim(3)).
///
/// glibc keeps what a process frees for later reuse. After 241,000 probes were registered and
/// removed, the daemon held on to ~650 MB although the registry was empty again: the records,
/// the tree, the resolution and the state encoding of the whole binary were freed into the
/// heap but stayed part of the RSS. A trim walks the heap (tens of ms for hundreds of MB), so
/// it runs on a utility queue, after a delay that lets the batch's transient buffers (its
/// reply, its state entry, records a reader may still hold for a grace period) go first, and
/// several requests within the delay share one trim.
public final class MemoryTrimmer: Sendable {
    /// Probes added or removed by one batch, or slots freed by one detach round, that make a
    /// trim worth its walk. Well above 10,000: what a 10,000-probe request frees (~20 MB) the
    /// next one of its size takes again, and handing it back made that next request fault it
    /// in afresh (the daemon's CPU per 10,000-probe register was 46-48 ms with a trim after
    /// each cycle, 36-38 ms without).
    public static let bulk = 50_000
    private let delay: DispatchTimeInterval
    private let scheduled = Atomic<Bool>(false)
    private let trims = Atomic<UInt64>(0)

    public init(delay: DispatchTimeInterval = .milliseconds(500)) { self.delay = delay }

    /// Trims once, `delay` from now, unless a trim is already scheduled.
    public func request() {
        guard scheduled.compareExchange(expected: false, desired: true, ordering: .acquiringAndReleasing).exchanged else { return }
        DispatchQueue.global(qos: .utility).asyncAfter(deadline: .now() + delay) { [self] in
            scheduled.store(false, ordering: .releasing)
            _ = malloc_trim(0)
            trims.add(1, ordering: .relaxed)
        }
    }

    /// Trims done so far.
    public var count: UInt64 { trims.load(ordering: .relaxed) }
}
