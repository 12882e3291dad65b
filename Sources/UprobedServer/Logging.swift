import CSystemd
import Logging
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// The daemon's log level, shared by every logger so a config reload (SIGHUP) changes it at once.
public final class LogLevelCell: Sendable {
    private let raw: Atomic<Int>
    public init(_ level: Logger.Level) { raw = Atomic(Self.index(level)) }
    public var level: Logger.Level {
        get { Logger.Level.allCases[raw.load(ordering: .relaxed)] }
        set { raw.store(Self.index(newValue), ordering: .relaxed) }
    }
    static func index(_ l: Logger.Level) -> Int { Logger.Level.allCases.firstIndex(of: l) ?? 2 }
    /// The process-wide cell `uprobed` bootstraps its handlers with.
    public static let shared = LogLevelCell(.info)
}

/// Sends log events to journald as structured entries (sd_journal_sendv(3)): PRIORITY,
/// MESSAGE, SYSLOG_IDENTIFIER and one field per metadata key (`probe_id` -> PROBE_ID, `path`
/// -> PATH, `consumer` -> CONSUMER, `error_code` -> ERROR_CODE, `peer_uid` -> PEER_UID, ...),
/// so `journalctl -u uprobed PROBE_ID=p7` finds one probe's history. Used when stderr is the
/// journal stream (Systemd.stderrIsJournal); falls back to the stderr line if sending fails.
public struct JournalLogHandler: LogHandler {
    public var metadata: Logger.Metadata = [:]
    private let label: String
    private let levelCell: LogLevelCell
    private let fallback: PriorityStderrLogHandler

    public init(label: String, levelCell: LogLevelCell) {
        self.label = label
        self.levelCell = levelCell
        self.fallback = PriorityStderrLogHandler(label: label, levelCell: levelCell)
    }

    public var logLevel: Logger.Level {
        get { levelCell.level }
        set { levelCell.level = newValue }
    }

    public subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    /// Journal field name for a metadata key: upper case, `[A-Z0-9_]` only, not starting with
    /// `_` (those are trusted fields journald sets itself) or a digit, at most 64 characters.
    /// Names that would shadow the entry's own fields get an `UPROBED_` prefix.
    static func fieldName(_ key: String) -> String {
        var name = String(key.uppercased().map { c -> Character in
            (c.isASCII && (c.isLetter || c.isNumber)) ? c : "_"
        })
        while name.hasPrefix("_") { name.removeFirst() }
        if name.isEmpty || name.first?.isNumber == true { name = "F" + name }
        if ["MESSAGE", "PRIORITY", "SYSLOG_IDENTIFIER", "CODE_FILE", "CODE_LINE", "CODE_FUNC", "MESSAGE_ID"].contains(name) {
            name = "UPROBED_" + name
        }
        return String(name.prefix(64))
    }

    /// The `FIELD=value` strings of one entry, in a stable order (entry fields first, then
    /// metadata sorted by key). Values may hold any bytes, newlines included: sd_journal_sendv
    /// takes each iovec as one field.
    static func fields(level: Logger.Level, message: String, metadata: Logger.Metadata,
                       source: (file: String, line: UInt, function: String)? = nil) -> [String] {
        var out = ["PRIORITY=\(PriorityStderrLogHandler.priority(level))", "MESSAGE=\(message)", "SYSLOG_IDENTIFIER=uprobed"]
        if let source {
            out += ["CODE_FILE=\(source.file)", "CODE_LINE=\(source.line)", "CODE_FUNC=\(source.function)"]
        }
        for (k, v) in metadata.sorted(by: { $0.key < $1.key }) { out.append("\(fieldName(k))=\(v)") }
        return out
    }

    public func log(event: LogEvent) {
        var all = metadata
        if let extra = event.metadata { all.merge(extra) { $1 } }
        let entry = Self.fields(level: event.level, message: "\(event.message)", metadata: all,
                                source: (event.file, event.line, event.function))
        let strings = entry.map { Array($0.utf8) }
        let rc: Int32 = Self.withIOVecs(strings) { iov in sd_journal_sendv(iov.baseAddress, Int32(iov.count)) }
        if rc < 0 { fallback.log(event: event) }
    }

    /// Builds one iovec per field, valid during `body`.
    static func withIOVecs<R>(_ fields: [[UInt8]], _ body: (UnsafeBufferPointer<iovec>) -> R) -> R {
        let total = fields.reduce(0) { $0 + $1.count }
        var flat = [UInt8]()
        flat.reserveCapacity(total)
        for f in fields { flat += f }
        return flat.withUnsafeMutableBytes { raw in
            var iovs: [iovec] = []
            iovs.reserveCapacity(fields.count)
            var off = 0
            for f in fields {
                iovs.append(iovec(iov_base: raw.baseAddress.map { $0 + off }, iov_len: f.count))
                off += f.count
            }
            return iovs.withUnsafeBufferPointer { body($0) }
        }
    }
}

/// Writes log lines to stderr with the `<N>` syslog priority prefix that systemd (and
/// journald's stream transport) understands; metadata is appended as `key=value`.
public struct PriorityStderrLogHandler: LogHandler {
    public var metadata: Logger.Metadata = [:]
    private let label: String
    private let levelCell: LogLevelCell

    /// A handler with its own level.
    public init(label: String, level: Logger.Level) {
        self.label = label
        self.levelCell = LogLevelCell(level)
    }

    /// A handler whose level follows `levelCell` (changed by a config reload).
    public init(label: String, levelCell: LogLevelCell) {
        self.label = label
        self.levelCell = levelCell
    }

    public var logLevel: Logger.Level {
        get { levelCell.level }
        set { levelCell.level = newValue }
    }

    public subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    static func priority(_ level: Logger.Level) -> Int {
        switch level {
        case .trace, .debug: return 7
        case .info: return 6
        case .notice: return 5
        case .warning: return 4
        case .error: return 3
        case .critical: return 2
        }
    }

    public func log(event: LogEvent) {
        var all = metadata
        if let extra = event.metadata { all.merge(extra) { $1 } }
        let fields = all.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: " ")
        let line = "<\(Self.priority(event.level))>\(event.message)\(fields.isEmpty ? "" : " " + fields)\n"
        // One write(2) per line so concurrent log lines never interleave mid-line.
        var bytes = Array(line.utf8)[...]
        while !bytes.isEmpty {
            let n = bytes.withUnsafeBytes { Glibc.write(2, $0.baseAddress, $0.count) }
            if n <= 0 { return }
            bytes = bytes.dropFirst(n)
        }
    }
}
