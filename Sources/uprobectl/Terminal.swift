#if canImport(Glibc)
import Glibc
#endif

/// The terminal, driven by hand with termios and ANSI (VT100/xterm) escapes: what every
/// terminal emulator and ssh session understands, without a curses dependency.
enum Terminal {
    struct Size: Equatable { var rows: Int; var columns: Int }

    /// TIOCGWINSZ on `fd`; nil if it is not a terminal or reports 0×0 (some serial consoles).
    static func size(fd: Int32) -> Size? {
        var ws = winsize()
        guard ioctl(fd, UInt(TIOCGWINSZ), &ws) == 0, ws.ws_row > 0, ws.ws_col > 0 else { return nil }
        return Size(rows: Int(ws.ws_row), columns: Int(ws.ws_col))
    }

    enum Escape {
        static let alternateScreenOn = "\u{1B}[?1049h"
        static let alternateScreenOff = "\u{1B}[?1049l"
        static let hideCursor = "\u{1B}[?25l"
        static let showCursor = "\u{1B}[?25h"
        static let home = "\u{1B}[H"
        static let clearToEndOfLine = "\u{1B}[K"
        static let clearToEndOfScreen = "\u{1B}[J"
        static let reverse = "\u{1B}[7m"
        static let bold = "\u{1B}[1m"
        static let reset = "\u{1B}[0m"
    }
}
