import NIOCore

/// One unit of input on a connection.
enum LineFrame: Sendable {
    /// A complete line, without its newline.
    case line(ByteBuffer)
    /// A line that exceeded the limit; its bytes were discarded as they arrived.
    case tooLong(limit: Int)
}

/// Splits the byte stream into lines, with a hard limit: a line longer than `maxLength` is
/// reported once (as soon as it crosses the limit) and then skipped up to its newline, so a
/// hostile client cannot make the daemon buffer without bound, and the connection stays usable.
/// A partial line left when the client goes away is dropped: it was never a request.
struct LineFramer: ByteToMessageDecoder {
    typealias InboundOut = LineFrame
    let maxLength: Int
    private var discarding = false
    private var scanned = 0  // bytes of the current line already searched for a newline

    init(maxLength: Int) { self.maxLength = maxLength }

    mutating func decode(context: ChannelHandlerContext, buffer: inout ByteBuffer) throws -> DecodingState {
        let view = buffer.readableBytesView
        if let nl = view[(view.startIndex + scanned)...].firstIndex(of: 0x0A) {
            let length = nl - view.startIndex
            scanned = 0
            if discarding {
                buffer.moveReaderIndex(forwardBy: length + 1)
                discarding = false
                return .continue
            }
            if length > maxLength {
                buffer.moveReaderIndex(forwardBy: length + 1)
                context.fireChannelRead(wrapInboundOut(.tooLong(limit: maxLength)))
                return .continue
            }
            guard var line = buffer.readSlice(length: length) else { return .needMoreData }
            buffer.moveReaderIndex(forwardBy: 1)
            if line.readableBytesView.last == 0x0D { line = line.getSlice(at: line.readerIndex, length: line.readableBytes - 1) ?? line }
            context.fireChannelRead(wrapInboundOut(.line(line)))
            return .continue
        }
        if discarding {
            buffer.moveReaderIndex(forwardBy: buffer.readableBytes)
            scanned = 0
            return .needMoreData
        }
        if buffer.readableBytes > maxLength {
            discarding = true
            buffer.moveReaderIndex(forwardBy: buffer.readableBytes)
            scanned = 0
            context.fireChannelRead(wrapInboundOut(.tooLong(limit: maxLength)))
            return .needMoreData
        }
        scanned = buffer.readableBytes
        return .needMoreData
    }

    mutating func decodeLast(context: ChannelHandlerContext, buffer: inout ByteBuffer, seenEOF: Bool) throws -> DecodingState {
        while try decode(context: context, buffer: &buffer) == .continue {}
        buffer.moveReaderIndex(forwardBy: buffer.readableBytes)
        return .needMoreData
    }
}
