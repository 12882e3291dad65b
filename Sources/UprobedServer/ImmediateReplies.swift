import NIOCore
import Synchronization
import UprobedProtocol

/// What a connection's task tells the `ImmediateReplies` handler on the connection's event loop.
/// Both flags only ever go from false to true.
final class ConnectionGate: Sendable {
    /// The connection was admitted (it is within `max_connections`). Until then nothing is
    /// answered here: a refused connection gets its refusal and nothing else.
    let admitted = Atomic<Bool>(false)
    /// The task started a `watch` stream. From then on the task answers every request, because
    /// any request must first end the stream.
    let watching = Atomic<Bool>(false)
}

/// Answers `stats` and `status` on the event-loop thread that read them. Every other line goes
/// on to the connection's task.
///
/// Why: through the task, a `stats` crosses four threads (event loop → task pool → event loop
/// → client), and each hop can wait for a CPU; answered here it crosses two. `bench-batch`
/// measures the `stats` tail during a register churn (docs/BENCHMARKS.md).
///
/// A request is answered here only when all of these hold:
/// - Every line already passed to the task has had its reply written. Each such line gets
///   exactly one reply, and that reply passes through `write` below on its way out, so an
///   answer written here follows them and replies stay in request order. Blank lines get no
///   reply, so they are dropped here and never reach the task.
/// - The connection is admitted, and has not started a `watch` (see `ConnectionGate`). The task
///   sets `watching` before the stream's first event is written. That write reaches this loop
///   through its task queue, whose lock orders the two, and `pending` stays above zero until
///   the write arrives.
/// - The line is at most `maxLineBytes` long and mentions `"stat`, which is a cheap scan.
///   Spellings with escapes take the normal path.
/// - The registry holds at most `maxProbes` probes. A larger `stats` would hold up the loop's
///   other connections for milliseconds.
/// - The channel is writable: the client reads its replies. A client that pipelines requests
///   and never reads would otherwise have every reply queued here (4.8 GB in 7 s with 10,000
///   probes). Not writable, the line goes to the task, whose writes wait for the client, and
///   `BackPressureHandler` stops reading until then.
/// A line that fails to decode here goes on to the task, which decodes it again and answers
/// with the error.
final class ImmediateReplies: ChannelDuplexHandler {
    typealias InboundIn = LineFrame
    typealias InboundOut = LineFrame
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    static let maxLineBytes = 64 * 1024
    static let maxProbes = 20_000

    private let handler: RequestHandler
    private let peer: PeerIdentity
    private let gate: ConnectionGate
    /// Lines passed to the task whose replies have not been written yet. Event loop only.
    private var pending = 0

    init(handler: RequestHandler, peer: PeerIdentity, gate: ConnectionGate) {
        self.handler = handler
        self.peer = peer
        self.gate = gate
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        if case .line(let buffer) = unwrapInboundIn(data) {
            if Self.isBlank(buffer) { return }  // keep-alive lines: no reply
            if pending == 0, context.channel.isWritable, let reply = answer(buffer) {
                handler.counters.repliesOnEventLoop.add(1, ordering: .relaxed)
                context.writeAndFlush(wrapOutboundOut(reply), promise: nil)
                return
            }
        }
        pending += 1
        context.fireChannelRead(data)
    }

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        // A reply from the task (or, once watching, a stream event; then the count no longer matters).
        if pending > 0 { pending -= 1 }
        context.write(data, promise: promise)
    }

    /// The reply to `line` if it is a `stats` or `status` request that may be answered here.
    private func answer(_ line: ByteBuffer) -> ByteBuffer? {
        guard line.readableBytes <= Self.maxLineBytes, gate.admitted.load(ordering: .relaxed),
              !gate.watching.load(ordering: .relaxed), Self.mentionsStat(line),
              handler.engine.read({ s, _ in s.probes.count }) <= Self.maxProbes,
              case .success(let env) = RequestDecoder.decode(Array(line.readableBytesView), limits: handler.limits)
        else { return nil }
        return handler.replyWithoutWaiting(env, peer: peer)
    }

    static func isBlank(_ line: ByteBuffer) -> Bool {
        line.readableBytesView.allSatisfy { $0 == 0x20 || $0 == 0x09 }
    }

    /// Whether the line contains `"stat` (as `"op": "stats"` and `"op": "status"` do).
    static func mentionsStat(_ line: ByteBuffer) -> Bool {
        line.withUnsafeReadableBytes { raw in
            let quoteStat: [UInt8] = [0x22, 0x73, 0x74, 0x61, 0x74]
            guard raw.count >= quoteStat.count else { return false }
            for i in 0...(raw.count - quoteStat.count) where raw[i] == 0x22 {
                if raw[i + 1] == 0x73 && raw[i + 2] == 0x74 && raw[i + 3] == 0x61 && raw[i + 4] == 0x74 { return true }
            }
            return false
        }
    }
}
