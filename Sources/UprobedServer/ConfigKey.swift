/// Every key of the config file, in one table: its name, how its value is checked and stored,
/// and whether a reload (SIGHUP) applies it or it waits for a restart. The parser, the reload
/// and the list of restart-only changes all read this table, so a key is declared once.
/// (`config/uprobed.conf` documents each key; a test checks it names exactly these.)
struct ConfigKey: Sendable {
    let name: String
    /// Applied by a reload; otherwise the running value stays until a restart.
    let reloadable: Bool
    /// Parses `value` into its field.
    let set: @Sendable (inout DaemonConfig, String) throws(BadValue) -> Void
    /// Copies the field from one config to another (what a reload applies).
    let copy: @Sendable (DaemonConfig, inout DaemonConfig) -> Void
    let differs: @Sendable (DaemonConfig, DaemonConfig) -> Bool

    /// Why a value was refused; the parser adds the line.
    struct BadValue: Error, Sendable {
        let message: String
    }

    static let all: [ConfigKey] = [
        path("socket", \.socketPath),
        field("socket_mode", \.socketMode) { v throws(BadValue) in
            guard let m = UInt32(v, radix: 8), m <= 0o777 else { throw BadValue(message: "socket_mode must be octal like 0660, got '\(v)'") }
            return m
        },
        path("state_dir", \.stateDir),
        field("pin_dir", \.pinDir) { v throws(BadValue) in
            guard v.isEmpty || (v.hasPrefix("/") && !v.split(separator: "/").contains("..")) else {
                throw BadValue(message: "pin_dir must be empty (no pinning) or an absolute path without '..'")
            }
            return v
        },
        path("probes_dir", \.probesDir, reloadable: true),
        int("state_checkpoint_s", \.stateCheckpointSeconds, 0...86_400),
        int("max_line_bytes", \.maxLineBytes, 1024...(256 << 20)),
        int("max_probes_per_request", \.maxProbesPerRequest, 1...16_777_216),
        int("send_buffer_bytes", \.sendBufferBytes, 0...(256 << 20)),
        int("max_connections", \.maxConnections, 1...1_000_000),
        int("max_connections_per_uid", \.maxConnectionsPerUID, 0...1_000_000),
        int("admin_reserved_connections", \.adminReservedConnections, 0...1_000_000),
        int("elf_cache_bytes", \.elfCacheBytes, 0...(64 << 30)),
        int("max_glob_matches", \.maxGlobMatches, 1...16_777_216),
        int("batch_window_us", \.batchWindowMicros, 0...1_000_000),
        int("max_batch_requests", \.maxBatchRequests, 1...1_000_000),
        int("compaction_delay_ms", \.compactionDelayMs, 0...3_600_000),
        int("max_links_per_group", \.maxLinksPerGroup, 1...100_000),
        field("slot_capacity", \.slotCapacity) { v throws(BadValue) in UInt32(try integer("slot_capacity", v, 16...16_777_216)) },
        field("latency_capacity", \.latencyCapacity) { v throws(BadValue) in UInt32(try integer("latency_capacity", v, 1...1_048_576)) },
        int("min_watch_interval_ms", \.minWatchIntervalMs, 1...3_600_000),
        int("follow_check_ms", \.followCheckMs, 10...3_600_000),
        int("follow_settle_ms", \.followSettleMs, 0...60_000),
        int("owner_check_ms", \.ownerCheckMs, 10...3_600_000),
        ids("admin_uids", \.adminUsers),
        ids("admin_groups", \.adminGroups),
        ids("register_uids", \.registerUsers),
        ids("register_groups", \.registerGroups),
        ids("read_uids", \.readUsers),
        ids("read_groups", \.readGroups),
        int("max_probes_per_uid", \.maxProbesPerUID, 0...10_000_000, reloadable: true),
        field("metrics_listen", \.metricsListen, reloadable: true) { v throws(BadValue) in
            do throws(MetricsEndpoint.ParseError) { _ = try MetricsEndpoint.parse(v) } catch { throw BadValue(message: error.message) }
            return v
        },
        field("metrics_probe_series", \.metricsProbeSeries, reloadable: true) { v throws(BadValue) in
            guard let mode = MetricsProbeSeries.parse(v) else {
                throw BadValue(message: "metrics_probe_series must be all, per_consumer or top:N (N in 1...\(MetricsProbeSeries.maxTop)), got '\(v)'")
            }
            return mode
        },
        field("otlp_endpoint", \.otlpEndpoint, reloadable: true) { v throws(BadValue) in
            do throws(OTLPEndpoint.ParseError) { _ = try OTLPEndpoint.parse(v) } catch { throw BadValue(message: error.message) }
            return v
        },
        int("otlp_interval_ms", \.otlpIntervalMs, 100...86_400_000, reloadable: true),
        int("otlp_timeout_ms", \.otlpTimeoutMs, 100...600_000, reloadable: true),
        field("otlp_headers", \.otlpHeaders, reloadable: true) { v throws(BadValue) in
            do throws(OTLPEndpoint.ParseError) { return try OTLPHeader.parseList(v) } catch { throw BadValue(message: error.message) }
        },
        field("log_level", \.logLevel, reloadable: true) { v throws(BadValue) in
            let levels = ["trace", "debug", "info", "notice", "warning", "error", "critical"]
            guard levels.contains(v) else { throw BadValue(message: "log_level must be one of \(levels.joined(separator: ", "))") }
            return v
        },
    ]

