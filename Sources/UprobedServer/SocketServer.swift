import Logging
import NIOCore
import NIOPosix
import UprobeCore
import UprobedProtocol
import Synchronization
import UprobeSystem
#if canImport(Glibc)
import Glibc
#endif

/// Errors that stop the daemon from serving at all.
public struct ServerError: Error, Sendable, CustomStringConvertible {
    public let message: String
    public var description: String { message }
}

/// The JSON-lines server on a Unix stream socket.
///
/// Each connection reads lines in order and answers them in order; one request's failure never
/// closes the connection. Connections run concurrently; all mutations meet in the engine.
final class SocketServer: Sendable {
    private let handler: RequestHandler
    private let logger: Logger
    private let maxLineBytes: Int
    private let minWatchIntervalMs: Int
    /// SO_SNDBUF for each connection (0: the kernel's default); see `run`.
    private let sendBufferBytes: Int
    /// How many connections may be open, in all and per peer; see `admit`.
    private let connectionLimits: ConnectionLimits
    /// When a refused connection was last logged, so a flood of them logs once in a while.
    private let lastRefusalLog = Mutex<ContinuousClock.Instant?>(nil)
    /// Open connections (so a graceful shutdown can stop their input after the current
    /// request) and how many each uid holds.
    private let connections = Mutex(OpenConnections())
    private let listener = Mutex<(any Channel)?>(nil)
    private let stopping = Atomic<Bool>(false)

    init(handler: RequestHandler, logger: Logger, maxLineBytes: Int, minWatchIntervalMs: Int, sendBufferBytes: Int = 0,
         connectionLimits: ConnectionLimits = ConnectionLimits()) {
        self.handler = handler
        self.logger = logger
        self.maxLineBytes = maxLineBytes
        self.minWatchIntervalMs = minWatchIntervalMs
        self.sendBufferBytes = sendBufferBytes
        self.connectionLimits = connectionLimits
    }

    typealias Connection = NIOAsyncChannel<LineFrame, ByteBuffer>

    /// An accepted connection and who is on the other end (nil if the kernel would not say).
    struct Accepted: Sendable {
        var connection: Connection
        var who: PeerIdentity?
        /// Shared with the connection's `ImmediateReplies` handler (nil without credentials).
        var gate: ConnectionGate?
    }

    /// Where to listen: a socket systemd passed us, or a path we bind ourselves.
    enum Endpoint: Sendable {
        case activated(fd: Int32)
        case path(String, mode: UInt32)
    }

    /// Binds (or adopts) the listening socket, calls `ready` once it accepts connections,
    /// then serves until `stop()`.
    func run(endpoint: Endpoint, group: MultiThreadedEventLoopGroup, ready: @Sendable () -> Void) async throws {
        let maxLine = maxLineBytes
        var bootstrap = ServerBootstrap(group: group)
            .serverChannelOption(.backlog, value: 256)
        if sendBufferBytes > 0 {
            // A send buffer that holds a whole `stats` reply: with the default (208 KiB) a reply
            // for 10,000 probes went out in several writes, each waiting for the client to drain
            // the last, and during a register churn every wait was a round of wake-ups between
            // the event loop and that client. (The kernel clamps the size; it does not refuse it.)
            bootstrap = bootstrap.childChannelOption(.socketOption(.so_sndbuf), value: sendBufferBytes)
        }
        // Credentials are taken here, on the event loop before the first read: a client that
        // sends its request and closes at once would otherwise leave a closed channel whose
        // socket options can no longer be read.
        let handler = self.handler
        let initializer: @Sendable (any Channel) -> EventLoopFuture<Accepted> = { channel in
            Self.identity(channel).flatMapThrowing { who in
                // First in line: while the client does not read its replies (the channel is not
                // writable), no more of its requests are read, so none of their replies queue.
                try channel.pipeline.syncOperations.addHandler(BackPressureHandler())
                try channel.pipeline.syncOperations.addHandler(ByteToMessageHandler(LineFramer(maxLength: maxLine)))
                var gate: ConnectionGate? = nil
                if let who {
                    let g = ConnectionGate()
                    try channel.pipeline.syncOperations.addHandler(ImmediateReplies(handler: handler, peer: who, gate: g))
                    gate = g
                }
                return Accepted(connection: try Connection(wrappingChannelSynchronously: channel,
                                                           configuration: .init(isOutboundHalfClosureEnabled: false)),
                                who: who, gate: gate)
            }
        }
        // The listening socket's descriptor is ours to know (NIO does not expose it), so that
        // `DescriptorReserve` can answer the clients NIO cannot accept at the descriptor limit.
        let listenFD: Int32
        switch endpoint {
        case .activated(let fd):
            listenFD = fd
        case .path(let path, let mode):
            try Self.prepareSocketPath(path)
            listenFD = try Self.bindUnixSocket(path, mode: mode)
        }
        let logger = self.logger
        let counters = handler.counters
        let server: NIOAsyncChannel<Accepted, Never>
        do {
            server = try await bootstrap
                .serverChannelInitializer { channel in
                    channel.eventLoop.makeCompletedFuture {
                        try channel.pipeline.syncOperations.addHandler(
                            DescriptorReserve(listenFD: listenFD, logger: logger, counters: counters))
                    }
                }
                .bind(listenFD, childChannelInitializer: initializer)
        } catch {
            if case .path = endpoint { close(listenFD) }
            throw error
        }
        listener.withLock { $0 = server.channel }
        if stopping.load(ordering: .acquiring) { server.channel.close(promise: nil) }
        ready()
        try await withThrowingDiscardingTaskGroup { group in
            try await server.executeThenClose { inbound in
                for try await accepted in inbound {
                    group.addTask { await self.serve(accepted.connection, peer: accepted.who, gate: accepted.gate) }
                }
            }
        }
    }

