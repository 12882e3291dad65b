// CUprobeSys — syscall wrappers and bpf_attr builders (see include/CUprobeSys.h).
#define _GNU_SOURCE
#include "CUprobeSys.h"

#include <errno.h>
#include <malloc.h>
#include <pthread.h>
#include <string.h>
#include <unistd.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/vfs.h>
#include <sys/mount.h>

// Layout checks against the kernel UAPI (include/uapi/linux/bpf.h, Linux >= 6.6):
// link_create.uprobe_multi starts right after the four u32 heads, i.e. where kprobe_multi
// starts, and is { path@16, offsets@24, ref_ctr_offsets@32, cookies@40, cnt@48, flags@52,
// pid@56 }, making the link_create member 64 bytes long.
#define LC struct CUprobeSys_link_create_uprobe_multi
_Static_assert(offsetof(LC, prog_fd) == offsetof(union bpf_attr, link_create.prog_fd), "prog_fd");
_Static_assert(offsetof(LC, target_fd) == offsetof(union bpf_attr, link_create.target_fd), "target_fd");
_Static_assert(offsetof(LC, attach_type) == offsetof(union bpf_attr, link_create.attach_type), "attach_type");
_Static_assert(offsetof(LC, flags) == offsetof(union bpf_attr, link_create.flags), "flags");
_Static_assert(offsetof(LC, uprobe_multi) == offsetof(union bpf_attr, link_create.kprobe_multi),
               "uprobe_multi overlays kprobe_multi");
_Static_assert(offsetof(LC, uprobe_multi.path) == 16, "path");
_Static_assert(offsetof(LC, uprobe_multi.offsets) == 24, "offsets");
_Static_assert(offsetof(LC, uprobe_multi.ref_ctr_offsets) == 32, "ref_ctr_offsets");
_Static_assert(offsetof(LC, uprobe_multi.cookies) == 40, "cookies");
_Static_assert(offsetof(LC, uprobe_multi.cnt) == 48, "cnt");
_Static_assert(offsetof(LC, uprobe_multi.flags) == 52, "flags");
_Static_assert(offsetof(LC, uprobe_multi.pid) == 56, "pid");
_Static_assert(sizeof(LC) == 64, "link_create is 64 bytes");
_Static_assert(sizeof(union CUprobeSys_bpf_attr) >= sizeof(union bpf_attr), "widened attr");
_Static_assert(offsetof(union bpf_attr, link_create.perf_event.bpf_cookie) == 16, "bpf_cookie");
_Static_assert(sizeof(struct bpf_insn) == 8, "bpf_insn is one u64 word");
#undef LC

static inline __u64 ptr_to_u64(const void *p) { return (__u64)(uintptr_t)p; }

int CUprobeSys_bpf(int cmd, union bpf_attr *attr, unsigned int size) {
    return (int)syscall(__NR_bpf, cmd, attr, size);
}

int CUprobeSys_perf_event_open(struct perf_event_attr *attr, pid_t pid, int cpu,
                               int group_fd, unsigned long flags) {
    return (int)syscall(__NR_perf_event_open, attr, pid, cpu, group_fd, flags);
}

int CUprobeSys_map_create(uint32_t map_type, uint32_t key_size, uint32_t value_size,
                          uint32_t max_entries, uint32_t map_flags, const char *name) {
    union bpf_attr attr;
    memset(&attr, 0, sizeof(attr));
    attr.map_type = map_type;
    attr.key_size = key_size;
    attr.value_size = value_size;
    attr.max_entries = max_entries;
    attr.map_flags = map_flags;
    if (name != NULL) {
        strncpy(attr.map_name, name, sizeof(attr.map_name) - 1);
    }
    return CUprobeSys_bpf(BPF_MAP_CREATE, &attr, sizeof(attr));
}

int CUprobeSys_prog_load(uint32_t prog_type, uint32_t expected_attach_type,
                         const uint64_t *insns, uint32_t insn_cnt, const char *license,
                         const char *name, char *log_buf, uint32_t log_size) {
    union bpf_attr attr;
    memset(&attr, 0, sizeof(attr));
    attr.prog_type = prog_type;
    attr.expected_attach_type = expected_attach_type;
    attr.insns = ptr_to_u64(insns);
    attr.insn_cnt = insn_cnt;
    attr.license = ptr_to_u64(license);
    if (log_buf != NULL && log_size > 0) {
        log_buf[0] = '\0';
        attr.log_buf = ptr_to_u64(log_buf);
        attr.log_size = log_size;
        attr.log_level = 1;
    }
    if (name != NULL) {
        strncpy(attr.prog_name, name, sizeof(attr.prog_name) - 1);
    }
    return CUprobeSys_bpf(BPF_PROG_LOAD, &attr, sizeof(attr));
}

