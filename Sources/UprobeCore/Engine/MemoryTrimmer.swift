import CUprobeSys
import Dispatch
import Synchronization

/// Hands freed heap memory back to the kernel after bulk work (malloc_trim(3), and a
/// heap-release window while the bulk's memory is freed).
///
/// glibc keeps what a process frees for later reuse. After 241,000 probes were registered and
/// removed, the daemon held on to ~650 MB although the registry was empty again: the records,
/// the tree, the resolution and the state encoding of the whole binary were freed into the
/// heap but stayed part of the RSS. A trim walks the heap (tens of ms for hundreds of MB), so
/// it runs on a utility queue, after a delay that lets the batch's transient buffers (its
/// reply, its state entry, records a reader may still hold for a grace period) go first, and
/// several requests within the delay share one trim.
///
/// malloc_trim alone is not enough: it returns the free pages inside every arena, but the top
/// chunk of a thread's arena only shrinks when a free leaves it above M_TRIM_THRESHOLD, which
/// the daemon raises to 64 MiB (`DaemonProcess.keepFreedMemory`) so that 10,000-probe requests
/// reuse their pages. So from the first request until the trim, a heap-release window
/// (`CUprobeSys_heap_release_begin`) puts glibc's default threshold back: the bulk's frees hand
/// the arenas' tops back as they happen, and the kept threshold returns with the window's end.
public final class MemoryTrimmer: Sendable {
    /// Probes added or removed by one batch, or slots freed by one detach round, that make a
    /// trim worth its walk. Well above 10,000: what a 10,000-probe request frees (~20 MB) the
    /// next one of its size takes again, and handing it back made that next request fault it
    /// in afresh (the daemon's CPU per 10,000-probe register was 46-48 ms with a trim after
    /// each cycle, 36-38 ms without).
    public static let bulk = 50_000
    private let delay: DispatchTimeInterval
    private struct State {
        /// Bumped by every request: a follow-up chain of an older one stops.
        var generation: UInt64 = 0
        /// A first trim is pending (requests meanwhile share it).
        var scheduled = false
        /// When the pending trim is due: `delay` after the last request.
        var due = DispatchTime.now()
        /// This trimmer holds a heap-release window open.
        var windowOpen = false
    }
    private let state = Mutex(State())
    private let trims = Atomic<UInt64>(0)

    public init(delay: DispatchTimeInterval = .milliseconds(500)) { self.delay = delay }

    deinit {
        if state.withLock({ $0.windowOpen }) { CUprobeSys_heap_release_end() }
    }

    /// Free heap (mallinfo2's `fordblks`) above which a follow-up check trims again.
    static let followUpFreeBytes = 32 << 20
    /// Follow-up checks after a trim, `delay` apart.
    static let followUps = 8

    /// Opens the heap-release window (if this trimmer has none open) and trims once, `delay`
    /// after the last of a run of requests (each one moves the trim later), closing the window;
    /// then checks `followUps` times, `delay` apart, whether much of the heap was freed since,
    /// and trims again if so. A bulk batch's memory is not all freed by the time of the first
    /// trim: the registry version readers may still hold goes after a grace period, its links'
    /// detach round and the state file's rewrite finish later (after removing 241,000 probes,
    /// 170 MB were freed after the first trim). A removal asks at the start of its batch and
    /// again, `within` 200 ms, when its detach round is collected: its records are freed right
    /// after, by the writer's reclaim, and must be freed inside the window.
    /// `within`: the trim's delay from this request, if not `delay` (the last request sets it).
    public func request(within: DispatchTimeInterval? = nil) {
        let wait = within ?? delay
        let schedule = state.withLock { s -> Bool in
            s.generation += 1
            s.due = .now() + wait
            if !s.windowOpen {
                s.windowOpen = true
                CUprobeSys_heap_release_begin()
            }
            let schedule = !s.scheduled
            s.scheduled = true
            return schedule
        }
        if schedule { trim(at: .now() + wait) }
    }

    private func trim(at deadline: DispatchTime) {
        DispatchQueue.global(qos: .utility).asyncAfter(deadline: deadline) { [self] in
            let (later, generation) = state.withLock { s -> (DispatchTime?, UInt64) in
                // A request meanwhile moved the trim later.
                if DispatchTime.now() < s.due { return (s.due, s.generation) }
                s.scheduled = false
                return (nil, s.generation)
            }
            if let later {
                trim(at: later)
                return
            }
            trim()
            // The window ends with the trim: the bulk's own frees are done by then, and a
            // window left open for the follow-ups made the next whole-binary register, 0.8 s
            // after a removal, run in it (handing back buffers it took again).
            state.withLock { s in
                guard s.generation == generation, !s.scheduled, s.windowOpen else { return }
                s.windowOpen = false
                CUprobeSys_heap_release_end()
            }
            followUp(Self.followUps, generation: generation)
        }
    }

    private func followUp(_ left: Int, generation: UInt64) {
        guard left > 0 else { return }
        DispatchQueue.global(qos: .utility).asyncAfter(deadline: .now() + delay) { [self] in
            // A newer request runs its own checks.
            guard state.withLock({ $0.generation == generation && !$0.scheduled }) else { return }
            if mallinfo2().fordblks > Self.followUpFreeBytes { trim() }
            followUp(left - 1, generation: generation)
        }
    }

    private func trim() {
        _ = malloc_trim(0)
        trims.add(1, ordering: .relaxed)
    }

    /// Trims done so far.
    public var count: UInt64 { trims.load(ordering: .relaxed) }

    /// Whether this trimmer holds a heap-release window open (tests).
    public var releasing: Bool { state.withLock { $0.windowOpen } }
}
