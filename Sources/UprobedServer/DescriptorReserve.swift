import Logging
import NIOCore
import Synchronization
import SystemPackage
import UprobedProtocol
import UprobeSystem
#if canImport(Glibc)
import Glibc
#endif

/// Answers clients that connect while the daemon is out of file descriptors.
///
/// When accept(2) fails with EMFILE or ENFILE, the kernel has already completed the client's
/// connect: it waits in the listen queue with no reply, and NIO backs off accepting for a
/// second and tries again, so such clients hung with nothing logged. This handler, on the
/// listening channel, keeps one descriptor in reserve (an open `/dev/null`). On such an error
/// it gives the reserve back, accepts each queued client on the freed descriptor itself, tells
/// it `too_many_open_files` and closes it, then takes the reserve again.
///
/// Runs on the listening channel's event loop, like NIO's own accepts on the same socket.
final class DescriptorReserve: ChannelInboundHandler {
    typealias InboundIn = any Channel
    typealias InboundOut = any Channel

    private let listenFD: Int32
    private let logger: Logger
    private let counters: ServiceCounters
    /// The reserved descriptor, or -1 while it is given back (or could not be taken again).
    private var spare: Int32
    private var lastLog: ContinuousClock.Instant? = nil

    /// Most clients refused in one go, so a flood cannot keep the event loop here.
    static let maxPerRound = 256

    init(listenFD: Int32, logger: Logger, counters: ServiceCounters) {
        self.listenFD = listenFD
        self.logger = logger
        self.counters = counters
        self.spare = Self.takeSpare()
    }

    deinit { if spare >= 0 { close(spare) } }

    static func takeSpare() -> Int32 { open("/dev/null", O_RDONLY | O_CLOEXEC) }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        if let io = error as? IOError, io.errnoCode == EMFILE || io.errnoCode == ENFILE {
            refuseQueued(errnoCode: io.errnoCode)
        }
        context.fireErrorCaught(error)
    }

    private func refuseQueued(errnoCode: Int32) {
        if spare >= 0 { close(spare) }
        spare = -1
        let line = JSONSerializer.serializeLine(Reply.failure(id: nil, ProtocolError(.tooManyOpenFiles,
            "uprobed is out of file descriptors (\(Errno(rawValue: errnoCode))) and cannot serve this connection; "
                + "retry later. Its operator should raise LimitNOFILE or lower max_connections")))
        var refused = 0
        while refused < Self.maxPerRound {
            // accept(2), not accept4 (Glibc's module hides it); the listening socket is
            // non-blocking, and the accepted one is made so before anything is read from it.
            let fd = accept(listenFD, nil, nil)
            if fd < 0 { break }  // EAGAIN: none left; EMFILE: another thread took the freed descriptor
            _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
            _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK)
            Self.refuse(fd, line: line)
            refused += 1
        }
        spare = Self.takeSpare()
        counters.connectionsRefused.add(UInt64(refused), ordering: .relaxed)
        let now = ContinuousClock.now
        if let last = lastLog, now - last < .seconds(10) { return }
        lastLog = now
        logger.error("out of file descriptors: new connections are refused until some close", metadata: [
            "error_code": "\(ErrorCode.tooManyOpenFiles)", "refused": "\(refused)", "reserve_taken_again": "\(spare >= 0)",
            "hint": "raise LimitNOFILE, or lower max_connections and max_connections_per_uid"])
    }

    /// Writes the refusal and closes. What the client already sent is read first: closing a
    /// socket with unread input resets the connection, and the client would read ECONNRESET
    /// instead of the line. Never blocks (the socket is non-blocking; a client that has not
    /// drained its receive buffer simply loses the line).
    static func refuse(_ fd: Int32, line: [UInt8]) {
        var scratch = [UInt8](repeating: 0, count: 4096)
        for _ in 0..<16 {
            let n = scratch.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, Int32(MSG_DONTWAIT)) }
            if n <= 0 { break }
        }
        _ = line.withUnsafeBytes { send(fd, $0.baseAddress, $0.count, Int32(MSG_DONTWAIT | MSG_NOSIGNAL)) }
        shutdown(fd, Int32(SHUT_WR))
        close(fd)
    }
}