    static let named: [String: ConfigKey] = Dictionary(all.map { ($0.name, $0) }, uniquingKeysWith: { a, _ in a })

    /// Names of the keys that differ between `a` and `b` but only take effect after a restart.
    static func restartOnlyChanges(_ a: DaemonConfig, _ b: DaemonConfig) -> [String] {
        all.filter { !$0.reloadable && $0.differs(a, b) }.map(\.name)
    }

    /// `running` with every reloadable key taken from `next`.
    static func reloaded(_ running: DaemonConfig, from next: DaemonConfig) -> DaemonConfig {
        var applied = running
        for key in all where key.reloadable { key.copy(next, &applied) }
        return applied
    }

    // MARK: kinds of keys

    static func field<V: Equatable & Sendable>(_ name: String, _ path: any WritableKeyPath<DaemonConfig, V> & Sendable, reloadable: Bool = false,
                                    parse: @escaping @Sendable (String) throws(BadValue) -> V) -> ConfigKey {
        ConfigKey(name: name, reloadable: reloadable,
                  set: { (c: inout DaemonConfig, v: String) throws(BadValue) in c[keyPath: path] = try parse(v) },
                  copy: { from, to in to[keyPath: path] = from[keyPath: path] },
                  differs: { a, b in a[keyPath: path] != b[keyPath: path] })
    }

    static func int(_ name: String, _ path: any WritableKeyPath<DaemonConfig, Int> & Sendable, _ range: ClosedRange<Int>,
                    reloadable: Bool = false) -> ConfigKey {
        field(name, path, reloadable: reloadable) { v throws(BadValue) in try integer(name, v, range) }
    }

    /// An integer in `range`; `_` may group digits (`4_194_304`).
    static func integer(_ name: String, _ v: String, _ range: ClosedRange<Int>) throws(BadValue) -> Int {
        guard let n = Int(v.replacingOccurrences(of: "_", with: "")), range.contains(n) else {
            throw BadValue(message: "\(name) must be an integer in \(range.lowerBound)...\(range.upperBound), got '\(v)'")
        }
        return n
    }

    static func path(_ name: String, _ keyPath: any WritableKeyPath<DaemonConfig, String> & Sendable,
                     reloadable: Bool = false) -> ConfigKey {
        field(name, keyPath, reloadable: reloadable) { v throws(BadValue) in
            guard v.hasPrefix("/") else { throw BadValue(message: "\(name) must be an absolute path") }
            return v
        }
    }

    /// The access lists: reloadable (a reload replaces the policy).
    static func ids(_ name: String, _ path: any WritableKeyPath<DaemonConfig, [String]> & Sendable) -> ConfigKey {
        field(name, path, reloadable: true) { v throws(BadValue) in try DaemonConfig.idList(v, key: name) }
    }
}
