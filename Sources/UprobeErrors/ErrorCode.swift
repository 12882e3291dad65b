/// A stable, snake_case error code: `error.code` of a failed reply, and `ERROR_CODE` of a log
/// line. Every layer (resolver, kernel attacher, engine, state files, server) reports its
/// failures with these, so the wire and the journal have one vocabulary.
///
/// Codes are part of the contract: scripts match on them, so a code is never renamed or
/// removed. The set is closed: a new code is added here (and to README.md's list, which a test
/// keeps equal to `all`), never spelled ad hoc, so a typo cannot make a new wire code.
public struct ErrorCode: Hashable, Sendable, CustomStringConvertible {
    public let rawValue: String
    private init(_ rawValue: String) { self.rawValue = rawValue }

    /// The code named `rawValue`, if it is one of `all` (a client reading a reply).
    public init?(rawValue: String) {
        guard let known = Self.byName[rawValue] else { return nil }
        self = known
    }

    public var description: String { rawValue }

    // MARK: requests and connections

    /// The line is not valid JSON (UTF-8, RFC 8259).
    public static let invalidJSON = ErrorCode("invalid_json")
    /// Valid JSON, but not a request of this protocol (not an object, wrong field types, ...).
    public static let invalidRequest = ErrorCode("invalid_request")
    /// `op` names no operation this daemon knows.
    public static let unknownOp = ErrorCode("unknown_op")
    /// The line exceeded `max_line_bytes`; it was discarded unread.
    public static let lineTooLong = ErrorCode("line_too_long")
    /// A request carried more probes than `max_probes_per_request`.
    public static let tooManyProbes = ErrorCode("too_many_probes")
    /// A probe id in the request names no registration.
    public static let probeNotFound = ErrorCode("probe_not_found")
    /// The connection is over `max_connections`, `max_connections_per_uid` or the admins'
    /// reserve; it is closed after this reply.
    public static let tooManyConnections = ErrorCode("too_many_connections")
    /// The daemon is out of file descriptors (a binary could not be opened, or a connection
    /// could not be served and is closed).
    public static let tooManyOpenFiles = ErrorCode("too_many_open_files")
    /// The daemon is stopping and takes no new work.
    public static let shuttingDown = ErrorCode("shutting_down")
    /// A bug: the daemon could not complete an operation it accepted.
    public static let internalError = ErrorCode("internal_error")

    // MARK: access

    /// The peer's credentials do not allow this (role, process owner, unreadable binary).
    public static let permissionDenied = ErrorCode("permission_denied")
    /// A non-admin uid would hold more than `max_probes_per_uid` probes.
    public static let probeLimitExceeded = ErrorCode("probe_limit_exceeded")
    /// (log) A registrant's process stopped being its own; its probes were ended.
    public static let processNotOwned = ErrorCode("process_not_owned")

    // MARK: resolving a spec

    public static let fileNotFound = ErrorCode("file_not_found")
    public static let notELF = ErrorCode("not_elf")
    public static let unsupportedELF = ErrorCode("unsupported_elf")
    public static let malformedELF = ErrorCode("malformed_elf")
    public static let noSymbols = ErrorCode("no_symbols")
    public static let symbolNotFound = ErrorCode("symbol_not_found")
    public static let offsetNotExecutable = ErrorCode("offset_not_executable")
    public static let offsetNotFunctionStart = ErrorCode("offset_not_function_start")
    /// The instruction at a named symbol, offset or USDT site is one x86 uprobes refuse (or would
    /// emulate instead of executing); `force` does not override it. A glob skips such functions
    /// and lists them in its reply's `skipped` instead. Also reported when the kernel refused a
    /// link over an instruction the resolver could not judge: the message names the offsets.
    public static let instructionNotProbeable = ErrorCode("instruction_not_probeable")
    public static let usdtNotFound = ErrorCode("usdt_not_found")
    public static let libraryNotFound = ErrorCode("library_not_found")
    public static let tooManyMatches = ErrorCode("too_many_matches")
    public static let invalidSpec = ErrorCode("invalid_spec")
    public static let retprobeOnGo = ErrorCode("retprobe_on_go")
    public static let processNotFound = ErrorCode("process_not_found")

    // MARK: the kernel