int CUprobeSys_link_create_uprobe_multi(int prog_fd, const char *path, const uint64_t *offsets,
                                        const uint64_t *ref_ctr_offsets, const uint64_t *cookies,
                                        uint32_t cnt, uint32_t flags, uint32_t pid) {
    return CUprobeSys_link_create_uprobe_multi_as(prog_fd, CUPROBESYS_BPF_TRACE_UPROBE_MULTI, path, offsets,
                                                  ref_ctr_offsets, cookies, cnt, flags, pid);
}

int CUprobeSys_link_create_uprobe_multi_as(int prog_fd, uint32_t attach_type, const char *path,
                                           const uint64_t *offsets, const uint64_t *ref_ctr_offsets,
                                           const uint64_t *cookies, uint32_t cnt, uint32_t flags, uint32_t pid) {
    union CUprobeSys_bpf_attr attr;
    memset(&attr, 0, sizeof(attr));
    attr.link_create_uprobe_multi.prog_fd = (__u32)prog_fd;
    attr.link_create_uprobe_multi.attach_type = attach_type;
    attr.link_create_uprobe_multi.uprobe_multi.path = ptr_to_u64(path);
    attr.link_create_uprobe_multi.uprobe_multi.offsets = ptr_to_u64(offsets);
    attr.link_create_uprobe_multi.uprobe_multi.ref_ctr_offsets = ptr_to_u64(ref_ctr_offsets);
    attr.link_create_uprobe_multi.uprobe_multi.cookies = ptr_to_u64(cookies);
    attr.link_create_uprobe_multi.uprobe_multi.cnt = cnt;
    attr.link_create_uprobe_multi.uprobe_multi.flags = flags;
    attr.link_create_uprobe_multi.uprobe_multi.pid = pid;
    return CUprobeSys_bpf(BPF_LINK_CREATE, &attr.base, sizeof(attr));
}

int CUprobeSys_link_create_perf_event(int prog_fd, int perf_fd, uint64_t cookie) {
    union bpf_attr attr;
    memset(&attr, 0, sizeof(attr));
    attr.link_create.prog_fd = (__u32)prog_fd;
    attr.link_create.target_fd = (__u32)perf_fd;
    attr.link_create.attach_type = CUPROBESYS_BPF_PERF_EVENT;
    attr.link_create.perf_event.bpf_cookie = cookie;
    return CUprobeSys_bpf(BPF_LINK_CREATE, &attr, sizeof(attr));
}

static int map_elem_op(int cmd, int map_fd, const void *key, const void *value_or_next,
                       uint64_t flags) {
    union bpf_attr attr;
    memset(&attr, 0, sizeof(attr));
    attr.map_fd = (__u32)map_fd;
    attr.key = ptr_to_u64(key);
    attr.value = ptr_to_u64(value_or_next); // aliases next_key for GET_NEXT_KEY
    attr.flags = flags;
    return CUprobeSys_bpf(cmd, &attr, sizeof(attr));
}

int CUprobeSys_map_lookup_elem(int map_fd, const void *key, void *value) {
    return map_elem_op(BPF_MAP_LOOKUP_ELEM, map_fd, key, value, 0);
}

int CUprobeSys_map_update_elem(int map_fd, const void *key, const void *value, uint64_t flags) {
    return map_elem_op(BPF_MAP_UPDATE_ELEM, map_fd, key, value, flags);
}

int CUprobeSys_map_delete_elem(int map_fd, const void *key) {
    return map_elem_op(BPF_MAP_DELETE_ELEM, map_fd, key, NULL, 0);
}

int CUprobeSys_map_get_next_key(int map_fd, const void *key, void *next_key) {
    return map_elem_op(BPF_MAP_GET_NEXT_KEY, map_fd, key, next_key, 0);
}

