import SystemPackage
import UprobeSystem
#if canImport(Glibc)
import Glibc
#endif
import UprobedProtocol

/// Why talking to the daemon failed.
public struct ClientError: Error, Sendable, CustomStringConvertible {
    public let message: String
    /// The errno of a failed connect(2) (ENOENT, ECONNREFUSED, EACCES, ...), so a caller can
    /// say what to do about it; nil for every other failure.
    public let connectErrno: Int32?
    public init(_ message: String, connectErrno: Int32? = nil) {
        self.message = message
        self.connectErrno = connectErrno
    }
    public var description: String { message }
}

/// A blocking JSON-lines client on a Unix stream socket: what `uprobectl`, the integration
/// tests and the benchmarks use to talk to `uprobed`. One instance per thread.
public final class LineClient {
    private let fd: Int32
    private var buffer: [UInt8] = []
    private var start = 0
    /// `buffer[start..<scanned]` holds no newline: each byte is searched once, however many
    /// reads a long line takes (a 1.3 MB reply arrives in ~20 reads; rescanning from `start`
    /// after each one cost more than parsing it).
    private var scanned = 0
    /// Reused for every recv(2): allocating (and zeroing) 64 KiB per read dominated the
    /// client's CPU in benchmarks.
    private var chunk = [UInt8](repeating: 0, count: 65536)
    public let socketPath: String

    /// Connects to `socketPath` (socket(2) + connect(2)). `timeoutSeconds` bounds every read.
    public init(socketPath: String, timeoutSeconds: Int = 30) throws(ClientError) {
        self.socketPath = socketPath
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw ClientError(Syscall.lastError("socket", "AF_UNIX").description) }
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        let pathBytes = Array(socketPath.utf8)
        guard pathBytes.count < MemoryLayout.size(ofValue: addr.sun_path) else {
            close(fd)
            throw ClientError("socket path too long: \(socketPath)")
        }
        withUnsafeMutableBytes(of: &addr.sun_path) { raw in
            for (i, b) in pathBytes.enumerated() { raw[i] = b }
        }
        let rc = withUnsafePointer(to: &addr) { p in
            p.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
            }
        }
        guard rc == 0 else {
            let e = errno
            close(fd)
            let hint = e == ENOENT || e == ECONNREFUSED ? " (is uprobed running? set --socket or UPROBED_SOCKET)" : ""
            throw ClientError("cannot connect to \(socketPath): \(Errno(rawValue: e))\(hint)", connectErrno: e)
        }
        var tv = timeval(tv_sec: timeoutSeconds, tv_usec: 0)
        _ = setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        self.fd = fd
    }

    deinit { close(fd) }

    /// Writes raw bytes (used by tests to send malformed lines).
    public func sendRaw(_ bytes: [UInt8]) throws(ClientError) {
        var off = 0
        while off < bytes.count {
            let n = bytes[off...].withUnsafeBytes { Glibc.send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            if n < 0 {
                if errno == EINTR { continue }
                throw ClientError(Syscall.lastError("send", socketPath).description)
            }
            off += n
        }
    }

    public func send(_ value: JSONValue) throws(ClientError) {
        try sendRaw(JSONSerializer.serializeLine(value))
    }

    /// Reads one line (without the newline); nil at end of stream.
    public func readLine() throws(ClientError) -> [UInt8]? {
        while true {
            scanned = max(scanned, start)
            if scanned < buffer.count, let nl = buffer[scanned...].firstIndex(of: 0x0A) {
                let line = Array(buffer[start..<nl])
                start = nl + 1
                scanned = start
                if start > 65536 { buffer.removeFirst(start); start = 0; scanned = 0 }
                return line
            }
            scanned = buffer.count
            let fd = self.fd
            let n = chunk.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            if n < 0 {
                if errno == EINTR { continue }
                if errno == EAGAIN { throw ClientError("timed out waiting for uprobed on \(socketPath)") }
                throw ClientError(Syscall.lastError("recv", socketPath).description)
            }
            if n == 0 { return nil }
            if start == buffer.count { buffer.removeAll(keepingCapacity: true); start = 0; scanned = 0 }
            buffer.append(contentsOf: chunk[0..<n])
        }
    }

    /// Reads and parses one reply line.
    public func readReply() throws(ClientError) -> JSONValue {
        guard let line = try readLine() else { throw ClientError("uprobed closed the connection") }
        do { return try JSONParser.parse(line) } catch {
            throw ClientError("unparseable reply from uprobed: \(error)")
        }
    }

    /// Sends one request object and returns its reply.
    public func call(_ request: JSONObject) throws(ClientError) -> JSONValue {
        try send(.object(request))
        return try readReply()
    }

    /// Half-closes the write side (the daemon sees end of input).
    public func shutdownWrite() { shutdown(fd, Int32(SHUT_WR)) }
}