    /// bpf(2) is not available to the daemon (no CAP_BPF/CAP_SYS_ADMIN, or disabled).
    public static let bpfUnavailable = ErrorCode("bpf_unavailable")
    /// The kernel has no uprobe_multi links (before 6.6, or not built in).
    public static let uprobeMultiUnsupported = ErrorCode("uprobe_multi_unsupported")
    public static let mapCreateFailed = ErrorCode("map_create_failed")
    public static let mapOpFailed = ErrorCode("map_op_failed")
    public static let progLoadFailed = ErrorCode("prog_load_failed")
    /// The kernel refused a link; the message carries the errno.
    public static let linkCreateFailed = ErrorCode("link_create_failed")
    public static let pathNotFound = ErrorCode("path_not_found")
    public static let offsetOutOfRange = ErrorCode("offset_out_of_range")
    public static let invalidArgument = ErrorCode("invalid_argument")
    public static let perfEventOpenFailed = ErrorCode("perf_event_open_failed")
    public static let perfPMUUnavailable = ErrorCode("perf_pmu_unavailable")
    /// (log) Exec events (the BPF exec tracepoint) are unavailable; ownership is polled.
    public static let execEventsUnavailable = ErrorCode("exec_events_unavailable")
    /// The binary at a path was replaced between resolving and attaching; resolve again.
    public static let fileChanged = ErrorCode("file_changed")
    /// No counter slot is free, even after reclaiming retired ones (`slot_capacity`).
    public static let capacityExhausted = ErrorCode("capacity_exhausted")
    /// The bpf file system refused a pin (a link, map or program under `pin_dir`), or the pin
    /// directory cannot be used (not on bpffs and cannot be mounted, or in use by another uprobed).
    public static let pinFailed = ErrorCode("pin_failed")
    /// (log) A pinned link no registration owns was detached at start.
    public static let pinStale = ErrorCode("pin_stale")

    // MARK: state files

    /// The registration could not be saved, so it was not made.
    public static let stateWriteFailed = ErrorCode("state_write_failed")
    /// (start) The state files could not be read or written.
    public static let stateIO = ErrorCode("state_io")
    /// (start) A state file is not one this daemon understands.
    public static let stateCorrupt = ErrorCode("state_corrupt")
    /// (start) The state log lacks changes between the snapshot and its first line.
    public static let stateIncomplete = ErrorCode("state_incomplete")
    /// (log) The state dir's disk is full; its space reserve was used.
    public static let stateDiskFull = ErrorCode("state_disk_full")

    // MARK: service

    /// (log) A config reload was refused; the previous config stays.
    public static let configInvalid = ErrorCode("config_invalid")
    /// (log) A restored or followed probe is degraded (registered, not attached).
    public static let probeDegraded = ErrorCode("probe_degraded")

    // MARK: probe sets

    /// (log) A probe-set file in `probes_dir` was refused for its text: not YAML, an unknown
    /// key, a `pid`, a bad spelling, a bad name. Its set keeps its previous probes.
    public static let setInvalid = ErrorCode("set_invalid")
    /// The set name is held by the other source: a file in `probes_dir` for an `apply`, or an
    /// `apply` for a file of the same name (refused in the log). (A non-admin's `apply` of a set
    /// another uid applied is `permission_denied`.)
    public static let setConflict = ErrorCode("set_conflict")
    /// An `unregister` named a probe a probe set owns: change the set instead.
    public static let probeInSet = ErrorCode("probe_in_set")

    /// Every code, in the order README.md lists them.
    public static let all: [ErrorCode] = [
        invalidJSON, invalidRequest, unknownOp, lineTooLong, tooManyProbes, probeNotFound,
        tooManyConnections, tooManyOpenFiles, shuttingDown, internalError,
        permissionDenied, probeLimitExceeded, processNotOwned,
        fileNotFound, notELF, unsupportedELF, malformedELF, noSymbols, symbolNotFound, offsetNotExecutable,
        offsetNotFunctionStart, instructionNotProbeable, usdtNotFound, libraryNotFound, tooManyMatches, invalidSpec, retprobeOnGo,
        processNotFound,
        bpfUnavailable, uprobeMultiUnsupported, mapCreateFailed, mapOpFailed, progLoadFailed, linkCreateFailed,
        pathNotFound, offsetOutOfRange, invalidArgument, perfEventOpenFailed, perfPMUUnavailable,
        execEventsUnavailable, fileChanged, capacityExhausted, pinFailed, pinStale,
        stateWriteFailed, stateIO, stateCorrupt, stateIncomplete, stateDiskFull,
        configInvalid, probeDegraded,
        setInvalid, setConflict, probeInSet,
    ]

    private static let byName: [String: ErrorCode] = Dictionary(all.map { ($0.rawValue, $0) }, uniquingKeysWith: { a, _ in a })
}