    /// Stops accepting, and stops reading from every connection after its current request
    /// (whose reply is still written).
    func stop() {
        stopping.store(true, ordering: .releasing)
        listener.withLock { $0?.close(promise: nil) }
        for c in connections.withLock({ Array($0.channels.values) }) { c.close(mode: .input, promise: nil) }
    }

    /// Creates the socket's directory and refuses to steal the socket of a running daemon.
    static func prepareSocketPath(_ path: String) throws {
        let dir = String(path[..<(path.lastIndex(of: "/") ?? path.startIndex)])
        if !dir.isEmpty { try makeDirectories(dir) }
        var st = stat()
        guard lstat(path, &st) == 0 else { return }
        guard (st.st_mode & S_IFMT) == S_IFSOCK else {
            throw ServerError(message: "\(path) exists and is not a socket; refusing to replace it")
        }
        if (try? probeConnect(path)) == true {
            throw ServerError(message: "another uprobed is already serving \(path)")
        }
    }

    /// socket(2), bind(2) and chmod(2) of a Unix stream socket at `path` (which
    /// `prepareSocketPath` has cleared); NIO listens on it. Created with mode 0600 (umask) and
    /// opened up to `mode` only once bound, so no client connects before the mode is right.
    static func bindUnixSocket(_ path: String, mode: UInt32) throws -> Int32 {
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        guard bytes.count < MemoryLayout.size(ofValue: addr.sun_path) else {
            throw ServerError(message: "socket path \(path) is longer than a Unix socket address allows")
        }
        withUnsafeMutableBytes(of: &addr.sun_path) { raw in for (i, b) in bytes.enumerated() { raw[i] = b } }
        let fd: Int32
        do {
            fd = try Syscall.run("socket", "AF_UNIX") {
                socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue) | Int32(SOCK_NONBLOCK.rawValue), 0)
            }
        } catch { throw ServerError(message: error.description) }
        unlink(path)  // a stale socket file: `prepareSocketPath` found no daemon serving it
        do {
            let old = umask(0o177)
            defer { umask(old) }
            try Syscall.run("bind", path) {
                withUnsafePointer(to: &addr) {
                    $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
                }
            }
            try Syscall.run("chmod", path) { chmod(path, mode_t(mode)) }
        } catch {
            close(fd)
            throw ServerError(message: error.description)
        }
        return fd
    }

    static func makeDirectories(_ dir: String) throws {
        var built = ""
        for part in dir.split(separator: "/") {
            built += "/" + part
            if mkdir(built, 0o755) != 0 && errno != EEXIST {
                throw ServerError(message: Syscall.lastError("mkdir", built).description)
            }
        }
    }

    /// True if something accepts connections on the socket at `path`.
    static func probeConnect(_ path: String) throws -> Bool {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        guard bytes.count < MemoryLayout.size(ofValue: addr.sun_path) else { return false }
        withUnsafeMutableBytes(of: &addr.sun_path) { raw in for (i, b) in bytes.enumerated() { raw[i] = b } }
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        return rc == 0
    }

    /// The peer's pid/uid/gid from SO_PEERCRED and its supplementary groups from
    /// SO_PEERGROUPS (socket(7)), both captured by the kernel at connect time. Called on the
    /// channel's event loop, where these getsockopt calls complete at once.
    static func identity(_ channel: any Channel) -> EventLoopFuture<PeerIdentity?> {
        let loop = channel.eventLoop
        guard let provider = channel as? any SocketOptionProvider else { return loop.makeSucceededFuture(nil) }
        let bound = NIOLoopBound(provider, eventLoop: loop)
        let cred: EventLoopFuture<UCred> = provider.unsafeGetSocketOption(
            level: SocketOptionLevel(SOL_SOCKET), name: SocketOptionName(SO_PEERCRED))
        return cred.flatMap { c -> EventLoopFuture<PeerIdentity?> in
            let peer = Peer(pid: c.pid, uid: c.uid, gid: c.gid)
            return peerGroups(bound.value).map { PeerIdentity(peer: peer, supplementaryGroups: $0) }
        }.recover { _ in nil }
    }

    /// SO_PEERGROUPS from linux/socket.h (Glibc's module does not export it).
    static let soPeerGroups: Int32 = 59

    /// The peer's supplementary groups. NIO zero-fills the buffer and drops the returned length,
    /// so the count is found like this: a zero-length read succeeds only when there are no
    /// groups (ERANGE otherwise); the kernel keeps group lists sorted without duplicates, so in a
    /// non-empty list only the first entry can be gid 0 and every zero after it is padding.
    /// More than 256 groups: none are used (least privilege; the primary gid still counts).
    static func peerGroups(_ provider: any SocketOptionProvider) -> EventLoopFuture<[UInt32]> {
        let none: EventLoopFuture<NoGroups> = provider.unsafeGetSocketOption(
            level: SocketOptionLevel(SOL_SOCKET), name: SocketOptionName(soPeerGroups))
        let bound = NIOLoopBound(provider, eventLoop: none.eventLoop)
        return none.map { _ in [UInt32]() }.flatMapError { _ in
            let full: EventLoopFuture<GroupBuffer> = bound.value.unsafeGetSocketOption(
                level: SocketOptionLevel(SOL_SOCKET), name: SocketOptionName(soPeerGroups))
            return full.map { buf in
                let all = withUnsafeBytes(of: buf) { Array($0.bindMemory(to: UInt32.self)) }
                guard let first = all.first else { return [] }
                return [first] + all.dropFirst().prefix(while: { $0 != 0 })
            }.recover { _ in [] }
        }
    }

    struct NoGroups: Sendable {}
    /// Room for 256 gids.
    struct GroupBuffer: Sendable {
        var v = (SIMD64<UInt32>(), SIMD64<UInt32>(), SIMD64<UInt32>(), SIMD64<UInt32>())
    }

    /// Layout of `struct ucred` (socket(7)): Glibc's module map hides it behind _GNU_SOURCE.
    struct UCred: Sendable {
        var pid: Int32 = 0
        var uid: UInt32 = 0
        var gid: UInt32 = 0
    }

    /// Counts `channel` among the open connections, or says why it may not be: all
    /// `max_connections` are open; the peer is not an admin and only the connections kept for
    /// admins are left; or its uid holds `max_connections_per_uid` already. The checks and the
    /// insert are one step under the lock, so a burst of connects cannot overshoot a limit.
    private func admit(_ channel: any Channel, peer who: PeerIdentity?) -> String? {
        let limits = connectionLimits
        let isAdmin = who.map { handler.access.load().role(of: $0) == .admin } ?? false
        let uid = who?.peer.uid
        let refusal = connections.withLock { open -> String? in
            if let why = limits.refusal(open: open.channels.count, heldByUID: uid.map { open.perUID[$0] ?? 0 } ?? 0,
                                        uid: uid, isAdmin: isAdmin) {
                return why
            }
            open.channels[ObjectIdentifier(channel)] = channel
            if let uid { open.perUID[uid, default: 0] += 1 }
            return nil
        }
        if refusal == nil { handler.counters.connectionsOpen.add(1, ordering: .relaxed) }
        return refusal
    }

    private func release(_ channel: any Channel, peer who: PeerIdentity?) {
        connections.withLock { open in
            guard open.channels.removeValue(forKey: ObjectIdentifier(channel)) != nil, let uid = who?.peer.uid else { return }
            let left = (open.perUID[uid] ?? 1) - 1
            if left > 0 { open.perUID[uid] = left } else { open.perUID.removeValue(forKey: uid) }
        }
        handler.counters.connectionsOpen.subtract(1, ordering: .relaxed)
    }

    /// Tells a connection over a limit why it is closed (one error line), then closes it.
    private func refuse(_ connection: Connection, peer who: PeerIdentity?, reason: String) async {
        handler.counters.connectionsRefused.add(1, ordering: .relaxed)
        let now = ContinuousClock.now
        let due = lastRefusalLog.withLock { last -> Bool in
            if let l = last, now - l < .seconds(10) { return false }
            last = now
            return true
        }
        if due {
            logger.warning("connection refused", metadata: [
                "reason": "\(reason)", "peer_pid": "\(who?.peer.pid ?? 0)", "peer_uid": "\(who?.peer.uid ?? 0)",
                "refused_total": "\(handler.counters.connectionsRefused.load(ordering: .relaxed))"])
        }
        let line = JSONSerializer.serializeLine(Reply.failure(id: nil, ProtocolError(.tooManyConnections,
            "\(reason); this connection is closed")))
        let channel = connection.channel
        try? await connection.executeThenClose { inbound, outbound in
            try await outbound.write(ByteBuffer(bytes: line))
            // Closing with the client's first request still unread makes the kernel reset the
            // connection, and the client then reads ECONNRESET instead of this line (17 times in
            // 20 for a client that sends at once). So: end our side, and read and drop what the
            // client sends until it closes, for at most `refusalLinger`.
            try await channel.close(mode: .output)
            let deadline = channel.eventLoop.scheduleTask(in: Self.refusalLinger) { channel.close(promise: nil) }
            defer { deadline.cancel() }
            for try await _ in inbound {}
        }
    }

    /// How long a refused connection is kept open for its client to read the refusal and close.
    static let refusalLinger = TimeAmount.seconds(1)

    /// The connections being served: each channel, and how many each uid holds.
    struct OpenConnections {
        var channels: [ObjectIdentifier: any Channel] = [:]
        var perUID: [UInt32: Int] = [:]
    }

    private func serve(_ connection: Connection, peer who: PeerIdentity?, gate: ConnectionGate?) async {
        let channel = connection.channel
        if let reason = admit(channel, peer: who) { return await refuse(connection, peer: who, reason: reason) }
        defer { release(channel, peer: who) }
        if stopping.load(ordering: .acquiring) { channel.close(mode: .input, promise: nil) }
        guard let peer = who else {
            logger.warning("connection without peer credentials refused")
            try? await channel.close()
            return
        }
        gate?.admitted.store(true, ordering: .relaxed)
        do {
            try await connection.executeThenClose { inbound, outbound in
                var watch: Task<Void, Never>? = nil
                defer { watch?.cancel() }
                for try await frame in inbound {
                    // Any new request ends a running watch stream first.
                    if let w = watch { w.cancel(); await w.value; watch = nil }
                    let reply: ByteBuffer
                    switch frame {
                    case .tooLong(let limit):
                        reply = ByteBuffer(bytes: JSONSerializer.serializeLine(Reply.failure(id: nil, ProtocolError(
                            .lineTooLong, "request line longer than \(limit) bytes (max_line_bytes); it was discarded"))))
                    case .line(let buffer):
                        // (Blank keep-alive lines never arrive: `ImmediateReplies` drops them.)
                        let decoded = RequestDecoder.decode(Array(buffer.readableBytesView), limits: handler.limits)
                        if case .success(let env) = decoded, case .watch(let interval, _, _) = env.request {
                            gate?.watching.store(true, ordering: .relaxed)  // before the stream's first write; see `ImmediateReplies`
                            watch = startWatch(env, intervalMs: interval, peer: peer, outbound: outbound)
                            continue
                        }
                        switch decoded {
                        case .success(let env): reply = await handler.reply(env, peer: peer)
                        case .failure(let f): reply = ByteBuffer(bytes: JSONSerializer.serializeLine(Reply.failure(id: f.id, f.error)))
                        }
                    }
                    try await outbound.write(reply)
                }
                if let w = watch { w.cancel(); await w.value }
            }
        } catch {
            logger.debug("connection ended", metadata: ["error": "\(error)", "peer_pid": "\(peer.peer.pid)"])
        }
    }

    /// Streams one `stats` event per interval until cancelled (a new request or the client
    /// closing). The first event is sent at once.
    private func startWatch(_ env: RequestEnvelope, intervalMs: Int, peer: PeerIdentity,
                            outbound: NIOAsyncChannelOutboundWriter<ByteBuffer>) -> Task<Void, Never> {
        let handler = self.handler
        return Task {
            var previous = WatchMemory()
            var last = ContinuousClock.now
            while !Task.isCancelled {
                let now = ContinuousClock.now
                let event = handler.watchEvent(env, peer: peer, previous: &previous, seconds: (now - last).inSeconds)
                last = now
                do { try await outbound.write(event.line) } catch { return }
                if event.failed { return }
                try? await Task.sleep(for: .milliseconds(intervalMs))
            }
        }
    }
}