int CUprobeSys_map_update_batch(int map_fd, const void *keys, const void *values, uint32_t *count) {
    union bpf_attr attr;
    memset(&attr, 0, sizeof(attr));
    attr.batch.map_fd = (__u32)map_fd;
    attr.batch.keys = ptr_to_u64(keys);
    attr.batch.values = ptr_to_u64(values);
    attr.batch.count = *count;
    int rc = CUprobeSys_bpf(BPF_MAP_UPDATE_BATCH, &attr, sizeof(attr));
    int saved = errno;
    *count = attr.batch.count; // elements updated, also on error
    errno = saved;
    return rc;
}

int CUprobeSys_perf_uprobe_open(uint32_t pmu_type, uint64_t config, const char *path,
                                uint64_t offset, pid_t pid) {
    struct perf_event_attr attr;
    memset(&attr, 0, sizeof(attr));
    attr.size = sizeof(attr);
    attr.type = pmu_type;
    attr.config = config;
    attr.config1 = ptr_to_u64(path);   // uprobe_path
    attr.config2 = offset;             // probe_offset
    attr.sample_period = 1;
    attr.wakeup_events = 1;
    return CUprobeSys_perf_event_open(&attr, pid < 0 ? -1 : pid, pid < 0 ? 0 : -1, -1,
                                      PERF_FLAG_FD_CLOEXEC);
}

int CUprobeSys_raw_tracepoint_open(const char *name, int prog_fd) {
    union bpf_attr attr;
    memset(&attr, 0, sizeof(attr));
    attr.raw_tracepoint.name = ptr_to_u64(name);
    attr.raw_tracepoint.prog_fd = (__u32)prog_fd;
    return CUprobeSys_bpf(BPF_RAW_TRACEPOINT_OPEN, &attr, sizeof(attr));
}

// Ring buffer record header (include/uapi/linux/bpf.h): a u32 length whose top two bits are
// BPF_RINGBUF_BUSY_BIT (still being written) and BPF_RINGBUF_DISCARD_BIT, then a u32 page
// offset; records are 8-byte aligned.
int CUprobeSys_ringbuf_drain(uint64_t *consumer, const uint64_t *producer, const uint8_t *data,
                             uint64_t data_size, struct CUprobeSys_ringbuf_record *out, int max_out) {
    uint64_t cons = __atomic_load_n(consumer, __ATOMIC_ACQUIRE);
    uint64_t prod = __atomic_load_n(producer, __ATOMIC_ACQUIRE);
    int n = 0;
    while (cons < prod) {
        const uint32_t *header = (const uint32_t *)(data + (cons & (data_size - 1)));
        uint32_t len = __atomic_load_n(header, __ATOMIC_ACQUIRE);
        if (len & BPF_RINGBUF_BUSY_BIT) break;
        uint32_t size = len & ~(BPF_RINGBUF_BUSY_BIT | BPF_RINGBUF_DISCARD_BIT);
        if (!(len & BPF_RINGBUF_DISCARD_BIT)) {
            if (n < max_out) {
                memset(&out[n], 0, sizeof(out[n]));
                // The data area is mapped twice in a row, so a record that wraps reads whole.
                memcpy(&out[n], (const uint8_t *)header + BPF_RINGBUF_HDR_SZ,
                       size < sizeof(out[n]) ? size : sizeof(out[n]));
            }
            n++;
        }
        cons += (BPF_RINGBUF_HDR_SZ + size + 7) & ~7ULL;
        __atomic_store_n(consumer, cons, __ATOMIC_RELEASE);
    }
    return n;
}

// The trim threshold outside heap-release windows, and the windows open; both under
// `heap_release_lock`, so a window's end never restores over a later window's begin.
static pthread_mutex_t heap_release_lock = PTHREAD_MUTEX_INITIALIZER;
static size_t kept_trim_threshold = 128 * 1024;  // glibc's default until a process sets its own
static int heap_release_windows = 0;

int CUprobeSys_keep_freed_memory(size_t mmap_threshold, size_t trim_threshold) {
    pthread_mutex_lock(&heap_release_lock);
    kept_trim_threshold = trim_threshold;
    int ok = mallopt(M_MMAP_THRESHOLD, (int)mmap_threshold)
        && (heap_release_windows > 0 || mallopt(M_TRIM_THRESHOLD, (int)trim_threshold));
    pthread_mutex_unlock(&heap_release_lock);
    return ok;
}

void CUprobeSys_heap_release_begin(void) {
    pthread_mutex_lock(&heap_release_lock);
    if (heap_release_windows++ == 0) mallopt(M_TRIM_THRESHOLD, 128 * 1024);
    pthread_mutex_unlock(&heap_release_lock);
}

