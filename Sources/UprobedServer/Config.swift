import Foundation
import UprobeELF
import UprobeSystem

/// The daemon's configuration. Every field has a built-in default; `config/uprobed.conf`
/// documents each key with exactly these defaults (a test keeps the two equal).
public struct DaemonConfig: Sendable, Equatable {
    /// Unix socket the daemon binds when not socket-activated.
    public var socketPath = "/run/uprobed/uprobed.sock"
    /// Permission bits of a socket the daemon binds itself.
    public var socketMode: UInt32 = 0o660
    /// Where the state file lives.
    public var stateDir = "/var/lib/uprobed"
    /// Where the counting program, its maps and every link are pinned in bpffs, so counting
    /// goes on while the daemon is down and a restart adopts them ("": nothing is pinned, and
    /// every exit detaches every probe).
    public var pinDir = "/sys/fs/bpf/uprobed"
    /// The probe-set files (`*.yaml`, one set per file), reconciled at start and on each reload.
    public var probesDir = "/etc/uprobed/probes.d"
    /// Seconds between saves of the hit totals when no batch saved them (0: only at batches
    /// and at stop). Bounds the hits a crash can lose from the carried-over totals.
    public var stateCheckpointSeconds = 60
    /// Longest request line accepted, in bytes (a 10,000-probe request is about 0.6 MB).
    public var maxLineBytes = 4 * 1024 * 1024
    /// Most probe specs in one register request, and (times 4) most sites its globs may expand
    /// to. 2^20 is the kernel's most offsets in one uprobe_multi link: an admin may probe a
    /// whole binary in one request (non-admins stay bound by `maxProbesPerUID`).
    public var maxProbesPerRequest = 1_048_576
    /// SO_SNDBUF asked for on each client connection, in bytes (0: the kernel's default). The
    /// kernel caps it at net.core.wmem_max and doubles what it grants.
    public var sendBufferBytes = 1024 * 1024
    /// Most client connections open at once; one more is told `too_many_connections` and
    /// closed. Connections and uprobe_multi links draw on the same file-descriptor limit, so a
    /// flood of idle clients must not leave the engine unable to open a link or a binary.
    public var maxConnections = 1024
    /// Most connections one uid that is not an admin may hold open at once (0: no limit), so
    /// one reader cannot take every connection.
    public var maxConnectionsPerUID = 64
    /// Of `max_connections`, this many are kept for admins: peers that are not admins are
    /// refused once only these are left, so root can always connect to repair things.
    public var adminReservedConnections = 16
    /// Most functions one glob may expand to (2^20: every function of the largest binaries).
    public var maxGlobMatches = 1_048_576
    /// Memory the cache of parsed binaries may hold, in bytes (estimated from their symbols).
    /// A parse larger than this is used once and not kept.
    public var elfCacheBytes = ELFFileCache.defaultByteBudget
    /// Batching: how long the writer waits for more requests after the first, in microseconds.
    public var batchWindowMicros = 250
    /// Batching: most requests in one batch.
    public var maxBatchRequests = 1024
    /// A removed probe is physically detached within this many milliseconds; removals within
    /// it share one link rebuild and one grace period.
    public var compactionDelayMs = 250
    /// A binary (per pid filter and direction) with more small links than this gets them merged.
    public var maxLinksPerGroup = 8
    /// Counter slots, i.e. the most probe sites attached at once. The counters cost 12 bytes of
    /// kernel memory per slot, allocated when the daemon starts (12 MiB for 2^20); the count
    /// map is mapped into the daemon, so its RSS shows 8 of them (RssFile), not its heap.
    public var slotCapacity: UInt32 = 1_048_576
    /// Latency probe sites at once: each has a histogram row of 2.7 KB of kernel memory,
    /// allocated for all of them when the first latency probe is registered.
    public var latencyCapacity: UInt32 = 16_384
    /// Least `interval_ms` a `watch` may ask for.
    public var minWatchIntervalMs = 100
    /// trace, debug, info, notice, warning, error, critical.
    public var logLevel = "info"
    /// Registrations made by path follow it through replacements of the file: every this many
    /// milliseconds (and at once on an inotify event in the file's directory) the daemon checks
    /// followed paths, pid-filtered probes' processes, and which old files are still mapped.
    public var followCheckMs = 1000
    /// After an inotify event, wait this long for the directory to settle before checking (a
    /// copy in place arrives as several events; a rename is atomic).
    public var followSettleMs = 20
    /// A non-admin's pid-filtered probe ends when its process stops being the owner's (a
    /// setuid exec). Checked at once after every exec of such a process (BPF exec events) and
    /// also every this many milliseconds while there are any (one read of /proc/PID/status per
    /// process), for when exec events are unavailable.
    public var ownerCheckMs = 100

