import Synchronization

/// The daemon's own counters, beside the engine's: reported by `status` and the metrics endpoint.
public final class ServiceCounters: Sendable {
    public let accessDenied = Atomic<UInt64>(0)
    public let stateWrites = Atomic<UInt64>(0)
    public let stateWriteFailures = Atomic<UInt64>(0)
    /// Unregistered probes whose removal is not on disk yet (a restart now would bring them back).
    public let stateUnsavedRemovals = Atomic<Int>(0)
    /// Bytes of the state directory's space reserve (0: used up by a full disk, or not made).
    public let stateReserveBytes = Atomic<Int>(0)
    /// fsyncs of the state log by group commit (each covers one or more batches).
    public let stateSyncs = Atomic<UInt64>(0)
    public let configReloads = Atomic<UInt64>(0)
    public let configReloadFailures = Atomic<UInt64>(0)
    public let metricsScrapes = Atomic<UInt64>(0)
    /// Scrapes whose bulk read of the kernel counters failed (they carry no probe series).
    public let counterReadFailures = Atomic<UInt64>(0)
    /// OTLP pushes the collector accepted, and pushes that failed (`otlp_endpoint`).
    public let otlpExports = Atomic<UInt64>(0)
    public let otlpExportFailures = Atomic<UInt64>(0)
    /// Client connections being served now.
    public let connectionsOpen = Atomic<Int>(0)
    /// Connections turned away because `max_connections` were open.
    public let connectionsRefused = Atomic<UInt64>(0)
    /// `stats` and `status` requests answered by the event loop that read them (`ImmediateReplies`).
    public let repliesOnEventLoop = Atomic<UInt64>(0)
    /// What this start adopted from the pin directory (nil: nothing is pinned).
    public let pins = Mutex<PinSummary?>(nil)
    public init() {}
}