void CUprobeSys_heap_release_end(void) {
    pthread_mutex_lock(&heap_release_lock);
    if (heap_release_windows > 0 && --heap_release_windows == 0) mallopt(M_TRIM_THRESHOLD, (int)kept_trim_threshold);
    pthread_mutex_unlock(&heap_release_lock);
}

int CUprobeSys_heap_release_windows(void) {
    pthread_mutex_lock(&heap_release_lock);
    int n = heap_release_windows;
    pthread_mutex_unlock(&heap_release_lock);
    return n;
}

int CUprobeSys_set_thread_name(const char *name) {
    return prctl(PR_SET_NAME, (unsigned long)name, 0UL, 0UL, 0UL);
}

int CUprobeSys_memfd_create(const char *name) {
    return (int)syscall(SYS_memfd_create, name, 1u /* MFD_CLOEXEC */);
}

// struct bpf_link_info: the per-type union starts at 16 (after three u32 and padding to 8), so
// uprobe_multi's fields are { path@16, offsets@24, ref_ctr_offsets@32, cookies@40,
// path_size@48, count@52, flags@56, pid@60 } (include/uapi/linux/bpf.h, Linux >= 6.8).
#define LI struct CUprobeSys_uprobe_multi_link_info
_Static_assert(offsetof(struct bpf_link_info, raw_tracepoint) == 16, "link info union at 16");
_Static_assert(offsetof(LI, prog_id) == offsetof(struct bpf_link_info, prog_id), "prog_id");
_Static_assert(offsetof(LI, path) == 16, "path");
_Static_assert(offsetof(LI, cookies) == 40, "cookies");
_Static_assert(offsetof(LI, path_size) == 48, "path_size");
_Static_assert(offsetof(LI, pid) == 60, "pid");
_Static_assert(sizeof(LI) == 64, "uprobe_multi link info is 64 bytes");
#undef LI

int CUprobeSys_obj_pin(int fd, const char *path) {
    union bpf_attr attr;
    memset(&attr, 0, sizeof(attr));
    attr.pathname = ptr_to_u64(path);
    attr.bpf_fd = (__u32)fd;
    return CUprobeSys_bpf(BPF_OBJ_PIN, &attr, sizeof(attr));
}

int CUprobeSys_obj_get(const char *path) {
    union bpf_attr attr;
    memset(&attr, 0, sizeof(attr));
    attr.pathname = ptr_to_u64(path);
    return CUprobeSys_bpf(BPF_OBJ_GET, &attr, sizeof(attr));
}

static int obj_info(int fd, void *info, uint32_t len) {
    union bpf_attr attr;
    memset(&attr, 0, sizeof(attr));
    attr.info.bpf_fd = (__u32)fd;
    attr.info.info_len = len;
    attr.info.info = ptr_to_u64(info);
    return CUprobeSys_bpf(BPF_OBJ_GET_INFO_BY_FD, &attr, sizeof(attr));
}

int CUprobeSys_map_info(int map_fd, uint32_t *type, uint32_t *id, uint32_t *key_size, uint32_t *value_size,
                        uint32_t *max_entries, uint32_t *map_flags) {
    struct bpf_map_info info;
    memset(&info, 0, sizeof(info));
    int rc = obj_info(map_fd, &info, sizeof(info));
    if (rc != 0) return rc;
    *type = info.type;
    *id = info.id;
    *key_size = info.key_size;
    *value_size = info.value_size;
    *max_entries = info.max_entries;
    *map_flags = info.map_flags;
    return 0;
}

int CUprobeSys_prog_info(int prog_fd, uint32_t *id, uint8_t *tag) {
    struct bpf_prog_info info;
    memset(&info, 0, sizeof(info));
    int rc = obj_info(prog_fd, &info, sizeof(info));
    if (rc != 0) return rc;
    *id = info.id;
    memcpy(tag, info.tag, sizeof(info.tag));
    return 0;
}

int CUprobeSys_link_info(int link_fd, struct CUprobeSys_uprobe_multi_link_info *info) {
    return obj_info(link_fd, info, sizeof(*info));
}

int CUprobeSys_fs_type(const char *path, int64_t *type) {
    struct statfs st;
    int rc = statfs(path, &st);
    if (rc == 0) *type = (int64_t)st.f_type;
    return rc;
}

int CUprobeSys_mount_bpffs(const char *target, const char *options) {
    return mount("bpf", target, "bpf", 0, options);
}