    // Access control (see AccessPolicy). Entries are user/group names or numeric ids; `*` is
    // everyone. Root (uid 0) is always an admin.
    /// Users who may do everything: probe any binary and every process, remove anyone's probes.
    public var adminUsers: [String] = []
    /// Groups whose members are admins.
    public var adminGroups: [String] = []
    /// Users who may register probes on binaries they can read in processes they own, and
    /// remove their own probes.
    public var registerUsers: [String] = []
    /// Groups whose members may register like `register_uids`.
    public var registerGroups: [String] = []
    /// Users who may only read (`list`, `stats`, `watch`, `status`). The socket's own
    /// permissions are the first gate; by default anyone who can connect may read.
    public var readUsers: [String] = ["*"]
    /// Groups whose members may read.
    public var readGroups: [String] = []
    /// Most probes one non-admin uid may hold at once (0: no limit).
    public var maxProbesPerUID = 1000
    /// Where to serve Prometheus metrics: empty (off), `HOST:PORT` (loopback TCP) or an
    /// absolute Unix socket path.
    public var metricsListen = ""
    /// Which per-probe series the metrics carry: every probe, one per consumer, or the top N
    /// plus an aggregate (bounds the series at large probe counts).
    public var metricsProbeSeries = MetricsProbeSeries.all
    /// Where to push the same metrics over OTLP/HTTP (an OpenTelemetry collector): empty (off),
    /// or an http:// or https:// URL (`/v1/metrics` is added when it has no path).
    public var otlpEndpoint = ""
    /// Milliseconds between OTLP pushes.
    public var otlpIntervalMs = 60_000
    /// Most milliseconds one push may take, retries included (capped at the interval).
    public var otlpTimeoutMs = 10_000
    /// Extra HTTP headers of every push (`name=value,name2=value2`), e.g. an auth token.
    public var otlpHeaders: [OTLPHeader] = []

    public init() {}

    public static let defaultPath = "/etc/uprobed/uprobed.conf"

    /// Parses `key = value` lines; `#` starts a comment. Unknown keys and bad values are errors
    /// naming the line, so a typo is never silently ignored.
    public static func parse(_ text: String, base: DaemonConfig = DaemonConfig()) throws(ConfigError) -> DaemonConfig {
        var c = base
        for (n, raw) in text.split(separator: "\n", omittingEmptySubsequences: false).enumerated() {
            let line = raw.split(separator: "#", maxSplits: 1, omittingEmptySubsequences: false).first.map(String.init) ?? ""
            let trimmed = line.trimmingCharacters(in: .whitespaces)
            if trimmed.isEmpty { continue }
            guard let eq = trimmed.firstIndex(of: "=") else {
                throw ConfigError(line: n + 1, message: "expected 'key = value', got '\(trimmed)'")
            }
            let key = trimmed[..<eq].trimmingCharacters(in: .whitespaces)
            let value = trimmed[trimmed.index(after: eq)...].trimmingCharacters(in: .whitespaces)
            guard let entry = ConfigKey.named[key] else {
                throw ConfigError(line: n + 1, message: "unknown key '\(key)'")
            }
            do throws(ConfigKey.BadValue) { try entry.set(&c, value) } catch {
                throw ConfigError(line: n + 1, message: error.message)
            }
        }
        return c
    }

    /// A list of user or group names / numeric ids, separated by commas or blanks; `*` means
    /// everyone. Names are resolved when the policy is built (and again on every reload).
    static func idList(_ value: String, key: String) throws(ConfigKey.BadValue) -> [String] {
        let items = value.split(whereSeparator: { $0 == "," || $0 == " " || $0 == "\t" }).map(String.init)
        for item in items {
            let ok = item == "*" || UInt32(item) != nil
                || (item.first.map { $0.isLetter || $0 == "_" } ?? false)
                    && item.allSatisfy { $0.isASCII && ($0.isLetter || $0.isNumber || "_-.$".contains($0)) }
            guard ok else {
                throw ConfigKey.BadValue(message: "\(key): '\(item)' is not a user/group name, a numeric id or *")
            }
        }
        return items
    }

    /// Loads `path`; a missing file at the default path means built-in defaults.
    public static func load(path: String?, base: DaemonConfig = DaemonConfig()) throws(ConfigError) -> DaemonConfig {
        let p = path ?? defaultPath
        guard FileManager.default.fileExists(atPath: p) else {
            if path == nil { return base }
            throw ConfigError(line: 0, message: "config file \(p) does not exist")
        }
        guard let bytes = readWholeFile(p, limit: 1 << 20) else {
            throw ConfigError(line: 0, message: "cannot read the config: \(Syscall.lastError("read", p))")
        }
        guard let text = String(validating: bytes, as: UTF8.self) else {
            throw ConfigError(line: 0, message: "\(p) is not UTF-8 text")
        }
        do { return try parse(text, base: base) } catch {
            throw ConfigError(line: error.line, message: "\(p): \(error.message)")
        }
    }
}

public struct ConfigError: Error, Sendable, CustomStringConvertible {
    public let line: Int
    public let message: String
    public var description: String { line > 0 ? "line \(line): \(message)" : message }
}

/// Reads a small file with open(2)/read(2) (works for /dev/null and other special files,
/// which Foundation's readers reject). Nil on error (errno set) or when over `limit` bytes.
func readWholeFile(_ path: String, limit: Int) -> [UInt8]? {
    let fd = open(path, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { return nil }
    defer { close(fd) }
    var out: [UInt8] = []
    var chunk = [UInt8](repeating: 0, count: 65536)
    while true {
        let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        if n < 0 { if errno == EINTR { continue }; return nil }
        if n == 0 { return out }
        out.append(contentsOf: chunk[0..<n])
        if out.count > limit { errno = EFBIG; return nil }
    }
}
