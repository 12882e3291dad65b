#ifndef CZLIB_SHIM_H
#define CZLIB_SHIM_H
// zlib for the compressed symbol names (UprobeELF's CompressedNames). ZLIB_CONST makes
// `next_in` a pointer to const, as Swift hands it read-only bytes.
#define ZLIB_CONST
#include <zlib.h>

// deflateInit2 and inflateInit2 are macros (they pass zlib's version and the stream's size),
// which Swift cannot call: these are the same calls as functions. Raw deflate (negative
// window bits): no zlib header or checksum per block, 6 bytes a block saved.
static inline int CZlib_deflateInitRaw(z_streamp stream, int level) {
    return deflateInit2(stream, level, Z_DEFLATED, -MAX_WBITS, MAX_MEM_LEVEL, Z_DEFAULT_STRATEGY);
}

static inline int CZlib_inflateInitRaw(z_streamp stream) {
    return inflateInit2(stream, -MAX_WBITS);
}
#endif
